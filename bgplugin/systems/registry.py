"""The bundled systems: YAML definitions in the top-level ``systems/`` folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

from bgplugin.systems.system import CollectiveVariable, MolecularSystem, ParticleSystem, System

_MOLECULE_KEYS = {"kind", "description", "pdb", "forcefield", "temperature", "implicit_solvent", "cvs", "atom_groups"}
_PARTICLE_KEYS = {"kind", "description", "n_particles", "dim", "temperature", "parameters"}


def systems_dir() -> Path:
    """Where the system files live: ``$BGPLUGIN_SYSTEMS_DIR``, the source tree, or the install prefix."""
    candidates = [
        os.environ.get("BGPLUGIN_SYSTEMS_DIR"),
        Path(__file__).resolve().parents[2] / "systems",
        Path(sys.prefix) / "share" / "bgplugin" / "systems",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "dw4.yaml").is_file():
            return Path(candidate)
    raise FileNotFoundError(
        "bgplugin's systems/ folder was not found (looked in "
        f"{[str(c) for c in candidates if c]}); set BGPLUGIN_SYSTEMS_DIR to it"
    )


def list_systems() -> list[str]:
    """Names accepted by :func:`get_system`."""
    return sorted(p.stem for p in systems_dir().glob("*.yaml"))


def get_system(name: str, **options: Any) -> System:
    """A bundled system by name.

    Parameters
    ----------
    name : str
        One of :func:`list_systems`: ``dw4``, ``lj13``, ``lj55``,
        ``alanine_dipeptide`` (ff99SB-ILDN + OBC), ``alanine_dipeptide_vacuum``.
    **options
        For molecules: ``distinguishable`` (atom indices, names or a group such
        as ``"backbone"``) and ``temperature``. For particle systems:
        ``temperature``.
    """
    names = list_systems()
    if name not in names:
        raise ValueError(f"unknown system {name!r}; choose one of {names}, or use MolecularSystem.from_pdb(...)")
    path = systems_dir() / f"{name}.yaml"
    with open(path) as handle:
        spec = yaml.safe_load(handle)
    kind = spec.get("kind")
    allowed = _MOLECULE_KEYS if kind == "molecule" else _PARTICLE_KEYS
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    allowed_options = {"distinguishable", "temperature"} if kind == "molecule" else {"temperature"}
    bad = set(options) - allowed_options
    if bad:
        raise ValueError(f"get_system({name!r}) got unknown options {sorted(bad)}; allowed: {sorted(allowed_options)}")
    temperature = float(options.get("temperature", spec["temperature"]))
    if kind == "molecule":
        cvs = {
            cv_name: CollectiveVariable(cv_name, cv["type"], tuple(cv["atoms"]))
            for cv_name, cv in (spec.get("cvs") or {}).items()
        }
        return MolecularSystem.from_pdb(
            path.parent / spec["pdb"],
            forcefield=spec["forcefield"],
            temperature=temperature,
            implicit_solvent=spec.get("implicit_solvent"),
            name=name,
            cvs=cvs,
            atom_groups=spec.get("atom_groups"),
            distinguishable=options.get("distinguishable"),
            description=spec.get("description", ""),
        )
    return ParticleSystem(
        name,
        kind,
        int(spec["n_particles"]),
        int(spec["dim"]),
        temperature,
        spec.get("parameters"),
        spec.get("description", ""),
    )
