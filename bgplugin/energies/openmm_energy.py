"""Reduced energies and forces from OpenMM, one Context per worker process."""

from __future__ import annotations

import logging
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import openmm

from bgplugin.energies.base import FailurePolicy, FrameStatus
from bgplugin.energies.engine import ChunkResult, Engine, EngineEnergy, EngineSpec, screen_frames
from bgplugin.units import kt_kj_per_mol

logger = logging.getLogger(__name__)

#: Platforms that run in the calling process by default (a GPU context per worker wastes memory).
IN_PROCESS_PLATFORMS = ("CUDA", "OpenCL", "HIP", "Metal")


def available_platforms() -> list[str]:
    """Names of the OpenMM platforms that load on this machine."""
    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def make_context(
    system: openmm.System, platform: str = "CPU", properties: dict[str, str] | None = None
) -> openmm.Context:
    """An OpenMM Context for single-point evaluations (its integrator is never stepped).

    ``properties`` default to ``{"Threads": "1"}`` on the CPU platform.
    """
    names = available_platforms()
    if platform not in names:
        raise ValueError(f"OpenMM platform {platform!r} is not available here; choose one of {names}")
    if properties is None:
        properties = {"Threads": "1"} if platform == "CPU" else {}
    integrator = openmm.VerletIntegrator(0.001)
    return openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform), properties)


@dataclass(frozen=True)
class OpenMMSpec(EngineSpec):
    """An OpenMM system (serialised) and where to run it."""

    system_xml: str
    platform: str
    properties: tuple[tuple[str, str], ...]
    temperature: float
    overlap_distance: float
    max_energy: float

    def build(self) -> OpenMMEngine:
        system = openmm.XmlSerializer.deserialize(self.system_xml)
        context = make_context(system, self.platform, dict(self.properties))
        return OpenMMEngine(context, self)


class OpenMMEngine(Engine):
    """Loops over frames with one Context; converts kJ/mol to kT at the boundary."""

    def __init__(self, context: openmm.Context, spec: OpenMMSpec) -> None:
        self.context = context
        self.spec = spec
        self.kt = kt_kj_per_mol(spec.temperature)

    def evaluate(self, x: np.ndarray, need_forces: bool) -> ChunkResult:
        status = screen_frames(x, self.spec.overlap_distance)
        energy = np.full(len(x), np.nan)
        forces = np.zeros_like(x)
        # The loop only moves numbers: checks and unit conversion run vectorised afterwards.
        # State quantities are always in OpenMM's MD units (kJ/mol, kJ/mol/nm), so the raw
        # values are read without a per-frame unit conversion.
        for k in np.flatnonzero(status == FrameStatus.OK):
            try:
                self.context.setPositions(x[k])
                state = self.context.getState(getEnergy=True, getForces=need_forces)
            except openmm.OpenMMException as exc:
                logger.debug("OpenMM raised on frame %d: %s", k, exc)
                status[k] = FrameStatus.ENGINE_ERROR
                continue
            energy[k] = state.getPotentialEnergy()._value
            if need_forces:
                forces[k] = state.getForces(asNumpy=True)._value
        evaluated = status == FrameStatus.OK
        u = energy / self.kt
        f = forces / self.kt
        finite = np.isfinite(u) & np.isfinite(f).reshape(len(x), -1).all(axis=1)
        status[evaluated & ~finite] = FrameStatus.NON_FINITE
        status[evaluated & finite & (u > self.spec.max_energy)] = FrameStatus.ENERGY_TOO_HIGH
        failed = status != FrameStatus.OK
        u[failed] = np.inf
        f[failed] = 0.0
        return u, f, status


class OpenMMEnergy(EngineEnergy):
    r"""Reduced potential energy :math:`u = U/k_BT` of an OpenMM system.

    Parameters
    ----------
    system : bgplugin System or openmm.System
        A molecular :class:`~bgplugin.systems.System` (its temperature is used),
        or a bare ``openmm.System`` together with ``temperature``.
    platform : str
        OpenMM platform name (``"CPU"``, ``"Reference"``, ``"CUDA"``, ``"OpenCL"``).
    n_workers : int or None
        Worker processes, each with one Context (``Threads=1`` on CPU). Default:
        1 for CPU/Reference, 0 (in-process) for GPU platforms.
    platform_properties : dict or None
        Passed to the Context; default ``{"Threads": "1"}`` on CPU.
    temperature : float or None
        Kelvin; required when ``system`` is a bare ``openmm.System``.
    overlap_distance : float
        Frames with two atoms closer than this (nm) are ``OVERLAP`` and never
        reach OpenMM.
    max_energy : float
        Energies above this (kT) are treated as failures (``ENERGY_TOO_HIGH``);
        OpenMM's Reference platform returns huge finite numbers for near overlaps.
    executor, chunk_size, timeout, failure_policy
        See :class:`~bgplugin.energies.engine.EngineEnergy`.
    """

    def __init__(
        self,
        system: object,
        platform: str = "CPU",
        n_workers: int | None = None,
        *,
        platform_properties: dict[str, str] | None = None,
        temperature: float | None = None,
        overlap_distance: float = 0.01,
        max_energy: float = 1e10,
        executor: Executor | None = None,
        chunk_size: int = 256,
        timeout: float = 600.0,
        failure_policy: FailurePolicy | str = FailurePolicy.INF,
    ) -> None:
        omm_system = system if isinstance(system, openmm.System) else getattr(system, "openmm_system", None)
        if not isinstance(omm_system, openmm.System):
            raise TypeError(
                f"system must be an openmm.System or a molecular bgplugin System, got {type(system).__name__}"
            )
        if temperature is None:
            temperature = getattr(system, "temperature", None)
            if temperature is None:
                raise ValueError("temperature (K) is required when passing a bare openmm.System")
        names = available_platforms()
        if platform not in names:
            raise ValueError(f"OpenMM platform {platform!r} is not available here; choose one of {names}")
        if platform_properties is None:
            platform_properties = {"Threads": "1"} if platform == "CPU" else {}
        if n_workers is None:
            n_workers = 0 if platform in IN_PROCESS_PLATFORMS else 1
        spec = OpenMMSpec(
            system_xml=openmm.XmlSerializer.serialize(omm_system),
            platform=platform,
            properties=tuple(sorted(platform_properties.items())),
            temperature=float(temperature),
            overlap_distance=float(overlap_distance),
            max_energy=float(max_energy),
        )
        super().__init__(
            spec,
            omm_system.getNumParticles(),
            float(temperature),
            n_workers=n_workers,
            executor=executor,
            chunk_size=chunk_size,
            timeout=timeout,
            failure_policy=failure_policy,
        )
        self.platform = platform

    def __repr__(self) -> str:
        return (
            f"OpenMMEnergy(n_particles={self.n_particles}, temperature={self.temperature}, "
            f"platform={self.platform!r}, n_workers={self.n_workers})"
        )
