"""Parallel tempering with openmmtools: one ``Dataset`` per temperature, swap statistics, ``u_kln`` for MBAR.

openmmtools' ``ParallelTemperingSampler`` runs the replicas and
``MultiStateReporter`` stores them in netCDF (``<storage>`` plus
``<storage stem>_checkpoint.nc``). Positions of every atom are stored at
every iteration (``analysis_particle_indices`` = all atoms; without them they
exist only every ``checkpoint_interval`` iterations). Calling
:func:`run_parallel_tempering` again with the same storage resumes from its
last checkpoint (``from_storage(...).extend(...)``) up to ``n_iterations``.

Frames are sorted by thermodynamic state, not by replica: the dataset of
temperature ``T_k`` holds, for every iteration, the configuration of the
replica that was in state ``k`` during that iteration's MD.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import openmm.unit as unit
from tqdm.auto import tqdm

from bgplugin.data import Dataset, provenance
from bgplugin.simulation._openmm import check_md_settings, platform_and_properties, require_molecular

logger = logging.getLogger(__name__)

ReplicaMixing = Literal["swap-all", "swap-neighbors"]
MBAR_LOG_WEIGHTS_DEFINITION = (
    "MBAR log-weight of each frame (pooled over all temperatures) for the thermodynamic state at {temperature} K"
)


@dataclass
class ParallelTemperingResult:
    """Per-state datasets and statistics of a parallel-tempering run.

    Attributes
    ----------
    datasets : list of Dataset
        One per thermodynamic state in ascending temperature; frame ``n`` is
        iteration ``n + 1`` (the minimised start, iteration 0, is left out).
    temperatures : ndarray, shape (n_states,), K
    u_kln : ndarray, shape (n_states, n_states, n_iterations)
        ``u_kln[k, l, n]``: reduced potential (kT) in state ``l`` of the frame
        of state ``k`` at iteration ``n + 1`` (pymbar's layout).
    replica_state : ndarray of int, shape (n_iterations + 1, n_replicas)
        State of each replica at each iteration (row 0: the start).
    n_accepted, n_proposed : ndarray of int, shape (n_states, n_states)
        Swap counts between states, summed over iterations.
    storage : Path
    metadata : dict
    """

    datasets: list[Dataset]
    temperatures: np.ndarray
    u_kln: np.ndarray
    replica_state: np.ndarray
    n_accepted: np.ndarray
    n_proposed: np.ndarray
    storage: Path
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_iterations(self) -> int:
        return int(self.u_kln.shape[2])

    @property
    def acceptance(self) -> np.ndarray:
        """Swap acceptance rate between neighbouring temperatures, shape (n_states - 1,) (NaN if never proposed)."""
        k = np.arange(len(self.temperatures) - 1)
        acc = self.n_accepted[k, k + 1] + self.n_accepted[k + 1, k]
        prop = self.n_proposed[k, k + 1] + self.n_proposed[k + 1, k]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(prop > 0, acc / np.maximum(prop, 1), np.nan)

    def reweighted(self, state: int = 0, discard: int = 0) -> Dataset:
        """All frames of all temperatures, with MBAR log-weights for one state.

        Parameters
        ----------
        state : int
            Target thermodynamic state (0 = lowest temperature).
        discard : int
            Leading iterations to drop from every state (equilibration).

        Returns
        -------
        Dataset
            Frames ordered by state, then iteration; ``log_weights`` are
            MBAR's ``log W_nk`` for ``state``.
        """
        from pymbar import MBAR  # imported here: pymbar prints a banner on import

        n_states = len(self.temperatures)
        if not 0 <= state < n_states:
            raise ValueError(f"state must be in 0..{n_states - 1}, got {state}")
        if not 0 <= discard < self.n_iterations:
            raise ValueError(f"discard must be in 0..{self.n_iterations - 1}, got {discard}")
        u = self.u_kln[:, :, discard:]
        n = u.shape[2]
        u_kn = np.transpose(u, (1, 0, 2)).reshape(n_states, n_states * n)
        mbar = MBAR(u_kn, np.full(n_states, n))
        log_w = np.asarray(mbar.Log_W_nk[:, state], dtype=np.float64)
        frames = np.concatenate([d.positions[discard:] for d in self.datasets])
        first = self.datasets[0]
        meta = dict(first.metadata)
        meta.update(
            method="parallel_tempering_mbar",
            temperature=float(self.temperatures[state]),
            discard=discard,
            segment_lengths=[n] * n_states,  # frames per state, in state order
            estimated_log_weights=True,
        )
        return Dataset(
            frames,
            first.topology,
            log_w,
            MBAR_LOG_WEIGHTS_DEFINITION.format(temperature=float(self.temperatures[state])),
            meta,
            None,
            first.units,
        )


def geometric_temperatures(t_min: float, t_max: float, n: int) -> np.ndarray:
    """``n`` temperatures from ``t_min`` to ``t_max`` K in geometric progression (equal ratios)."""
    if not 0 < t_min < t_max or n < 2:
        raise ValueError(f"need 0 < t_min < t_max and n >= 2, got t_min={t_min}, t_max={t_max}, n={n}")
    return t_min * (t_max / t_min) ** (np.arange(n) / (n - 1))


def run_parallel_tempering(
    system: Any,
    temperatures: Sequence[float] | None = None,
    n_iterations: int = 1000,
    steps_per_iteration: int = 500,
    *,
    storage: str | Path,
    temperature_range: tuple[float, float, int] | None = None,
    timestep: float = 1.0,
    friction: float = 1.0,
    platform: str = "CPU",
    platform_properties: dict[str, str] | None = None,
    checkpoint_interval: int = 10,
    minimize: bool = True,
    replica_mixing: ReplicaMixing = "swap-all",
    progress: bool = True,
) -> ParallelTemperingResult:
    """Parallel tempering (replica exchange in temperature) of a molecular system.

    Parameters
    ----------
    system : MolecularSystem
    temperatures : sequence of float or None
        The ladder in K (sorted ascending here). Give this or ``temperature_range``.
    n_iterations : int
        Total iterations (counting earlier sessions with the same storage).
    steps_per_iteration : int
        Langevin steps between swap attempts.
    storage : path
        netCDF file (``.nc``); its checkpoint goes next to it as
        ``<stem>_checkpoint.nc``. If it exists, the run resumes.
    temperature_range : (float, float, int) or None
        ``(T_min, T_max, n)``: a geometric ladder of ``n`` temperatures.
    timestep, friction : float
        fs and 1/ps (``LangevinDynamicsMove``, a ``LangevinMiddleIntegrator``);
        1 fs for bgplugin's unconstrained systems.
    platform, platform_properties
        OpenMM platform of the context caches (``Threads=1`` on CPU by default).
    checkpoint_interval : int
        Iterations between full checkpoints (velocities, for resuming). A
        resumed run restarts from the last one and redoes later iterations.
    minimize : bool
        Minimise every replica before the first iteration.
    replica_mixing : {"swap-all", "swap-neighbors"}
    progress : bool
        Progress bar over iterations.

    Returns
    -------
    ParallelTemperingResult

    Notes
    -----
    openmmtools draws the integrators' random seeds itself, so runs are not
    bitwise reproducible; the metadata says so (``seeds``).
    """
    from openmmtools import cache, mcmc, states
    from openmmtools.multistate import MultiStateReporter, ParallelTemperingSampler

    require_molecular(system, "run_parallel_tempering")
    ladder = _ladder(temperatures, temperature_range)
    check_md_settings(float(ladder[0]), timestep, friction, steps_per_iteration)
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    if checkpoint_interval < 1:
        raise ValueError(f"checkpoint_interval must be >= 1, got {checkpoint_interval}")
    if replica_mixing not in ("swap-all", "swap-neighbors"):
        raise ValueError(f"replica_mixing must be 'swap-all' or 'swap-neighbors', got {replica_mixing!r}")
    omm_platform, properties = platform_and_properties(platform, platform_properties)
    storage = Path(storage)
    storage.parent.mkdir(parents=True, exist_ok=True)
    checkpoint_file = storage.with_name(f"{storage.stem}_checkpoint.nc")
    n_atoms = system.topology.n_atoms

    start = time.perf_counter()
    reporter = MultiStateReporter(
        str(storage), checkpoint_interval=checkpoint_interval, analysis_particle_indices=list(range(n_atoms))
    )
    if storage.exists():
        stored = _stored_temperatures(storage)
        if stored.shape != ladder.shape or not np.allclose(stored, ladder, rtol=0, atol=1e-3):
            reporter.close()
            raise ValueError(
                f"{storage} holds a run at temperatures {np.round(stored, 3).tolist()} K, not "
                f"{np.round(ladder, 3).tolist()}; use the same ladder to resume, or another storage path"
            )
        sampler = ParallelTemperingSampler.from_storage(reporter)
        _check_stored_move(sampler, storage, steps_per_iteration, timestep, friction, reporter)
        logger.info("parallel tempering: resuming %s from iteration %d", storage, sampler.iteration)
    else:
        if checkpoint_file.exists():
            raise FileExistsError(
                f"{checkpoint_file} exists without {storage}: delete it (openmmtools refuses to overwrite it)"
            )
        move = mcmc.LangevinDynamicsMove(
            timestep=timestep * unit.femtosecond,
            collision_rate=friction / unit.picosecond,
            n_steps=int(steps_per_iteration),
            reassign_velocities=False,
        )
        sampler = ParallelTemperingSampler(
            mcmc_moves=move, number_of_iterations=int(n_iterations), replica_mixing_scheme=replica_mixing
        )
        _use_platform(sampler, cache, omm_platform, properties)
        thermo = states.ThermodynamicState(system.openmm_system, temperature=float(ladder[0]) * unit.kelvin)
        start_state = states.SamplerState(system.positions * unit.nanometer)
        # openmmtools 0.27: temperatures=[...] needs n_temperatures too, or create() raises TypeError
        sampler.create(
            thermo,
            start_state,
            reporter,
            temperatures=[float(t) * unit.kelvin for t in ladder],
            n_temperatures=len(ladder),
        )
        if minimize:
            sampler.minimize()
    _use_platform(sampler, cache, omm_platform, properties)

    chunk = max(1, min(checkpoint_interval, 50))
    bar = tqdm(
        total=n_iterations,
        initial=min(sampler.iteration, n_iterations),
        unit="it",
        desc="parallel tempering",
        disable=not progress,
    )
    try:
        while sampler.iteration < n_iterations:
            before = sampler.iteration
            sampler.extend(min(chunk, n_iterations - sampler.iteration))
            bar.update(sampler.iteration - before)
    finally:
        bar.close()
        reporter.close()
    wall = time.perf_counter() - start
    settings = {
        "temperatures": ladder.tolist(),
        "steps_per_iteration": int(steps_per_iteration),
        "timestep_fs": float(timestep),
        "friction_per_ps": float(friction),
        "platform": platform,
        "checkpoint_interval": int(checkpoint_interval),
        "replica_mixing": replica_mixing,
    }
    return read_parallel_tempering(storage, system, settings=settings, wall_time_s=wall, progress=progress)


def _ladder(temperatures: Sequence[float] | None, temperature_range: tuple[float, float, int] | None) -> np.ndarray:
    if (temperatures is None) == (temperature_range is None):
        raise ValueError("give either temperatures=[T1, T2, ...] (K) or temperature_range=(T_min, T_max, n)")
    if temperature_range is not None:
        t_min, t_max, n = temperature_range
        return geometric_temperatures(float(t_min), float(t_max), int(n))
    ladder = np.sort(np.asarray(temperatures, dtype=np.float64))
    if ladder.ndim != 1 or len(ladder) < 2 or ladder[0] <= 0 or np.any(np.diff(ladder) <= 0):
        raise ValueError(f"temperatures must be at least 2 distinct positive values in K, got {temperatures}")
    return ladder


def _check_stored_move(
    sampler: Any, storage: Path, steps_per_iteration: int, timestep: float, friction: float, reporter: Any
) -> None:
    """A resumed sampler uses the stored move; refuse to resume with different dynamics."""
    moves = sampler.mcmc_moves
    move = moves[0] if isinstance(moves, list) else moves
    stored = {
        "steps_per_iteration": int(move.n_steps),
        "timestep": float(move.timestep.value_in_unit(unit.femtosecond)),
        "friction": float(move.collision_rate.value_in_unit(unit.picosecond**-1)),
    }
    wanted = {"steps_per_iteration": int(steps_per_iteration), "timestep": float(timestep), "friction": float(friction)}
    diffs = [f"{k}: stored {stored[k]:g}, now {wanted[k]:g}" for k in stored if not np.isclose(stored[k], wanted[k])]
    if diffs:
        reporter.close()
        raise ValueError(
            f"{storage} was run with other dynamics ({'; '.join(diffs)}); resume with the stored settings or use "
            "another storage path"
        )


def _use_platform(sampler: Any, cache: Any, platform: Any, properties: dict[str, str]) -> None:
    """Give the sampler its own context caches on our platform (the global cache picks the 'fastest')."""
    sampler.energy_context_cache = cache.ContextCache(platform=platform, platform_properties=properties)
    sampler.sampler_context_cache = cache.ContextCache(platform=platform, platform_properties=properties)


def _stored_temperatures(storage: Path) -> np.ndarray:
    from openmmtools.multistate import MultiStateReporter

    reader = MultiStateReporter(str(storage), open_mode="r")
    try:
        thermo_states, _ = reader.read_thermodynamic_states()
        return np.array([s.temperature.value_in_unit(unit.kelvin) for s in thermo_states])
    finally:
        reader.close()


def read_parallel_tempering(
    storage: str | Path,
    system: Any,
    *,
    settings: dict[str, Any] | None = None,
    wall_time_s: float | None = None,
    progress: bool = True,
) -> ParallelTemperingResult:
    """Read a parallel-tempering storage file into per-state datasets (see :func:`run_parallel_tempering`).

    Parameters
    ----------
    storage : path
        The ``.nc`` file.
    system : MolecularSystem
        Provides the topology (and name) of the frames.
    settings : dict or None
        Recorded in the metadata.
    wall_time_s : float or None
        Recorded in the metadata.
    progress : bool
        Progress bar over the stored iterations.
    """
    from openmmtools.multistate import MultiStateReporter

    storage = Path(storage)
    if not storage.is_file():
        raise FileNotFoundError(f"no parallel-tempering storage at {storage}")
    reader = MultiStateReporter(str(storage), open_mode="r")
    try:
        thermo_states, _ = reader.read_thermodynamic_states()
        temperatures = np.array([s.temperature.value_in_unit(unit.kelvin) for s in thermo_states])
        last = reader.read_last_iteration(last_checkpoint=False)
        replica_state = np.asarray(reader.read_replica_thermodynamic_states())[: last + 1].astype(int)
        energies = np.asarray(reader.read_energies()[0])[: last + 1]  # (iteration, replica, state)
        n_acc, n_prop = reader.read_mixing_statistics()
        n_acc = np.asarray(n_acc)[1 : last + 1].sum(axis=0)
        n_prop = np.asarray(n_prop)[1 : last + 1].sum(axis=0)
        n_states = len(temperatures)
        if n_states != replica_state.shape[1]:
            raise ValueError(
                f"{storage}: {replica_state.shape[1]} replicas for {n_states} states is not parallel tempering"
            )
        positions = np.empty((n_states, last, system.topology.n_atoms, 3), dtype=np.float32)
        u_kln = np.empty((n_states, n_states, last))
        for it in tqdm(range(1, last + 1), desc="reading storage", unit="it", disable=not progress, leave=False):
            sampler_states = reader.read_sampler_states(it, analysis_particles_only=True)
            for replica, state_index in enumerate(replica_state[it]):
                positions[state_index, it - 1] = sampler_states[replica].positions.value_in_unit(unit.nanometer)
                u_kln[state_index, :, it - 1] = energies[it, replica, :]
    finally:
        reader.close()
    order = np.argsort(temperatures)
    if np.any(order != np.arange(n_states)):
        raise ValueError(f"{storage}: thermodynamic states are not in ascending temperature ({temperatures})")
    steps = (settings or {}).get("steps_per_iteration")
    dt = (settings or {}).get("timestep_fs")
    meta_common = {
        "system": getattr(system, "name", None),
        "engine": "openmmtools",
        "method": "parallel_tempering",
        "temperatures": temperatures.tolist(),
        "settings": settings or {},
        "seeds": {"note": "openmmtools draws integrator seeds itself; runs are not bitwise reproducible"},
        "wall_time_s": wall_time_s,
        "storage": str(storage),
        "n_iterations": int(last),
        "provenance": provenance(),
    }
    datasets = []
    for k in range(n_states):
        meta = dict(meta_common, temperature=float(temperatures[k]), state_index=k)
        time_ps = None if steps is None or dt is None else np.arange(1, last + 1) * steps * dt / 1000.0
        datasets.append(Dataset(positions[k], system.topology, metadata=meta, time=time_ps))
    return ParallelTemperingResult(
        datasets=datasets,
        temperatures=temperatures,
        u_kln=u_kln,
        replica_state=replica_state,
        n_accepted=np.asarray(n_acc, dtype=np.int64),
        n_proposed=np.asarray(n_prop, dtype=np.int64),
        storage=storage,
        metadata=meta_common,
    )
