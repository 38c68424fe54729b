r"""Free-energy profiles along a CV, free-energy differences between CV ranges, and their plots.

A :class:`FreeEnergyProfile` holds bin edges, :math:`F_i = -\ln p_i` (kT,
lowest bin 0) on equal-width bins, the uncertainty of each bin relative to the
lowest, and, when it came from a bootstrap, every bootstrap replicate, so that
any derived quantity (such as a free-energy difference) gets an error that
includes the correlations between bins.

:func:`delta_f` gives :math:`\Delta F = F_A - F_B = -\ln(P_A / P_B)` between
two CV ranges, from a profile, an umbrella result, or samples (a dataset,
optionally weighted, or plain CV values).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.special import logsumexp

from bgplugin.data import Dataset
from bgplugin.fileio import write_json
from bgplugin.systems import CollectiveVariable, backbone_dihedrals
from bgplugin.units import kt_kj_per_mol

logger = logging.getLogger(__name__)

#: A CV range ``(low, high]`` in the CV's units; ``low > high`` wraps around a periodic CV (radians).
CVRange = tuple[float, float]
#: Alanine dipeptide's default states (radians): phi > 0 (alpha_L, C7ax) and phi < 0 (C5, C7eq, alpha_R).
PHI_POSITIVE: CVRange = (0.0, math.pi)
PHI_NEGATIVE: CVRange = (-math.pi, 0.0)


def in_range(values: np.ndarray, cv_range: CVRange) -> np.ndarray:
    """Membership of ``values`` in ``(low, high]``; wraps around when ``low > high``.

    Parameters
    ----------
    values : ndarray, shape (n,)
    cv_range : (float, float)

    Returns
    -------
    ndarray of bool, shape (n,)
    """
    low, high = (float(v) for v in cv_range)
    values = np.asarray(values)
    if low == high:
        raise ValueError(f"empty CV range {cv_range}: low and high must differ")
    if low < high:
        return (values > low) & (values <= high)
    return (values > low) | (values <= high)


def energy_unit_scale(temperature: float, units: str) -> float:
    """Factor that converts kT at ``temperature`` (K) into ``units`` ("kT", "kJ/mol" or "kcal/mol")."""
    kt = kt_kj_per_mol(temperature)
    scale = {"kT": 1.0, "kJ/mol": kt, "kcal/mol": kt / 4.184}
    if units not in scale:
        raise ValueError(f"units must be one of {list(scale)}, got {units!r}")
    return scale[units]


class FreeEnergyUnits:
    """``kt`` and ``in_units`` of a free-energy table with ``f``, ``df`` (kT) and ``temperature`` (K)."""

    f: np.ndarray
    df: np.ndarray
    temperature: float

    @property
    def kt(self) -> float:
        """kT in kJ/mol at the table's temperature."""
        return kt_kj_per_mol(self.temperature)

    def in_units(self, units: Literal["kT", "kJ/mol", "kcal/mol"]) -> tuple[np.ndarray, np.ndarray]:
        """``(f, df)`` in ``units``."""
        scale = energy_unit_scale(self.temperature, units)
        return self.f * scale, self.df * scale


