"""Shared OpenMM plumbing for the engines: system checks, seeds, platforms, Langevin integrators."""

from __future__ import annotations

import hashlib
import logging
import secrets
from typing import Any

import numpy as np
import openmm
import openmm.unit as unit

from bgplugin.energies import available_platforms

logger = logging.getLogger(__name__)

#: Largest seed OpenMM accepts (a signed 32-bit int).
MAX_SEED = 2**31 - 1


def require_molecular(system: Any, caller: str) -> None:
    """Fail fast unless ``system`` is a molecular bgplugin System (an OpenMM system, topology, positions)."""
    missing = [name for name in ("openmm_system", "topology", "positions", "temperature") if not hasattr(system, name)]
    if missing or not isinstance(getattr(system, "openmm_system", None), openmm.System):
        raise TypeError(
            f"{caller} needs a molecular System (get_system('alanine_dipeptide') or MolecularSystem.from_pdb(...)) "
            f"with an OpenMM force field; got {type(system).__name__}. Particle systems have torch energies: sample "
            "them with an MCMC sampler or load published data with Dataset.from_npy"
        )


def resolve_seed(seed: int | None) -> int:
    """A seed in 1..2**31-1; a fresh random one for None (OpenMM treats 0 as 'pick one for me')."""
    if seed is None:
        return secrets.randbelow(MAX_SEED) + 1
    if not 1 <= int(seed) <= MAX_SEED:
        raise ValueError(
            f"seed must be in 1..{MAX_SEED} (OpenMM reads 0 as 'choose a random seed', which is not reproducible); "
            f"got {seed}"
        )
    return int(seed)


def platform_and_properties(name: str, properties: dict[str, str] | None) -> tuple[openmm.Platform, dict[str, str]]:
    """An OpenMM platform by name and its properties (``Threads=1`` on CPU unless given)."""
    names = available_platforms()
    if name not in names:
        raise ValueError(f"OpenMM platform {name!r} is not available here; choose one of {names}")
    if properties is None:
        properties = {"Threads": "1"} if name == "CPU" else {}
    return openmm.Platform.getPlatformByName(name), dict(properties)


def check_md_settings(temperature: float, timestep: float, friction: float, stride: int | None = None) -> None:
    """Validate the common Langevin settings (K, fs, 1/ps, steps)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 K, got {temperature}")
    if not timestep > 0:
        raise ValueError(f"timestep must be > 0 fs, got {timestep}")
    if timestep > 1.0:
        logger.warning(
            "timestep=%g fs: bgplugin's molecular systems have no constraints, so bonds to hydrogen vibrate freely "
            "and need a step of at most 1 fs",
            timestep,
        )
    if not friction > 0:
        raise ValueError(f"friction must be > 0 per ps, got {friction}")
    if stride is not None and stride < 1:
        raise ValueError(f"stride must be >= 1 step, got {stride}")


def langevin(temperature: float, friction: float, timestep: float, seed: int) -> openmm.LangevinMiddleIntegrator:
    """``LangevinMiddleIntegrator`` at ``temperature`` K, ``friction`` 1/ps, ``timestep`` fs, seeded."""
    integrator = openmm.LangevinMiddleIntegrator(
        temperature * unit.kelvin, friction / unit.picosecond, timestep * unit.femtosecond
    )
    integrator.setRandomNumberSeed(seed)
    return integrator


def system_digest(system: openmm.System) -> str:
    """SHA-256 of the serialised OpenMM system (identifies it across runs)."""
    return hashlib.sha256(openmm.XmlSerializer.serialize(system).encode()).hexdigest()


def positions_nm(context: openmm.Context) -> np.ndarray:
    """Current positions, shape (n_atoms, 3), nm, float64."""
    state = context.getState(getPositions=True)
    return np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))


def minimize_and_equilibrate(
    context: openmm.Context,
    integrator: openmm.Integrator,
    positions: np.ndarray,
    temperature: float,
    seed: int,
    minimize: bool,
    equilibration_steps: int,
) -> None:
    """Set positions, minimise (optional), draw Maxwell-Boltzmann velocities, run equilibration steps."""
    context.setPositions(np.asarray(positions, dtype=np.float64))
    if minimize:
        openmm.LocalEnergyMinimizer.minimize(context)
    context.setVelocitiesToTemperature(temperature * unit.kelvin, seed)
    if equilibration_steps > 0:
        integrator.step(int(equilibration_steps))
