r"""Umbrella sampling along a dihedral, MBAR, and a free-energy profile with bootstrap errors.

Each window adds a periodic harmonic bias on the dihedral (OpenMM
``CustomTorsionForce``)

.. math:: U_k(\phi) = \tfrac12 K\, \mathrm{wrap}(\phi - c_k)^2,
   \qquad \mathrm{wrap}(d) = d - 2\pi \lfloor d / 2\pi + \tfrac12 \rfloor,

and runs Langevin MD in its own worker process. The analysis
(:func:`analyze_umbrella`) discards each window's equilibration and keeps an
uncorrelated subsample (``pymbar.timeseries``), solves MBAR on the biases
(the unbiased potential cancels: all windows share the temperature), checks
the overlap of neighbouring windows, builds the histogram profile with
``pymbar.FES`` and bootstraps it (frames resampled within each window and
MBAR solved again, once per replicate). Every production frame also gets its
unbiased MBAR log-weight, so umbrella data serve as weighted training data.

We bootstrap in our own loop rather than with ``FES.generate_fes(n_bootstraps=...)``:
pymbar 4.0.3 re-solves MBAR once per window inside each replicate (K times
the cost) and gives bins that a replicate happens not to visit ``f = 0``
instead of leaving them out.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Executor, Future, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openmm
from scipy.special import logsumexp
from tqdm.auto import tqdm

from bgplugin.data import Dataset, DatasetFormatError, provenance
from bgplugin.energies import WorkerPool
from bgplugin.fileio import write_json
from bgplugin.simulation._openmm import (
    check_md_settings,
    langevin,
    minimize_and_equilibrate,
    platform_and_properties,
    positions_nm,
    require_molecular,
    resolve_seed,
    system_digest,
)
from bgplugin.simulation.profiles import (
    PHI_NEGATIVE,
    PHI_POSITIVE,
    CVRange,
    FreeEnergyDifference,
    FreeEnergyProfile,
    delta_f,
    plot_profile,
)
from bgplugin.systems import CollectiveVariable
from bgplugin.units import kt_kj_per_mol

logger = logging.getLogger(__name__)

#: Global parameters of the bias force (names unlikely to clash with a force field's).
K_PARAMETER = "bgplugin_umbrella_k"
CENTER_PARAMETER = "bgplugin_umbrella_center"
#: pymbar's rule of thumb: neighbouring windows should overlap by at least this much.
DEFAULT_OVERLAP_THRESHOLD = 0.03
LOG_WEIGHTS_DEFINITION = (
    "MBAR unbiased log-weight of each production frame: -log sum_k N_k exp(f_k - u_k(x)), u_k = reduced "
    "umbrella bias of window k, f_k = MBAR window free energies, N_k = frames kept from window k"
)


class UmbrellaOverlapWarning(UserWarning):
    """Neighbouring umbrella windows overlap too little for a reliable profile."""


def dihedral_bias_force(atoms: Sequence[int], k: float, center: float) -> openmm.CustomTorsionForce:
    """Periodic harmonic bias ``0.5 k wrap(theta - center)^2`` on one dihedral.

    Parameters
    ----------
    atoms : 4 ints
    k : float
        kJ/mol/rad^2 (global parameter ``bgplugin_umbrella_k``).
    center : float
        rad (global parameter ``bgplugin_umbrella_center``).
    """
    if len(atoms) != 4:
        raise ValueError(f"a dihedral bias needs 4 atoms, got {list(atoms)}")
    force = openmm.CustomTorsionForce(
        f"0.5*{K_PARAMETER}*dw^2; dw = dt - two_pi*floor(dt/two_pi + 0.5); dt = theta - {CENTER_PARAMETER}; "
        f"two_pi = {2 * math.pi!r}"
    )
    force.addGlobalParameter(K_PARAMETER, float(k))
    force.addGlobalParameter(CENTER_PARAMETER, float(center))
    force.addTorsion(*(int(a) for a in atoms), [])
    return force


def wrap_angle(d: np.ndarray) -> np.ndarray:
    """Angle differences wrapped to [-pi, pi), the same convention as the bias force."""
    return d - 2 * np.pi * np.floor(d / (2 * np.pi) + 0.5)


def reduced_bias(cv_values: np.ndarray, centers: np.ndarray, k: float, temperature: float) -> np.ndarray:
    """Reduced bias of every window at every sample.

    Parameters
    ----------
    cv_values : ndarray, shape (n,), rad
    centers : ndarray, shape (n_windows,), rad
    k : float
        kJ/mol/rad^2.
    temperature : float
        K.

    Returns
    -------
    ndarray, shape (n_windows, n), kT
    """
    d = wrap_angle(np.asarray(cv_values)[None, :] - np.asarray(centers)[:, None])
    return 0.5 * k * d**2 / kt_kj_per_mol(temperature)


# ------------------------------------------------------------------ windows
@dataclass(frozen=True)
class _WindowTask:
    """Everything a worker needs to run one window (picklable)."""

    index: int
    system_xml: str
    positions: np.ndarray
    center: float
    temperature: float
    timestep: float
    friction: float
    seed: int
    platform: str
    properties: tuple[tuple[str, str], ...]
    equilibration_steps: int
    n_frames: int
    stride: int


def _simulate_window(task: _WindowTask) -> tuple[np.ndarray, float]:
    """Worker entry point: minimise, equilibrate and sample one window.

    Returns
    -------
    positions : ndarray, shape (n_frames, n_atoms, 3), float32, nm
    wall_time : float, s
    """
    start = time.perf_counter()
    system = openmm.XmlSerializer.deserialize(task.system_xml)
    integrator = langevin(task.temperature, task.friction, task.timestep, task.seed)
    platform, properties = platform_and_properties(task.platform, dict(task.properties))
    context = openmm.Context(system, integrator, platform, properties)
    context.setParameter(CENTER_PARAMETER, task.center)
    minimize_and_equilibrate(
        context, integrator, task.positions, task.temperature, task.seed, True, task.equilibration_steps
    )
    frames = np.empty((task.n_frames, system.getNumParticles(), 3), dtype=np.float32)
    for i in range(task.n_frames):
        integrator.step(task.stride)
        frames[i] = positions_nm(context)
    return frames, time.perf_counter() - start


def run_umbrella(
    system: Any,
    cv: str | CollectiveVariable = "phi",
    centers: Sequence[float] | np.ndarray | None = None,
    k: float = 200.0,
    ns_per_window: float = 1.0,
    *,
    n_windows: int = 36,
    temperature: float | None = None,
    timestep: float = 1.0,
    friction: float = 1.0,
    stride: int = 100,
    equilibration_ps: float = 20.0,
    seed: int | None = None,
    platform: str = "CPU",
    platform_properties: dict[str, str] | None = None,
    n_workers: int = 2,
    executor: Executor | None = None,
    n_bins: int = 36,
    n_bootstraps: int = 100,
    overlap_threshold: float = DEFAULT_OVERLAP_THRESHOLD,
    output_dir: str | Path | None = None,
    progress: bool = True,
) -> UmbrellaResult:
    r"""Umbrella sampling along a dihedral CV, analysed with MBAR.

    Parameters
    ----------
    system : MolecularSystem
    cv : str or CollectiveVariable
        A dihedral: a name in ``system.cvs`` (default ``"phi"``) or a CV.
    centers : sequence of float or None
        Window centres in rad; default ``n_windows`` centres evenly spaced
        on [-pi, pi).
    k : float
        Bias force constant, kJ/mol/rad^2 (the window width is
        :math:`\sqrt{k_BT/k}`: 6.4 degrees for 200 at 300 K; with 36 windows the
        smallest neighbour overlap was 0.07 in a 10 ps-per-window alanine
        dipeptide test).
    ns_per_window : float
        Production time per window, ns.
    n_windows : int
        Number of default centres.
    temperature : float or None
        K; default ``system.temperature``.
    timestep, friction, stride
        fs, 1/ps, and steps between saved frames.
    equilibration_ps : float
        Biased MD before production in each window (after minimisation).
    seed : int or None
        Window ``i`` uses ``seed + i``; None draws a seed (recorded).
    platform, platform_properties
        OpenMM platform in each worker (``Threads=1`` on CPU by default).
    n_workers : int
        Worker processes (one window each at a time); ignored with ``executor``.
    executor : Executor or None
        Run windows here instead (e.g. a ``dask.distributed`` client's executor).
    n_bins : int
        Profile bins on [-pi, pi].
    n_bootstraps : int
        Bootstrap replicates for the profile's and ``delta_f``'s errors.
    overlap_threshold : float
        Warn (:class:`UmbrellaOverlapWarning`) when neighbouring windows'
        MBAR overlap is below this.
    output_dir : path or None
        Save each finished window (``window_XXX.h5``) and the results
        (``profile.json``, ``profile.png``, ``umbrella.h5``,
        ``summary.json``) here. A rerun with the same directory and settings
        reuses the finished windows.
    progress : bool
        Progress bar over windows.

    Returns
    -------
    UmbrellaResult
    """
    require_molecular(system, "run_umbrella")
    cv_obj = _resolve_cv(system, cv)
    temperature = float(system.temperature if temperature is None else temperature)
    check_md_settings(temperature, timestep, friction, stride)
    if not k > 0:
        raise ValueError(f"k must be > 0 kJ/mol/rad^2, got {k}")
    if not ns_per_window > 0:
        raise ValueError(f"ns_per_window must be > 0, got {ns_per_window}")
    if centers is None:
        if n_windows < 2:
            raise ValueError(f"n_windows must be >= 2, got {n_windows}")
        centers_arr = -np.pi + 2 * np.pi * np.arange(n_windows) / n_windows
    else:
        centers_arr = np.asarray(centers, dtype=np.float64)
        if centers_arr.ndim != 1 or len(centers_arr) < 2:
            raise ValueError(f"centers must be a 1D sequence of at least 2 angles (rad), got {centers_arr}")
        if np.any(np.abs(centers_arr) > np.pi + 1e-9):
            raise ValueError(f"centers must be in radians within [-pi, pi], got {centers_arr}")
    platform_and_properties(platform, platform_properties)  # fail fast in the caller, not in the workers
    properties = tuple(sorted((platform_properties or ({"Threads": "1"} if platform == "CPU" else {})).items()))
    seed = resolve_seed(seed)
    steps_per_ps = 1000.0 / timestep
    n_frames = max(1, int(round(ns_per_window * 1000.0 * steps_per_ps / stride)))
    equilibration_steps = int(round(equilibration_ps * steps_per_ps))

    biased = openmm.XmlSerializer.clone(system.openmm_system)
    biased.addForce(dihedral_bias_force(cv_obj.atoms, k, 0.0))
    system_xml = openmm.XmlSerializer.serialize(biased)
    settings = {
        "cv": cv_obj.name,
        "cv_atoms": list(cv_obj.atoms),
        "k_kj_per_mol_rad2": float(k),
        "temperature": temperature,
        "timestep_fs": float(timestep),
        "friction_per_ps": float(friction),
        "stride": int(stride),
        "n_frames": n_frames,
        "equilibration_steps": equilibration_steps,
        "platform": platform,
        "system_digest": system_digest(system.openmm_system),
    }
    out = None if output_dir is None else Path(output_dir)
    windows: list[Dataset | None] = [None] * len(centers_arr)
    if out is not None:
        for i, center in enumerate(centers_arr):
            windows[i] = _load_window(out / f"window_{i:03d}.h5", settings, float(center), seed + i)
        if any(w is not None for w in windows):
            logger.info("run_umbrella: reusing %d finished windows in %s", sum(w is not None for w in windows), out)

    todo = [i for i, w in enumerate(windows) if w is None]
    start = time.perf_counter()
    if todo:
        own_pool = None
        if executor is None:
            own_pool = executor = WorkerPool(min(n_workers, len(todo)))
        try:
            futures: dict[Future[tuple[np.ndarray, float]], int] = {}
            for i in todo:
                task = _WindowTask(
                    i,
                    system_xml,
                    system.positions,
                    float(centers_arr[i]),
                    temperature,
                    float(timestep),
                    float(friction),
                    seed + i,
                    platform,
                    properties,
                    equilibration_steps,
                    n_frames,
                    int(stride),
                )
                futures[executor.submit(_simulate_window, task)] = i
            failed: dict[int, str] = {}
            bar = tqdm(
                total=len(centers_arr),
                initial=len(centers_arr) - len(todo),
                unit="window",
                desc="umbrella",
                disable=not progress,
            )
            try:
                for future in as_completed(futures):
                    i = futures[future]
                    try:
                        frames, wall = future.result()
                    except (RuntimeError, TimeoutError, openmm.OpenMMException) as exc:
                        failed[i] = repr(exc)
                        logger.error("umbrella window %d (center %.3f rad) failed: %r", i, centers_arr[i], exc)
                        continue
                    window = _window_dataset(system, frames, settings, float(centers_arr[i]), seed + i, wall, i)
                    if out is not None:
                        window.save(out / f"window_{i:03d}.h5")
                    windows[i] = window
                    bar.update(1)
            finally:
                bar.close()
        finally:
            if own_pool is not None:
                own_pool.shutdown(wait=False, cancel_futures=True)
        if failed:
            hint = f"; rerun with output_dir={out} to redo only these" if out is not None else ""
            raise RuntimeError(f"{len(failed)} umbrella windows failed: {failed}{hint}")
    wall_time = time.perf_counter() - start

    result = analyze_umbrella(
        [w for w in windows if w is not None],
        cv_obj,
        n_bins=n_bins,
        n_bootstraps=n_bootstraps,
        overlap_threshold=overlap_threshold,
        seed=seed,
        progress=progress,
    )
    result.metadata.update(
        system=getattr(system, "name", None),
        settings=settings,
        seed=seed,
        wall_time_s=wall_time,
        window_wall_time_s=[float(w.metadata.get("wall_time_s", 0.0)) for w in windows if w is not None],
    )
    if out is not None:
        result.save(out)
    return result


def _resolve_cv(system: Any, cv: str | CollectiveVariable) -> CollectiveVariable:
    if isinstance(cv, str):
        cvs = getattr(system, "cvs", {})
        if cv not in cvs:
            raise ValueError(f"system has no CV {cv!r}; its CVs are {list(cvs)} (or pass a CollectiveVariable)")
        cv = cvs[cv]
    if cv.type != "dihedral":
        raise ValueError(f"run_umbrella biases dihedrals (CustomTorsionForce); CV {cv.name!r} is a {cv.type}")
    return cv


def _window_dataset(
    system: Any, frames: np.ndarray, settings: dict[str, Any], center: float, seed: int, wall: float, index: int
) -> Dataset:
    dt_ps = settings["stride"] * settings["timestep_fs"] / 1000.0
    return Dataset(
        frames,
        system.topology,
        metadata={
            "system": getattr(system, "name", None),
            "temperature": settings["temperature"],
            "engine": "openmm",
            "method": "umbrella_window",
            "umbrella": {
                "index": index,
                "center_rad": center,
                "k_kj_per_mol_rad2": settings["k_kj_per_mol_rad2"],
                "cv": settings["cv"],
                "cv_atoms": settings["cv_atoms"],
            },
            "settings": settings,
            "seeds": {"integrator": seed, "velocities": seed},
            "wall_time_s": wall,
            "provenance": provenance(),
        },
        time=(np.arange(len(frames)) + 1) * dt_ps,
    )


def _load_window(path: Path, settings: dict[str, Any], center: float, seed: int) -> Dataset | None:
    if not path.is_file():
        return None
    try:
        window = Dataset.load(path)
    except DatasetFormatError as exc:
        logger.warning("ignoring unreadable window file %s (%s); it will be recomputed", path, exc)
        return None
    meta = window.metadata
    stored = {k: v for k, v in meta.get("settings", {}).items() if k != "platform"}  # any platform will do
    if (
        stored != {k: v for k, v in settings.items() if k != "platform"}
        or not math.isclose(meta.get("umbrella", {}).get("center_rad", math.nan), center, abs_tol=1e-9)
        or meta.get("seeds", {}).get("integrator") != seed
    ):
        raise ValueError(
            f"{path} was made with other settings, centre or seed; use another output_dir, delete it, or "
            "pass the original settings"
        )
    return window


# ----------------------------------------------------------------- analysis
@dataclass
class UmbrellaResult:
    """What :func:`run_umbrella` / :func:`analyze_umbrella` return.

    Attributes
    ----------
    profile : FreeEnergyProfile
        F(cv) in kT with bootstrap errors.
    dataset : Dataset
        Every production frame (equilibration discarded) with its unbiased
        MBAR log-weight.
    cv_values : ndarray, shape (n_frames,), rad
        CV of each frame of ``dataset``.
    window_index : ndarray of int, shape (n_frames,)
    centers : ndarray, shape (n_windows,), rad
    k : float
        kJ/mol/rad^2.
    f_k : ndarray, shape (n_windows,), kT
        MBAR free energies of the biased windows (``f_k[0] = 0``).
    overlap : ndarray, shape (n_windows, n_windows)
        MBAR overlap matrix.
    neighbour_overlap : ndarray, shape (n_pairs,)
        Overlap of windows adjacent in CV (around the circle when the
        centres cover it).
    statistical_inefficiency, n_equilibration, n_uncorrelated : ndarray, shape (n_windows,)
        Per window: g of the bias energy, frames discarded as equilibration,
        and frames in the uncorrelated subsample used by MBAR.
    temperature : float
        K.
    metadata : dict
    """

    profile: FreeEnergyProfile
    dataset: Dataset
    cv_values: np.ndarray
    window_index: np.ndarray
    centers: np.ndarray
    k: float
    f_k: np.ndarray
    overlap: np.ndarray
    neighbour_overlap: np.ndarray
    statistical_inefficiency: np.ndarray
    n_equilibration: np.ndarray
    n_uncorrelated: np.ndarray
    temperature: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def delta_f(self, state_a: CVRange = PHI_POSITIVE, state_b: CVRange = PHI_NEGATIVE) -> FreeEnergyDifference:
        """``F_A - F_B`` from the profile, with the bootstrap error (see :func:`delta_f`)."""
        return delta_f(self.profile, state_a, state_b)

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable summary: default delta F, overlap, sampling statistics, metadata."""
        return {
            "cv": self.profile.cv_name,
            "temperature": self.temperature,
            "n_windows": len(self.centers),
            "centers_rad": self.centers.tolist(),
            "k_kj_per_mol_rad2": self.k,
            "delta_f_phi_positive_minus_negative": self.delta_f().to_dict(),
            "min_neighbour_overlap": float(self.neighbour_overlap.min()),
            "statistical_inefficiency": self.statistical_inefficiency.tolist(),
            "n_equilibration": self.n_equilibration.tolist(),
            "n_uncorrelated": self.n_uncorrelated.tolist(),
            "n_frames": len(self.cv_values),
            "effective_sample_size": self.dataset.effective_sample_size(),
            "metadata": self.metadata,
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``profile.json``, ``profile.png``, ``umbrella.h5`` and ``summary.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.profile.save(directory / "profile.json")
        plot_profile(self.profile, directory / "profile.png", title=f"umbrella sampling, {len(self.centers)} windows")
        self.dataset.save(directory / "umbrella.h5")
        write_json(directory / "summary.json", self.summary())
        return directory


def analyze_umbrella(
    windows: Sequence[Dataset],
    cv: CollectiveVariable,
    *,
    n_bins: int = 36,
    n_bootstraps: int = 100,
    overlap_threshold: float = DEFAULT_OVERLAP_THRESHOLD,
    seed: int | None = None,
    progress: bool = True,
) -> UmbrellaResult:
    """MBAR analysis of umbrella windows (from :func:`run_umbrella` or saved ``window_XXX.h5`` files).

    Parameters
    ----------
    windows : sequence of Dataset
        One per window, frames in time order; ``metadata["umbrella"]`` gives
        its ``center_rad`` and ``k_kj_per_mol_rad2``, ``metadata["temperature"]`` K.
    cv : CollectiveVariable
        The biased dihedral.
    n_bins : int
        Equal bins on [-pi, pi].
    n_bootstraps : int
        Replicates (0 for none: then ``profile.df`` is pymbar's analytical error).
    overlap_threshold : float
        Warn below this neighbour overlap.
    seed : int or None
        For the bootstrap resampling.
    progress : bool
        Progress bar over bootstrap replicates.
    """
    from pymbar import FES, MBAR, timeseries  # imported here: pymbar prints a banner on import

    if len(windows) < 2:
        raise ValueError(f"need at least 2 windows, got {len(windows)}")
    if n_bins < 2:
        raise ValueError(f"n_bins must be >= 2, got {n_bins}")
    if n_bootstraps == 1 or n_bootstraps < 0:
        raise ValueError(f"n_bootstraps must be 0 or >= 2, got {n_bootstraps}")
    try:
        centers = np.array([w.metadata["umbrella"]["center_rad"] for w in windows], dtype=np.float64)
        ks = {float(w.metadata["umbrella"]["k_kj_per_mol_rad2"]) for w in windows}
        temps = {float(w.metadata["temperature"]) for w in windows}
    except KeyError as exc:
        raise ValueError(
            f"window metadata lacks {exc}; analyze_umbrella needs datasets written by run_umbrella"
        ) from exc
    if len(ks) != 1 or len(temps) != 1:
        raise ValueError(f"windows must share k and temperature, got k={sorted(ks)}, T={sorted(temps)}")
    k, temperature = ks.pop(), temps.pop()

    # per window: CV, equilibration, uncorrelated subsample
    kept, uncorrelated, g_k, t0_k = [], [], [], []
    cv_all, win_all = [], []
    for i, window in enumerate(windows):
        phi = np.asarray(cv(window.positions.astype(np.float64)))
        u_own = reduced_bias(phi, centers[i : i + 1], k, temperature)[0]
        if len(phi) < 10 or np.ptp(u_own) == 0:
            raise ValueError(f"window {i} has {len(phi)} frames with no fluctuation; sample longer")
        t0, g, _ = timeseries.detect_equilibration(u_own, fast=True, nskip=max(1, len(phi) // 200))
        idx = t0 + np.asarray(timeseries.subsample_correlated_data(u_own[t0:], g=g), dtype=int)
        kept.append(np.arange(t0, len(phi)))
        uncorrelated.append(idx)
        g_k.append(float(g))
        t0_k.append(int(t0))
        cv_all.append(phi[t0:])
        win_all.append(np.full(len(phi) - t0, i))
    phi_unc = np.concatenate(
        [np.asarray(cv(w.positions[idx].astype(np.float64))) for w, idx in zip(windows, uncorrelated)]
    )
    n_k = np.array([len(idx) for idx in uncorrelated])
    u_kn = reduced_bias(phi_unc, centers, k, temperature)

    mbar = MBAR(u_kn, n_k)
    f_k = np.asarray(mbar.f_k, dtype=np.float64)
    overlap = np.asarray(mbar.compute_overlap()["matrix"])
    neighbour = _neighbour_overlap(overlap, centers)
    if neighbour.min() < overlap_threshold:
        message = (
            f"umbrella windows overlap poorly: smallest neighbour overlap {neighbour.min():.3g} < "
            f"{overlap_threshold} (pairs {np.flatnonzero(neighbour < overlap_threshold).tolist()} in CV order); "
            "add windows between them, lower k, or sample longer"
        )
        warnings.warn(message, UmbrellaOverlapWarning, stacklevel=2)
        logger.warning("%s", message)

    edges = np.linspace(-np.pi, np.pi, n_bins + 1)
    bins = np.clip(np.digitize(phi_unc, edges) - 1, 0, n_bins - 1)
    occupied = np.unique(bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    fes = FES(u_kn, n_k, mbar_options={"initial_f_k": f_k})
    fes.generate_fes(np.zeros(len(phi_unc)), phi_unc, fes_type="histogram", histogram_parameters={"bin_edges": [edges]})
    res = fes.get_fes(centres[occupied], reference_point="from-lowest", uncertainty_method="analytical")
    f = np.full(n_bins, np.inf)
    df = np.full(n_bins, np.inf)
    f[occupied] = res["f_i"]
    df[occupied] = res["df_i"]
    method = "MBAR histogram (pymbar FES)"

    f_boot = None
    if n_bootstraps:
        rng = np.random.default_rng(seed)
        offsets = np.concatenate([[0], np.cumsum(n_k)[:-1]])
        f_boot = np.empty((n_bootstraps, n_bins))
        for b in tqdm(range(n_bootstraps), desc="bootstrap", disable=not progress, leave=False):
            idx = np.concatenate([o + rng.integers(0, n, n) for o, n in zip(offsets, n_k)])
            u_b = u_kn[:, idx]
            f_kb = np.asarray(MBAR(u_b, n_k, initial_f_k=f_k).f_k)
            f_boot[b] = _bin_free_energies(_unbiased_log_weights(u_b, f_kb, n_k), bins[idx], n_bins)
        j = int(np.argmin(f))
        with np.errstate(invalid="ignore"):
            rel = f_boot - f_boot[:, j : j + 1]
        finite = np.isfinite(rel)
        df = np.full(n_bins, np.inf)
        for i in occupied:
            vals = rel[finite[:, i], i]
            df[i] = float(np.std(vals, ddof=1)) if len(vals) >= 2 else np.inf
        missing = (~finite[:, occupied]).any(axis=0).sum()
        if missing:
            logger.warning(
                "%d profile bins were empty in some bootstrap replicates; their errors use the rest", missing
            )
        method += f", {n_bootstraps} bootstrap replicates (frames resampled within windows, MBAR re-solved)"
    else:
        method += ", analytical errors"
    profile = FreeEnergyProfile(cv.name, cv.units, edges, f, df, temperature, method, f_boot)

    # unbiased weights of every production frame
    phi_all = np.concatenate(cv_all)
    window_index = np.concatenate(win_all)
    n_kept = np.array([len(x) for x in kept])
    log_w = _unbiased_log_weights(reduced_bias(phi_all, centers, k, temperature), f_k, n_kept)
    first = windows[0]
    dataset = Dataset(
        np.concatenate([w.positions[idx] for w, idx in zip(windows, kept)]),
        first.topology,
        log_w,
        LOG_WEIGHTS_DEFINITION,
        {
            "system": first.metadata.get("system"),
            "temperature": temperature,
            "engine": "openmm",
            "method": "umbrella_sampling",
            "cv": cv.name,
            "segment_lengths": n_kept.tolist(),  # frames per window, in window order
            "estimated_log_weights": True,
            "centers_rad": centers.tolist(),
            "k_kj_per_mol_rad2": k,
            "provenance": provenance(),
        },
        None,
        first.units,
    )
    return UmbrellaResult(
        profile=profile,
        dataset=dataset,
        cv_values=phi_all,
        window_index=window_index,
        centers=centers,
        k=k,
        f_k=f_k,
        overlap=overlap,
        neighbour_overlap=neighbour,
        statistical_inefficiency=np.array(g_k),
        n_equilibration=np.array(t0_k),
        n_uncorrelated=n_k,
        temperature=temperature,
        metadata={"n_bins": n_bins, "n_bootstraps": n_bootstraps, "overlap_threshold": overlap_threshold},
    )


def _unbiased_log_weights(u_kn: np.ndarray, f_k: np.ndarray, n_k: np.ndarray) -> np.ndarray:
    """MBAR log-weights of the samples in the unbiased state: ``-logsumexp_k(log N_k + f_k - u_kn)``."""
    with np.errstate(divide="ignore"):
        log_n = np.log(n_k.astype(np.float64))
    return -logsumexp(log_n[:, None] + f_k[:, None] - u_kn, axis=0)


def _bin_free_energies(log_w: np.ndarray, bins: np.ndarray, n_bins: int) -> np.ndarray:
    """``-ln p_i`` per bin from sample log-weights (``inf`` for bins without samples)."""
    total = logsumexp(log_w)
    f = np.full(n_bins, np.inf)
    for i in np.unique(bins):
        f[i] = total - logsumexp(log_w[bins == i])
    return f


def _neighbour_overlap(overlap: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Overlap of windows adjacent in CV; includes the wrap-around pair when the centres cover the circle."""
    order = np.argsort(centers)
    pairs = list(zip(order[:-1], order[1:]))
    gaps = np.diff(centers[order])
    wrap_gap = centers[order[0]] + 2 * np.pi - centers[order[-1]]
    if len(gaps) and wrap_gap <= 1.5 * np.max(gaps):
        pairs.append((order[-1], order[0]))
    return np.array([overlap[i, j] for i, j in pairs])
