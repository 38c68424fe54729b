"""Analysis: weighted 1D/2D profiles against analytic answers, profile comparison, inputs, chirality, plots."""

from __future__ import annotations

import math
from pathlib import Path

import mdtraj
import numpy as np
import pytest
from scipy import integrate, stats

from bgplugin.analysis import (
    FreeEnergyProfile,
    FreeEnergyProfile2D,
    chirality_fraction,
    classify_chirality,
    compare_profiles,
    cv_values,
    delta_f,
    fix_chirality,
    free_energy_profile,
    free_energy_profile_2d,
    mirror,
    plot_energy_histograms,
    plot_profiles_with_reference,
    plot_ramachandran,
    plot_weight_distribution,
)
from bgplugin.data import Dataset
from bgplugin.reweighting import WeightedTrajectory
from bgplugin.simulation import is_l_amino_acid

N_SIGMA = 4.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def potential(phi: np.ndarray) -> np.ndarray:
    """A periodic, asymmetric test potential in kT."""
    return 1.5 * (1 + np.cos(phi)) + 0.8 * np.sin(2 * phi)


def exact_bin_free_energies(density, edges: np.ndarray) -> np.ndarray:
    """-ln of the integral of an (unnormalised) density over each bin."""
    return np.array([-math.log(integrate.quad(density, a, b)[0]) for a, b in zip(edges[:-1], edges[1:])])


# ----------------------------------------------------------------------------- 1D profiles
def test_weighted_profile_matches_analytic_profile() -> None:
    """Uniform samples on (-pi, pi] reweighted to exp(-U): every bin within N_SIGMA, and a chi^2 test
    with the bootstrap covariance (the bins share the reference bin, so they are correlated).

    Independent log-normal noise on the weights leaves the target unchanged (its mean is a constant
    factor) but makes the weights vary within each bin, so errors that ignored the weights would be
    about e^{1/2} too small and fail the chi^2 test."""
    rng = np.random.default_rng(1)
    phi = rng.uniform(-np.pi, np.pi, 40_000)
    log_w = -potential(phi) + rng.standard_normal(len(phi))
    n_boot = 400
    profile = free_energy_profile(phi, "phi", 36, log_weights=log_w, n_bootstrap=n_boot, seed=1)
    assert profile.cv_name == "phi" and profile.cv_units == "rad"
    np.testing.assert_allclose(profile.bin_edges[[0, -1]], [-np.pi, np.pi])
    exact = exact_bin_free_energies(lambda t: math.exp(-potential(np.array(t))), profile.bin_edges)
    j = int(np.argmin(profile.f))
    others = np.arange(36) != j
    diff = (profile.f - (exact - exact[j]))[others]
    assert profile.f[j] == 0.0 and profile.df[j] == 0.0
    np.testing.assert_array_less(np.abs(diff), N_SIGMA * profile.df[others])
    rel = profile.f_bootstrap[:, others] - profile.f_bootstrap[:, [j]]
    chi2 = diff @ np.linalg.solve(np.cov(rel.T), diff)
    k = int(others.sum())
    hotelling = (n_boot - 1) / (n_boot - k)  # the covariance itself is estimated from n_boot replicates
    assert chi2 < stats.chi2.ppf(0.999, k) * hotelling, chi2
    # the delta-method errors (n_bootstrap=0) agree with the bootstrap
    quick = free_energy_profile(phi, "phi", 36, log_weights=log_w, n_bootstrap=0)
    np.testing.assert_array_equal(quick.f, profile.f)
    assert quick.f_bootstrap is None
    np.testing.assert_allclose(quick.df[others], profile.df[others], rtol=0.2)


def test_unweighted_profile_of_von_mises_samples() -> None:
    rng = np.random.default_rng(2)
    kappa, mu = 2.0, 1.0
    psi = rng.vonmises(mu, kappa, 50_000)
    profile = free_energy_profile(psi, "psi", 24, n_bootstrap=100, seed=0)
    exact = exact_bin_free_energies(lambda t: math.exp(kappa * math.cos(t - mu)), profile.bin_edges)
    j = int(np.argmin(profile.f))
    others = np.arange(24) != j
    np.testing.assert_array_less(np.abs(profile.f - (exact - exact[j]))[others], N_SIGMA * profile.df[others])
    assert "equal weights" in profile.method


