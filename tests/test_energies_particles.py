"""Particle potentials: the benchmark conventions, gradients and failure handling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import load_benchmark

from bgplugin.energies import EnergyEvaluationError, FrameStatus
from bgplugin.systems import get_system


@pytest.mark.parametrize(("name", "expected"), [("dw4", -22.45), ("lj13", -43.1)])
def test_mean_energy_of_test_split(name: str, expected: float) -> None:
    x = torch.as_tensor(load_benchmark(name, "test"))
    u = get_system(name).energy()(x)
    assert torch.isfinite(u).all()
    assert abs(u.mean().item() - expected) < 0.1


@pytest.mark.parametrize("name", ["dw4", "lj13"])
def test_stein_identity_on_data(name: str) -> None:
    """E[x . grad u] = (N-1) D for Boltzmann samples of a translation-invariant u (3 standard errors)."""
    system = get_system(name)
    x = torch.as_tensor(load_benchmark(name, "test"))
    forces = system.energy().forces(x)
    virial = -(x * forces).sum(dim=(1, 2)).numpy()
    expected = (system.n_particles - 1) * system.dim
    stderr = virial.std(ddof=1) / math.sqrt(len(virial))
    assert abs(virial.mean() - expected) < 3 * stderr, (virial.mean(), expected, stderr)


def test_stein_identity_rejects_unordered_lj_convention() -> None:
    """Half the LJ13 pair sum (the printed formula) must fail the same check: the test can tell."""
    system = get_system("lj13")
    x = torch.as_tensor(load_benchmark("lj13", "test"))
    energy = system.energy()
    lj_only = system.energy()
    lj_only.oscillator_scale = 0.0
    osc_forces = energy.forces(x) - lj_only.forces(x)
    wrong = 0.5 * lj_only.forces(x) + osc_forces
    virial = -(x * wrong).sum(dim=(1, 2)).numpy()
    stderr = virial.std(ddof=1) / math.sqrt(len(virial))
    assert abs(virial.mean() - 36) > 10 * stderr


@pytest.mark.parametrize("name", ["dw4", "lj13", "lj55"])
def test_gradient_matches_finite_differences(name: str) -> None:
    system = get_system(name)
    energy = system.energy()
    rng = np.random.default_rng(1)
    x = torch.as_tensor(system.positions[None] + 0.05 * rng.standard_normal((3, system.n_particles, system.dim)))
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(energy(x).sum(), x)
    h = 1e-6
    for _ in range(5):
        k, i, j = rng.integers(3), rng.integers(system.n_particles), rng.integers(system.dim)
        xp, xm = x.detach().clone(), x.detach().clone()
        xp[k, i, j] += h
        xm[k, i, j] -= h
        fd = (energy(xp)[k] - energy(xm)[k]).item() / (2 * h)
        assert grad[k, i, j].item() == pytest.approx(fd, rel=1e-5, abs=1e-5)


def test_float32_and_float64_agree() -> None:
    x = torch.as_tensor(load_benchmark("dw4", "test")[:100])
    energy = get_system("dw4").energy()
    u64 = energy(x)
    u32 = energy(x.float())
    assert u32.dtype == torch.float32
    assert torch.allclose(u32.double(), u64, rtol=1e-5, atol=1e-4)


def test_bad_frames_get_inf_and_leave_good_gradients_intact() -> None:
    system = get_system("lj13")
    energy = system.energy()
    x = torch.as_tensor(load_benchmark("lj13", "test")[:4]).clone()
    x[1, 0, 0] = float("nan")
    x[2, 1] = x[2, 0]  # coincident atoms: LJ diverges
    x.requires_grad_(True)
    u = energy(x)
    assert torch.isinf(u[1]) and u[1] > 0 and torch.isinf(u[2])
    assert list(energy.last_status) == [FrameStatus.OK, FrameStatus.NAN_COORDINATES, FrameStatus.NON_FINITE, 0]
    u[torch.isfinite(u)].sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[1:3] == 0).all()
    clean = x.detach()[[0, 3]].clone().requires_grad_(True)
    energy(clean).sum().backward()
    assert torch.allclose(x.grad[[0, 3]], clean.grad)


def test_failure_policy_raise_names_the_frames() -> None:
    energy = get_system("dw4").energy(failure_policy="raise")
    x = torch.zeros(2, 4, 2, dtype=torch.float64)
    x[0] = torch.as_tensor(get_system("dw4").positions)
    x[1, 0, 0] = float("nan")
    with pytest.raises(EnergyEvaluationError, match="1 of 2 frames failed.*NAN_COORDINATES") as info:
        energy(x)
    assert list(info.value.status) == [FrameStatus.OK, FrameStatus.NAN_COORDINATES]


def test_failures_are_logged_in_full_a_few_times_then_summarised(caplog: pytest.LogCaptureFixture) -> None:
    """Training on an energy for hours must not log every batch with a failed frame."""
    system = get_system("dw4")
    energy = system.energy()
    x = torch.as_tensor(system.positions, dtype=torch.float64).expand(3, 4, 2).clone()
    x[1, 0, 0] = float("nan")
    with caplog.at_level("WARNING", logger="bgplugin.energies.base"):
        for _ in range(energy.FAILURE_WARNINGS_IN_FULL + 3):
            energy(x)
        energy(x[[0, 2]])  # no failure
        energy.FAILURE_SUMMARY_SECONDS = 0.0
        energy(x)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == energy.FAILURE_WARNINGS_IN_FULL + 1, messages
    assert all("1 of 3 frames failed (1 NAN_COORDINATES)" in m for m in messages[:-1])
    assert "summarised at most every 60 s" in messages[-2]
    # the summary counts every call since the last message: 4 failing calls of 3 frames and one clean call of 2
    assert "4 of 14 frames evaluated since the last message failed, in 4 calls" in messages[-1]
    assert "all failures so far: 9 NAN_COORDINATES" in messages[-1]
    assert energy.failure_counts["NAN_COORDINATES"] == 9


def test_shape_mismatch_names_expected_and_received() -> None:
    energy = get_system("lj13").energy()
    with pytest.raises(ValueError, match=r"shape \(batch, 13, 3\), got \(2, 12, 3\)"):
        energy(torch.zeros(2, 12, 3))
    with pytest.raises(ValueError, match=r"add a batch axis"):
        energy(torch.zeros(13, 3))


def test_unknown_failure_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="failure_policy must be one of"):
        get_system("dw4").energy(failure_policy="ignore")
