"""Parallel tempering: frames sorted by thermodynamic state, u_kln, swap statistics, resume extends the storage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bgplugin.energies import OpenMMEnergy
from bgplugin.simulation import ParallelTemperingResult, geometric_temperatures, run_parallel_tempering

LADDER = [300.0, 340.0, 390.0, 450.0]


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pt") / "pt.nc"


@pytest.fixture(scope="module")
def first(ala2_vacuum, storage: Path) -> ParallelTemperingResult:
    return run_parallel_tempering(
        ala2_vacuum, LADDER, n_iterations=5, steps_per_iteration=50, storage=storage, platform="Reference",
        checkpoint_interval=3, progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def extended(first: ParallelTemperingResult, ala2_vacuum, storage: Path) -> ParallelTemperingResult:
    first_size = storage.stat().st_size
    result = run_parallel_tempering(
        ala2_vacuum, LADDER, n_iterations=9, steps_per_iteration=50, storage=storage, platform="Reference",
        checkpoint_interval=3, progress=False,
    )  # fmt: skip
    assert storage.stat().st_size > first_size
    return result


def test_frames_are_sorted_by_state(extended: ParallelTemperingResult, ala2_vacuum) -> None:
    n_iter = extended.n_iterations
    swaps = extended.replica_state[1:] != np.arange(4)
    assert swaps.any(), "no replica ever changed state: the test could not tell states from replicas"
    for k, temperature in enumerate(extended.temperatures):
        data = extended.datasets[k]
        assert len(data) == n_iter and data.metadata["temperature"] == pytest.approx(temperature)
        energy = OpenMMEnergy(ala2_vacuum, platform="Reference", n_workers=0, temperature=float(temperature))
        u = energy(torch.as_tensor(data.positions.astype(np.float64))).numpy()
        # the stored reduced energy of the state's sample is that of the frame we filed under the state
        np.testing.assert_allclose(u, extended.u_kln[k, k], rtol=0, atol=0.02)


def test_u_kln_is_reduced_by_each_states_temperature(extended: ParallelTemperingResult) -> None:
    potential = extended.u_kln * extended.temperatures[None, :, None]  # u_l * T_l = U / k_B for every l
    np.testing.assert_allclose(potential, potential[:, :1, :].repeat(4, axis=1), rtol=1e-6)


def test_resume_extends_storage(first: ParallelTemperingResult, extended: ParallelTemperingResult) -> None:
    assert first.n_iterations == 5 and extended.n_iterations == 9
    # resumed from the last checkpoint (iteration 3): iterations 1-3 are kept as they were
    for k in range(4):
        np.testing.assert_array_equal(extended.datasets[k].positions[:3], first.datasets[k].positions[:3])
        np.testing.assert_array_equal(extended.u_kln[k, :, :3], first.u_kln[k, :, :3])
    np.testing.assert_array_equal(extended.replica_state[:4], first.replica_state[:4])
    np.testing.assert_allclose(extended.datasets[0].time, np.arange(1, 10) * 50 * 1e-3)


def test_acceptance_and_mbar_reweighting(extended: ParallelTemperingResult, ala2_vacuum) -> None:
    acc = extended.acceptance
    assert acc.shape == (3,) and np.all((acc >= 0) & (acc <= 1))
    assert extended.n_proposed.sum() > 0
    cold, hot = extended.reweighted(0, discard=1), extended.reweighted(3, discard=1)
    assert len(cold) == 4 * 8 and np.isfinite(cold.log_weights).all()
    assert np.exp(cold.log_weights).sum() == pytest.approx(1.0)
    assert "300.0 K" in cold.log_weights_definition
    # MBAR: log W_n0 - log W_n3 = u_3(x_n) - u_0(x_n) + const; u from an independent OpenMM evaluation of each frame
    energy = OpenMMEnergy(ala2_vacuum, platform="Reference", n_workers=0, temperature=300.0)
    u_0 = energy(torch.as_tensor(cold.positions.astype(np.float64))).numpy()
    u_3 = u_0 * 300.0 / LADDER[3]
    offset = (cold.log_weights - hot.log_weights) - (u_3 - u_0)
    assert np.ptp(offset) < 0.05


def test_resume_with_another_ladder_is_refused(extended: ParallelTemperingResult, ala2_vacuum, storage: Path) -> None:
    with pytest.raises(ValueError, match="use the same ladder"):
        run_parallel_tempering(ala2_vacuum, [300.0, 400.0], n_iterations=10, storage=storage, platform="Reference")
    with pytest.raises(ValueError, match="steps_per_iteration: stored 50, now 500"):
        run_parallel_tempering(ala2_vacuum, LADDER, n_iterations=10, steps_per_iteration=500, storage=storage)


def test_ladder_options(ala2_vacuum, tmp_path: Path) -> None:
    np.testing.assert_allclose(geometric_temperatures(300, 600, 3), [300, 300 * 2**0.5, 600])
    with pytest.raises(ValueError, match="either temperatures"):
        run_parallel_tempering(ala2_vacuum, LADDER, temperature_range=(300, 400, 3), storage=tmp_path / "x.nc")
    with pytest.raises(ValueError, match="either temperatures"):
        run_parallel_tempering(ala2_vacuum, storage=tmp_path / "x.nc")
    result = run_parallel_tempering(
        ala2_vacuum, None, n_iterations=1, steps_per_iteration=10, storage=tmp_path / "range.nc",
        temperature_range=(300.0, 600.0, 3), platform="Reference", progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(result.temperatures, geometric_temperatures(300, 600, 3), rtol=1e-9)
