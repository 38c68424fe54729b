"""Von Mises training-set biasing: the weight function, the resampling, and undoing it by reweighting."""

from __future__ import annotations

import numpy as np
import pytest

from bgplugin.data import Dataset
from bgplugin.simulation import bias_training_set, von_mises_weight
from bgplugin.systems import CollectiveVariable

N_SIGMA = 4.0
CV = CollectiveVariable("phi", "dihedral", (0, 1, 2, 3))


def frames_with_dihedral(phi: np.ndarray) -> np.ndarray:
    """Four-atom frames (n, 4, 3) whose dihedral 0-1-2-3 is ``phi``."""
    n = len(phi)
    x = np.zeros((n, 4, 3))
    x[:, 0] = [0.15, 0.0, 0.0]
    x[:, 2] = [0.0, 0.0, 0.15]
    x[:, 3, 0], x[:, 3, 1], x[:, 3, 2] = 0.15 * np.cos(phi), 0.15 * np.sin(phi), 0.15
    return x


@pytest.fixture(scope="module")
def source() -> tuple[Dataset, np.ndarray]:
    rng = np.random.default_rng(0)
    phi = np.where(rng.random(20_000) < 0.05, rng.normal(1.0, 0.3, 20_000), rng.normal(-1.5, 0.4, 20_000))
    phi = (phi + np.pi) % (2 * np.pi) - np.pi
    return Dataset(frames_with_dihedral(phi), units="nm", metadata={"system": "toy"}), phi


def test_frames_have_the_requested_dihedral(source: tuple[Dataset, np.ndarray]) -> None:
    data, phi = source
    np.testing.assert_allclose(CV(data.positions[:100]), phi[:100], atol=1e-10)


def test_weight_function_is_the_published_one() -> None:
    grid = np.linspace(-np.pi, np.pi, 200_001)[:-1]
    omega = von_mises_weight(grid)
    # omega = 150 f_vM + 1 with f_vM normalised on the circle
    assert np.mean(omega - 1.0) * 2 * np.pi == pytest.approx(150.0, rel=1e-6)
    assert grid[np.argmax(omega)] == pytest.approx(1.0, abs=1e-4)
    assert omega.min() == pytest.approx(1.0, abs=1e-6)
    assert von_mises_weight(np.array([1.0]))[0] == pytest.approx(150 * np.exp(10) / (2 * np.pi * np.i0(10)) + 1)


def test_biasing_oversamples_and_reweighting_undoes_it(source: tuple[Dataset, np.ndarray]) -> None:
    data, phi = source
    biased = bias_training_set(data, CV, seed=1)
    assert len(biased) == len(data)
    phi_b = CV(biased.positions)
    idx = np.asarray(biased.metadata["biasing"]["source_indices"])
    np.testing.assert_allclose(phi_b, phi[idx], atol=1e-10)
    np.testing.assert_allclose(biased.log_weights, -np.log(von_mises_weight(phi_b)))
    p_source = float(np.mean(phi > 0))
    assert np.mean(phi_b > 0) > 5 * p_source  # the rare region is oversampled
    w = biased.weights()
    indicator = (phi_b > 0).astype(float)
    p_undone = float(np.sum(w * indicator))
    error = float(np.sqrt(np.sum(w**2 * (indicator - p_undone) ** 2)))
    assert abs(p_undone - p_source) < N_SIGMA * error, f"{p_undone:.4f} +- {error:.4f} vs {p_source:.4f}"


def test_biasing_a_weighted_dataset_recovers_its_weighted_ensemble(source: tuple[Dataset, np.ndarray]) -> None:
    data, phi = source
    log_w = -0.5 * np.cos(phi)  # some reweighting of the source
    weighted = Dataset(data.positions, log_weights=log_w, log_weights_definition="test", units="nm")
    target = float(np.sum(weighted.weights() * np.cos(phi)))
    biased = bias_training_set(weighted, CV, n_samples=30_000, seed=2)
    w = biased.weights()
    c = np.cos(CV(biased.positions))
    estimate = float(np.sum(w * c))
    error = float(np.sqrt(np.sum(w**2 * (c - estimate) ** 2)))
    assert abs(estimate - target) < N_SIGMA * error
    assert biased.metadata["biasing"]["source_log_weights_definition"] == "test"


def test_bad_parameters(source: tuple[Dataset, np.ndarray]) -> None:
    with pytest.raises(ValueError, match="kappa must be > 0"):
        von_mises_weight(np.zeros(3), kappa=0.0)
    with pytest.raises(ValueError, match="offset > 0"):
        von_mises_weight(np.zeros(3), offset=0.0)
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        bias_training_set(source[0], CV, n_samples=0)
