"""Flow matching, likelihood / reverse-KL objectives and the Trainer.

Most tests use two tiny exact stand-ins so that the expected answers are known:
``PairFlow`` (an equivariant pairwise-distance MLP field, for flow matching)
and ``ScaleFlow`` (x = exp(s) z, with a closed-form log-density and a real
Hutchinson estimator). Two tests use the real ``bgplugin.flows`` CNF.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from bgplugin.flows import MeanFreeGaussian, build_flow
from bgplugin.training import (
    MLKL,
    FlowMatching,
    LambdaSchedule,
    LossOutput,
    MaximumLikelihood,
    ReverseKL,
    Trainer,
    TrainerConfig,
    TrainingData,
    conditional_flow_matching_loss,
    linlog_cutoff,
    nll_loss,
    reverse_kl_loss,
    sample_conditional_path,
)
from bgplugin.training.flow_matching import mean_free_noise
from bgplugin.training.trainer import _StepBatches

torch.set_num_threads(1)


# ------------------------------------------------------------------ stand-ins
class PairField(nn.Module):
    """v_i = sum_j (x_i - x_j) phi(|x_i - x_j|^2, t): E(n)-equivariant and mean-free."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        diff = x[:, :, None] - x[:, None]
        d2 = diff.square().sum(-1, keepdim=True)
        tt = t.reshape(-1, 1, 1, 1).expand_as(d2)
        return (diff * self.phi(torch.cat([d2, tt], dim=-1))).sum(2) / x.shape[1]


class PairFlow(nn.Module):
    """Just enough of a flow for flow matching: ``field`` and ``prior``."""

    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.field = PairField()
        self.prior = MeanFreeGaussian(n, dim)


class ScaleFlow(nn.Module):
    """x = exp(s) z with z from the mean-free Gaussian: log q(x) = log p(x e^{-s}) - D s.

    ``divergence="hutchinson"`` replaces D s by s |eps|^2 with mean-free standard
    normal eps (the Hutchinson estimate of the integrated divergence of v = s x),
    drawn from the global RNG, so it is unbiased and random.
    """

    def __init__(self, n: int, dim: int, log_scale: float = 0.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(log_scale, dtype=torch.float64))
        self.prior = MeanFreeGaussian(n, dim).double()
        self.subspace_dim = (n - 1) * dim

    def _log_det(self, like: Tensor, divergence: str) -> Tensor:
        if divergence == "exact":
            return self.subspace_dim * self.log_scale.expand(like.shape[0])
        eps = torch.randn_like(like)
        eps = eps - eps.mean(1, keepdim=True)
        return self.log_scale * eps.square().sum((1, 2))

    def log_prob(self, x: Tensor, divergence: str = "exact") -> Tensor:
        z = x * torch.exp(-self.log_scale)
        return self.prior.log_prob(z) - self._log_det(x, divergence)

    def sample(self, n: int, divergence: str = "exact") -> tuple[Tensor, Tensor]:
        z = self.prior.sample(n)
        return z * torch.exp(self.log_scale), self.prior.log_prob(z) - self._log_det(z, divergence)


def gaussian_energy(std: float) -> Callable[[Tensor], Tensor]:
    """u(x) = |x|^2 / (2 std^2) in kT on mean-free coordinates (a Gaussian target)."""
    return lambda x: x.square().sum((1, 2)) / (2.0 * std**2)


def toy_data(n_samples: int = 512, n: int = 4, dim: int = 2, seed: int = 0) -> Tensor:
    """A rigid square (side 2) with small noise, randomly rotated: a simple, symmetric target."""
    g = torch.Generator().manual_seed(seed)
    square = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])[:n, :dim]
    angle = 2 * math.pi * torch.rand(n_samples, generator=g)
    rot = torch.stack([torch.cos(angle), -torch.sin(angle), torch.sin(angle), torch.cos(angle)], -1).reshape(-1, 2, 2)
    x = square @ rot + 0.1 * torch.randn(n_samples, n, dim, generator=g)
    return x - x.mean(1, keepdim=True)


def config(tmp_path: Path | None, **changes: object) -> TrainerConfig:
    base = {"max_steps": 6, "batch_size": 32, "lr": 1e-2, "progress": False, "checkpoint_every": 2, "log_every": 2}
    return TrainerConfig(out_dir=tmp_path, **{**base, **changes})  # type: ignore[arg-type]


# -------------------------------------------------------------- flow matching
def test_conditional_path_interpolates_and_ut_is_its_time_derivative() -> None:
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, 5, 3, 2, generator=g, dtype=torch.float64)
    eps = mean_free_noise((5, 3, 2), g, torch.float64)
    zero, one = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    torch.testing.assert_close(sample_conditional_path(x0, x1, zero, eps, 0.1)[0], x0 + 0.1 * eps)
    torch.testing.assert_close(sample_conditional_path(x0, x1, one, eps, 0.1)[0], x1 + 0.1 * eps)
    t, h = torch.rand(5, generator=g, dtype=torch.float64), 1e-6
    forward = sample_conditional_path(x0, x1, t + h, eps, 0.1)[0]
    backward = sample_conditional_path(x0, x1, t - h, eps, 0.1)[0]
    ut = sample_conditional_path(x0, x1, t, eps, 0.1)[1]
    torch.testing.assert_close((forward - backward) / (2 * h), ut, atol=1e-8, rtol=0)
    assert eps.sum(1).abs().max() < 1e-12  # noise is mean-free


