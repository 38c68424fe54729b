"""What is sampled: ``System`` objects and the registry of bundled systems."""

from bgplugin.systems.registry import get_system, list_systems, systems_dir
from bgplugin.systems.system import (
    CollectiveVariable,
    MolecularSystem,
    ParticleSystem,
    System,
    backbone_dihedrals,
    element_types,
)

__all__ = [
    "CollectiveVariable",
    "MolecularSystem",
    "ParticleSystem",
    "System",
    "backbone_dihedrals",
    "element_types",
    "get_system",
    "list_systems",
    "systems_dir",
]
