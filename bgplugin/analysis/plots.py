"""PNG plots of a reweighting run: Ramachandran surfaces, energy histograms, weights, profiles.

Every function draws on its own ``matplotlib.figure.Figure`` with the Agg
canvas (no pyplot state, no display needed) and writes the PNG atomically
through :func:`bgplugin.fileio.atomic_write`. The training loss plot is
written by :class:`bgplugin.training.Trainer` itself (``loss.png``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.special import logsumexp

from bgplugin.analysis.profiles import align_to_reference, free_energy_profile_2d
from bgplugin.fileio import atomic_write
from bgplugin.reweighting.weights import ess as kish_ess
from bgplugin.simulation.profiles import FreeEnergyProfile

logger = logging.getLogger(__name__)

#: One Ramachandran panel: (label, phi (n,) rad, psi (n,) rad, weights (n,) or None).
RamachandranPanel = tuple[str, Any, Any, Any]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: str | Path) -> Path:
    figure.tight_layout()
    return atomic_write(path, lambda stream: figure.savefig(stream, format="png"))


def _panel_title(label: str, weights: np.ndarray | None, n: int) -> str:
    """``label (n=...)``, with the Kish effective sample size when the panel is weighted."""
    if weights is None:
        return f"{label} (n={n})"
    w = np.asarray(weights, dtype=np.float64)
    with np.errstate(divide="ignore"):  # weight 0: log-weight -inf, counted in n
        n_effective = kish_ess(np.log(w)) * len(w)
    return f"{label} (n={n}, {n_effective:.1f} effective)"


def plot_ramachandran(
    panels: Sequence[RamachandranPanel],
    path: str | Path,
    *,
    bins: int = 60,
    f_max: float = 10.0,
    title: str | None = None,
) -> Path:
    r"""Side-by-side Ramachandran free-energy surfaces :math:`F(\phi, \psi) = -\ln p` (kT), one colour scale.

    Parameters
    ----------
    panels : sequence of (label, phi, psi, weights or None)
        ``phi``, ``psi``: shape (n,), radians; ``weights``: shape (n,),
        non-negative (e.g. ``normalized_weights(log_w)``), or None for equal
        weights.
    path : path
        Output ``.png``.
    bins : int
        Bins per axis over (-180, 180] degrees.
    f_max : float
        Top of the shared colour scale, kT above each panel's lowest bin;
        empty bins are white.
    title : str or None

    Returns
    -------
    Path
    """
    if not panels:
        raise ValueError("plot_ramachandran needs at least one panel")
    figure = _figure(3.6 * len(panels) + 0.8, 3.6)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    mesh = None
    for ax, panel in zip(axes, panels):
        if len(panel) != 4:
            raise ValueError(f"each panel is (label, phi, psi, weights or None), got {len(panel)} entries")
        label, phi, psi, weights = panel
        values = np.column_stack([np.asarray(phi, dtype=np.float64), np.asarray(psi, dtype=np.float64)])
        surface = free_energy_profile_2d(values, ("phi", "psi"), bins, weights=weights, n_bootstrap=0)
        f = np.where(np.isfinite(surface.f), surface.f, np.nan)
        mesh = ax.pcolormesh(
            np.degrees(surface.edges_x), np.degrees(surface.edges_y), f.T, vmin=0.0, vmax=f_max, cmap="viridis"
        )
        ax.set_title(_panel_title(label, weights, len(values)), fontsize=9)
        ax.set_xlabel(r"$\phi$ (deg)")
        ax.set_xlim(-180, 180)
        ax.set_ylim(-180, 180)
        ax.set_aspect("equal")
        ax.set_xticks([-180, -90, 0, 90, 180])
        ax.set_yticks([-180, -90, 0, 90, 180])
    axes[0].set_ylabel(r"$\psi$ (deg)")
    if mesh is not None:
        figure.colorbar(mesh, ax=list(axes), label=r"$F = -\ln p$ (kT)", shrink=0.85)
    if title:
        figure.suptitle(title)
    figure.set_layout_engine("constrained")
    return atomic_write(path, lambda stream: figure.savefig(stream, format="png"))


def plot_energy_histograms(
    path: str | Path,
    data: Mapping[str, tuple[Any, Any]],
    *,
    bins: int = 80,
    range: tuple[float, float] | None = None,  # noqa: A002 - numpy's name for it
    units: str = "kT",
    title: str | None = None,
) -> Path:
    """Overlaid (weighted) histograms of reduced energies, e.g. data, flow and reweighted flow.

    Parameters
    ----------
    path : path
        Output ``.png``.
    data : mapping of label to (u, weights or None)
        ``u``: shape (n,), energies in ``units`` (non-finite values are left
        out and counted in the legend); ``weights``: shape (n,), non-negative.
    bins : int
    range : (float, float) or None
        Energy axis; default: the 0.1-99.9 % range of the first entry (by
        convention the reference data) widened by half its width, because
        untrained flows produce energies many orders of magnitude higher.
        The share of each histogram's weight outside the range is in the legend.
    units : str
        Axis label.
    title : str or None

    Returns
    -------
    Path
    """
    if not data:
        raise ValueError("plot_energy_histograms needs at least one entry")
    entries = []
    for label, pair in data.items():
        if len(pair) != 2:
            raise ValueError(f"entry {label!r} must be (u, weights or None)")
        u = np.asarray(pair[0], dtype=np.float64)
        w = np.ones_like(u) if pair[1] is None else np.asarray(pair[1], dtype=np.float64)
        if w.shape != u.shape:
            raise ValueError(f"entry {label!r}: weights shape {w.shape} differs from energies shape {u.shape}")
        if (w < 0).any() or not np.isfinite(w).all():
            raise ValueError(f"entry {label!r}: weights must be finite and non-negative")
        entries.append((str(label), u, w))
    if range is None:
        first = entries[0][1][np.isfinite(entries[0][1])]
        if len(first) == 0:
            raise ValueError(f"entry {entries[0][0]!r} has no finite energy; pass range=(low, high)")
        low, high = np.quantile(first, [0.001, 0.999])
        width = max(high - low, 1.0)
        range = (float(low - 0.5 * width), float(high + 0.5 * width))
    low, high = (float(v) for v in range)
    if not high > low:
        raise ValueError(f"range must be (low, high) with high > low, got {range}")
    figure = _figure(6.0, 4.0)
    ax = figure.add_subplot()
    for label, u, w in entries:
        finite = np.isfinite(u)
        total = w[finite].sum()
        if total <= 0:
            logger.warning("plot_energy_histograms: %r has no finite energy with positive weight; skipped", label)
            continue
        inside = finite & (u >= low) & (u <= high)
        outside = 1.0 - w[inside].sum() / total
        text = label
        extras = []
        if outside > 0:
            extras.append(f"{100 * outside:.3g}% outside")
        if outside > 0.5:  # most of it is off the plot: say where it is
            extras.append(f"median {np.median(u[finite]):.3g} {units}")
        if (~finite).any():
            extras.append(f"{int((~finite).sum())} failed")
        if extras:
            text += f" ({', '.join(extras)})"
        ax.hist(u[inside], bins=bins, range=(low, high), weights=w[inside] / total, histtype="step", lw=1.5, label=text)
    ax.set_xlabel(f"u ({units})")
    ax.set_ylabel("probability per bin")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(figure, path)


def _weight_decades(log_w: np.ndarray, decades: float) -> tuple[np.ndarray, float]:
    """``log10`` of the normalised finite weights that lie at most ``decades`` below ``1/n``, and that floor."""
    finite = log_w[np.isfinite(log_w)]
    lowest = -math.log10(len(log_w)) - decades
    if not len(finite):
        return finite, lowest
    normalised = (finite - logsumexp(finite)) / math.log(10.0)
    return normalised[normalised >= lowest], lowest


def plot_weight_distribution(
    log_w: Any, path: str | Path, *, bins: int = 60, title: str | None = None, decades: float = 15.0
) -> Path:
    r"""Histogram of the log normalised importance weights, with the Kish ESS in the title.

    Parameters
    ----------
    log_w : array-like, shape (n,)
        Unnormalised log-weights (``-inf`` = weight 0, counted in the title).
    path : path
        Output ``.png``.
    bins : int
    title : str or None
        Prefix of the title.
    decades : float
        Weights more than this many decades below equal weights (``1/n``) are
        left out of the histogram and counted in the title: a few samples with
        absurd energies (log-weights of -1e9) would otherwise squeeze every
        other sample into one bar.

    Returns
    -------
    Path

    Notes
    -----
    The x axis is :math:`\log_{10} \bar w_i` with :math:`\sum_i \bar w_i = 1`;
    the dashed line marks equal weights, :math:`\bar w = 1/n`. A healthy
    proposal gives a narrow peak near it; a long right tail of a few dominant
    weights means a low ESS.
    """
    array = np.asarray(log_w, dtype=np.float64)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"log_w must be a non-empty 1D array, got shape {array.shape}")
    if not decades > 0:
        raise ValueError(f"decades must be > 0, got {decades!r}")
    fraction = kish_ess(array)
    finite = np.isfinite(array)
    figure = _figure(6.0, 4.0)
    ax = figure.add_subplot()
    n = len(array)
    shown, lowest = _weight_decades(array, decades)
    if len(shown):
        ax.hist(shown, bins=bins, color="tab:blue", alpha=0.8)
        ax.axvline(-math.log10(n), color="k", ls="--", lw=1, label="equal weights (1/n)")
        ax.legend(fontsize=8)
    ax.set_xlabel(r"$\log_{10}$ normalised weight")
    ax.set_ylabel("samples")
    text = f"ESS = {100 * fraction:.3g}% ({fraction * n:.1f} of {n})"
    if (~finite).any():
        text += f", {int((~finite).sum())} with weight 0"
    hidden = int(finite.sum()) - len(shown)
    if hidden:
        text += f", {hidden} below $10^{{{lowest:.0f}}}$ not shown"
    ax.set_title(f"{title}: {text}" if title else text, fontsize=10)
    return _save(figure, path)


def plot_profiles_with_reference(
    path: str | Path,
    profiles: Mapping[str, FreeEnergyProfile],
    reference: FreeEnergyProfile | None = None,
    *,
    units: Literal["kT", "kJ/mol", "kcal/mol"] = "kT",
    align: bool = True,
    f_max: float = 6.0,
    degrees: bool = True,
    title: str | None = None,
) -> Path:
    """Profiles with error bars over a reference (line with a shaded one-sigma band).

    Parameters
    ----------
    path : path
        Output ``.png``.
    profiles : mapping of label to FreeEnergyProfile
        E.g. ``{"flow (raw)": ..., "flow (reweighted)": ...}``.
    reference : FreeEnergyProfile or None
        E.g. ``bundled_reference().profile``; drawn relative to its lowest bin.
    units : {"kT", "kJ/mol", "kcal/mol"}
    align : bool
        Shift each profile onto the reference with
        :func:`~bgplugin.analysis.align_to_reference` (bins with reference
        F < ``f_max`` kT); profiles on other bins, or without overlap, are
        drawn unshifted.
    f_max : float
        kT, for the alignment.
    degrees : bool
        Show radian CVs in degrees.
    title : str or None

    Returns
    -------
    Path
    """
    if not profiles and reference is None:
        raise ValueError("nothing to plot: give profiles and/or a reference")
    figure = _figure(6.5, 4.2)
    ax = figure.add_subplot()
    first = reference if reference is not None else next(iter(profiles.values()))
    to_degrees = degrees and first.cv_units == "rad"

    def xs(profile: FreeEnergyProfile) -> np.ndarray:
        return np.degrees(profile.bin_centers) if to_degrees else profile.bin_centers

    if reference is not None:
        f, df = reference.in_units(units)
        finite = np.isfinite(f)
        f = f - np.min(f[finite])
        x = xs(reference)
        ax.plot(x[finite], f[finite], color="k", lw=1.5, label="reference")
        ax.fill_between(x[finite], (f - df)[finite], (f + df)[finite], color="k", alpha=0.15, lw=0)
    for label, profile in profiles.items():
        f, df = profile.in_units(units)
        shift = 0.0
        if align and reference is not None:
            try:
                offset, _ = align_to_reference(profile, reference, f_max)
                shift = offset * _scale(profile, units)
            except ValueError as exc:
                logger.warning("plot_profiles_with_reference: %r not aligned (%s)", label, exc)
        finite = np.isfinite(f)
        ax.errorbar(
            xs(profile)[finite], f[finite] + shift, yerr=df[finite], marker="o", ms=3, capsize=2, lw=1, label=label
        )
    ax.set_xlabel(f"{first.cv_name} ({'deg' if to_degrees else first.cv_units})")
    ax.set_ylabel(f"F ({units})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    elif align and reference is not None:
        ax.set_title("profiles aligned to the reference (population-weighted offset)", fontsize=9)
    return _save(figure, path)


def _scale(profile: FreeEnergyProfile, units: str) -> float:
    return {"kT": 1.0, "kJ/mol": profile.kt, "kcal/mol": profile.kt / 4.184}[units]