class MarginalField(nn.Module):
    """Exact marginal field for a point-mass target y: u*(t, x) = y - (1-t)(x - t y) / ((1-t)^2 + sigma^2)."""

    def __init__(self, y: Tensor, sigma: float, coefficient_sigma: float) -> None:
        super().__init__()
        self.y, self.sigma, self.coefficient_sigma = y, sigma, coefficient_sigma

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = t[:, None, None]
        scale = (1 - tt) / ((1 - tt) ** 2 + self.coefficient_sigma**2)
        return self.y - scale * (x - tt * self.y)


@pytest.mark.parametrize(
    "coefficient_sigma, should_vanish", [(0.4, True), (0.2, False), (0.6, False)], ids=["exact", "narrow", "wide"]
)
def test_cfm_target_has_zero_mean_error_against_the_exact_marginal_field(
    coefficient_sigma: float, should_vanish: bool
) -> None:
    """E[(u*(t, x_t) - u_t) . g(t, x_t)] = 0 for the marginal field u* of the path, for any g.

    Checked with g = x_t - t y (a field perturbation) at 5 standard errors; the
    same statistic for the marginal field of a path of another width must be far from 0.
    This also checks the loss identity L(u* + g) - L(u*) = E|g|^2 / (n d).
    """
    sigma, n, dim, m = 0.4, 3, 2, 40_000
    y = torch.tensor([[1.0, 0.0], [-0.5, 1.0], [-0.5, -1.0]], dtype=torch.float64)
    objective = FlowMatching(MeanFreeGaussian(n, dim).double(), sigma=sigma)
    batch = objective.make_batch(y.expand(m, n, dim).clone(), None, torch.Generator().manual_seed(1))
    xt, ut = sample_conditional_path(batch.x0, batch.x1, batch.t, batch.eps, sigma)
    field = MarginalField(y, sigma, coefficient_sigma)
    perturbation = xt - batch.t[:, None, None] * y
    error = field(batch.t, xt) - ut
    statistic = (error * perturbation).sum((1, 2))
    z_score = statistic.mean() / (statistic.std() / math.sqrt(m))
    if should_vanish:
        assert abs(z_score) < 5.0
        perturbed = MarginalField(y, sigma, coefficient_sigma)
        perturbed.forward = lambda t, x: field(t, x) + (x - t[:, None, None] * y)  # type: ignore[method-assign]
        args = (batch.x0, batch.x1, batch.t, batch.eps, sigma)
        gain = conditional_flow_matching_loss(perturbed, *args) - conditional_flow_matching_loss(field, *args)
        expected = perturbation.square().sum((1, 2)).mean() / (n * dim)
        assert abs(gain - expected) < 5.0 * 2 * statistic.std() / math.sqrt(m) / (n * dim)
    else:
        assert abs(z_score) > 20.0


def test_cfm_loss_weights() -> None:
    g = torch.Generator().manual_seed(2)
    flow = PairFlow(4, 2)
    x0, x1 = torch.randn(2, 6, 4, 2, generator=g)
    t, eps = torch.rand(6, generator=g), mean_free_noise((6, 4, 2), g, torch.float32)
    args = (flow.field, x0, x1, t, eps, 0.05)
    per_sample = torch.stack(
        [
            conditional_flow_matching_loss(flow.field, x0[i : i + 1], x1[i : i + 1], t[i : i + 1], eps[i : i + 1], 0.05)
            for i in range(6)
        ]
    )
    one_hot = torch.zeros(6)
    one_hot[3] = 2.5
    torch.testing.assert_close(conditional_flow_matching_loss(*args, weights=one_hot), per_sample[3])
    torch.testing.assert_close(conditional_flow_matching_loss(*args, weights=torch.ones(6)), per_sample.mean())
    w = torch.rand(6, generator=g)
    torch.testing.assert_close(conditional_flow_matching_loss(*args, weights=7 * w), (w * per_sample).sum() / w.sum())
    with pytest.raises(ValueError, match="positive sum"):
        conditional_flow_matching_loss(*args, weights=torch.zeros(6))


