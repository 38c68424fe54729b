"""Reduced GFN2-xTB energies and forces: xtb-python (default) or tblite, one calculator per worker.

xTB works in atomic units (Bohr, Hartree); positions arrive in nm and results
leave in kT and kT/nm. Each worker keeps its calculator and restarts the SCF
from the previous frame's wavefunction. A frame whose SCF fails is retried
once from scratch and once at a higher electronic temperature before it gets
``+inf``. Workers run with ``OMP_NUM_THREADS=1``: xtb-python slows down badly
with more OpenMP threads on small molecules; parallelise over processes.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal

import numpy as np

from bgplugin.energies.base import FailurePolicy, FrameStatus
from bgplugin.energies.engine import ChunkResult, Engine, EngineEnergy, EngineSpec, screen_frames
from bgplugin.units import BOHR_PER_NM, KJ_PER_MOL_PER_HARTREE, kt_kj_per_mol

logger = logging.getLogger(__name__)

Backend = Literal["xtb", "tblite"]
BACKENDS: tuple[str, ...] = ("xtb", "tblite")
#: Boltzmann constant in Hartree per kelvin (tblite takes the electronic temperature in Hartree).
KB_HARTREE_PER_K = 3.166811563e-6


def available_backends() -> dict[str, str | None]:
    """Installed xTB backends and their versions (None when missing)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    found: dict[str, str | None] = {}
    for name, module in (("xtb", "xtb.interface"), ("tblite", "tblite.interface")):
        try:
            importlib.import_module(module)
            found[name] = metadata.version(name)
        except (ImportError, metadata.PackageNotFoundError):
            found[name] = None
    return found


@dataclass(frozen=True)
class XTBSpec(EngineSpec):
    """Everything a worker needs to build one xTB calculator."""

    numbers: tuple[int, ...]
    charge: int
    uhf: int
    method: str
    solvent: str | None
    backend: str
    temperature: float
    electronic_temperature: float
    retry_electronic_temperature: float
    max_iterations: int
    overlap_distance: float
    max_energy: float

    def build(self) -> XTBEngine:
        return XTBEngine(self)


class XTBEngine(Engine):
    """One xTB calculator, reused across frames with wavefunction restarts."""

    def __init__(self, spec: XTBSpec) -> None:
        self.spec = spec
        self.kt = kt_kj_per_mol(spec.temperature)
        self.numbers = np.asarray(spec.numbers, dtype=np.int32)
        self._calc: Any = None
        self._restart: Any = None
        if spec.backend == "xtb":
            from xtb.interface import XTBException

            self._errors: tuple[type[BaseException], ...] = (XTBException,)
        else:
            from tblite.exceptions import TBLiteRuntimeError, TBLiteValueError

            self._errors = (TBLiteRuntimeError, TBLiteValueError)

    def _new_calculator(self, positions_bohr: np.ndarray, electronic_temperature: float) -> Any:
        spec = self.spec
        if spec.backend == "xtb":
            from xtb.interface import Calculator
            from xtb.libxtb import VERBOSITY_MUTED
            from xtb.utils import get_method, get_solvent

            calc = Calculator(get_method(spec.method), self.numbers, positions_bohr, charge=spec.charge, uhf=spec.uhf)
            calc.set_verbosity(VERBOSITY_MUTED)
            calc.set_electronic_temperature(electronic_temperature)
            calc.set_max_iterations(spec.max_iterations)
            if spec.solvent is not None:
                calc.set_solvent(get_solvent(spec.solvent))
        else:
            from tblite.interface import Calculator

            calc = Calculator(spec.method, self.numbers, positions_bohr, charge=spec.charge, uhf=spec.uhf)
            calc.set("verbosity", 0)
            calc.set("temperature", electronic_temperature * KB_HARTREE_PER_K)
            calc.set("max-iter", spec.max_iterations)
            if spec.solvent is not None:
                calc.add("gbsa-solvation", spec.solvent)
        return calc

    def _singlepoint(self, positions_bohr: np.ndarray) -> tuple[float, np.ndarray]:
        """Energy (Hartree) and gradient (Hartree/Bohr), reusing calculator and wavefunction."""
        if self._calc is None:
            self._calc = self._new_calculator(positions_bohr, self.spec.electronic_temperature)
            self._restart = None
        else:
            self._calc.update(positions_bohr)
        self._restart = self._calc.singlepoint(self._restart)
        if self.spec.backend == "xtb":
            return float(self._restart.get_energy()), np.asarray(self._restart.get_gradient())
        return float(self._restart.get("energy")), np.asarray(self._restart.get("gradient"))

    def _attempts(self, positions_bohr: np.ndarray) -> tuple[float, np.ndarray]:
        """Restarted SCF, then from scratch, then at the higher electronic temperature."""
        try:
            return self._singlepoint(positions_bohr)
        except self._errors as first:
            logger.debug("xTB failed with restart (%s); retrying from scratch", first)
        self._calc = None
        try:
            return self._singlepoint(positions_bohr)
        except self._errors as second:
            logger.debug("xTB failed from scratch (%s); retrying at higher electronic temperature", second)
        try:
            calc = self._new_calculator(positions_bohr, self.spec.retry_electronic_temperature)
            result = calc.singlepoint()
        finally:
            self._calc = None  # the next frame starts from a calculator at the normal temperature
        logger.warning(
            "xTB SCF converged only at electronic temperature %.0f K for one frame",
            self.spec.retry_electronic_temperature,
        )
        if self.spec.backend == "xtb":
            return float(result.get_energy()), np.asarray(result.get_gradient())
        return float(result.get("energy")), np.asarray(result.get("gradient"))

    def evaluate(self, x: np.ndarray, need_forces: bool) -> ChunkResult:
        status = screen_frames(x, self.spec.overlap_distance)
        u = np.full(len(x), np.inf)
        f = np.zeros_like(x)
        to_kt = KJ_PER_MOL_PER_HARTREE / self.kt
        for k in np.flatnonzero(status == FrameStatus.OK):
            try:
                energy, gradient = self._attempts(x[k] * BOHR_PER_NM)
            except self._errors as exc:
                message = str(exc).lower()
                status[k] = FrameStatus.SCF_NOT_CONVERGED if "converge" in message else FrameStatus.ENGINE_ERROR
                logger.debug("xTB failed on frame %d: %s", k, exc)
                continue
            energy_kt = energy * to_kt
            forces = -gradient * to_kt * BOHR_PER_NM
            if not np.isfinite(energy_kt) or not np.isfinite(forces).all():
                status[k] = FrameStatus.NON_FINITE
            elif energy_kt > self.spec.max_energy:
                status[k] = FrameStatus.ENERGY_TOO_HIGH
            else:
                u[k] = energy_kt
                f[k] = forces
        return u, f, status