def test_profile_binning_edges_wrapping_and_empty_bins() -> None:
    values = np.array([-np.pi, np.pi, 0.0, 1e-12, 7 * np.pi / 4])  # -pi wraps to pi; 7pi/4 wraps to -pi/4
    profile = free_energy_profile(values, "phi", 4, n_bootstrap=0)
    counts = np.exp(-profile.f) / np.exp(-profile.f).max() * 2  # the largest bins hold 2 frames
    np.testing.assert_allclose(counts, [0.0, 2.0, 1.0, 2.0], atol=1e-12)  # bins (-pi,-pi/2], ..., (pi/2, pi]
    assert np.isinf(profile.f[0]) and np.isinf(profile.df[0])
    # a non-periodic CV: (min, max) by default, both ends included; explicit ranges drop outside frames
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    distance = free_energy_profile(x, "d", 4, n_bootstrap=0)
    np.testing.assert_allclose(distance.bin_edges, [0, 1, 2, 3, 4])
    np.testing.assert_allclose(np.exp(-distance.f), [1.0, 0.5, 0.5, 0.5])  # [0,1] holds 0 and 1, then (1,2], ...
    part = free_energy_profile(x, "d", 2, range=(0.5, 2.5), n_bootstrap=0)
    np.testing.assert_allclose(part.f, [0.0, 0.0])
    with pytest.raises(ValueError, match="not both"):
        free_energy_profile(x, "d", 2, log_weights=np.zeros(5), weights=np.ones(5))
    with pytest.raises(ValueError, match="n_bootstrap"):
        free_energy_profile(x, "d", 2, n_bootstrap=1)
    with pytest.raises(ValueError, match="positive weight"):
        free_energy_profile(x, "d", 2, log_weights=np.full(5, -np.inf))