def test_make_batch_is_deterministic_mean_free_and_keeps_data_order() -> None:
    data = toy_data(64)
    weights = torch.rand(64)
    objective = FlowMatching(MeanFreeGaussian(4, 2), pairing="eqot")
    first = objective.make_batch(data, weights, torch.Generator().manual_seed(3))
    again = objective.make_batch(data, weights, torch.Generator().manual_seed(3))
    for name in ("x0", "t", "eps"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert torch.equal(first.x1, data) and torch.equal(first.weights, weights)
    assert first.x0.sum(1).abs().max() < 1e-5 and first.eps.sum(1).abs().max() < 1e-5
    unpaired = FlowMatching(MeanFreeGaussian(4, 2)).make_batch(data, None, torch.Generator().manual_seed(3))
    assert first.pair_distance < unpaired.pair_distance
    assert first.pairing_seconds > 0.0 and unpaired.pairing_seconds == 0.0


def test_compiled_cnf_trains_with_the_same_flow_matching_loss_and_gradients() -> None:
    """CNF(compiled=True): FlowMatching regresses the field through torch.compile, with the eager values."""
    from bgplugin.flows import compiled as compiled_module
    from bgplugin.systems import get_system

    torch.manual_seed(0)
    flow = build_flow(get_system("dw4"), "egnn", hidden=8, n_layers=2, device="cpu", dtype=torch.float64)
    fast = flow.with_options(compiled=True)
    objective = FlowMatching(flow.prior, sigma=0.01)
    optimizer = torch.optim.SGD(flow.parameters(), lr=0.05)
    for size in (6, 1):  # every batch size, one sample included; a weight change between them
        batch = objective.make_batch(toy_data(size).double(), None, torch.Generator().manual_seed(size))
        losses, grads = [], []
        for model in (flow, fast):
            model.zero_grad()
            loss = objective.loss(model, batch, 0).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() for p in model.parameters()])
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=1e-12)
        for eager_grad, fast_grad in zip(*grads, strict=True):
            torch.testing.assert_close(fast_grad, eager_grad, rtol=1e-8, atol=1e-10)
        optimizer.step()
    assert compiled_module._VELOCITY.compiled is not None and flow.field not in compiled_module._VELOCITY.failed


def test_flow_matching_rejects_bad_settings() -> None:
    prior = MeanFreeGaussian(4, 2)
    with pytest.raises(ValueError, match="sigma"):
        FlowMatching(prior, sigma=-0.1)
    with pytest.raises(ValueError, match="pairing method"):
        FlowMatching(prior, pairing="optimal")  # type: ignore[arg-type]
    batch = FlowMatching(prior).make_batch(toy_data(8), None, torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="no 'field'"):
        FlowMatching(prior).loss(nn.Linear(2, 2), batch, 0)
    with pytest.raises(ValueError, match="same system"):
        FlowMatching(MeanFreeGaussian(3, 2)).make_batch(toy_data(8), None, torch.Generator())


# --------------------------------------------------------- likelihood and KL
def test_nll_loss_is_the_weighted_negative_log_likelihood() -> None:
    flow = ScaleFlow(3, 2, log_scale=0.3)
    x = flow.sample(10)[0].detach()
    w = torch.rand(10, dtype=torch.float64)
    expected = -(w * flow.log_prob(x)).sum() / w.sum()
    torch.testing.assert_close(nll_loss(flow, x, w, divergence="exact"), expected)
    torch.manual_seed(0)
    estimates = torch.stack([nll_loss(flow, x, divergence="hutchinson").detach() for _ in range(2000)])
    assert abs(estimates.mean() - nll_loss(flow, x, divergence="exact")) < 5 * estimates.std() / math.sqrt(2000)


@pytest.mark.parametrize("n, dim", [(2, 1), (3, 2)], ids=["1d", "2d"])
def test_reverse_kl_moves_the_flow_to_the_gaussian_target(tmp_path: Path, n: int, dim: int) -> None:
    torch.manual_seed(0)
    flow = ScaleFlow(n, dim, log_scale=0.0)
    objective = ReverseKL(gaussian_energy(2.0), n_samples=256)
    summary = Trainer(flow, objective, config(None, max_steps=150, lr=0.05, schedule="constant")).fit()
    # KL(q || N(0, 4 I)) is minimised at exp(s) = 2
    assert math.exp(flow.log_scale.item()) == pytest.approx(2.0, abs=0.1)
    assert summary.final_loss < reverse_kl_loss(ScaleFlow(n, dim), gaussian_energy(2.0), 4096).loss.item()


def test_reverse_kl_leaves_out_and_counts_failed_frames() -> None:
    torch.manual_seed(1)
    flow = ScaleFlow(3, 2)
    base = gaussian_energy(1.0)

    def flaky(x: Tensor) -> Tensor:
        u = base(x)
        return torch.where(x[:, 0, 0] > 0.5, torch.full_like(u, math.inf), u)

    out = reverse_kl_loss(flow, flaky, 500)
    assert 0 < out.metrics["failed_frames"] < 500
    assert math.isfinite(out.loss.item())
    out.loss.backward()
    assert torch.isfinite(flow.log_scale.grad)
    assert not math.isfinite(reverse_kl_loss(flow, lambda x: torch.full((len(x),), math.inf), 8).loss.item())


def test_linlog_cutoff_is_identity_below_and_logarithmic_above() -> None:
    u = torch.tensor([-5.0, 0.0, 10.0, 11.0, 1e30], dtype=torch.float64, requires_grad=True)
    out = linlog_cutoff(u, 10.0)
    torch.testing.assert_close(out[:3], u[:3].detach())
    assert out[3].item() == pytest.approx(10.0 + math.log(2.0))
    assert out[4].item() < 100.0
    out.sum().backward()
    assert torch.isfinite(u.grad).all() and u.grad[4] < 1e-20


