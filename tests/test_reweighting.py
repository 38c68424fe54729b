"""Reweighting: weights and ESS against closed forms, a mixture with known dF/mean/normaliser, clipping,
WeightedTrajectory on disk, and the end-to-end path on alanine dipeptide with OpenMM (and GFN2-xTB)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mdtraj
import numpy as np
import pytest
import torch
from scipy.stats import norm

from bgplugin.analysis import classify_chirality, delta_f, mirror
from bgplugin.data import Dataset
from bgplugin.energies import FrameStatus, OpenMMEnergy, ParticleEnergy, XTBEnergy, available_backends
from bgplugin.flows import build_flow
from bgplugin.reweighting import (
    WeightedTrajectory,
    clip_log_weights,
    ess,
    forward_ess,
    log_weights,
    normalized_weights,
    proposal_is_reflection_symmetric,
    reweight,
    reweight_samples,
    target_likelihood,
    weight_diagnostics,
)

N_SIGMA = 4.0


# ----------------------------------------------------------------- analytic targets and proposals
def chi2_plus_one(sigma_p: float, sigma_q: float, shift: float) -> float:
    """Per-dimension E_q[(p/q)^2] = int p^2/q for p = N(0, sp^2), q = N(shift, sq^2) (needs 2 sq^2 > sp^2)."""
    s = 2 * sigma_q**2 - sigma_p**2
    return sigma_q**2 / (sigma_p * math.sqrt(s)) * math.exp(shift**2 / s)


class GaussianProposal:
    """Isotropic Gaussian 'flow' on (n, 1, dim) with an exact log-density (the sampler protocol)."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.dist = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), torch.tensor(std))

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        eps = torch.randn((n, 1, len(self.dist.loc)), generator=generator, dtype=torch.float64)
        x = self.dist.loc + self.dist.scale * eps
        return x, self.dist.log_prob(x).sum(dim=(1, 2))


class MixtureEnergy(ParticleEnergy):
    """u(x) = -log(Z * sum_k c_k N(x; mu_k, diag(s_k^2))) for one particle in 2D: normaliser Z is known."""

    def __init__(self, c: list[float], mu: list[list[float]], s: list[list[float]], log_z: float) -> None:
        super().__init__(n_particles=1, dim=2, temperature=1.0)
        self.log_c = torch.log(torch.tensor(c, dtype=torch.float64))
        self.mu, self.s, self.log_z = torch.tensor(mu), torch.tensor(s), log_z

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        comp = torch.distributions.Normal(self.mu.to(x.dtype), self.s.to(x.dtype))
        log_p = torch.logsumexp(self.log_c + comp.log_prob(x[:, 0, None, :]).sum(-1), dim=-1)
        return -(self.log_z + log_p)


class GaussianEnergy(ParticleEnergy):
    """u = |x|^2 / (2 sigma^2) + const for one particle in `dim` dimensions."""

    def __init__(self, dim: int, sigma: float) -> None:
        super().__init__(n_particles=1, dim=dim, temperature=1.0)
        self.sigma = sigma

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (x**2).sum(dim=(1, 2)) / self.sigma**2 + 3.0


# ------------------------------------------------------------------------------- weights
def test_log_weights_and_failures() -> None:
    u = np.array([1.0, np.inf, np.nan, 2.0, -1.0])
    log_q = np.array([0.5, 0.0, 0.0, -np.inf, 1.0])
    np.testing.assert_array_equal(log_weights(u, log_q), [-1.5, -np.inf, -np.inf, -np.inf, 0.0])
    assert log_weights(torch.tensor([1.0]), torch.tensor([2.0])).dtype == np.float64
    with pytest.raises(ValueError, match="same shape"):
        log_weights(np.zeros(3), np.zeros(4))


def test_ess_counts_zero_weights_and_is_scale_free() -> None:
    assert ess(np.zeros(10)) == pytest.approx(1.0)
    assert ess(np.array([0.0, -np.inf, -np.inf, -np.inf])) == pytest.approx(0.25)  # one sample of four
    assert ess(np.array([5000.0, 5000.0, -np.inf, -np.inf])) == pytest.approx(0.5)  # no overflow
    assert ess(np.full(3, -np.inf)) == 0.0
    with pytest.raises(ValueError, match="NaN"):
        ess(np.array([0.0, np.nan]))


