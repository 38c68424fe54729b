"""The correlated mean-free Gaussian base (covariance C ⊗ I_d) and its fit to frames.

Densities are checked against torch's multivariate normal in orthonormal
coordinates of the mean-free subspace (:func:`bgplugin.flows.mean_free_basis`),
normalisation by quadrature, symmetries with :func:`bgplugin.testing.assert_equivariant`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bgplugin.flows import (
    CorrelatedMeanFreeGaussian,
    MeanFreeGaussian,
    build_flow,
    fit_particle_covariance,
    load_flow,
    mean_free_basis,
    symmetrised_covariance,
)
from bgplugin.flows.eacf import EACF
from bgplugin.testing import assert_equivariant, random_rotation

TYPES = np.array([0, 0, 1, 0, 2])


def _covariance(n: int, seed: int = 0, types: np.ndarray | None = None) -> np.ndarray:
    """A random particle covariance, positive definite on the mean-free subspace (symmetrised over ``types``)."""
    rng = np.random.default_rng(seed)
    factor = rng.normal(size=(n, n))
    matrix = factor @ factor.T / n + 0.1 * np.eye(n)
    if types is not None:
        matrix = symmetrised_covariance(matrix, types)
    centring = np.eye(n) - 1.0 / n
    return centring @ matrix @ centring


class _System:
    def __init__(self, types: np.ndarray, dim: int = 3) -> None:
        self.atom_types, self.n_particles, self.dim, self.name = types, len(types), dim, "test"


# -- the density --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_log_prob_is_the_gaussian_with_covariance_c_kron_identity(dim: int) -> None:
    n = 5
    covariance = _covariance(n)
    prior = CorrelatedMeanFreeGaussian(covariance, dim).double()
    basis = mean_free_basis(n, dim).reshape(n * dim, (n - 1) * dim)  # orthonormal coordinates of the subspace
    full = torch.from_numpy(np.kron(covariance, np.eye(dim)))
    reference = torch.distributions.MultivariateNormal(
        torch.zeros((n - 1) * dim, dtype=torch.float64), covariance_matrix=basis.T @ full @ basis
    )
    x = torch.randn(7, n, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x - x.mean(1, keepdim=True)
    expected = reference.log_prob(x.reshape(7, n * dim) @ basis)
    torch.testing.assert_close(prior.log_prob(x), expected, atol=1e-10, rtol=1e-12)
    # Translation-invariant (the centre of mass is removed) and blind to a constant added to C.
    torch.testing.assert_close(prior.log_prob(x + torch.ones(dim, dtype=torch.float64)), expected, atol=1e-10, rtol=0)
    shifted = CorrelatedMeanFreeGaussian(covariance + 3.0, dim).double()
    torch.testing.assert_close(shifted.log_prob(x), expected, atol=1e-10, rtol=0)


def test_isotropic_covariance_gives_the_isotropic_prior() -> None:
    n, dim, std = 6, 3, 0.4
    covariance = std**2 * (np.eye(n) - 1.0 / n)
    correlated = CorrelatedMeanFreeGaussian(covariance, dim).double()
    isotropic = MeanFreeGaussian(n, dim, std).double()
    x = torch.randn(9, n, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(correlated.log_prob(x), isotropic.log_prob(x), atol=1e-10, rtol=0)
    assert correlated.std == pytest.approx(std)


def test_density_integrates_to_one_on_the_subspace() -> None:
    """Quadrature over the 2-d subspace of 3 particles in 1-d, for a strongly correlated C."""
    covariance = np.array([[1.0, 0.9, -0.2], [0.9, 1.0, 0.1], [-0.2, 0.1, 0.3]])
    prior = CorrelatedMeanFreeGaussian(covariance, 1).double()
    basis = mean_free_basis(3, 1).reshape(3, 2)
    axis = torch.linspace(-8.0, 8.0, 1201, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    density = prior.log_prob((grid @ basis.T).unsqueeze(-1)).exp().reshape(axis.numel(), axis.numel())
    integral = torch.trapezoid(torch.trapezoid(density, axis, dim=0), axis, dim=0)
    assert abs(float(integral) - 1.0) < 1e-6


def test_samples_are_mean_free_and_have_the_covariance() -> None:
    n, dim, n_samples = 5, 3, 40_000
    covariance = _covariance(n, seed=2)
    prior = CorrelatedMeanFreeGaussian(covariance, dim).double()
    x = prior.sample(n_samples, generator=torch.Generator().manual_seed(3))
    assert x.shape == (n_samples, n, dim) and x.sum(1).abs().max() < 1e-12
    estimate = np.einsum("bid,bjd->ij", x.numpy(), x.numpy()) / (n_samples * dim)
    # Each entry is a mean of n_samples * dim products: standard error sqrt((C_ii C_jj + C_ij^2) / (N d)).
    stderr = np.sqrt((np.outer(np.diag(covariance), np.diag(covariance)) + covariance**2) / (n_samples * dim))
    assert np.all(np.abs(estimate - covariance) < 5 * stderr)
    # Axes are uncorrelated: C ⊗ I_d, not a full 3n x 3n covariance.
    cross = np.einsum("bi,bj->ij", x[:, :, 0].numpy(), x[:, :, 1].numpy()) / n_samples
    assert np.all(np.abs(cross) < 5 * stderr)


def test_density_is_invariant_under_rotations_reflections_translations_and_equal_type_permutations() -> None:
    prior = CorrelatedMeanFreeGaussian(_covariance(5, seed=4, types=TYPES), 3).double()
    x = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert_equivariant(prior.log_prob, x, TYPES, reflections=True, outputs="invariant")
    # Without the symmetrisation a permutation of equal types changes the density.
    plain = CorrelatedMeanFreeGaussian(_covariance(5, seed=4), 3).double()
    swapped = x[:, [3, 1, 2, 0, 4]]  # two type-0 particles exchanged
    assert (plain.log_prob(swapped) - plain.log_prob(x)).abs().max() > 1e-3
    torch.testing.assert_close(prior.log_prob(swapped), prior.log_prob(x), atol=1e-10, rtol=0)


# -- the fit -------------------------------------------------------------------------------------------
def test_fit_recovers_the_covariance_of_samples() -> None:
    covariance = _covariance(6, seed=6)
    prior = CorrelatedMeanFreeGaussian(covariance, 3).double()
    frames = prior.sample(50_000, generator=torch.Generator().manual_seed(7))
    fitted = fit_particle_covariance(frames + 2.5)  # translated frames: centred by the fit
    np.testing.assert_allclose(fitted, covariance, atol=0.02 * np.abs(covariance).max())
    np.testing.assert_allclose(fitted.sum(1), 0.0, atol=1e-12)
    np.testing.assert_allclose(fitted, fitted.T, atol=0)


def test_fit_symmetrises_over_equal_types() -> None:
    rng = np.random.default_rng(8)
    frames = rng.normal(size=(300, 5, 3)) * np.array([0.5, 1.0, 1.5, 2.0, 0.7])[None, :, None]
    fitted = fit_particle_covariance(frames, TYPES)
    np.testing.assert_allclose(symmetrised_covariance(fitted, TYPES), fitted, atol=1e-12)
    same = [0, 1, 3]  # the type-0 particles share one variance and one covariance
    assert np.ptp(np.diag(fitted)[same]) < 1e-12
    assert np.ptp([fitted[0, 1], fitted[0, 3], fitted[1, 3]]) < 1e-12
    # Identical particles (one type): the fit is isotropic on the subspace, whatever the frames.
    single = fit_particle_covariance(frames, np.zeros(5, dtype=int))
    eigenvalues = np.linalg.eigvalsh(single)
    np.testing.assert_allclose(eigenvalues[1:], eigenvalues[-1], rtol=1e-10)


def test_fit_weights_and_floor() -> None:
    rng = np.random.default_rng(9)
    frames = rng.normal(size=(40, 4, 3))
    counts = rng.integers(1, 4, size=40)
    weighted = fit_particle_covariance(frames, weights=counts.astype(float))
    repeated = fit_particle_covariance(np.repeat(frames, counts, axis=0))
    np.testing.assert_allclose(weighted, repeated, atol=1e-12)
    # One configuration of 6 particles in 1-d: rank 1 of 5 on the subspace; the floor keeps the base proper.
    line = np.repeat(np.arange(1.0, 7.0)[None, :, None], 2, axis=0)  # two copies of one configuration
    raw = fit_particle_covariance(line, floor=1e-12)
    fitted = fit_particle_covariance(line, floor=0.05)
    helmert = mean_free_basis(6, 1)[:, 0, :].numpy()
    raw_eigenvalues = np.linalg.eigvalsh(helmert.T @ raw @ helmert)
    eigenvalues = np.linalg.eigvalsh(helmert.T @ fitted @ helmert)
    assert raw_eigenvalues[:4].max() < 1e-9 * raw_eigenvalues[4]
    np.testing.assert_allclose(eigenvalues[:4], 0.05 * raw_eigenvalues.mean(), rtol=1e-9)
    np.testing.assert_allclose(eigenvalues[4], raw_eigenvalues[4], rtol=1e-12)
    CorrelatedMeanFreeGaussian(fitted, 3)  # accepted (the raw one is not)
    with pytest.raises(ValueError, match="positive definite"):
        CorrelatedMeanFreeGaussian(fit_particle_covariance(line, floor=1e-300), 3)


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"covariance": np.ones((3, 2))}, "square"),
        ({"covariance": np.eye(1)}, "n_particles >= 2"),
        ({"covariance": np.array([[1.0, 0.5], [0.0, 1.0]])}, "symmetric"),
        ({"covariance": np.full((3, 3), np.nan)}, "non-finite"),
        ({"covariance": np.ones((3, 3))}, "positive definite"),
    ],
)
def test_correlated_prior_rejects_bad_covariances(arguments: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CorrelatedMeanFreeGaussian(dim=3, **arguments)


@pytest.mark.parametrize(
    ("frames", "kwargs", "match"),
    [
        (np.zeros((5, 4)), {}, "shape"),
        (np.full((5, 4, 3), np.inf), {}, "non-finite"),
        (np.zeros((5, 4, 3)), {"atom_types": [0, 1]}, "atom_types"),
        (np.zeros((5, 4, 3)), {"weights": -np.ones(5)}, "weights"),
        (np.zeros((5, 4, 3)), {"floor": 0.0}, "floor"),
    ],
)
def test_fit_rejects_bad_input(frames: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit_particle_covariance(frames, **kwargs)


# -- flows built on it ---------------------------------------------------------------------------------
def test_flows_refuse_a_covariance_that_breaks_their_permutation_symmetry() -> None:
    plain = _covariance(5, seed=10)
    for kind in ("cnf", "eacf"):
        with pytest.raises(ValueError, match="not invariant under permutations"):
            build_flow(_System(TYPES), kind=kind, prior_covariance=plain, device="cpu")
        with pytest.raises(ValueError, match="for 5 particles"):
            build_flow(_System(np.arange(4)), kind=kind, prior_covariance=_covariance(5), device="cpu")


def test_new_eacf_on_a_correlated_base_is_that_base_and_keeps_its_symmetries() -> None:
    covariance = _covariance(5, seed=11, types=TYPES)
    torch.manual_seed(0)
    flow = EACF(TYPES, 3, n_blocks=2, hidden=8, n_layers=1, n_bins=4, prior_covariance=covariance, device="cpu")
    flow = flow.double()
    generator = torch.Generator().manual_seed(12)
    x, a, log_q = flow.sample_joint(16, generator=generator)
    base = CorrelatedMeanFreeGaussian(covariance, 3).double()
    torch.testing.assert_close(log_q, base.log_prob(x) + flow.log_prob_aug(a, x), atol=1e-9, rtol=0)
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        x, a, log_q = flow.sample_joint(16, generator=generator)
        x0, a0, log_det = flow.inverse(x, a)
        eta = flow.base_aug_scale
        log_aug = torch.distributions.Normal(x0.unsqueeze(1), eta).log_prob(a0).sum((1, 2, 3))
        torch.testing.assert_close(log_q, base.log_prob(x0) + log_aug + log_det, atol=1e-8, rtol=0)
        rotation = random_rotation(3, generator=generator)
        perm = torch.tensor([3, 1, 2, 0, 4])  # swaps two type-0 particles
        moved = flow.log_prob_joint((x @ rotation.T + 0.3)[:, perm], (a @ rotation.T + 0.3)[:, :, perm])
    torch.testing.assert_close(moved, flow.log_prob_joint(x, a), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("kind", ["cnf", "eacf"])
def test_flows_with_a_correlated_base_save_and_load(kind: str, tmp_path: Path) -> None:
    covariance = _covariance(5, seed=13, types=TYPES)
    options = {"hidden": 8, "n_layers": 1} | ({"n_blocks": 1, "n_bins": 4} if kind == "eacf" else {"steps": 4})
    flow = build_flow(_System(TYPES), kind=kind, prior_covariance=covariance, device="cpu", dtype=torch.float64,
                      **options)  # fmt: skip
    assert isinstance(flow.prior, CorrelatedMeanFreeGaussian)
    flow.save(tmp_path / "flow.pt")
    loaded = load_flow(tmp_path / "flow.pt", device="cpu")
    assert isinstance(loaded.prior, CorrelatedMeanFreeGaussian) and loaded.dtype == torch.float64
    np.testing.assert_allclose(loaded.prior.covariance, flow.prior.covariance, atol=1e-15)
    x = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    log_q = flow.log_prob(x, generator=torch.Generator().manual_seed(15)) if kind == "eacf" else flow.log_prob(x)
    again = loaded.log_prob(x, generator=torch.Generator().manual_seed(15)) if kind == "eacf" else loaded.log_prob(x)
    torch.testing.assert_close(again, log_q, atol=1e-9, rtol=0)
    assert math.isfinite(float(log_q.detach().sum()))


def test_flow_matching_draws_its_pairs_from_the_correlated_base() -> None:
    from bgplugin.training import FlowMatching

    covariance = _covariance(5, seed=16, types=TYPES)
    flow = build_flow(_System(TYPES), prior_covariance=covariance, hidden=8, n_layers=1, steps=2, device="cpu",
                      dtype=torch.float64)  # fmt: skip
    objective = FlowMatching(flow.prior, pairing="eqot", atom_types=TYPES, sigma=0.0)
    data = CorrelatedMeanFreeGaussian(covariance, 3).double().sample(2000, generator=torch.Generator().manual_seed(17))
    unpaired = FlowMatching(flow.prior, sigma=0.0).make_batch(data, None, torch.Generator().manual_seed(18))
    paired = objective.make_batch(data, None, torch.Generator().manual_seed(18))
    # The base draws follow C (pairing rotates and permutes equal types: the base is invariant under both) ...
    for batch in (unpaired, paired):
        x0 = batch.x0.numpy()
        estimate = np.einsum("bid,bjd->ij", x0, x0) / (x0.shape[0] * 3)
        np.testing.assert_allclose(estimate, covariance, atol=0.15 * np.abs(covariance).max())
    # ... and data drawn from the base itself is already close to them once paired.
    assert paired.pair_distance < unpaired.pair_distance
    loss = objective.loss(flow, paired, 0)
    assert torch.isfinite(loss.loss)