def test_lambda_schedule_and_mixture() -> None:
    schedule = LambdaSchedule(start=0.0, end=0.8, ramp_start=10, ramp_steps=20)
    assert [schedule(s) for s in (0, 10, 20, 30, 100)] == pytest.approx([0.0, 0.0, 0.4, 0.8, 0.8])
    flow = ScaleFlow(3, 2, log_scale=0.2)
    x = flow.sample(16)[0].detach()
    objective = MLKL(gaussian_energy(1.5), 64, LambdaSchedule(0.25, 0.25), divergence="exact")
    torch.manual_seed(3)
    mixed = objective.loss(flow, objective.make_batch(x, None, torch.Generator()), step=0)
    torch.manual_seed(3)
    kl = reverse_kl_loss(flow, gaussian_energy(1.5), 64, divergence="exact").loss
    nll = nll_loss(flow, x, divergence="exact")
    torch.testing.assert_close(mixed.loss, 0.75 * nll + 0.25 * kl)
    assert mixed.metrics["lambda"] == 0.25
    pure_ml = MLKL(gaussian_energy(1.5), 64, LambdaSchedule(0.0, 0.0))
    assert math.isnan(pure_ml.loss(flow, pure_ml.make_batch(x, None, torch.Generator()), 0).metrics["kl"])
    with pytest.raises(ValueError, match="start"):
        LambdaSchedule(start=1.5)


def test_mixture_trains_on_the_data_term_when_every_kl_sample_fails() -> None:
    """MLKL (a KLMixture): all-NaN energies leave the NLL with weight 1, finite gradients, the failures logged."""
    flow = ScaleFlow(3, 2, log_scale=0.2)
    x = flow.sample(16)[0].detach()
    objective = MLKL(lambda y: torch.full(y.shape[:1], math.nan, dtype=y.dtype), 8, LambdaSchedule(0.5, 0.5),
                     divergence="exact")  # fmt: skip
    out = objective.loss(flow, objective.make_batch(x, None, torch.Generator()), step=0)
    nll = nll_loss(flow, x, divergence="exact")
    torch.testing.assert_close(out.loss, nll)
    assert out.watch == pytest.approx(float(nll))
    assert out.metrics["failed_frames"] == 8.0 and math.isnan(out.metrics["kl"]) and out.metrics["lambda"] == 0.5
    assert list(out.metrics) == ["nll", "kl", "energy", "failed_frames", "lambda"]
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in flow.parameters())


# -------------------------------------------------------------------- trainer
Recipe = tuple[Callable[[], nn.Module], Callable[[Any], Any], bool]


def _objectives() -> dict[str, Recipe]:
    return {
        "fm-eqot": (lambda: PairFlow(4, 2), lambda f: FlowMatching(f.prior, pairing="eqot"), True),
        "nll-hutchinson": (lambda: ScaleFlow(4, 2), lambda f: MaximumLikelihood(), True),
        "kl": (lambda: ScaleFlow(4, 2), lambda f: ReverseKL(gaussian_energy(2.0), 32), False),
    }


def _fresh(name: str, tmp_path: Path | None, **changes: object) -> Trainer:
    make_flow, make_objective, needs_data = _objectives()[name]
    torch.manual_seed(0)
    flow = make_flow()
    weights = torch.rand(512, generator=torch.Generator().manual_seed(5))
    data = TrainingData(toy_data(), weights=weights) if needs_data else None
    settings = {"ema_decay": 0.9, "grad_clip": 0.5, "warmup_steps": 2, **changes}
    return Trainer(flow, make_objective(flow), config(tmp_path, **settings), data)


def _losses(path: Path) -> list[tuple[int, float]]:
    with path.open() as stream:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(stream)]


@pytest.mark.parametrize("name", ["fm-eqot", "nll-hutchinson", "kl"])
def test_resume_is_exact(tmp_path: Path, name: str) -> None:
    straight = _fresh(name, tmp_path / "straight")
    straight.fit()
    first = _fresh(name, tmp_path / "split")
    assert first.fit(stop_at=3).stopped_by == "stop_at"
    torch.manual_seed(12345)  # whatever happens to the global RNG in between must not matter
    second = _fresh(name, tmp_path / "split")
    summary = second.fit()
    assert summary.step == 6 and summary.steps_this_session == 3
    for a, b in zip(straight.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.shadow, second.ema.shadow, strict=True):  # type: ignore[union-attr]
        assert torch.equal(a, b)
    assert straight.optimizer.param_groups[0]["lr"] == second.optimizer.param_groups[0]["lr"]
    assert _losses(tmp_path / "straight" / "loss.csv") == _losses(tmp_path / "split" / "loss.csv")


def test_resume_after_a_crash_replays_the_steps_after_the_last_checkpoint(tmp_path: Path) -> None:
    straight = _fresh("kl", tmp_path / "straight", log_every=1)
    straight.fit()
    crashed = tmp_path / "crashed"
    _fresh("kl", crashed, log_every=1).fit(stop_at=4)
    saved = (crashed / "checkpoint.pt").read_bytes()
    _fresh("kl", crashed, log_every=1).fit(stop_at=6)
    (crashed / "checkpoint.pt").write_bytes(saved)  # as if the run died after step 6, before checkpointing it
    resumed = _fresh("kl", crashed, log_every=1)
    assert resumed.fit().steps_this_session == 2
    assert _losses(crashed / "loss.csv") == _losses(tmp_path / "straight" / "loss.csv")  # no duplicate rows
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_minibatches_carry_the_weights_of_their_own_samples() -> None:
    pattern = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.5], [0.0, -0.5]])
    index = torch.arange(1, 101, dtype=torch.float32)
    data = TrainingData(index[:, None, None] * pattern, weights=index)
    stream = _StepBatches(MaximumLikelihood(), data, batch_size=64, seed=3)
    first, again, other = stream[7], stream[7], stream[8]
    assert torch.equal(first.x, again.x) and not torch.equal(first.x, other.x)  # a function of (seed, step)
    torch.testing.assert_close(first.weights, first.x[:, 0, 0])  # weight i belongs to configuration i


