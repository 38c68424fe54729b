"""Reduced energies u(x) in kT: batched, differentiable, failure-safe.

``Energy`` is the contract; ``ParticleEnergy`` subclasses are pure torch,
``OpenMMEnergy`` and ``XTBEnergy`` run external engines in worker processes.
"""

from bgplugin.energies.base import (
    Energy,
    EnergyEvaluationError,
    EnergyResult,
    FailurePolicy,
    FrameStatus,
    summarize_status,
)
from bgplugin.energies.engine import EngineEnergy, EngineSpec
from bgplugin.energies.openmm_energy import OpenMMEnergy, available_platforms, make_context
from bgplugin.energies.particles import DoubleWellEnergy, LennardJonesEnergy, ParticleEnergy
from bgplugin.energies.pool import WorkerDiedError, WorkerPool
from bgplugin.energies.xtb_energy import XTBEnergy, available_backends

__all__ = [
    "DoubleWellEnergy",
    "Energy",
    "EnergyEvaluationError",
    "EnergyResult",
    "EngineEnergy",
    "EngineSpec",
    "FailurePolicy",
    "FrameStatus",
    "LennardJonesEnergy",
    "OpenMMEnergy",
    "ParticleEnergy",
    "WorkerDiedError",
    "WorkerPool",
    "XTBEnergy",
    "available_backends",
    "available_platforms",
    "make_context",
    "summarize_status",
]