@dataclass(frozen=True)
class FreeEnergyProfile(FreeEnergyUnits):
    r"""A 1D free-energy profile on equal-width bins.

    Attributes
    ----------
    cv_name : str
    cv_units : str
        Units of the bin edges (``"rad"`` for dihedrals).
    bin_edges : ndarray, shape (n_bins + 1,)
    f : ndarray, shape (n_bins,), kT
        :math:`-\ln p_i` shifted so the lowest bin is 0; ``inf`` for empty bins.
    df : ndarray, shape (n_bins,), kT
        Uncertainty of :math:`F_i - F_\mathrm{lowest}` (0 at the lowest bin).
    temperature : float
        K (converts kT to kJ/mol).
    method : str
        How the profile and its errors were obtained.
    f_bootstrap : ndarray, shape (n_bootstraps, n_bins), kT, or None
        :math:`-\ln p_i` of each bootstrap replicate (``inf`` where a
        replicate has no sample in a bin).
    """

    cv_name: str
    cv_units: str
    bin_edges: np.ndarray
    f: np.ndarray
    df: np.ndarray
    temperature: float
    method: str = ""
    f_bootstrap: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        edges = np.asarray(self.bin_edges, dtype=np.float64)
        n_bins = len(edges) - 1
        if n_bins < 1 or not np.all(np.diff(edges) > 0):
            raise ValueError(f"bin_edges must be increasing with at least 2 entries, got {edges}")
        if not np.allclose(np.diff(edges), edges[1] - edges[0], rtol=1e-6, atol=0):
            raise ValueError("bins must have equal widths (F_i = -ln p_i is then a density up to a constant)")
        for name in ("f", "df"):
            if np.asarray(getattr(self, name)).shape != (n_bins,):
                raise ValueError(f"{name} must have shape ({n_bins},), got {np.asarray(getattr(self, name)).shape}")
        object.__setattr__(self, "bin_edges", edges)
        object.__setattr__(self, "f", np.asarray(self.f, dtype=np.float64))
        object.__setattr__(self, "df", np.asarray(self.df, dtype=np.float64))
        if self.f_bootstrap is not None:
            boot = np.asarray(self.f_bootstrap, dtype=np.float64)
            if boot.ndim != 2 or boot.shape[1] != n_bins:
                raise ValueError(f"f_bootstrap must have shape (n_bootstraps, {n_bins}), got {boot.shape}")
            object.__setattr__(self, "f_bootstrap", boot)

    @property
    def bin_centers(self) -> np.ndarray:
        """Bin centres, shape (n_bins,), in ``cv_units``."""
        return 0.5 * (self.bin_edges[1:] + self.bin_edges[:-1])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable content (``inf`` written as null)."""

        def clean(a: np.ndarray) -> list[Any]:
            return [None if not np.isfinite(v) else float(v) for v in np.ravel(a)]

        return {
            "cv_name": self.cv_name,
            "cv_units": self.cv_units,
            "energy_units": "kT",
            "temperature": self.temperature,
            "method": self.method,
            "bin_edges": self.bin_edges.tolist(),
            "bin_centers": self.bin_centers.tolist(),
            "f": clean(self.f),
            "df": clean(self.df),
            "f_bootstrap": None if self.f_bootstrap is None else [clean(row) for row in self.f_bootstrap],
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON (atomically)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> FreeEnergyProfile:
        """Read a profile written by :meth:`save`."""
        data = json.loads(Path(path).read_text())

        def arr(values: Sequence[Any]) -> np.ndarray:
            return np.array([np.inf if v is None else v for v in values], dtype=np.float64)

        boot = data.get("f_bootstrap")
        return cls(
            data["cv_name"],
            data["cv_units"],
            np.asarray(data["bin_edges"]),
            arr(data["f"]),
            arr(data["df"]),
            float(data["temperature"]),
            data.get("method", ""),
            None if boot is None else np.array([arr(row) for row in boot]),
        )


@dataclass(frozen=True)
class FreeEnergyDifference:
    r""":math:`\Delta F = F_A - F_B = -\ln(P_A/P_B)` between two CV ranges.

    Attributes
    ----------
    value, error : float
        kT (``error`` is one standard error).
    temperature : float or None
        K; needed for the kJ/mol properties.
    state_a, state_b : (float, float)
        The CV ranges ``(low, high]``.
    cv_name : str
    method : str
    """

    value: float
    error: float
    temperature: float | None
    state_a: CVRange
    state_b: CVRange
    cv_name: str
    method: str

    @property
    def value_kj_per_mol(self) -> float:
        return self.value * self._kt()

    @property
    def error_kj_per_mol(self) -> float:
        return self.error * self._kt()

    @property
    def population_a(self) -> float:
        r"""Fraction of A among A and B: :math:`1/(1 + e^{\Delta F})`."""
        return float(1.0 / (1.0 + np.exp(self.value)))

    @property
    def population_a_error(self) -> float:
        """Standard error of :attr:`population_a` (delta method)."""
        p = self.population_a
        return float(p * (1.0 - p) * self.error)

    def _kt(self) -> float:
        if self.temperature is None:
            raise ValueError("this free-energy difference has no temperature; only kT values are available")
        return kt_kj_per_mol(self.temperature)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cv_name": self.cv_name,
            "state_a": list(self.state_a),
            "state_b": list(self.state_b),
            "delta_f_kT": self.value,
            "error_kT": self.error,
            "population_a": self.population_a,
            "population_a_error": self.population_a_error,
            "temperature": self.temperature,
            "method": self.method,
        }
        if self.temperature is not None:
            out.update(delta_f_kJ_per_mol=self.value_kj_per_mol, error_kJ_per_mol=self.error_kj_per_mol)
        return out

    def __str__(self) -> str:
        text = f"dF({self.cv_name} in {self.state_a} - {self.state_b}) = {self.value:.3f} +- {self.error:.3f} kT"
        if self.temperature is not None:
            text += f" = {self.value_kj_per_mol:.2f} +- {self.error_kj_per_mol:.2f} kJ/mol"
        return text


def delta_f(
    profile_or_samples: Any,
    state_a: CVRange = PHI_POSITIVE,
    state_b: CVRange = PHI_NEGATIVE,
    *,
    cv: CollectiveVariable | None = None,
    log_weights: np.ndarray | None = None,
    segments: Sequence[int] | None = None,
    temperature: float | None = None,
) -> FreeEnergyDifference:
    r"""Free-energy difference :math:`F_A - F_B = -\ln(P_A/P_B)` between two CV ranges, with its error.

    Parameters
    ----------
    profile_or_samples : FreeEnergyProfile, UmbrellaResult, Dataset or ndarray
        * a profile (or anything with a ``.profile``, e.g. an umbrella result):
          bins are assigned to a state by their centre; the error is the
          standard deviation over the profile's bootstrap replicates when it
          has them (else the bins' errors are propagated as if independent,
          which ignores correlations and is flagged in ``method``);
        * a :class:`~bgplugin.data.Dataset`: the CV is evaluated on its frames
          and its log-weights (if any) are used;
        * an ndarray of CV values, shape (n,), optionally with ``log_weights``.

        For samples the error is the delta-method standard error with the
        statistical inefficiency of the linearised estimator (pymbar
        ``timeseries``): it accounts for time correlation of frames in the
        given order (within each segment) and treats the log-weights as exact.
        For weights that were themselves estimated (MBAR weights of umbrella
        windows) that misses most of the error: use the umbrella result's
        profile (``delta_f(result)``), whose bootstrap re-solves MBAR.
    state_a, state_b : (float, float)
        CV ranges ``(low, high]`` in the CV's units (radians for dihedrals);
        ``low > high`` wraps around. Default: alanine dipeptide's
        :math:`\phi > 0` versus :math:`\phi < 0`.
    cv : CollectiveVariable or None
        For a dataset: the CV; default the backbone ``phi`` of its topology.
    log_weights : ndarray, shape (n,), or None
        For an array of CV values.
    segments : sequence of int or None
        Lengths of consecutive independent time series in the samples (e.g.
        umbrella windows, tempering states), each sampled with a fixed number
        of frames; default: a dataset's ``metadata["segment_lengths"]``, else
        one series.
    temperature : float or None
        K; taken from the profile or the dataset metadata when not given.

    Returns
    -------
    FreeEnergyDifference
    """
    state_a, state_b = _as_range(state_a, "state_a"), _as_range(state_b, "state_b")
    profile = getattr(profile_or_samples, "profile", profile_or_samples)
    if isinstance(profile, FreeEnergyProfile):
        return _delta_f_profile(profile, state_a, state_b, temperature)
    if isinstance(profile_or_samples, Dataset):
        dataset = profile_or_samples
        if cv is None:
            cv = _default_phi(dataset)
        values = np.asarray(cv(dataset.positions.astype(np.float64)))
        if log_weights is not None:
            raise ValueError("a Dataset carries its own log_weights; do not pass log_weights with it")
        log_w = dataset.log_weights
        if segments is None:
            segments = dataset.metadata.get("segment_lengths")
        if dataset.metadata.get("estimated_log_weights"):
            logger.warning(
                "delta_f: this dataset's log-weights were estimated (%s); the error below treats them as exact and "
                "is too small. Use the profile of the run that made them (e.g. delta_f(umbrella_result))",
                dataset.metadata.get("method"),
            )
        temperature = temperature if temperature is not None else dataset.metadata.get("temperature")
        name = cv.name
    else:
        values = np.asarray(profile_or_samples, dtype=np.float64)
        if values.ndim != 1:
            raise TypeError(
                "delta_f takes a FreeEnergyProfile, an UmbrellaResult, a Dataset or a 1D array of CV values; "
                f"got {type(profile_or_samples).__name__} of shape {getattr(values, 'shape', None)}"
            )
        log_w = None if log_weights is None else np.asarray(log_weights, dtype=np.float64)
        name = cv.name if cv is not None else "cv"
    return _delta_f_samples(values, log_w, state_a, state_b, temperature, name, segments)


def _as_range(cv_range: CVRange, name: str) -> CVRange:
    try:
        low, high = (float(v) for v in cv_range)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a CV range (low, high), got {cv_range!r}") from exc
    return (low, high)


def _default_phi(dataset: Dataset) -> CollectiveVariable:
    if dataset.topology is None:
        raise ValueError("this dataset has no topology; pass cv=... to say which collective variable to use")
    cvs = backbone_dihedrals(dataset.topology, dataset.positions[0].astype(np.float64))
    if "phi" not in cvs:
        raise ValueError(
            f"the dataset's topology has backbone dihedrals {list(cvs)}, not a single 'phi'; pass cv=system.cvs[...]"
        )
    return cvs["phi"]


def _log_state_probability(f: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """log P(state) from bin free energies ``f`` (..., n_bins) = -ln p_i."""
    return logsumexp(-f[..., mask], axis=-1)


def _delta_f_profile(
    profile: FreeEnergyProfile, state_a: CVRange, state_b: CVRange, temperature: float | None
) -> FreeEnergyDifference:
    centers = profile.bin_centers
    mask_a, mask_b = in_range(centers, state_a), in_range(centers, state_b)
    for label, mask, cv_range in (("state_a", mask_a, state_a), ("state_b", mask_b, state_b)):
        if not mask.any():
            raise ValueError(
                f"{label}={cv_range} contains no bin centre of the profile (bins {profile.bin_edges[[0, -1]]})"
            )
    _warn_straddling(profile.bin_edges, state_a, state_b)
    value = float(_log_state_probability(profile.f, mask_b) - _log_state_probability(profile.f, mask_a))
    if profile.f_bootstrap is not None and len(profile.f_bootstrap) >= 2:
        reps = _log_state_probability(profile.f_bootstrap, mask_b) - _log_state_probability(profile.f_bootstrap, mask_a)
        reps = reps[np.isfinite(reps)]
        error = float(np.std(reps, ddof=1)) if len(reps) >= 2 else float("nan")
        method = f"profile, {len(reps)} bootstrap replicates"
    else:
        # independent-bin propagation: d(-ln sum_i e^{-F_i}) = sum_i p_i dF_i within each state
        pa = np.exp(-profile.f[mask_a] - _log_state_probability(profile.f, mask_a))
        pb = np.exp(-profile.f[mask_b] - _log_state_probability(profile.f, mask_b))
        error = float(np.sqrt(np.sum((pa * profile.df[mask_a]) ** 2) + np.sum((pb * profile.df[mask_b]) ** 2)))
        method = "profile, bin errors propagated as independent (approximate: ignores correlations)"
    return FreeEnergyDifference(
        value,
        error,
        temperature if temperature is not None else profile.temperature,
        state_a,
        state_b,
        profile.cv_name,
        method,
    )


def _warn_straddling(edges: np.ndarray, *ranges: CVRange) -> None:
    for cv_range in ranges:
        for bound in cv_range:
            inside = (bound > edges[0] + 1e-12) & (bound < edges[-1] - 1e-12)
            if inside and np.min(np.abs(edges - bound)) > 1e-9 * max(1.0, abs(bound)):
                logger.warning(
                    "CV range bound %g is not a bin edge of the profile; bins are assigned by their centre", bound
                )


def _delta_f_samples(
    values: np.ndarray,
    log_w: np.ndarray | None,
    state_a: CVRange,
    state_b: CVRange,
    temperature: float | None,
    cv_name: str,
    segments: Sequence[int] | None,
) -> FreeEnergyDifference:
    from pymbar import timeseries  # imported here: pymbar prints a banner on import

    n = len(values)
    if n < 2:
        raise ValueError(f"need at least 2 samples, got {n}")
    lengths = [n] if segments is None else [int(m) for m in segments]
    if sum(lengths) != n or min(lengths) < 1:
        raise ValueError(f"segment lengths {lengths} must be positive and add up to the {n} samples")
    if log_w is None:
        w = np.ones(n)
    else:
        if log_w.shape != (n,):
            raise ValueError(f"log_weights must have shape ({n},), got {log_w.shape}")
        w = np.exp(log_w - np.max(log_w))
    w = w * (n / w.sum())  # mean 1
    a, b = in_range(values, state_a).astype(float), in_range(values, state_b).astype(float)
    p_a, p_b = float(np.mean(w * a)), float(np.mean(w * b))
    if p_a == 0 or p_b == 0:
        empty = "state_a" if p_a == 0 else "state_b"
        raise ValueError(f"no sample (with non-zero weight) falls in {empty}; cannot estimate a free-energy difference")
    # linearised estimator: ln p_a - ln p_b ~ mean(h) with h_n = w_n (a_n / p_a - b_n / p_b);
    # segments are strata of fixed size (windows, states): var = sum_k (N_k/N)^2 var_k(h) g_k / N_k
    h = w * (a / p_a - b / p_b)
    variance, g_max = 0.0, 1.0
    for part in np.split(h, np.cumsum(lengths)[:-1]):
        if len(part) < 2 or np.ptp(part) == 0:
            continue
        g = float(timeseries.statistical_inefficiency(part, mintime=3, fast=True))
        g_max = max(g_max, g)
        variance += (len(part) / n) ** 2 * np.var(part, ddof=1) * g / len(part)
    kind = "weighted samples" if log_w is not None else "samples"
    where = f"{len(lengths)} segments, " if len(lengths) > 1 else ""
    return FreeEnergyDifference(
        float(-np.log(p_a / p_b)),
        float(np.sqrt(variance)),
        None if temperature is None else float(temperature),
        state_a,
        state_b,
        cv_name,
        f"{kind}, delta method, {where}largest statistical inefficiency {g_max:.1f}",
    )


def plot_profile(
    profile: FreeEnergyProfile | Sequence[FreeEnergyProfile],
    path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    units: Literal["kT", "kJ/mol", "kcal/mol"] = "kJ/mol",
    degrees: bool = True,
    title: str | None = None,
) -> Path:
    """Plot one or more profiles with error bars to a PNG (written atomically).

    Parameters
    ----------
    profile : FreeEnergyProfile or sequence of them
    path : path
        Output file (``.png``).
    labels : sequence of str or None
        Legend entries, one per profile.
    units : {"kT", "kJ/mol", "kcal/mol"}
        Energy axis.
    degrees : bool
        Show radian CVs in degrees.
    title : str or None
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = [profile] if isinstance(profile, FreeEnergyProfile) else list(profile)
    if not profiles:
        raise ValueError("plot_profile needs at least one profile")
    if labels is not None and len(labels) != len(profiles):
        raise ValueError(f"got {len(labels)} labels for {len(profiles)} profiles")
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, prof in enumerate(profiles):
        f, df = prof.in_units(units)
        x = prof.bin_centers
        scale_x = degrees and prof.cv_units == "rad"
        ok = np.isfinite(f)
        ax.errorbar(
            np.degrees(x[ok]) if scale_x else x[ok],
            f[ok],
            yerr=df[ok],
            marker="o",
            markersize=3,
            capsize=2,
            label=None if labels is None else labels[i],
        )
    first = profiles[0]
    x_units = "deg" if degrees and first.cv_units == "rad" else first.cv_units
    ax.set_xlabel(f"{first.cv_name} ({x_units})")
    ax.set_ylabel(f"F ({units})")
    if title:
        ax.set_title(title)
    if labels is not None:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