def test_profile_inputs_agree(ala2, ala2_frames, tmp_path: Path) -> None:
    """WeightedTrajectory, Dataset, mdtraj, positions and CV values give the same weighted profile."""
    rng = np.random.default_rng(3)
    log_w = rng.standard_normal(len(ala2_frames))
    traj = mdtraj.Trajectory(ala2_frames.astype(np.float32), ala2.topology)
    xyz = traj.xyz.astype(np.float64)
    phi = ala2.cvs["phi"](xyz)
    kwargs = dict(bins=12, n_bootstrap=20, seed=4)
    expected = free_energy_profile(phi, "phi", log_weights=log_w, **kwargs)
    wt = WeightedTrajectory(traj, log_w)
    data = Dataset(xyz, ala2.topology, log_w, "test weights", {"temperature": 310.0})
    candidates = {
        "weighted trajectory": free_energy_profile(wt, "phi", **kwargs),
        "reloaded": free_energy_profile(WeightedTrajectory.load(wt.save(tmp_path / "wt.h5")), "phi", **kwargs),
        "dataset": free_energy_profile(data, "phi", **kwargs),
        "mdtraj": free_energy_profile(traj, "phi", log_weights=log_w, **kwargs),
        "positions": free_energy_profile(xyz, "phi", log_weights=log_w, system=ala2, **kwargs),
        "cv object": free_energy_profile(traj, ala2.cvs["phi"], weights=np.exp(log_w), **kwargs),
    }
    for name, profile in candidates.items():
        np.testing.assert_allclose(profile.f, expected.f, rtol=0, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(profile.df, expected.df, rtol=0, atol=1e-9, err_msg=name)
    assert candidates["dataset"].temperature == 310.0
    assert candidates["positions"].temperature == ala2.temperature
    both = cv_values(wt, ("phi", "psi"))
    assert both.values.shape == (len(ala2_frames), 2) and both.names == ("phi", "psi")
    np.testing.assert_allclose(both.values[:, 1], ala2.cvs["psi"](xyz), atol=1e-6)
    with pytest.raises(ValueError, match="carries its own"):
        free_energy_profile(wt, "phi", log_weights=log_w)
    with pytest.raises(ValueError, match="unknown CV 'omega'"):
        free_energy_profile(traj, "omega")


# ----------------------------------------------------------------------------- 2D profiles
def test_2d_profile_of_a_product_distribution() -> None:
    """phi and psi independent (von Mises): F(phi, psi) = F(phi) + F(psi) bin by bin, within N_SIGMA."""
    rng = np.random.default_rng(5)
    (k1, m1), (k2, m2) = (2.0, -1.0), (1.0, 2.0)
    values = np.column_stack([rng.vonmises(m1, k1, 100_000), rng.vonmises(m2, k2, 100_000)])
    surface = free_energy_profile_2d(values, bins=(18, 12), n_bootstrap=50, seed=0)
    assert surface.f.shape == (18, 12) and surface.names == ("phi", "psi") and surface.units == ("rad", "rad")
    fx = exact_bin_free_energies(lambda t: math.exp(k1 * math.cos(t - m1)), surface.edges_x)
    fy = exact_bin_free_energies(lambda t: math.exp(k2 * math.cos(t - m2)), surface.edges_y)
    exact = fx[:, None] + fy[None, :]
    i, j = np.unravel_index(np.argmin(surface.f), surface.f.shape)
    exact = exact - exact[i, j]
    use = (exact < 5.0) & (surface.df > 0)
    assert use.sum() > 100
    np.testing.assert_array_less(np.abs(surface.f - exact)[use], N_SIGMA * surface.df[use])
    # weighting uniform samples by the product density gives the same surface
    uniform = rng.uniform(-np.pi, np.pi, (200_000, 2))
    log_w = k1 * np.cos(uniform[:, 0] - m1) + k2 * np.cos(uniform[:, 1] - m2)
    weighted = free_energy_profile_2d(uniform, bins=(18, 12), log_weights=log_w, n_bootstrap=0)
    i, j = np.unravel_index(np.argmin(weighted.f), weighted.f.shape)
    exact_w = fx[:, None] + fy[None, :] - (fx[i] + fy[j])
    use = (exact_w < 5.0) & (weighted.df > 0)
    np.testing.assert_array_less(np.abs(weighted.f - exact_w)[use], N_SIGMA * weighted.df[use])


def test_2d_profile_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    surface = free_energy_profile_2d(rng.vonmises(0.0, 1.0, (2000, 2)), bins=8, n_bootstrap=0, temperature=320.0)
    back = FreeEnergyProfile2D.load(surface.save(tmp_path / "surface.json"))
    np.testing.assert_array_equal(back.f, surface.f)
    np.testing.assert_array_equal(back.df, surface.df)
    np.testing.assert_array_equal(back.edges_x, surface.edges_x)
    assert back.names == surface.names and back.temperature == 320.0 and back.method == surface.method
    f_kj, _ = back.in_units("kJ/mol")
    np.testing.assert_allclose(f_kj, surface.f * surface.kt)
    with pytest.raises(ValueError, match="shape"):
        FreeEnergyProfile2D(np.arange(3.0), np.arange(3.0), np.zeros((2, 3)), np.zeros((2, 3)), ("a", "b"), 300.0)


# ----------------------------------------------------------------------------- comparison
def _profile(f: np.ndarray, df: np.ndarray | None = None) -> FreeEnergyProfile:
    edges = np.linspace(-np.pi, np.pi, len(f) + 1)
    return FreeEnergyProfile("phi", "rad", edges, f, np.full(len(f), 0.1) if df is None else df, 300.0, "test")


def test_compare_profiles_with_a_known_offset() -> None:
    rng = np.random.default_rng(7)
    ref_f = rng.uniform(0.0, 8.0, 36)
    ref_f -= ref_f.min()
    ref_f[5] = np.inf  # an empty bin is skipped
    reference = _profile(ref_f)
    shifted = _profile(ref_f + 1.7)
    out = compare_profiles(shifted, reference, f_max=6.0)
    assert out["rmse"] == pytest.approx(0.0, abs=1e-12)
    assert out["max_abs_difference"] == pytest.approx(0.0, abs=1e-12)
    assert out["offset"] == pytest.approx(-1.7)
    assert out["n_bins"] == int(np.sum(np.isfinite(ref_f) & (ref_f < 6.0)))
    assert out["delta_f_difference"] == pytest.approx(0.0, abs=1e-12)
    assert out["delta_f"] == pytest.approx(delta_f(reference).value)
    assert out["fraction_within_2_sigma"] == 1.0


def test_compare_profiles_one_bin_off() -> None:
    """One bin raised by d: after the population-weighted alignment the RMSE has a closed form."""
    ref_f = np.array([0.0, 1.0, 2.0, 0.5, 3.0, 8.0])
    d, k = 0.9, 1
    f = ref_f.copy()
    f[k] += d
    out = compare_profiles(_profile(f), _profile(ref_f), f_max=6.0)
    used = ref_f < 6.0
    pi = np.exp(-ref_f[used]) / np.exp(-ref_f[used]).sum()
    offset = -pi[k] * d
    diffs = np.full(used.sum(), offset)
    diffs[k] += d
    assert out["offset"] == pytest.approx(offset)
    assert out["rmse"] == pytest.approx(np.sqrt(np.mean(diffs**2)))
    assert out["max_abs_difference"] == pytest.approx(d * (1 - pi[k]))
    assert out["n_bins"] == 5
    with pytest.raises(ValueError, match="different bins"):
        compare_profiles(_profile(np.zeros(4)), _profile(np.zeros(6)))


# ----------------------------------------------------------------------------- chirality
def test_fix_chirality_filter_and_mirror(ala2, ala2_frames) -> None:
    frames = ala2_frames[:10].copy()
    frames[[1, 4, 7]] = mirror(frames[[1, 4, 7]])  # D-alanine
    assert chirality_fraction(frames, ala2.topology) == pytest.approx(0.3)
    kept, info = fix_chirality(frames, ala2.topology, "filter")
    assert len(kept) == 7 and info["n_removed"] == 3 and info["n_wrong"] == 3
    np.testing.assert_array_equal(kept, frames[info["keep"]])
    fixed, info = fix_chirality(frames, ala2.topology, "mirror")
    assert len(fixed) == 10 and info["n_mirrored"] == 3 and info["n_removed"] == 0
    assert is_l_amino_acid(fixed, ala2.topology).all()
    np.testing.assert_array_equal(fixed[[1, 4, 7]], ala2_frames[[1, 4, 7]])  # mirroring twice is the identity
    classes = classify_chirality(frames, ala2.topology)
    assert classes.n_centers == 1 and not classes.mixed.any()
    with pytest.raises(ValueError, match="mode"):
        fix_chirality(frames, ala2.topology, "flip")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- plots
def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5_000


def test_ramachandran_panel_titles_give_the_effective_sample_size_of_weighted_panels() -> None:
    from bgplugin.analysis.plots import _panel_title

    assert _panel_title("data", None, 50) == "data (n=50)"
    assert _panel_title("flow, reweighted", np.full(50, 0.3), 50) == "flow, reweighted (n=50, 50.0 effective)"
    assert _panel_title("w", np.r_[1.0, np.full(99, 1e-12)], 100) == "w (n=100, 1.0 effective)"
    assert _panel_title("w", np.r_[1.0, 1.0, 0.0, 0.0], 4) == "w (n=4, 2.0 effective)"
    assert _panel_title("w", np.zeros(3), 3) == "w (n=3, 0.0 effective)"


def test_weight_histogram_leaves_out_weights_far_below_equal_weights(tmp_path: Path) -> None:
    from bgplugin.analysis.plots import _weight_decades

    log_w = np.r_[np.log([0.5, 0.25, 0.25]), -1e9, -np.inf]  # n = 5: equal weights 10^-0.7, floor 10^-15.7
    shown, lowest = _weight_decades(log_w, 15.0)
    assert lowest == pytest.approx(-math.log10(5) - 15.0)
    np.testing.assert_allclose(shown, np.log10([0.5, 0.25, 0.25]))  # normalised over every finite weight
    shown, _ = _weight_decades(np.r_[0.0, -30.0, -50.0], 15.0)  # 10^-13.0 is kept, 10^-21.7 is not
    np.testing.assert_allclose(shown, [0.0, -30.0 / math.log(10.0)], atol=1e-12)
    assert len(_weight_decades(np.full(3, -np.inf), 15.0)[0]) == 0
    assert _is_png(plot_weight_distribution(log_w, tmp_path / "w.png"))
    with pytest.raises(ValueError, match="decades must be > 0"):
        plot_weight_distribution(log_w, tmp_path / "x.png", decades=0)


def test_plots_write_pngs_atomically(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    phi, psi = rng.vonmises(-1.5, 2.0, 3000), rng.vonmises(2.5, 1.5, 3000)
    log_w = 0.5 * rng.standard_normal(3000)
    log_w[:10] = -np.inf
    weights = np.exp(log_w)
    paths = [
        plot_ramachandran([("data", phi, psi, None), ("reweighted", phi, psi, weights)], tmp_path / "rama.png"),
        plot_energy_histograms(
            tmp_path / "energies.png",
            {"data": (rng.normal(-50, 4, 3000), None), "flow": (np.append(rng.normal(-45, 6, 2999), np.inf), None)},
        ),
        plot_weight_distribution(log_w, tmp_path / "weights.png"),
    ]
    profile = free_energy_profile(phi, "phi", 36, n_bootstrap=0)
    reweighted = free_energy_profile(phi, "phi", 36, weights=weights, n_bootstrap=20, seed=0)
    paths.append(
        plot_profiles_with_reference(
            tmp_path / "profiles.png", {"flow": profile, "reweighted": reweighted}, reference=profile
        )
    )
    paths.append(plot_profiles_with_reference(tmp_path / "alone.png", {"flow": profile}, units="kJ/mol"))
    for path in paths:
        assert _is_png(path), path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temporary files
    with pytest.raises(ValueError, match="at least one panel"):
        plot_ramachandran([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="non-negative"):
        plot_energy_histograms(tmp_path / "x.png", {"a": (np.zeros(3), -np.ones(3))})
