r"""Weighted free-energy profiles along one or two CVs, with bootstrap errors, and their comparison.

:func:`free_energy_profile` histograms CV values with importance weights
:math:`w_n` on equal-width bins and returns

.. math:: F_i = -\ln p_i, \qquad p_i = \frac{\sum_n w_n [x_n \in i]}{\sum_n w_n},

in kT, shifted so the lowest bin is 0 (empty bins: ``inf``). Errors come from
a nonparametric bootstrap: frames are resampled with replacement together
with their weights, the profile is recomputed, and the error of bin :math:`i`
is the standard deviation of :math:`F_i - F_j` over replicates, :math:`j`
the lowest bin. This assumes independent frames (true for flow samples); for
correlated MD frames the errors come out too small. The replicates are kept
(``f_bootstrap``) so that :func:`delta_f` of the profile includes the
correlations between bins.

:func:`free_energy_profile_2d` does the same on a 2D grid (e.g. phi, psi)
and :func:`compare_profiles` measures how far a profile is from a reference.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mdtraj
import numpy as np
from scipy.special import logsumexp

from bgplugin.data import Dataset
from bgplugin.fileio import write_json
from bgplugin.simulation.profiles import (
    PHI_NEGATIVE,
    PHI_POSITIVE,
    CVRange,
    FreeEnergyProfile,
    FreeEnergyUnits,
    delta_f,
)
from bgplugin.systems import CollectiveVariable, backbone_dihedrals

logger = logging.getLogger(__name__)

#: Temperature (K) used when neither the caller, the system nor the data give one.
DEFAULT_TEMPERATURE = 300.0
_PERIOD = 2.0 * math.pi

CVSpec = str | CollectiveVariable


@dataclass(frozen=True)
class CVSamples:
    """CV values of a set of frames with their log-weights.

    Attributes
    ----------
    values : ndarray, shape (n, n_cvs)
        In each CV's units (radians in (-pi, pi] for dihedrals).
    log_weights : ndarray, shape (n,), or None
        None for equally weighted frames.
    names, units : tuple of str
    periodic : tuple of bool
        Dihedrals are periodic with period 2 pi.
    temperature : float or None
        K, when the input carried one.
    """

    values: np.ndarray
    log_weights: np.ndarray | None
    names: tuple[str, ...]
    units: tuple[str, ...]
    periodic: tuple[bool, ...]
    temperature: float | None


def cv_values(
    traj_or_samples: Any,
    cvs: CVSpec | Sequence[CVSpec] = "phi",
    *,
    system: Any | None = None,
    log_weights: Any | None = None,
    weights: Any | None = None,
    periodic: bool | Sequence[bool] | None = None,
) -> CVSamples:
    """Evaluate CVs on frames and collect their weights: the input side of the profile functions.

    Parameters
    ----------
    traj_or_samples
        * a :class:`~bgplugin.reweighting.WeightedTrajectory` (its log-weights are used),
        * a :class:`~bgplugin.reweighting.ReweightingResult` (its ``log_w``),
        * a :class:`~bgplugin.data.Dataset` (its log-weights, if any),
        * an ``mdtraj.Trajectory``,
        * an ndarray of positions, shape (n, n_atoms, 3) in nm (needs ``system``
          or ``CollectiveVariable`` objects), or
        * an ndarray of CV values, shape (n,) for one CV or (n, n_cvs).
    cvs : str or CollectiveVariable, or a sequence of them
        Names are looked up in ``system.cvs``, else among the backbone
        dihedrals of the topology (``"phi"``, ``"psi"``); for CV values they
        only label the axes.
    system : System or None
    log_weights, weights : array-like, shape (n,), or None
        Log-weights or (non-negative) weights of the frames, for inputs that
        carry none of their own. Give at most one.
    periodic : bool or sequence of bool or None
        Override for CV values; default: dihedral CVs and the names
        ``phi``/``psi`` (``phi_<n>``, ``psi_<n>``) are periodic.

    Returns
    -------
    CVSamples
    """
    specs: list[CVSpec] = [cvs] if isinstance(cvs, (str, CollectiveVariable)) else list(cvs)
    if not specs:
        raise ValueError("give at least one CV")
    own_log_w, positions, topology, temperature = _unpack(traj_or_samples)
    explicit = _explicit_log_weights(log_weights, weights)
    if own_log_w is not None and explicit is not None:
        raise ValueError(
            f"{type(traj_or_samples).__name__} carries its own log-weights; do not pass log_weights/weights with it"
        )
    log_w = own_log_w if own_log_w is not None else explicit
    if positions is None:  # CV values given directly
        values = np.asarray(traj_or_samples, dtype=np.float64)
        if values.ndim == 1:
            values = values[:, None]
        if values.ndim != 2 or values.shape[1] != len(specs):
            raise ValueError(
                f"CV values must have shape (n,) or (n, {len(specs)}) for cvs {[_name(s) for s in specs]}, "
                f"got {np.shape(traj_or_samples)}"
            )
        names = tuple(_name(s) for s in specs)
        units = tuple(
            s.units if isinstance(s, CollectiveVariable) else ("rad" if _is_angle_name(s) else "") for s in specs
        )
        default_periodic = tuple(
            (s.type == "dihedral") if isinstance(s, CollectiveVariable) else _is_angle_name(s) for s in specs
        )
    else:
        resolved = [_resolve_cv(s, system, topology, positions) for s in specs]
        values = np.stack([np.asarray(cv(positions), dtype=np.float64) for cv in resolved], axis=1)
        names = tuple(cv.name for cv in resolved)
        units = tuple(cv.units for cv in resolved)
        default_periodic = tuple(cv.type == "dihedral" for cv in resolved)
    if periodic is None:
        periodic_flags = default_periodic
    elif isinstance(periodic, bool):
        periodic_flags = (periodic,) * len(specs)
    else:
        periodic_flags = tuple(bool(p) for p in periodic)
        if len(periodic_flags) != len(specs):
            raise ValueError(f"periodic has {len(periodic_flags)} entries for {len(specs)} CVs")
    n = len(values)
    if log_w is not None:
        log_w = np.asarray(log_w, dtype=np.float64)
        if log_w.shape != (n,):
            raise ValueError(f"log-weights must have shape ({n},) (one per frame), got {log_w.shape}")
        if np.isnan(log_w).any() or np.isposinf(log_w).any():
            raise ValueError("log-weights contain NaN or +inf; failed frames should have log-weight -inf")
    if system is not None and getattr(system, "temperature", None) is not None:
        temperature = float(system.temperature)
    return CVSamples(values, log_w, names, units, periodic_flags, temperature)


def _unpack(obj: Any) -> tuple[np.ndarray | None, np.ndarray | None, mdtraj.Topology | None, float | None]:
    """(own log-weights, positions, topology, temperature) of a supported input; positions None for CV values."""
    trajectory = getattr(obj, "trajectory", None)
    if isinstance(trajectory, mdtraj.Trajectory) and hasattr(obj, "log_weights"):  # WeightedTrajectory
        return (
            np.asarray(obj.log_weights, dtype=np.float64),
            trajectory.xyz.astype(np.float64),
            trajectory.topology,
            _meta_temperature(getattr(obj, "metadata", {})),
        )
    if isinstance(obj, Dataset):
        return (
            obj.log_weights,
            obj.positions.astype(np.float64),
            obj.topology,
            _meta_temperature(obj.metadata),
        )
    if isinstance(obj, mdtraj.Trajectory):
        return None, obj.xyz.astype(np.float64), obj.topology, None
    if hasattr(obj, "positions") and hasattr(obj, "log_w"):  # ReweightingResult
        return np.asarray(obj.log_w, dtype=np.float64), np.asarray(obj.positions, np.float64), None, obj.temperature
    if isinstance(obj, (np.ndarray, list, tuple)):
        array = np.asarray(obj, dtype=np.float64)
        if array.ndim == 3:
            return None, array, None, None
        return None, None, None, None
    raise TypeError(
        "expected a WeightedTrajectory, ReweightingResult, Dataset, mdtraj.Trajectory, positions (n, n_atoms, 3) "
        f"or CV values (n,) / (n, n_cvs); got {type(obj).__name__}"
    )


def _meta_temperature(metadata: dict[str, Any]) -> float | None:
    value = metadata.get("temperature") if isinstance(metadata, dict) else None
    return None if value is None else float(value)


def _explicit_log_weights(log_weights: Any | None, weights: Any | None) -> np.ndarray | None:
    if log_weights is not None and weights is not None:
        raise ValueError("give log_weights or weights, not both")
    if log_weights is not None:
        return np.asarray(log_weights, dtype=np.float64)
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or not np.isfinite(w).all():
            raise ValueError("weights must be finite and non-negative (use log_weights for log-space weights)")
        with np.errstate(divide="ignore"):
            return np.log(w)
    return None


def _name(spec: CVSpec) -> str:
    return spec.name if isinstance(spec, CollectiveVariable) else str(spec)


def _is_angle_name(name: str) -> bool:
    return name in ("phi", "psi") or name.startswith(("phi_", "psi_"))


def _resolve_cv(
    spec: CVSpec, system: Any | None, topology: mdtraj.Topology | None, positions: np.ndarray
) -> CollectiveVariable:
    if isinstance(spec, CollectiveVariable):
        return spec
    system_cvs = getattr(system, "cvs", None) or {}
    if spec in system_cvs:
        return system_cvs[spec]
    topology = topology if topology is not None else getattr(system, "topology", None)
    known: dict[str, CollectiveVariable] = {}
    if topology is not None:
        if positions.shape[1] != topology.n_atoms:
            raise ValueError(f"positions have {positions.shape[1]} atoms but the topology has {topology.n_atoms}")
        known = backbone_dihedrals(topology, positions[0])
        if spec in known:
            return known[spec]
    available = sorted(set(system_cvs) | set(known))
    raise ValueError(
        f"unknown CV {spec!r}; available here: {available or 'none (no system or topology)'}. "
        "Pass system=..., or a bgplugin.systems.CollectiveVariable"
    )


# ------------------------------------------------------------------ binning
def _edges(
    values: np.ndarray, bins: int, cv_range: tuple[float, float] | None, periodic: bool, name: str
) -> tuple[np.ndarray, bool]:
    """Bin edges and whether to wrap values (periodic CV over a full period)."""
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins for {name!r} must be a positive integer, got {bins}")
    if cv_range is None:
        if periodic:
            cv_range = (-math.pi, math.pi)
        else:
            finite = values[np.isfinite(values)]
            if len(finite) == 0:
                raise ValueError(f"no finite values of {name!r} to choose a range from")
            low, high = float(finite.min()), float(finite.max())
            cv_range = (low, high) if high > low else (low - 0.5, high + 0.5)
    low, high = (float(v) for v in cv_range)
    if not high > low:
        raise ValueError(f"range for {name!r} must be (low, high) with high > low, got {cv_range}")
    wrap = periodic and math.isclose(high - low, _PERIOD, rel_tol=1e-9)
    return np.linspace(low, high, int(bins) + 1), wrap


def _bin_index(values: np.ndarray, edges: np.ndarray, wrap: bool) -> np.ndarray:
    """Bin of each value, -1 outside. Bins are (e_i, e_{i+1}]; the lowest edge is included when not wrapping."""
    v = np.asarray(values, dtype=np.float64)
    low, high = edges[0], edges[-1]
    if wrap:
        shifted = np.mod(v - low, high - low)
        v = np.where(shifted == 0.0, high, low + shifted)
    idx = np.searchsorted(edges, v, side="left") - 1
    if not wrap:
        idx = np.where(v == low, 0, idx)
    idx[(idx < 0) | (idx >= len(edges) - 1) | ~np.isfinite(v)] = -1
    return idx


def _weighted_free_energies(
    bin_index: np.ndarray,
    log_w: np.ndarray | None,
    n_bins: int,
    n_bootstrap: int,
    seed: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    """(f shifted to min 0, df, f_bootstrap (unshifted -ln p) or None, method) of a weighted histogram."""
    n = len(bin_index)
    if n == 0:
        raise ValueError("no frames to histogram")
    if n_bootstrap < 0 or n_bootstrap == 1:
        raise ValueError(f"n_bootstrap must be 0 (delta-method errors) or >= 2, got {n_bootstrap}")
    if log_w is None:
        w = np.ones(n)
    else:
        if not np.isfinite(log_w).any():
            raise ValueError("every log-weight is -inf: no frame has positive weight")
        w = np.exp(log_w - logsumexp(log_w)) * n  # mean 1
    inside = bin_index >= 0
    if not (w[inside] > 0).any():
        raise ValueError("no frame with positive weight falls inside the histogram range; widen range=...")
    n_outside = int((~inside & (w > 0)).sum())
    if n_outside:
        logger.info(
            "%d of %d frames lie outside the histogram range (they still count in the normalisation)", n_outside, n
        )
    safe_index = np.where(inside, bin_index, 0)
    inside_w = np.where(inside, w, 0.0)
    p = np.bincount(safe_index, inside_w, minlength=n_bins) / w.sum()
    with np.errstate(divide="ignore"):
        f_raw = -np.log(p)
    occupied = np.isfinite(f_raw)
    j = int(np.argmin(f_raw))
    f = f_raw - f_raw[j]
    df = np.full(n_bins, np.inf)
    ess_samples = w.sum() ** 2 / np.sum(w**2)
    if n_bootstrap == 0:
        # delta method for ln p_i - ln p_j (independent frames): var = (S2_i / p_i^2 + S2_j / p_j^2) / n,
        # S2_i = mean(w^2 [x in i]) with mean(w) = 1; bins are disjoint, so the cross term vanishes
        s2 = np.bincount(safe_index, np.where(inside, w**2, 0.0), minlength=n_bins) / n
        with np.errstate(divide="ignore", invalid="ignore"):
            var = (s2 / p**2 + s2[j] / p[j] ** 2) / n
        df[occupied] = np.sqrt(var[occupied])
        df[j] = 0.0
        method = f"weighted histogram of {n} frames (Kish ESS {ess_samples:.1f}), delta-method errors"
        return f, df, None, method
    rng = np.random.default_rng(seed)
    f_boot = np.empty((n_bootstrap, n_bins))
    for b in range(n_bootstrap):
        idx = rng.integers(0, n, n)
        wb = inside_w[idx]
        total = w[idx].sum()
        if total <= 0:  # every drawn frame has weight 0: this replicate has no information
            f_boot[b] = np.inf
            continue
        with np.errstate(divide="ignore"):
            f_boot[b] = -np.log(np.bincount(safe_index[idx], wb, minlength=n_bins) / total)
    with np.errstate(invalid="ignore"):
        rel = f_boot - f_boot[:, j : j + 1]
    finite = np.isfinite(rel)
    for i in np.flatnonzero(occupied):
        vals = rel[finite[:, i], i]
        df[i] = float(np.std(vals, ddof=1)) if len(vals) >= 2 else np.inf
    df[j] = 0.0
    missing = int((~finite[:, occupied]).any(axis=0).sum())
    if missing:
        logger.info("%d occupied bins were empty in some bootstrap replicates; their errors use the rest", missing)
    method = (
        f"weighted histogram of {n} frames (Kish ESS {ess_samples:.1f}), {n_bootstrap} bootstrap replicates "
        "(frames resampled with their weights; assumes independent frames)"
    )
    return f, df, f_boot, method


def free_energy_profile(
    traj_or_samples: Any,
    cv: CVSpec = "phi",
    bins: int = 36,
    *,
    log_weights: Any | None = None,
    weights: Any | None = None,
    range: tuple[float, float] | None = None,  # noqa: A002 - numpy's name for it
    n_bootstrap: int = 100,
    temperature: float | None = None,
    system: Any | None = None,
    seed: int | None = None,
    periodic: bool | None = None,
) -> FreeEnergyProfile:
    r"""1D free-energy profile :math:`F(\mathrm{cv})` in kT from (weighted) frames, with bootstrap errors.

    Parameters
    ----------
    traj_or_samples
        WeightedTrajectory, ReweightingResult, Dataset, mdtraj.Trajectory,
        positions (n, n_atoms, 3) nm, or CV values (n,); see :func:`cv_values`.
    cv : str or CollectiveVariable
        E.g. ``"phi"``, ``"psi"`` or ``system.cvs["phi"]``.
    bins : int
        Equal-width bins over ``range``.
    log_weights, weights : array-like, shape (n,), or None
        For inputs without their own weights (at most one of the two).
    range : (float, float) or None
        CV range in its units; periodic CVs default to :math:`(-\pi, \pi]`
        (values are wrapped into it), others to (min, max) of the data.
    n_bootstrap : int
        Bootstrap replicates for the errors (0: delta-method errors, faster,
        and no ``f_bootstrap``).
    temperature : float or None
        K (for kJ/mol conversions); default the system's, the data's, else 300 K.
    system : System or None
        Resolves CV names (and gives the temperature).
    seed : int or None
        Bootstrap random seed.
    periodic : bool or None
        Override periodicity for CV values (see :func:`cv_values`).

    Returns
    -------
    FreeEnergyProfile
        ``f`` in kT with the lowest bin 0 and empty bins ``inf``; ``df`` the
        error of :math:`F_i - F_\mathrm{lowest}`; ``f_bootstrap`` the
        replicates (:math:`-\ln p_i`).
    """
    samples = cv_values(traj_or_samples, cv, system=system, log_weights=log_weights, weights=weights, periodic=periodic)
    values = samples.values[:, 0]
    edges, wrap = _edges(values, bins, range, samples.periodic[0], samples.names[0])
    index = _bin_index(values, edges, wrap)
    f, df, f_boot, method = _weighted_free_energies(index, samples.log_weights, len(edges) - 1, n_bootstrap, seed)
    if samples.log_weights is None:
        method = method.replace("weighted histogram", "histogram (equal weights)")
    return FreeEnergyProfile(
        samples.names[0],
        samples.units[0],
        edges,
        f,
        df,
        _temperature(temperature, samples.temperature),
        method,
        f_boot,
    )


def _temperature(explicit: float | None, from_data: float | None) -> float:
    if explicit is not None:
        if not explicit > 0:
            raise ValueError(f"temperature must be > 0 K, got {explicit}")
        return float(explicit)
    return float(from_data) if from_data is not None else DEFAULT_TEMPERATURE


@dataclass(frozen=True)
class FreeEnergyProfile2D(FreeEnergyUnits):
    r"""A 2D free-energy surface :math:`F(x, y) = -\ln p` on an equal-width grid.

    Attributes
    ----------
    edges_x : ndarray, shape (nx + 1,)
    edges_y : ndarray, shape (ny + 1,)
    f : ndarray, shape (nx, ny), kT
        Lowest bin 0, empty bins ``inf``; ``f[i, j]`` is bin ``i`` along x and ``j`` along y.
    df : ndarray, shape (nx, ny), kT
        Error of :math:`F_{ij} - F_\mathrm{lowest}`.
    names : (str, str)
        CV names along x and y.
    temperature : float
        K.
    units : (str, str)
        Units of the edges (``"rad"`` for dihedrals).
    method : str
    """

    edges_x: np.ndarray
    edges_y: np.ndarray
    f: np.ndarray
    df: np.ndarray
    names: tuple[str, str]
    temperature: float
    units: tuple[str, str] = ("", "")
    method: str = ""

    def __post_init__(self) -> None:
        ex = np.asarray(self.edges_x, dtype=np.float64)
        ey = np.asarray(self.edges_y, dtype=np.float64)
        for name, edges in (("edges_x", ex), ("edges_y", ey)):
            if edges.ndim != 1 or len(edges) < 2 or not np.all(np.diff(edges) > 0):
                raise ValueError(f"{name} must be increasing with at least 2 entries, got {edges}")
        shape = (len(ex) - 1, len(ey) - 1)
        f = np.asarray(self.f, dtype=np.float64)
        df = np.asarray(self.df, dtype=np.float64)
        if f.shape != shape or df.shape != shape:
            raise ValueError(f"f and df must have shape {shape}, got {f.shape} and {df.shape}")
        if len(self.names) != 2 or len(self.units) != 2:
            raise ValueError(f"names and units need two entries each, got {self.names} and {self.units}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 K, got {self.temperature}")
        object.__setattr__(self, "edges_x", ex)
        object.__setattr__(self, "edges_y", ey)
        object.__setattr__(self, "f", f)
        object.__setattr__(self, "df", df)
        object.__setattr__(self, "names", (str(self.names[0]), str(self.names[1])))
        object.__setattr__(self, "units", (str(self.units[0]), str(self.units[1])))

    @property
    def centers_x(self) -> np.ndarray:
        """Bin centres along x, shape (nx,)."""
        return 0.5 * (self.edges_x[1:] + self.edges_x[:-1])

    @property
    def centers_y(self) -> np.ndarray:
        """Bin centres along y, shape (ny,)."""
        return 0.5 * (self.edges_y[1:] + self.edges_y[:-1])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable content (``inf`` written as null)."""

        def clean(a: np.ndarray) -> list[list[float | None]]:
            return [[None if not np.isfinite(v) else float(v) for v in row] for row in a]

        return {
            "names": list(self.names),
            "units": list(self.units),
            "energy_units": "kT",
            "temperature": self.temperature,
            "method": self.method,
            "edges_x": self.edges_x.tolist(),
            "edges_y": self.edges_y.tolist(),
            "f": clean(self.f),
            "df": clean(self.df),
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON (atomically)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> FreeEnergyProfile2D:
        """Read a surface written by :meth:`save`."""
        data = json.loads(Path(path).read_text())

        def arr(rows: Sequence[Sequence[Any]]) -> np.ndarray:
            return np.array([[np.inf if v is None else v for v in row] for row in rows], dtype=np.float64)

        return cls(
            np.asarray(data["edges_x"]),
            np.asarray(data["edges_y"]),
            arr(data["f"]),
            arr(data["df"]),
            (data["names"][0], data["names"][1]),
            float(data["temperature"]),
            (data["units"][0], data["units"][1]),
            data.get("method", ""),
        )


def free_energy_profile_2d(
    traj_or_samples: Any,
    cvs: tuple[CVSpec, CVSpec] = ("phi", "psi"),
    bins: int | tuple[int, int] = (36, 36),
    *,
    log_weights: Any | None = None,
    weights: Any | None = None,
    range: tuple[tuple[float, float] | None, tuple[float, float] | None] | None = None,  # noqa: A002
    n_bootstrap: int = 100,
    temperature: float | None = None,
    system: Any | None = None,
    seed: int | None = None,
    periodic: bool | tuple[bool, bool] | None = None,
) -> FreeEnergyProfile2D:
    """2D free-energy surface in kT (e.g. the Ramachandran surface F(phi, psi)) with bootstrap errors.

    Parameters
    ----------
    traj_or_samples
        As for :func:`free_energy_profile`; CV values have shape (n, 2).
    cvs : (str or CollectiveVariable, str or CollectiveVariable)
    bins : int or (int, int)
    log_weights, weights, n_bootstrap, temperature, system, seed
        As for :func:`free_energy_profile`.
    range : ((low, high) or None, (low, high) or None) or None
        Per CV; periodic CVs default to (-pi, pi].
    periodic : bool or (bool, bool) or None

    Returns
    -------
    FreeEnergyProfile2D
    """
    if len(cvs) != 2:
        raise ValueError(f"cvs must name two CVs, got {cvs}")
    nbins = (bins, bins) if isinstance(bins, (int, np.integer)) else tuple(bins)
    ranges = (None, None) if range is None else tuple(range)
    if len(nbins) != 2 or len(ranges) != 2:
        raise ValueError(f"bins and range need one entry per CV, got bins={bins}, range={range}")
    samples = cv_values(
        traj_or_samples, list(cvs), system=system, log_weights=log_weights, weights=weights, periodic=periodic
    )
    grids = [_edges(samples.values[:, k], nbins[k], ranges[k], samples.periodic[k], samples.names[k]) for k in (0, 1)]
    ix = _bin_index(samples.values[:, 0], *grids[0])
    iy = _bin_index(samples.values[:, 1], *grids[1])
    nx, ny = len(grids[0][0]) - 1, len(grids[1][0]) - 1
    flat = np.where((ix >= 0) & (iy >= 0), ix * ny + iy, -1)
    f, df, _, method = _weighted_free_energies(flat, samples.log_weights, nx * ny, n_bootstrap, seed)
    if samples.log_weights is None:
        method = method.replace("weighted histogram", "histogram (equal weights)")
    return FreeEnergyProfile2D(
        grids[0][0],
        grids[1][0],
        f.reshape(nx, ny),
        df.reshape(nx, ny),
        (samples.names[0], samples.names[1]),
        _temperature(temperature, samples.temperature),
        (samples.units[0], samples.units[1]),
        method,
    )


# --------------------------------------------------------------- comparison
def align_to_reference(
    profile: FreeEnergyProfile, reference: FreeEnergyProfile, f_max: float = 6.0
) -> tuple[float, np.ndarray]:
    r"""Offset that aligns ``profile`` to ``reference``, and the bins it is computed on.

    The bins used are those finite in both with reference :math:`F < f_\mathrm{max}`
    (reference relative to its lowest bin). The offset :math:`c` makes the
    population-weighted mean difference zero,

    .. math:: c = \sum_i \pi_i (R_i - F_i), \qquad \pi_i \propto e^{-R_i},

    so the comparison is anchored where the reference has its probability.

    Returns
    -------
    offset : float
        kT; compare ``profile.f + offset`` with ``reference.f``.
    mask : ndarray of bool, shape (n_bins,)
    """
    if profile.bin_edges.shape != reference.bin_edges.shape or not np.allclose(
        profile.bin_edges, reference.bin_edges, rtol=0, atol=1e-9
    ):
        raise ValueError(
            f"profiles have different bins ({len(profile.f)} bins over {profile.bin_edges[[0, -1]]} vs "
            f"{len(reference.f)} over {reference.bin_edges[[0, -1]]}); compute the profile with "
            "bins=len(reference.f), range=(reference.bin_edges[0], reference.bin_edges[-1])"
        )
    if not f_max > 0:
        raise ValueError(f"f_max must be > 0 kT, got {f_max}")
    ref = reference.f - np.min(reference.f[np.isfinite(reference.f)]) if np.isfinite(reference.f).any() else reference.f
    mask = np.isfinite(profile.f) & np.isfinite(ref) & (ref < f_max)
    if not mask.any():
        raise ValueError(f"no bin is populated in both profiles with reference F < {f_max} kT")
    pi = np.exp(-ref[mask])
    pi /= pi.sum()
    offset = float(np.sum(pi * (ref[mask] - profile.f[mask])))
    return offset, mask


def compare_profiles(
    profile: FreeEnergyProfile,
    reference: FreeEnergyProfile,
    f_max: float = 6.0,
    *,
    state_a: CVRange = PHI_POSITIVE,
    state_b: CVRange = PHI_NEGATIVE,
) -> dict[str, Any]:
    r"""How far ``profile`` is from ``reference``: RMSE over populated bins, largest deviation, dF difference.

    The profile is first shifted by the offset of :func:`align_to_reference`
    (population-weighted mean difference zero over the bins used: finite in
    both, reference :math:`F < f_\mathrm{max}`).

    Parameters
    ----------
    profile, reference : FreeEnergyProfile
        On the same bins.
    f_max : float
        kT above the reference's lowest bin.
    state_a, state_b : (float, float)
        CV ranges for :math:`\Delta F = F_A - F_B` (default phi > 0 vs phi < 0).

    Returns
    -------
    dict
        ``rmse`` (kT), ``max_abs_difference`` (kT), ``n_bins`` used, ``offset``
        (kT), ``alignment`` (text), ``f_max``, ``fraction_within_2_sigma``
        (bins whose aligned difference is within twice the combined error),
        and, when both profiles have bins in both states, ``delta_f``,
        ``delta_f_error``, ``reference_delta_f``, ``reference_delta_f_error``,
        ``delta_f_difference`` and its error (errors added in quadrature);
        otherwise ``delta_f_unavailable`` with the reason.
    """
    offset, mask = align_to_reference(profile, reference, f_max)
    ref = reference.f - np.min(reference.f[np.isfinite(reference.f)])
    diff = profile.f[mask] + offset - ref[mask]
    sigma = np.hypot(profile.df[mask], reference.df[mask])
    with np.errstate(divide="ignore", invalid="ignore"):
        within = np.abs(diff) <= 2.0 * sigma
    out: dict[str, Any] = {
        "rmse": float(np.sqrt(np.mean(diff**2))),
        "max_abs_difference": float(np.max(np.abs(diff))),
        "n_bins": int(mask.sum()),
        "offset": offset,
        "alignment": "profile + offset, offset = exp(-F_ref)-weighted mean of F_ref - F over the bins used",
        "f_max": float(f_max),
        "fraction_within_2_sigma": float(np.mean(within)),
    }
    try:
        mine, theirs = delta_f(profile, state_a, state_b), delta_f(reference, state_a, state_b)
    except ValueError as exc:
        out["delta_f_unavailable"] = str(exc)
        return out
    if not (np.isfinite(mine.value) and np.isfinite(theirs.value)):
        out["delta_f_unavailable"] = "a state has no populated bin in one of the profiles"
        return out
    out.update(
        delta_f=mine.value,
        delta_f_error=mine.error,
        reference_delta_f=theirs.value,
        reference_delta_f_error=theirs.error,
        delta_f_difference=mine.value - theirs.value,
        delta_f_difference_error=float(math.hypot(mine.error, theirs.error)),
        state_a=list(state_a),
        state_b=list(state_b),
    )
    return out