class XTBEnergy(EngineEnergy):
    r"""Reduced GFN2-xTB energy :math:`u = E_\mathrm{xTB}/k_BT` in worker processes.

    Parameters
    ----------
    numbers : sequence of int
        Atomic numbers, shape (n_atoms,). ``System.atomic_numbers`` gives them.
    charge, uhf : int
        Total charge and number of unpaired electrons.
    method : str
        ``"GFN2-xTB"`` (default) or ``"GFN1-xTB"``.
    solvent : str or None
        Implicit solvent name (GBSA), e.g. ``"water"``; None for vacuum.
    backend : {"xtb", "tblite"}
        xtb-python (default) or tblite; both give the same energies to 1e-4 kJ/mol.
    temperature : float
        K; the temperature of kT.
    n_workers : int
        Worker processes (0 = in-process).
    electronic_temperature, retry_electronic_temperature : float
        Fermi smearing in K for normal evaluations and for the last retry.
    max_iterations : int
        SCF iteration limit.
    overlap_distance : float
        Frames with two atoms closer than this (nm) are ``OVERLAP``.
    max_energy : float
        Energies above this (kT) count as failed: xTB returns large finite
        energies for near-overlapping atoms instead of failing.
    executor, chunk_size, timeout, failure_policy
        See :class:`~bgplugin.energies.engine.EngineEnergy`.
    """

    def __init__(
        self,
        numbers: Sequence[int] | np.ndarray,
        charge: int = 0,
        uhf: int = 0,
        method: str = "GFN2-xTB",
        solvent: str | None = None,
        backend: Backend = "xtb",
        *,
        temperature: float = 300.0,
        n_workers: int = 1,
        electronic_temperature: float = 300.0,
        retry_electronic_temperature: float = 1000.0,
        max_iterations: int = 250,
        overlap_distance: float = 0.03,
        max_energy: float = 0.0,
        executor: Executor | None = None,
        chunk_size: int = 64,
        timeout: float = 600.0,
        failure_policy: FailurePolicy | str = FailurePolicy.INF,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        installed = available_backends()
        if installed[backend] is None:
            other = [b for b, v in installed.items() if v is not None]
            instead = f"or use backend={other[0]!r}" if other else "no other xTB backend is installed either"
            raise ImportError(f"xTB backend {backend!r} is not installed; pip install {backend} ({instead})")
        if method not in ("GFN2-xTB", "GFN1-xTB"):
            raise ValueError(f"method must be 'GFN2-xTB' or 'GFN1-xTB', got {method!r}")
        numbers = tuple(int(z) for z in np.asarray(numbers).ravel())
        if not numbers or min(numbers) < 1 or max(numbers) > 86:
            raise ValueError(f"numbers must be atomic numbers 1..86 (GFN2-xTB), got {numbers}")
        if max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
        spec = XTBSpec(
            numbers=numbers,
            charge=int(charge),
            uhf=int(uhf),
            method=method,
            solvent=solvent,
            backend=backend,
            temperature=float(temperature),
            electronic_temperature=float(electronic_temperature),
            retry_electronic_temperature=float(retry_electronic_temperature),
            max_iterations=int(max_iterations),
            overlap_distance=float(overlap_distance),
            max_energy=float(max_energy),
        )
        super().__init__(
            spec,
            len(numbers),
            float(temperature),
            n_workers=n_workers,
            executor=executor,
            chunk_size=chunk_size,
            timeout=timeout,
            failure_policy=failure_policy,
        )
        self.backend = backend

    def __repr__(self) -> str:
        return (
            f"XTBEnergy(n_atoms={self.n_particles}, method={self.spec.method!r}, "  # type: ignore[attr-defined]
            f"backend={self.backend!r}, n_workers={self.n_workers})"
        )