def test_batches_built_in_a_worker_process_give_the_same_result(tmp_path: Path) -> None:
    in_process = _fresh("fm-eqot", None, max_steps=4)
    in_process.fit()
    in_worker = _fresh("fm-eqot", None, max_steps=4, num_workers=1)
    summary = in_worker.fit()
    for a, b in zip(in_process.model.parameters(), in_worker.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert summary.mean_pairing_seconds is not None and summary.mean_pairing_seconds > 0


def test_outputs_are_written_atomically(tmp_path: Path) -> None:
    trainer = _fresh("fm-eqot", tmp_path)
    trainer.fit()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint.pt", "loss.csv", "loss.png"]  # no temporary files left behind
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (tmp_path / "loss.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    expected = {"loss", "lr", "grad_norm", "data_seconds", "step_seconds", "pairing_seconds", "pair_distance"}
    assert expected <= set(rows[0])
    assert float(rows[0]["lr"]) == pytest.approx(0.5e-2)  # warm-up: step 1 of 2
    assert all(float(r["grad_norm"]) >= 0 for r in rows)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6 and state["ema"] is not None


def test_time_budget_stops_training_and_checkpoints(tmp_path: Path) -> None:
    trainer = _fresh("kl", tmp_path, max_steps=100_000, max_minutes=0.2 / 60)
    summary = trainer.fit()
    assert summary.stopped_by == "max_minutes"
    assert 0 < summary.step < 100_000
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == summary.step


def test_flow_matching_training_lowers_the_loss() -> None:
    torch.manual_seed(0)
    flow = PairFlow(4, 2)
    trainer = Trainer(
        flow,
        FlowMatching(flow.prior, pairing="eqot", sigma=0.01),
        config(None, max_steps=200, batch_size=64, lr=5e-3, log_every=20),
        TrainingData(toy_data(2048)),
    )
    trainer.fit()
    losses = [loss for _, loss in trainer._history]
    assert np.mean(losses[-40:]) < 0.7 * np.mean(losses[:10])


class NaNOnOddSteps:
    """Wraps an objective; its loss is NaN on odd steps."""

    requires_data = False

    def __init__(self, inner: ReverseKL) -> None:
        self.inner = inner

    def make_batch(self, x1: Tensor | None, weights: Tensor | None, generator: torch.Generator) -> None:
        return None

    def loss(self, model: nn.Module, batch: None, step: int) -> LossOutput:
        out = self.inner.loss(model, batch, step)
        return LossOutput(out.loss * math.nan, out.metrics) if step % 2 else out


def test_non_finite_steps_are_skipped_and_then_stop_training() -> None:
    torch.manual_seed(0)
    flow = ScaleFlow(3, 2)
    trainer = Trainer(flow, NaNOnOddSteps(ReverseKL(gaussian_energy(2.0), 16)), config(None, max_steps=6))
    summary = trainer.fit()
    assert summary.skipped_steps == 3 and math.isfinite(flow.log_scale.item())
    failing = ReverseKL(lambda x: torch.full((len(x),), math.inf), 16)
    always_nan = Trainer(flow, NaNOnOddSteps(failing), config(None, max_nonfinite_steps=3))
    with pytest.raises(RuntimeError, match="3 consecutive steps"):
        always_nan.fit()


class LinearLoss:
    """loss = factor(step) * sum(w): every gradient element equals the step's factor."""

    requires_data = False

    def __init__(self, factors: dict[int, float]) -> None:
        self.factors = factors

    def make_batch(self, x1: Tensor | None, weights: Tensor | None, generator: torch.Generator) -> None:
        return None

    def loss(self, model: nn.Module, batch: None, step: int) -> LossOutput:
        return LossOutput(self.factors.get(step, 1.0) * model.weight.sum(), {})


@pytest.mark.parametrize(("grad_clip", "clipped_gradient"), [(None, 5.0), (3.0, 1.5)])
def test_gradient_guard_skips_outliers_and_clips_large_gradients(
    grad_clip: float | None, clipped_gradient: float
) -> None:
    model = nn.Module()
    model.weight = nn.Parameter(torch.zeros(4, dtype=torch.float64))  # gradient norm = 2 x factor
    # the guard decides from step 20 on (20 norms recorded, median 2): step 22 is 100x (skipped),
    # step 24 is 8x (clipped to 5x the median, i.e. 5 per element; then grad_clip=3 caps the norm at 3)
    objective = LinearLoss({22: 100.0, 24: 8.0, 10: 100.0})  # step 10: before the guard decides: taken as is
    settings = {"max_steps": 30, "lr": 1e-3, "schedule": "constant", "grad_guard": True, "grad_clip": grad_clip}
    trainer = Trainer(model, objective, config(None, **settings))
    summary = trainer.fit()
    assert (summary.guard_skipped_steps, summary.guard_clipped_steps, summary.skipped_steps) == (1, 1, 0)
    first_moment = 0.0
    for step in range(30):
        if step == 22:
            continue
        gradient = {24: clipped_gradient, 10: 100.0 if grad_clip is None else 100.0 * 3.0 / 200.0}.get(step, 1.0)
        first_moment = 0.9 * first_moment + 0.1 * gradient
    state = trainer.optimizer.state[model.weight]
    assert int(state["step"]) == 29
    torch.testing.assert_close(state["exp_avg"], torch.full((4,), first_moment, dtype=torch.float64))
    unguarded = Trainer(model, objective, config(None, **{**settings, "grad_guard": False}))
    assert unguarded.guard is None and unguarded.fit().guard_skipped_steps == 0


class SlowLinearLoss(LinearLoss):
    """LinearLoss that takes 30 ms per step (a stand-in for real work, for the time-based schedule)."""

    def loss(self, model: nn.Module, batch: None, step: int) -> LossOutput:
        time.sleep(0.03)
        return super().loss(model, batch, step)


def test_time_clock_spans_the_decay_over_the_time_budget(tmp_path: Path) -> None:
    model = nn.Module()
    model.weight = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    budget_minutes = 0.015  # 0.9 s: about 30 steps of 30 ms
    settings = {"max_steps": 10_000, "max_minutes": budget_minutes, "lr": 1e-2, "schedule": "cosine",
                "warmup_steps": 2, "schedule_clock": "time", "log_every": 1, "checkpoint_every": 10_000}  # fmt: skip
    summary = Trainer(model, SlowLinearLoss({}), config(tmp_path, **settings)).fit()
    assert summary.stopped_by == "max_minutes" and 10 < summary.step < 10_000
    with (tmp_path / "loss.csv").open() as stream:
        rows = [(float(r["lr"]), float(r["elapsed_seconds"])) for r in csv.DictReader(stream)]
    assert rows[0][0] == pytest.approx(0.5e-2) and rows[1][0] == pytest.approx(1e-2)  # warm-up by steps
    budget = 60.0 * budget_minutes
    for (lr, _), (_, elapsed_before) in zip(rows[3:], rows[2:-1], strict=True):
        expected = 0.5e-2 * (1.0 + math.cos(math.pi * min(1.0, elapsed_before / budget)))
        assert lr == pytest.approx(expected, abs=2e-4)
    assert rows[-1][0] < 0.15e-2  # the decay has (nearly) ended when the budget is spent
    resumed = Trainer(model, SlowLinearLoss({}), config(tmp_path, **{**settings, "max_minutes": 2 * budget_minutes}))
    again = resumed.fit()
    assert again.steps_this_session > 5 and resumed.scheduler.get_last_lr()[0] < 0.15e-2
    with (tmp_path / "loss.csv").open() as stream:
        lrs = [float(r["lr"]) for r in csv.DictReader(stream)][summary.step :]
    assert lrs[0] > 0.2e-2  # the decay is stretched over the doubled budget: half-way, lr ~ lr_peak / 2
    with pytest.raises(ValueError, match="needs max_minutes"):
        TrainerConfig(schedule_clock="time")
    with pytest.raises(ValueError, match="schedule_clock must be one of"):
        TrainerConfig(schedule_clock="wall", max_minutes=1.0)  # type: ignore[arg-type]


def test_resume_keeps_the_gradient_guard_history(tmp_path: Path) -> None:
    straight = _fresh("nll-hutchinson", tmp_path / "straight", max_steps=30, grad_guard=True, checkpoint_every=5)
    straight.fit()
    _fresh("nll-hutchinson", tmp_path / "split", max_steps=30, grad_guard=True, checkpoint_every=5).fit(stop_at=25)
    second = _fresh("nll-hutchinson", tmp_path / "split", max_steps=30, grad_guard=True, checkpoint_every=5)
    assert second.fit().steps_this_session == 5
    assert straight.guard is not None and second.guard is not None
    assert list(second.guard.norms) == list(straight.guard.norms) and len(second.guard.norms) == 30
    for a, b in zip(straight.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_checkpoints_are_also_written_by_wall_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved: list[int] = []
    original = Trainer.save_checkpoint

    def counting(self: Trainer, path: Path) -> None:
        saved.append(self.step)
        original(self, path)

    monkeypatch.setattr(Trainer, "save_checkpoint", counting)
    # by steps only: one checkpoint, at the end
    _fresh("nll-hutchinson", tmp_path / "steps", max_steps=8, checkpoint_every=10_000, checkpoint_minutes=None).fit()
    assert saved == [8]
    saved.clear()
    # a budget shorter than one step: a checkpoint after every step, the same training as without them
    timed = _fresh("nll-hutchinson", tmp_path / "time", max_steps=8, checkpoint_every=10_000, checkpoint_minutes=1e-9)
    timed.fit()
    assert saved == [1, 2, 3, 4, 5, 6, 7, 8, 8]
    reference = _fresh("nll-hutchinson", None, max_steps=8, checkpoint_every=10_000, checkpoint_minutes=None)
    reference.fit()
    for a, b in zip(reference.model.parameters(), timed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="checkpoint_minutes must be a finite number > 0 or None"):
            TrainerConfig(checkpoint_minutes=bad)


class CliffLoss:
    """(w - 1)^2 below a cliff at w = 1.05, 1e6 - w above it (a sticky region nothing leads out of).

    ``kick_step``: that step's batch adds -1e4 w (one pathological batch) and knocks a converged w over the
    cliff. ``cliff=None``: the loss is -w below 1, so the weight walks up until it falls off.
    """

    requires_data = False

    def __init__(self, cliff: float | None, kick_step: int = -1) -> None:
        self.cliff = cliff
        self.kick_step = kick_step

    def make_batch(self, x1: Tensor | None, weights: Tensor | None, generator: torch.Generator) -> None:
        return None

    def loss(self, model: nn.Module, batch: None, step: int) -> LossOutput:
        w = model.weight
        if self.cliff is None:
            return LossOutput(torch.where(w > 1.0, 1e6 - w, -w).sum(), {})
        loss = torch.where(w > self.cliff, 1e6 - w, (w - 1.0) ** 2).sum()
        return LossOutput(loss - 1e4 * w.sum() if step == self.kick_step else loss, {})


def _cliff_model() -> nn.Module:
    model = nn.Module()
    model.weight = nn.Parameter(torch.full((1,), -20.0, dtype=torch.float64))
    return model


def test_a_runaway_loss_is_rolled_back_at_a_lower_learning_rate(tmp_path: Path) -> None:
    settings = {"max_steps": 600, "lr": 0.2, "schedule": "constant", "snapshot_every": 20, "checkpoint_every": 20}
    # without roll-backs the kick over the cliff at step 150 is final
    plain = _cliff_model()
    Trainer(plain, CliffLoss(1.05, kick_step=150), config(None, **settings)).fit()
    assert plain.weight.item() > 1.05
    model = _cliff_model()
    trainer = Trainer(model, CliffLoss(1.05, kick_step=150), config(tmp_path, **settings, max_rollbacks=5))
    summary = trainer.fit()
    assert summary.rollbacks == 1 and summary.lr_scale == 0.5
    assert abs(model.weight.item() - 1.0) < 0.05  # converged below the cliff
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * summary.lr_scale)
    with (tmp_path / "loss.csv").open() as stream:
        losses = [float(row["loss"]) for row in csv.DictReader(stream)]
    assert max(losses) > 1e5 and losses[-1] < 1e-2  # it did fall off, and came back
    # the checkpoint carries the lowered learning rate and the count into a resumed run
    resumed = Trainer(_cliff_model(), CliffLoss(1.05, kick_step=150), config(tmp_path, **{**settings, "max_steps": 620},
                                                              max_rollbacks=5))  # fmt: skip
    again = resumed.fit()
    assert resumed.rollbacks == summary.rollbacks and again.lr_scale == pytest.approx(summary.lr_scale)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * summary.lr_scale)


def test_a_runaway_loss_stops_training_after_max_rollbacks_with_a_good_checkpoint(tmp_path: Path) -> None:
    settings = {"max_steps": 2000, "lr": 0.1, "schedule": "constant", "snapshot_every": 20, "checkpoint_every": 20}
    trainer = Trainer(_cliff_model(), CliffLoss(None), config(tmp_path, **settings, max_rollbacks=2))
    with pytest.raises(RuntimeError, match=r"ran away .* after 2 roll-back\(s\).*Lower lr"):
        trainer.fit()
    assert trainer.rollbacks == 2 and trainer.model.weight.item() <= 1.0
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["model"]["weight"].item() <= 1.0 and saved["rollbacks"] == 2
    with pytest.raises(ValueError, match="rollback_lr_factor"):
        TrainerConfig(max_rollbacks=1, rollback_lr_factor=1.0)
    with pytest.raises(ValueError, match="max_rollbacks"):
        TrainerConfig(max_rollbacks=-1)

class StepUpLoss:
    """(w - 1)^2 plus an offset that jumps by 1e3 at ``jump_step`` (a mixture whose weights change on purpose).

    ``watched``: the loss names its offset-free part as ``LossOutput.watch``.
    """

    requires_data = False

    def __init__(self, jump_step: int, watched: bool) -> None:
        self.jump_step, self.watched = jump_step, watched

    def make_batch(self, x1: Tensor | None, weights: Tensor | None, generator: torch.Generator) -> None:
        return None

    def loss(self, model: nn.Module, batch: None, step: int) -> LossOutput:
        term = ((model.weight - 1.0) ** 2).sum()
        offset = 1e3 if step >= self.jump_step else 0.0
        return LossOutput(term + offset, {}, float(term.detach()) if self.watched else None)


def test_the_runaway_check_watches_what_the_objective_names() -> None:
    settings = {"max_steps": 200, "lr": 0.05, "schedule": "constant", "snapshot_every": 20, "max_rollbacks": 1}
    def model() -> nn.Module:
        near = _cliff_model()
        with torch.no_grad():
            near.weight.fill_(0.0)  # converged well before the jump
        return near

    with pytest.raises(RuntimeError, match="ran away"):  # the loss's own jump looks like a run-away
        Trainer(model(), StepUpLoss(100, watched=False), config(None, **settings)).fit()
    trainer = Trainer(model(), StepUpLoss(100, watched=True), config(None, **settings))
    summary = trainer.fit()
    assert summary.rollbacks == 0 and summary.step == 200 and abs(trainer.model.weight.item() - 1.0) < 1e-3


def test_learning_rate_schedule() -> None:
    trainer = _fresh("kl", None, max_steps=10, warmup_steps=2, schedule="cosine", min_lr_factor=0.1)
    factors = [trainer.scheduler.lr_lambdas[0](s) for s in range(11)]  # type: ignore[attr-defined]
    assert factors[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert factors[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert factors[10] == pytest.approx(0.1)


def test_configuration_and_data_are_validated() -> None:
    with pytest.raises(ValueError, match="max_steps"):
        TrainerConfig(max_steps=0)
    with pytest.raises(ValueError, match="schedule"):
        TrainerConfig(schedule="exponential")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ema_decay"):
        TrainerConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        TrainingData(toy_data(8), weights=-torch.ones(8))
    with pytest.raises(ValueError, match=r"shape \(n_samples, n_particles, dim\)"):
        TrainingData(torch.zeros(8, 8))
    flow = ScaleFlow(4, 2)
    with pytest.raises(ValueError, match="needs training data"):
        Trainer(flow, MaximumLikelihood(), TrainerConfig())
    with pytest.raises(ValueError, match="does not use training data"):
        Trainer(flow, ReverseKL(gaussian_energy(1.0), 8), TrainerConfig(), TrainingData(toy_data(8)))
    shifted = TrainingData(toy_data(8) + 3.0)
    assert shifted.positions.mean(1).abs().max() < 1e-6  # centre of mass removed


# ----------------------------------------------------------- with the real CNF
def _real_flow() -> nn.Module:
    system = SimpleNamespace(n_particles=4, dim=2, atom_types=np.zeros(4, dtype=int))
    return build_flow(system, "egnn", hidden=8, n_layers=2, steps=4, device="cpu")


def test_real_cnf_flow_matching_resumes_exactly(tmp_path: Path) -> None:
    def run(out: Path, stop_at: int | None) -> Trainer:
        torch.manual_seed(0)
        flow = _real_flow()
        objective = FlowMatching(flow.prior, pairing="eqot")
        trainer = Trainer(flow, objective, config(out, max_steps=4, ema_decay=0.9), TrainingData(toy_data()))
        trainer.fit(stop_at=stop_at)
        return trainer

    straight = run(tmp_path / "a", None)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", None)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_real_cnf_reverse_kl_widens_towards_a_wider_gaussian() -> None:
    torch.manual_seed(0)
    flow = _real_flow()

    def median_spread() -> float:
        with torch.no_grad():
            return flow.sample(512)[0].square().sum((1, 2)).median().item()

    before = median_spread()
    trainer = Trainer(
        flow, ReverseKL(gaussian_energy(2.0), 64), config(None, max_steps=20, lr=5e-3, schedule="constant")
    )
    summary = trainer.fit()
    # prior: E|x|^2 = (n-1) d = 6; target: 4 * 6 = 24; optimum of the loss: -log Z = -3 log(8 pi) = -9.67
    assert median_spread() > before + 3.0
    assert summary.skipped_steps == 0
    assert summary.final_loss < trainer._history[0][1] - 0.5


def test_long_run_bars_refresh_rarely_when_stderr_is_a_file(monkeypatch) -> None:
    """A redirected log gets a bar line every 30 s, a terminal every 0.1 s (tqdm's default)."""
    import io
    import sys

    from bgplugin.progress import REDIRECTED_INTERVAL, bar_mininterval

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert bar_mininterval() == REDIRECTED_INTERVAL == 30.0

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert bar_mininterval() == 0.1


def test_bench_training_step_times_eager_and_compiled_steps() -> None:
    from bgplugin.benchmarks.training_step import bench_training_step, format_training_step

    eager = bench_training_step(("dw4",), ("eacf", "cnf"), compiled=False, n_steps=1, n_warmup=1,
                                batch_sizes={"dw4": {"eacf": 8, "cnf": 8}})  # fmt: skip
    assert [(row["model"], row["batch_size"]) for row in eager["results"]] == [("eacf", 8), ("cnf", 8)]
    for row in eager["results"]:
        assert row["eager_seconds_per_step"] > 0 and math.isfinite(row["loss_eager"])
        assert row["compiled_seconds_per_step"] is None and row["speedup"] is None
    result = bench_training_step(("dw4",), ("cnf",), n_steps=2, n_warmup=1, batch_sizes={"dw4": {"cnf": 8}})
    row = result["results"][0]
    assert row["compile_seconds"] > 0 and row["speedup"] == pytest.approx(
        row["eager_seconds_per_step"] / row["compiled_seconds_per_step"]
    )
    assert abs(row["loss_compiled"] - row["loss_eager"]) < 1e-5  # the same step, compiled
    assert "dw4" in format_training_step(result) and result["machine"]["cpu_count"] >= 1
    with pytest.raises(ValueError, match="unknown systems"):
        bench_training_step(("lj55",))
    with pytest.raises(ValueError, match="unknown models"):
        bench_training_step(("dw4",), ("kernel",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_steps must be an integer"):
        bench_training_step(("dw4",), n_steps=0)