def test_reverse_ess_matches_gaussian_closed_form() -> None:
    """Kish ESS -> 1 / E_q[w_bar^2] = 1 / prod_d int p^2/q, within N_SIGMA delta-method errors."""
    sp, sq, shift, dim, n = 1.0, 1.2, 0.8, 2, 40_000
    result = reweight(GaussianProposal([shift, 0.0], [sq, sq]), GaussianEnergy(dim, sp), n, seed=3, progress=False)
    expected = 1.0 / (chi2_plus_one(sp, sq, shift) * chi2_plus_one(sp, sq, 0.0))
    w = np.exp(result.log_w - result.log_w.max())
    m1, m2 = w.mean(), (w**2).mean()
    grad = np.array([2 * m1 / m2, -(m1**2) / m2**2])
    se = math.sqrt(grad @ np.cov(np.stack([w, w**2])) @ grad / n)
    assert result.ess == pytest.approx(ess(result.log_w))
    assert abs(result.ess - expected) < N_SIGMA * se, (result.ess, expected, se)
    assert 0.5 < expected < 0.8  # the proposal is genuinely mismatched


@pytest.mark.parametrize("biased_data", [False, True])
def test_forward_ess_matches_gaussian_closed_form(biased_data: bool) -> None:
    """Forward ESS from target samples estimates the same 1 / E_q[w_bar^2] (equal to E_p[w_bar]).

    With ``biased_data`` the 'data' come from a wider Gaussian and carry log-weights back to p.
    """
    sp, sq, shift, dim, n = 1.0, 1.2, 0.8, 2, 100_000
    rng = np.random.default_rng(11)
    mean_q = np.array([shift, 0.0])
    if biased_data:
        sb = 1.1
        y = sb * rng.standard_normal((n, dim))
        data_lw = -0.5 * (y**2).sum(1) / sp**2 + 0.5 * (y**2).sum(1) / sb**2
    else:
        y, data_lw = sp * rng.standard_normal((n, dim)), None
    log_q = -0.5 * ((y - mean_q) ** 2).sum(1) / sq**2 - dim * math.log(math.sqrt(2 * math.pi) * sq)
    u = 0.5 * (y**2).sum(1) / sp**2 + 3.0
    expected = 1.0 / (chi2_plus_one(sp, sq, shift) * chi2_plus_one(sp, sq, 0.0))
    value = forward_ess(log_q, u, data_lw)
    # delta method on 1 / (E_v[w] E_v[1/w]) with self-normalised means over v: per-frame influence values
    v = np.ones(n) if data_lw is None else np.exp(data_lw - data_lw.max())
    v = v / v.mean()
    lw = -u - log_q
    w, inv = np.exp(lw - lw.max()), np.exp(-(lw - lw.max()))
    a, b = np.mean(v * w), np.mean(v * inv)
    influence = -(v * (w - a) / a + v * (inv - b) / b) / (a * b)
    se = np.std(influence) / math.sqrt(n)
    assert abs(value - expected) < N_SIGMA * se, (value, expected, se)


def test_forward_ess_is_zero_when_the_flow_misses_data() -> None:
    assert forward_ess(np.array([0.0, -np.inf]), np.array([1.0, 1.0])) == 0.0
    assert forward_ess(np.array([-1.0, -1.0]), np.array([2.0, 2.0])) == pytest.approx(1.0)


