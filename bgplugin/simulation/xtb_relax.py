"""Relax MD frames under GFN2-xTB with ASE Langevin dynamics (the EFM data recipe).

Each frame is integrated for a short time (default 100 fs) with ASE's
``Langevin`` under a GFN2-xTB calculator (xtb-python or tblite), starting
from Maxwell-Boltzmann momenta and with the centre of mass fixed. Frames run
in parallel worker processes (one OpenMP thread each). A frame that cannot be
relaxed (overlapping atoms or NaN coordinates, a failed SCF, a non-finite
result, a dead or hung worker) is reported with its reason and left out; the
others are returned.

ASE's friction is in inverse ASE time units: ``friction=0.5`` is
0.5 / 10.18 fs = 49 ps^-1 (not 0.5 in Hartree atomic units, which would be
about 20 fs^-1, strongly overdamped).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor, Future, as_completed
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from bgplugin.data import Dataset, provenance
from bgplugin.energies import FrameStatus, WorkerDiedError, WorkerPool, available_backends
from bgplugin.energies.engine import screen_frames
from bgplugin.simulation._openmm import resolve_seed

logger = logging.getLogger(__name__)

Backend = Literal["xtb", "tblite"]
#: Frames with two atoms closer than this (nm) are not sent to xTB.
OVERLAP_DISTANCE = 0.03


class RelaxationFailed(RuntimeError):
    """xTB could not relax one frame (the message says why)."""


@dataclass(frozen=True)
class _RelaxTask:
    numbers: tuple[int, ...]
    positions: np.ndarray  # (n_atoms, 3) nm
    fs: float
    timestep_fs: float
    friction: float
    temperature: float
    backend: str
    solvent: str | None
    charge: int
    seed: int


def _relax_frame(task: _RelaxTask) -> tuple[np.ndarray, float]:
    """Worker entry point: Langevin under GFN2-xTB.

    Returns
    -------
    positions : ndarray, shape (n_atoms, 3), nm
    energy : float
        Final GFN2-xTB potential energy, kJ/mol.
    """
    from ase import Atoms, units
    from ase.calculators.calculator import CalculatorError
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta

    atoms = Atoms(numbers=list(task.numbers), positions=task.positions * 10.0)  # nm -> Angstrom
    if task.backend == "xtb":
        from xtb.ase.calculator import XTB

        atoms.calc = XTB(method="GFN2-xTB", solvent=task.solvent or "None")
        atoms.set_initial_charges([task.charge] + [0] * (len(atoms) - 1))
    else:
        from tblite.ase import TBLite

        atoms.calc = TBLite(
            method="GFN2-xTB",
            charge=task.charge,
            verbosity=0,
            solvation=None if task.solvent is None else ("alpb", task.solvent),
        )
    atoms.set_constraint(FixCom())
    rng = np.random.default_rng(task.seed)
    n_steps = max(1, int(round(task.fs / task.timestep_fs)))
    try:
        thermalize_momenta(atoms, temperature_K=task.temperature, rng=rng)
        dyn = Langevin(
            atoms,
            timestep=task.timestep_fs * units.fs,
            temperature_K=task.temperature,
            friction=task.friction,
            fixcm=False,
            rng=rng,
        )
        dyn.run(n_steps)
        energy = float(atoms.get_potential_energy()) / (units.kJ / units.mol)
    except CalculatorError as exc:
        raise RelaxationFailed(f"xTB failed: {exc}") from None
    positions = atoms.get_positions() / 10.0
    if not (np.isfinite(energy) and np.isfinite(positions).all()):
        raise RelaxationFailed(f"non-finite result (energy {energy} kJ/mol)")
    return positions, energy


@dataclass
class RelaxationResult:
    """Frames relaxed under GFN2-xTB.

    Attributes
    ----------
    dataset : Dataset
        The relaxed frames that succeeded, in input order.
    kept : ndarray of int, shape (n_kept,)
        Their indices in the input dataset.
    energies : ndarray, shape (n_kept,), kJ/mol
        Final GFN2-xTB potential energies.
    failures : dict of int to str
        Input frame index -> reason, for every frame left out.
    """

    dataset: Dataset
    kept: np.ndarray
    energies: np.ndarray
    failures: dict[int, str] = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        return len(self.failures)


def relax_with_xtb(
    dataset: Dataset,
    fs: float = 100.0,
    timestep_fs: float = 1.0,
    friction: float = 0.5,
    temperature: float = 300.0,
    backend: Backend = "xtb",
    n_workers: int = 2,
    *,
    numbers: np.ndarray | None = None,
    solvent: str | None = None,
    charge: int = 0,
    seed: int | None = None,
    max_bond_ratio: float = 1.5,
    executor: Executor | None = None,
    timeout_per_frame: float = 600.0,
    progress: bool = True,
) -> RelaxationResult:
    """Relax each frame with ASE Langevin dynamics under GFN2-xTB.

    Parameters
    ----------
    dataset : Dataset
        Molecular frames (nm) with a topology (its elements give the atomic
        numbers) or pass ``numbers``.
    fs : float
        Length of each relaxation, fs.
    timestep_fs : float
        ASE time step, fs.
    friction : float
        ASE Langevin friction in inverse ASE time units (0.5 = 49 ps^-1).
    temperature : float
        K, for the momenta and the thermostat.
    backend : {"xtb", "tblite"}
        xtb-python or tblite's ASE calculator.
    n_workers : int
        Worker processes (0 = in this process); ignored with ``executor``.
    numbers : ndarray of int or None
        Atomic numbers, shape (n_atoms,), when the dataset has no topology.
    solvent : str or None
        Implicit solvent (GBSA for xtb, ALPB for tblite), e.g. ``"water"``.
    charge : int
        Total charge.
    seed : int or None
        Frame ``i`` uses ``seed + i`` for its momenta and noise; None draws one.
    max_bond_ratio : float
        A relaxed frame in which a bond of the topology is longer than this
        times the sum of the two atoms' covalent radii (ASE's table) counts
        as broken (the molecule exploded) and is left out; needs a topology
        with bonds, otherwise no bond check is made.
    executor : Executor or None
        Run frames here instead of a new :class:`~bgplugin.energies.WorkerPool`.
    timeout_per_frame : float
        s; a frame running longer is failed and its worker replaced
        (applies to the built-in pool).
    progress : bool
        Progress bar over frames.

    Returns
    -------
    RelaxationResult
    """
    if not fs > 0 or not timestep_fs > 0:
        raise ValueError(f"fs and timestep_fs must be > 0, got fs={fs}, timestep_fs={timestep_fs}")
    if not friction > 0:
        raise ValueError(f"friction must be > 0 (inverse ASE time units; 0.5 = 49/ps), got {friction}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 K, got {temperature}")
    if backend not in ("xtb", "tblite"):
        raise ValueError(f"backend must be 'xtb' or 'tblite', got {backend!r}")
    if available_backends()[backend] is None:
        raise ImportError(f"xTB backend {backend!r} is not installed; pip install {backend}")
    if n_workers < 0:
        raise ValueError(f"n_workers must be >= 0 (0 = in-process), got {n_workers}")
    if dataset.dim != 3 or dataset.units != "nm":
        raise ValueError(
            f"relax_with_xtb needs molecular frames in nm (3D), got dim={dataset.dim}, units={dataset.units}"
        )
    if numbers is None:
        if dataset.topology is None:
            raise ValueError("the dataset has no topology: pass numbers=<atomic numbers>")
        numbers = np.array([a.element.atomic_number for a in dataset.topology.atoms])
    numbers = np.asarray(numbers, dtype=int)
    if numbers.shape != (dataset.n_particles,):
        raise ValueError(f"numbers must have shape ({dataset.n_particles},), got {numbers.shape}")
    if not max_bond_ratio > 1:
        raise ValueError(f"max_bond_ratio must be > 1, got {max_bond_ratio}")
    seed = resolve_seed(seed)
    bonds = _bond_limits(dataset, numbers, max_bond_ratio)

    x = np.asarray(dataset.positions, dtype=np.float64)
    status = screen_frames(x, OVERLAP_DISTANCE)
    failures: dict[int, str] = {
        int(i): (
            "NaN coordinates"
            if status[i] == FrameStatus.NAN_COORDINATES
            else f"atoms closer than {OVERLAP_DISTANCE} nm"
        )
        for i in np.flatnonzero(status != FrameStatus.OK)
    }
    todo = [int(i) for i in np.flatnonzero(status == FrameStatus.OK)]
    tasks = {
        i: _RelaxTask(
            tuple(int(z) for z in numbers),
            x[i],
            float(fs),
            float(timestep_fs),
            float(friction),
            float(temperature),
            backend,
            solvent,
            int(charge),
            seed + i,
        )
        for i in todo
    }
    results: dict[int, tuple[np.ndarray, float]] = {}
    start = time.perf_counter()
    bar = tqdm(total=len(x), initial=len(failures), unit="frame", desc="xTB relaxation", disable=not progress)
    try:
        if executor is None and n_workers == 0:
            for i, task in tasks.items():
                try:
                    results[i] = _relax_frame(task)
                except RelaxationFailed as exc:
                    failures[i] = str(exc)
                bar.update(1)
        else:
            own_pool = None
            if executor is None:
                own_pool = executor = WorkerPool(max(1, min(n_workers, len(tasks))), task_timeout=timeout_per_frame)
            try:
                futures: dict[Future[tuple[np.ndarray, float]], int] = {
                    executor.submit(_relax_frame, task): i for i, task in tasks.items()
                }
                for future in as_completed(futures):
                    i = futures[future]
                    try:
                        results[i] = future.result()
                    except RelaxationFailed as exc:
                        failures[i] = str(exc)
                    except WorkerDiedError as exc:
                        failures[i] = f"worker died: {exc}"
                    except TimeoutError:
                        failures[i] = f"timed out after {timeout_per_frame} s"
                    bar.update(1)
            finally:
                if own_pool is not None:
                    own_pool.shutdown(wait=False, cancel_futures=True)
    finally:
        bar.close()
    for i in sorted(results):
        broken = _broken_bond(results[i][0], *bonds) if bonds is not None else None
        if broken is not None:
            failures[i] = broken
            del results[i]
    if failures:
        logger.warning(
            "xTB relaxation failed for %d of %d frames (left out): %s",
            len(failures),
            len(x),
            dict(sorted(failures.items())[:10]),
        )
    kept = np.array(sorted(results), dtype=int)
    positions = np.array([results[i][0] for i in kept]).reshape(len(kept), dataset.n_particles, 3)
    energies = np.array([results[i][1] for i in kept])
    meta = {
        "system": dataset.metadata.get("system"),
        "temperature": float(temperature),
        "engine": f"GFN2-xTB ({backend}) via ASE",
        "method": "xtb_langevin_relaxation",
        "settings": {
            "fs": fs,
            "timestep_fs": timestep_fs,
            "friction_ase_units": friction,
            "friction_per_ps": friction / _ase_time_fs() * 1000.0,
            "temperature": temperature,
            "backend": backend,
            "solvent": solvent,
            "charge": charge,
            "max_bond_ratio": max_bond_ratio,
        },
        "seeds": {"base": seed, "frame": "seed + input frame index"},
        "wall_time_s": time.perf_counter() - start,
        "source": {
            "metadata": dataset.metadata,
            "kept_indices": kept,
            "failures": {str(k): v for k, v in failures.items()},
        },
        "provenance": provenance(),
    }
    relaxed = Dataset(
        positions,
        dataset.topology,
        None if dataset.log_weights is None else dataset.log_weights[kept],
        None
        if dataset.log_weights is None
        else f"{dataset.log_weights_definition} (of each frame before xTB relaxation)",
        meta,
        None if dataset.time is None else dataset.time[kept],
        dataset.units,
    )
    return RelaxationResult(relaxed, kept, energies, dict(sorted(failures.items())))


def _bond_limits(dataset: Dataset, numbers: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Bonded atom pairs (n_bonds, 2) of the topology and their longest allowed length in nm."""
    from ase.data import covalent_radii  # Angstrom

    if dataset.topology is None or dataset.topology.n_bonds == 0:
        logger.info("no bonds in the topology: relaxed frames are not checked for broken bonds")
        return None
    pairs = np.array([[a.index, b.index] for a, b in dataset.topology.bonds])
    limits = ratio * (covalent_radii[numbers[pairs[:, 0]]] + covalent_radii[numbers[pairs[:, 1]]]) / 10.0
    return pairs, limits


def _broken_bond(x: np.ndarray, pairs: np.ndarray, limits: np.ndarray) -> str | None:
    """A description of the most stretched bond beyond its limit, or None."""
    lengths = np.linalg.norm(x[pairs[:, 0]] - x[pairs[:, 1]], axis=1)
    excess = lengths / limits
    worst = int(np.argmax(excess))
    if excess[worst] <= 1.0:
        return None
    i, j = pairs[worst]
    return f"bond {i}-{j} broken after relaxation ({lengths[worst]:.3f} nm; limit {limits[worst]:.3f} nm)"


def _ase_time_fs() -> float:
    """ASE's unit of time in fs (about 10.18)."""
    from ase import units

    return 1.0 / units.fs