def _gaussian_case(
    n: int, m: int, seed: int, data_scale: float = 1.0, sq: float = 1.3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Target N(0, 1)^2 with u = |x|^2/2 + 3; flow q = N((0.5, 0), sq^2); data ~ N(0, data_scale^2)^2."""
    rng = np.random.default_rng(seed)
    mean_q = np.array([0.5, 0.0])

    def log_q(x: np.ndarray) -> np.ndarray:
        return -0.5 * ((x - mean_q) ** 2).sum(1) / sq**2 - 2 * math.log(math.sqrt(2 * math.pi) * sq)

    def u(x: np.ndarray) -> np.ndarray:
        return 0.5 * (x**2).sum(1) + 3.0

    x = mean_q + sq * rng.standard_normal((n, 2))
    data = data_scale * rng.standard_normal((m, 2))
    return log_weights(u(x), log_q(x)), u(data), log_q(data)


def test_target_likelihood_matches_gaussian_closed_forms() -> None:
    """log Z, the target's NLL on its own samples (its entropy) and KL(p||q) against closed forms, within 4 sd."""
    result = target_likelihood(*_gaussian_case(200_000, 100_000, seed=3))
    log_z = math.log(2 * math.pi) - 3.0
    entropy = 1.0 + math.log(2 * math.pi)  # of N(0, I_2)
    sq, shift = 1.3, 0.5
    kl = 2 * math.log(sq) + (2 + shift**2) / (2 * sq**2) - 1.0  # KL(N(0, I_2) || N((shift, 0), sq^2 I_2))
    assert abs(result.log_z - log_z) < N_SIGMA * result.log_z_stderr, (result.log_z, log_z)
    assert abs(result.nll_target - entropy) < N_SIGMA * result.nll_target_stderr, (result.nll_target, entropy)
    assert abs(result.kl - kl) < N_SIGMA * result.kl_stderr, (result.kl, kl)
    assert result.kl_stderr < 0.01 and result.log_z_stderr < 0.005  # the paired estimate is precise
    assert abs(result.log_z_forward - log_z) < N_SIGMA * result.log_z_forward_stderr, (result.log_z_forward, log_z)
    assert (result.n_data, result.n_samples, result.n_failed_samples) == (100_000, 200_000, 0)


def test_target_likelihood_with_weighted_data_matches_the_closed_forms() -> None:
    """Data from a wider Gaussian with log-weights back to the target give the unbiased numbers (within 4 sd)."""
    lw, _, _ = _gaussian_case(200_000, 10, seed=6)
    rng = np.random.default_rng(7)
    sb, mean_q, sq = 1.4, np.array([0.5, 0.0]), 1.3
    y = sb * rng.standard_normal((100_000, 2))
    data_lw = -0.5 * (y**2).sum(1) + 0.5 * (y**2).sum(1) / sb**2  # p / biased density, up to a constant
    u = 0.5 * (y**2).sum(1) + 3.0
    log_q = -0.5 * ((y - mean_q) ** 2).sum(1) / sq**2 - 2 * math.log(math.sqrt(2 * math.pi) * sq)
    weighted = target_likelihood(lw, u, log_q, data_log_weights=data_lw)
    entropy = 1.0 + math.log(2 * math.pi)
    kl = 2 * math.log(sq) + (2 + 0.5**2) / (2 * sq**2) - 1.0
    assert abs(weighted.nll_target - entropy) < N_SIGMA * weighted.nll_target_stderr, weighted
    assert abs(weighted.kl - kl) < N_SIGMA * weighted.kl_stderr, weighted
    log_z = math.log(2 * math.pi) - 3.0
    assert abs(weighted.log_z_forward - log_z) < N_SIGMA * weighted.log_z_forward_stderr, weighted
    unweighted = target_likelihood(lw, u, log_q)  # ignoring the bias is wrong by many standard errors
    assert abs(unweighted.nll_target - entropy) > 10 * unweighted.nll_target_stderr
    assert 0.5 < weighted.ess < 0.9  # the flow's own weights: N((0.5, 0), 1.3^2) against N(0, 1)
    with pytest.raises(ValueError, match="data_log_weights must have shape"):
        target_likelihood(lw, u, log_q, data_log_weights=data_lw[:-1])


def test_target_likelihood_standard_error_is_calibrated() -> None:
    """Over 300 independent small runs the spread of either log Z estimate is its reported standard error (20 %)."""
    runs = [target_likelihood(*_gaussian_case(400, 50, seed=100 + i)) for i in range(300)]
    spread = np.std([r.log_z for r in runs], ddof=1)
    reported = np.mean([r.log_z_stderr for r in runs])
    assert 0.8 < spread / reported < 1.2, (spread, reported)
    # the forward estimate from the data: q narrower than p keeps 1/w = q e^u light-tailed (with the wider q
    # above its fourth moment is infinite and no delta method is calibrated)
    runs = [target_likelihood(*_gaussian_case(50, 400, seed=500 + i, sq=0.9)) for i in range(300)]
    spread = np.std([r.log_z_forward for r in runs], ddof=1)
    reported = np.mean([r.log_z_forward_stderr for r in runs])
    assert 0.8 < spread / reported < 1.2, (spread, reported)


def test_target_likelihood_sees_data_that_are_not_from_the_target() -> None:
    """Data colder than the target sit where p is high: a flow can beat the exact density there (negative KL)."""
    cold = target_likelihood(*_gaussian_case(100_000, 50_000, seed=4, data_scale=0.7))
    assert cold.nll_target < 1.0 + math.log(2 * math.pi) - 0.2  # below the entropy: the data are not from p
    narrow = _gaussian_case(100_000, 50_000, seed=4, data_scale=0.7)
    u_data = narrow[1]
    x_norm2 = 2 * (u_data - 3.0)
    log_q_narrow = -0.5 * x_norm2 / 0.7**2 - 2 * math.log(math.sqrt(2 * math.pi) * 0.7)  # a flow fit to the data
    fitted = target_likelihood(narrow[0], u_data, log_q_narrow)
    assert fitted.kl < -5 * fitted.kl_stderr


def test_target_likelihood_counts_failed_samples_and_refuses_bad_input() -> None:
    lw, u, lq = _gaussian_case(1000, 100, seed=5)
    doubled = target_likelihood(np.concatenate([lw, np.full(1000, -np.inf)]), u, lq)
    assert doubled.log_z == pytest.approx(target_likelihood(lw, u, lq).log_z - math.log(2))
    assert doubled.n_failed_samples == 1000 and doubled.n_samples == 2000
    with pytest.raises(ValueError, match="no flow sample has positive weight"):
        target_likelihood(np.full(10, -np.inf), u, lq)
    with pytest.raises(ValueError, match="same shape"):
        target_likelihood(lw, u, lq[:-1])
    with pytest.raises(ValueError, match="NaN"):
        target_likelihood(np.array([0.0, np.nan]), u, lq)
    u_bad = u.copy()
    u_bad[0] = np.inf
    assert target_likelihood(lw, u_bad, lq).n_data == 99


def test_mixture_reweighting_recovers_delta_f_mean_and_normaliser() -> None:
    """A broad, offset Gaussian proposal reweighted to a 2D Gaussian mixture with a known normaliser."""
    c, mu, s, log_z = [0.7, 0.3], [[-1.5, 0.0], [1.5, 0.5]], [[0.6, 0.8], [0.5, 0.5]], 1.3
    energy = MixtureEnergy(c, mu, s, log_z)
    proposal = GaussianProposal([0.5, -0.3], [2.0, 1.5])
    n = 30_000
    result = reweight(proposal, energy, n, batch_size=7_000, seed=5, progress=False)
    assert result.n_samples == n and result.n_failed == 0
    assert result.positions.shape == (n, 1, 2)
    assert 0.05 < result.ess < 0.9  # mismatched, yet usable
    x1 = result.positions[:, 0, 0]

    # dF(x1 > 0 vs x1 <= 0): P(A) = sum_k c_k Phi(mu_k1 / s_k1)
    p_a = sum(ck * norm.cdf(m[0] / sk[0]) for ck, m, sk in zip(c, mu, s))
    true_df = -math.log(p_a / (1 - p_a))
    est = delta_f(x1, (0.0, np.inf), (-np.inf, 0.0), log_weights=result.log_w)
    assert abs(est.value - true_df) < N_SIGMA * est.error, (est, true_df)
    assert est.error < 0.1

    # mean, with the delta-method standard error of a self-normalised estimate
    w = normalized_weights(result.log_w)
    x = result.positions[:, 0, :]
    mean = w @ x
    se = np.sqrt((w[:, None] ** 2 * (x - mean) ** 2).sum(0))
    true_mean = np.array(c) @ np.array(mu)
    np.testing.assert_array_less(np.abs(mean - true_mean), N_SIGMA * se)

    # normaliser: mean of w over q estimates Z (u includes -log Z)
    lw = result.log_w
    wn = np.exp(lw - lw.max())
    se_log_z = wn.std() / wn.mean() / math.sqrt(n)
    diag = weight_diagnostics(lw)
    assert abs(diag.log_mean_weight - log_z) < N_SIGMA * se_log_z
    assert diag.n == n and diag.n_finite == n and diag.ess == pytest.approx(result.ess)
    assert diag.max_weight_fraction == pytest.approx(w.max())


class MeanFreeGaussianEnergy(ParticleEnergy):
    """u = |x - centroid|^2 / (2 sigma^2): normaliser (2 pi sigma^2)^((n-1)d/2) on the mean-free subspace."""

    def __init__(self, n: int, dim: int, sigma: float) -> None:
        super().__init__(n_particles=n, dim=dim, temperature=1.0)
        self.sigma = sigma

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((x - x.mean(dim=1, keepdim=True)) ** 2).sum(dim=(1, 2)) / self.sigma**2


def test_eacf_joint_weights_recover_the_normaliser_and_a_moment() -> None:
    """Joint importance weights of an E-ACF are exact: log Z and <|x|^2> of a mean-free Gaussian within 4 sigma.

    The marginal estimate with M = 1 draw overestimates Z by ~66 standard errors on this flow (M = 20: ~7),
    measured when the test was written: the test tells the two apart.
    """
    from bgplugin.flows.eacf import EACF

    torch.manual_seed(0)
    flow = EACF([0, 0, 0], 2, projection="vector", n_blocks=2, hidden=16, aug_scale=0.5, device="cpu").double()
    with torch.no_grad():  # a fresh E-ACF is the identity; perturb it so q(x, a) is not the base density
        for parameter in flow.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    sigma, n = 0.9, 40_000
    k = (3 - 1) * 2
    log_z = 0.5 * k * math.log(2 * math.pi * sigma**2)
    result = reweight(flow, MeanFreeGaussianEnergy(3, 2, sigma), n, batch_size=10_000, seed=1,
                      sample_kwargs={"density": "joint"}, progress=False)  # fmt: skip
    assert result.diagnostics["log_q"].startswith("joint")
    lw = result.log_w
    wn = np.exp(lw - lw.max())
    se_log_z = wn.std() / wn.mean() / math.sqrt(n)
    assert abs(weight_diagnostics(lw).log_mean_weight - log_z) < N_SIGMA * se_log_z
    w = normalized_weights(lw)
    r2 = (result.positions**2).sum(axis=(1, 2))
    mean = w @ r2
    assert abs(mean - k * sigma**2) < N_SIGMA * math.sqrt((w**2 * (r2 - mean) ** 2).sum())
    with pytest.raises(ValueError, match="generator"):
        reweight(flow, MeanFreeGaussianEnergy(3, 2, sigma), 4, sample_kwargs={"generator": None}, progress=False)
    chiral = EACF([0, 1, 2], 3, projection="spherical", n_blocks=1, hidden=4, device="cpu")
    with pytest.raises(ValueError, match="chirality='mirror' needs q"):
        reweight(chiral, MeanFreeGaussianEnergy(3, 3, sigma), 4, chirality="mirror",
                 sample_kwargs={"density": "joint"}, progress=False)  # fmt: skip


def test_reweight_rejects_wrong_usage() -> None:
    energy = GaussianEnergy(2, 1.0)
    proposal = GaussianProposal([0.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="either generator or seed"):
        reweight(proposal, energy, 4, seed=1, generator=torch.Generator(), progress=False)
    with pytest.raises(ValueError, match="needs a molecular topology"):
        reweight(proposal, energy, 4, chirality="filter", progress=False)
    with pytest.raises(ValueError, match="exactly one key"):
        reweight(proposal, energy, 4, clip={"quantile": 0.9, "max_fraction": 0.1}, progress=False)
    with pytest.raises(ValueError, match="n_samples"):
        reweight(proposal, energy, 0, progress=False)


def test_reweight_is_reproducible_with_a_seed() -> None:
    energy = GaussianEnergy(2, 1.0)
    proposal = GaussianProposal([0.0, 0.0], [1.3, 1.3])
    a = reweight(proposal, energy, 50, batch_size=16, seed=7, progress=False)
    b = reweight(proposal, energy, 50, batch_size=16, seed=7, progress=False)
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.log_w, b.log_w)
    assert json.loads(json.dumps(a.to_dict()))["n_samples"] == 50


# ------------------------------------------------------------------------------- clipping
def test_clipping_is_off_by_default_and_reported_when_on() -> None:
    energy = GaussianEnergy(2, 1.0)
    proposal = GaussianProposal([0.5, 0.0], [0.9, 0.9])  # too narrow: heavy-tailed weights
    plain = reweight(proposal, energy, 2000, seed=2, progress=False)
    assert plain.clipped_fraction == 0.0
    np.testing.assert_array_equal(plain.log_w, plain.log_w_unclipped)
    clipped = reweight(proposal, energy, 2000, seed=2, clip={"quantile": 0.99}, progress=False)
    np.testing.assert_array_equal(clipped.log_w_unclipped, plain.log_w)
    assert clipped.clipped_fraction == pytest.approx(0.01, abs=0.002)
    assert clipped.ess > plain.ess
    assert clipped.diagnostics["clip"] == {"quantile": 0.99}


def test_clip_max_fraction_caps_the_largest_normalised_weight() -> None:
    rng = np.random.default_rng(0)
    log_w = 3.0 * rng.standard_normal(500)
    log_w[:3] = -np.inf
    assert normalized_weights(log_w).max() > 0.05
    clipped, fraction = clip_log_weights(log_w, max_fraction=0.05)
    w = normalized_weights(clipped)
    assert w.max() == pytest.approx(0.05, rel=1e-9)
    n_capped = int(np.sum(clipped < log_w))
    assert n_capped >= 1 and fraction == pytest.approx(n_capped / 500)
    assert np.isneginf(clipped[:3]).all()
    unchanged = clipped >= log_w
    np.testing.assert_array_equal(clipped[unchanged], log_w[unchanged])
    # already below the limit: nothing to do
    same, none = clip_log_weights(np.zeros(10), max_fraction=0.2)
    np.testing.assert_array_equal(same, np.zeros(10))
    assert none == 0.0
    with pytest.raises(ValueError, match="exactly one"):
        clip_log_weights(log_w)
    with pytest.raises(ValueError, match="max_fraction must be in"):
        clip_log_weights(log_w, max_fraction=1e-4)


# ------------------------------------------------------------------------------- WeightedTrajectory
@pytest.fixture
def weighted(ala2) -> WeightedTrajectory:
    rng = np.random.default_rng(4)
    xyz = (ala2.positions[None] + 0.01 * rng.standard_normal((9, 22, 3))).astype(np.float32)
    log_w = rng.standard_normal(9) * 2.0
    log_w[4] = -np.inf
    return WeightedTrajectory(mdtraj.Trajectory(xyz, ala2.topology), log_w, metadata={"note": "test"})


def test_weighted_trajectory_round_trip_is_bitwise(weighted: WeightedTrajectory, tmp_path: Path) -> None:
    path = weighted.save(tmp_path / "out" / "samples.h5")
    back = WeightedTrajectory.load(path)
    np.testing.assert_array_equal(back.xyz, weighted.xyz)
    np.testing.assert_array_equal(back.log_weights, weighted.log_weights)
    assert back.log_weights_definition == "-u(x) - log q(x)"
    assert back.metadata == {"note": "test"}
    assert [str(a) for a in back.topology.atoms] == [str(a) for a in weighted.topology.atoms]
    assert list(back.topology.bonds) and len(list(back.topology.bonds)) == len(list(weighted.topology.bonds))
    assert [p.name for p in path.parent.iterdir()] == ["samples.h5"]  # atomic: no temporary file left
    plain = mdtraj.load(str(path))  # an ordinary mdtraj HDF5 trajectory
    assert plain.n_frames == 9
    np.testing.assert_array_equal(plain.xyz, weighted.xyz)
    data = Dataset.load(path)  # and a bgplugin Dataset
    np.testing.assert_array_equal(data.log_weights, weighted.log_weights)


def test_weighted_trajectory_slicing_keeps_weights(weighted: WeightedTrajectory) -> None:
    lw = np.asarray(weighted.log_weights)
    for index in (slice(2, 7), np.array([8, 0, 3]), lw > 0, 5):
        part = weighted[index]
        expected = np.atleast_1d(lw[index])
        np.testing.assert_array_equal(part.log_weights, expected)
        np.testing.assert_array_equal(part.xyz, weighted.xyz[np.arange(9)[index]].reshape(-1, 22, 3))
    assert len(weighted[lw > 0]) == int((lw > 0).sum())
    w = weighted.weights
    assert w.sum() == pytest.approx(1.0) and w[4] == 0.0
    assert weighted.ess == pytest.approx(ess(lw))
    with pytest.raises(ValueError, match="read-only"):
        weighted.log_weights[0] = 1.0


def test_weighted_trajectory_from_plain_mdtraj_and_errors(weighted: WeightedTrajectory, tmp_path: Path) -> None:
    weighted.trajectory.save_hdf5(str(tmp_path / "plain.h5"))
    back = WeightedTrajectory.load(tmp_path / "plain.h5")
    np.testing.assert_array_equal(back.log_weights, np.zeros(9))
    assert back.ess == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        WeightedTrajectory(weighted.trajectory, np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        WeightedTrajectory(weighted.trajectory, np.full(9, np.nan))
    with pytest.raises(ValueError, match="no topology"):
        WeightedTrajectory.from_dataset(Dataset(np.zeros((2, 4, 2))))


# ------------------------------------------------------------------------------- alanine dipeptide end to end
@pytest.fixture(scope="module")
def implicit_energy(ala2):
    energy = OpenMMEnergy(ala2, platform="Reference", n_workers=1)
    yield energy
    energy.close()


@pytest.fixture(scope="module")
def tiny_flow(ala2):
    torch.manual_seed(0)
    return build_flow(ala2, hidden=8, n_layers=1, steps=2, device="cpu")


def test_reweight_alanine_filter_end_to_end(ala2, tiny_flow, implicit_energy) -> None:
    result = reweight(tiny_flow, implicit_energy, 8, batch_size=4, system=ala2, seed=0, progress=False)
    assert result.positions.shape == (8, 22, 3) and result.positions.dtype == np.float64
    np.testing.assert_allclose(result.positions.mean(axis=1), 0.0, atol=1e-5)  # left mean-free
    # the energies are those of the engine called directly on the returned positions
    direct = implicit_energy.evaluate(torch.as_tensor(result.positions), need_forces=False)
    np.testing.assert_array_equal(result.u, direct.u.numpy())
    # the same draws straight from the flow, in the same two batches
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        draws = [tiny_flow.sample(4, generator=generator) for _ in range(2)]
    x, log_q = (torch.cat([d[k] for d in draws]).numpy().astype(np.float64) for k in (0, 1))
    np.testing.assert_array_equal(result.positions, x)
    np.testing.assert_array_equal(result.log_q, log_q)
    # log w = -u - log q, except frames of the wrong handedness (filtered: weight 0) and failed energies
    classes = classify_chirality(result.positions, ala2.topology)
    ok = classes.all_l & (result.status == FrameStatus.OK)
    np.testing.assert_array_equal(result.log_w[ok], -result.u[ok] - result.log_q[ok])
    assert np.isneginf(result.log_w[~ok]).all()
    assert result.chirality["mode"] == "filter"
    assert result.chirality["n_wrong"] == int((~classes.all_l).sum())
    assert result.chirality["n_removed"] == result.chirality["n_wrong"]
    assert result.n_failed == int((result.status != FrameStatus.OK).sum())
    assert 0 < result.chirality["n_wrong"] < 8  # an untrained E(3) flow makes both hands
    assert result.ess == pytest.approx(ess(result.log_w))
    json.dumps(result.to_dict())
    traj = result.to_trajectory(ala2.topology, drop_zero_weight=True)
    assert len(traj) == int(np.isfinite(result.log_w).sum())


def test_reweight_alanine_mirror(ala2, tiny_flow, implicit_energy) -> None:
    assert proposal_is_reflection_symmetric(tiny_flow) is True
    kwargs = dict(batch_size=8, system=ala2, seed=0, progress=False)
    filtered = reweight(tiny_flow, implicit_energy, 8, **kwargs)
    mirrored = reweight(tiny_flow, implicit_energy, 8, chirality="mirror", **kwargs)
    d_frames = classify_chirality(filtered.positions, ala2.topology).all_d
    assert mirrored.chirality["n_mirrored"] == int(d_frames.sum()) > 0
    np.testing.assert_array_equal(mirrored.positions[d_frames], mirror(filtered.positions[d_frames]))
    np.testing.assert_array_equal(mirrored.positions[~d_frames], filtered.positions[~d_frames])
    assert classify_chirality(mirrored.positions, ala2.topology).all_l.all()
    # density of the mirrored proposal: q(x) + q(Mx) = 2 q(x) for a reflection-symmetric flow
    np.testing.assert_allclose(mirrored.log_q, filtered.log_q + math.log(2.0), rtol=0, atol=1e-12)
    ok = mirrored.status == FrameStatus.OK
    np.testing.assert_array_equal(mirrored.log_w[ok], -mirrored.u[ok] - mirrored.log_q[ok])
    # reflection leaves the energy unchanged
    np.testing.assert_allclose(mirrored.u[ok & d_frames], filtered.u[ok & d_frames], rtol=1e-9)


def test_mirror_uses_log_prob_for_an_se3_flow(ala2) -> None:
    torch.manual_seed(1)
    flow = build_flow(ala2, hidden=8, n_layers=1, steps=2, device="cpu", dtype=torch.float64, symmetry="SE(n)")
    assert proposal_is_reflection_symmetric(flow) is False
    with torch.no_grad():
        x, log_q = flow.sample(6, generator=torch.Generator().manual_seed(3))
        log_q_image = flow.log_prob(torch.as_tensor(mirror(x.numpy())))
    energy = OpenMMEnergy(ala2, platform="Reference", n_workers=0)
    result = reweight_samples(
        x, log_q, energy, system=ala2, chirality="mirror",
        log_prob=lambda y: flow.log_prob(torch.as_tensor(y)).detach().numpy(), progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(result.log_q, np.logaddexp(log_q.numpy(), log_q_image.numpy()), rtol=1e-10)
    with pytest.raises(ValueError, match="log_prob"):
        reweight_samples(x, log_q, energy, system=ala2, chirality="mirror", progress=False)


def test_e3_flow_density_is_reflection_symmetric(ala2, tiny_flow) -> None:
    """The shortcut behind mirror mode for E(3) flows: log q(Mx) = log q(x)."""
    with torch.no_grad():
        x, log_q = tiny_flow.sample(4, generator=torch.Generator().manual_seed(5))
        log_q_image = tiny_flow.log_prob(torch.as_tensor(mirror(x.numpy())))
    np.testing.assert_allclose(log_q_image.numpy(), log_q.numpy(), rtol=1e-4, atol=1e-3)


def test_level_transfer_to_other_energies(ala2, ala2_vacuum, implicit_energy) -> None:
    """The same samples reweighted to implicit solvent, vacuum and GFN2-xTB: only u changes."""
    rng = np.random.default_rng(8)
    x0 = ala2.positions - ala2.positions.mean(0)
    sigma = 0.004
    x = x0[None] + sigma * rng.standard_normal((16, 22, 3))
    log_q = norm.logpdf(x, loc=x0, scale=sigma).sum(axis=(1, 2))
    implicit = reweight_samples(x, log_q, implicit_energy, system=ala2, progress=False)
    with OpenMMEnergy(ala2_vacuum, platform="Reference", n_workers=0) as vacuum_energy:
        vacuum = reweight_samples(x, log_q, vacuum_energy, system=ala2_vacuum, progress=False)
    for result in (implicit, vacuum):
        assert result.n_failed == 0 and 0 < result.ess <= 1
        assert result.chirality["n_wrong"] == 0
    # implicit solvent adds the (negative) GB solvation energy, frame by frame
    solvation = implicit.u - vacuum.u
    assert (solvation < -5).all()
    np.testing.assert_allclose(vacuum.log_w - implicit.log_w, solvation, rtol=0, atol=1e-9)
    if available_backends()["xtb"] is None:
        pytest.skip("xtb-python is not installed")
    with XTBEnergy(ala2.atomic_numbers, temperature=ala2.temperature, n_workers=0) as xtb_energy:
        xtb = reweight_samples(x[:4], log_q[:4], xtb_energy, system=ala2, progress=False)
    assert xtb.n_failed == 0 and 0 < xtb.ess <= 1
    np.testing.assert_array_equal(xtb.log_w, -xtb.u - xtb.log_q)
    assert "XTBEnergy" in xtb.diagnostics["energy"]
