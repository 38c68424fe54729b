r"""Training the E-ACF: joint maximum likelihood, joint reverse KL, and FAB with the :math:`\alpha = 2` divergence.

All objectives work on the joint space of :math:`x` and the augmented
variables :math:`a`, with the augmented target :math:`\pi(a \mid x)` of the
flow (Midgley et al. 2023, Sec. 3.4):

Joint maximum likelihood (:class:`JointMaximumLikelihood`)
    :math:`-\mathbb E_{x \sim \text{data},\, a \sim \pi(a|x)} \log q(x, a)`,
    an upper bound of the marginal NLL plus the (constant) entropy of
    :math:`\pi(a|x)`.
Marginal maximum likelihood (:class:`MarginalMaximumLikelihood`)
    :math:`-\mathbb E_x \mathbb E_{a_{1..K} \sim \pi} \log \frac1K \sum_k q(x, a_k) / \pi(a_k|x)`,
    the importance-weighted bound of the marginal NLL over K draws (the
    quantity the evaluation estimates with M draws); K = 1 is the joint
    objective less a constant.
Joint reverse KL (:class:`JointReverseKL`)
    :math:`\mathbb E_{(x,a) \sim q}[\log q(x, a) + u(x) - \log \pi(a|x)]`,
    from the energy alone (reparameterised samples).
Joint ML + KL (:class:`JointMLKL`)
    :math:`(1 - \lambda)` times the first plus :math:`\lambda` times the
    second, :math:`\lambda` following a :class:`~bgplugin.training.LambdaSchedule`
    (Noé et al. 2019's mixture of training by example and by energy): the data
    keep the flow on the modes while the energy pulls its samples off
    stretched bonds and overlapping atoms.
FAB, :math:`\alpha = 2` (:class:`FABAlpha2`)
    Flow annealed importance sampling bootstrap (Midgley et al. 2023, ICLR):
    annealed importance sampling (AIS) with Hamiltonian Monte Carlo
    transitions from :math:`q` towards :math:`g = \tilde p^2 / q`, the
    distribution that minimises the variance of the importance weights
    (:math:`\tilde p(x, a) = e^{-u(x)} \pi(a|x)`), fills a prioritised replay
    buffer; the loss on buffer samples (drawn with probability
    :math:`\propto w`) is :math:`-\frac1N\sum_i \frac{q_{\text{old}}(z_i)}{q_\theta(z_i)} \log q_\theta(z_i)`
    with the ratio held constant and clipped, whose gradient estimates that of
    :math:`D_{\alpha=2}(\tilde p \,\|\, q_\theta)`. After each use the
    weights are corrected by :math:`q_{\text{old}}/q_\theta`.

Each objective adds ``aux_weight`` times the collinearity loss of the frames
(:func:`~bgplugin.flows.eacf.projections.collinearity_loss`). They follow the
:class:`bgplugin.training.Objective` protocol and train with
:class:`bgplugin.training.Trainer` (``grad_guard=True``: the gradient skipping and
clipping of the paper); :func:`train_eacf` is its in-memory shortcut.
:class:`GuardedOptimizer` is the same guard around a bare optimiser, for loops
of one's own.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from bgplugin.flows.eacf.model import EACF
from bgplugin.training.guard import GradientGuard
from bgplugin.training.likelihood import KLMixture, LambdaSchedule, linlog_cutoff
from bgplugin.training.trainer import (
    LossOutput,
    Trainer,
    TrainerConfig,
    TrainingData,
    weighted_mean,
)

__all__ = [
    "FABAlpha2",
    "GuardedOptimizer",
    "JointMLKL",
    "JointMaximumLikelihood",
    "JointReverseKL",
    "MarginalMaximumLikelihood",
    "ReplayBuffer",
    "StepReport",
    "train_eacf",
]

logger = logging.getLogger(__name__)

EnergyFunction = Callable[[Tensor], Tensor]


def _check_positive_int(name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_flow(flow: Any) -> None:
    if not isinstance(flow, EACF):
        raise TypeError(f"flow must be an EACF (build_flow(system, kind='eacf')), got {type(flow).__name__}")


# ------------------------------------------------------------------ optimiser
class StepReport(NamedTuple):
    """What :meth:`GuardedOptimizer.step` did.

    Attributes
    ----------
    action : {"step", "clip", "skip"}
    grad_norm : float
        Global gradient norm before clipping (NaN/inf when not finite).
    median : float
        Median of the recorded norms the decision used (NaN during warm-up).
    """

    action: Literal["step", "clip", "skip"]
    grad_norm: float
    median: float


class GuardedOptimizer:
    """Wraps an optimiser with a :class:`~bgplugin.training.guard.GradientGuard` (Midgley et al. 2023).

    A step whose global gradient norm exceeds ``skip_factor`` times the
    median of the last ``history`` finite norms is skipped, one above
    ``clip_factor`` times the median is clipped to that norm, and a
    non-finite gradient is always skipped (see the guard for the details).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
    history : int
        Number of recent norms kept (100 in the paper).
    skip_factor, clip_factor : float
        Multiples of the median (20 and 5 in the paper).
    min_history : int
        Norms needed before skipping or clipping starts.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        history: int = 100,
        skip_factor: float = 20.0,
        clip_factor: float = 5.0,
        min_history: int = 20,
    ) -> None:
        self.optimizer = optimizer
        self.guard = GradientGuard(history, skip_factor, clip_factor, min_history)

    @property
    def norms(self) -> deque[float]:
        """Recorded gradient norms (the guard's history)."""
        return self.guard.norms

    @property
    def n_skipped(self) -> int:
        """Steps skipped so far."""
        return self.guard.n_skipped

    @property
    def n_clipped(self) -> int:
        """Steps clipped so far."""
        return self.guard.n_clipped

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimiser's parameter groups (for learning-rate schedules)."""
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        """Clear the gradients (set to None)."""
        self.optimizer.zero_grad(set_to_none=True)

    def _parameters(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def step(self) -> StepReport:
        """Take (or skip, or clip) one step with the current gradients."""
        parameters = self._parameters()
        if not parameters:
            raise RuntimeError("no parameter has a gradient; call loss.backward() before step()")
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters])))
        decision = self.guard.decide(norm)
        if decision.action == "skip":
            self.zero_grad()
            logger.debug("gradient norm %.3g (median %.3g): step skipped", norm, decision.median)
            return StepReport("skip", norm, decision.median)
        if decision.action == "clip":
            for p in parameters:
                p.grad.mul_(decision.scale)  # type: ignore[union-attr]
        self.optimizer.step()
        return StepReport(decision.action, norm, decision.median)

    def state_dict(self) -> dict[str, Any]:
        """Wrapped optimiser state plus the norm history and counters."""
        return {"optimizer": self.optimizer.state_dict(), **self.guard.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.guard.load_state_dict(state)


# ----------------------------------------------------------------- objectives
@dataclass(frozen=True)
class AugmentedBatch:
    """Data batch with the standard-normal noise of its augmented draws ``a = x + eta * noise``.

    Attributes
    ----------
    x : Tensor, shape (batch, n_particles, dim)
    weights : Tensor, shape (batch,), or None
    noise : Tensor, shape (batch, n_aug, n_particles, dim)
        For :class:`MarginalMaximumLikelihood`: (batch, K, n_aug, n_particles, dim).
    """

    x: Tensor
    weights: Tensor | None
    noise: Tensor


class JointMaximumLikelihood:
    """Joint maximum likelihood on data: ``-log q(x, a)`` with ``a ~ pi(a|x)`` drawn per batch.

    Parameters
    ----------
    flow : EACF
        The flow (its ``n_aug`` and ``aug_scale`` define the draws).
    aux_weight : float
        Weight of the collinearity loss of the frames.
    """

    requires_data = True

    def __init__(self, flow: EACF, *, aux_weight: float = 1.0) -> None:
        _check_flow(flow)
        if not aux_weight >= 0:
            raise ValueError(f"aux_weight must be >= 0, got {aux_weight}")
        self.n_aug, self.n_particles, self.dim = flow.n_aug, flow.n_particles, flow.dim
        self.aux_weight = float(aux_weight)

    def __repr__(self) -> str:
        return f"JointMaximumLikelihood(aux_weight={self.aux_weight})"

    def _noise_shape(self, n_frames: int) -> tuple[int, ...]:
        return (n_frames, self.n_aug, self.n_particles, self.dim)

    def make_batch(self, x1: Tensor | None, weights: Tensor | None, generator: torch.Generator) -> AugmentedBatch:
        """The data minibatch and the noise of its augmented draws (from ``generator``)."""
        if x1 is None:
            raise ValueError(f"{type(self).__name__} needs data samples; pass training data")
        noise = torch.randn(self._noise_shape(x1.shape[0]), generator=generator, dtype=x1.dtype)
        return AugmentedBatch(x1, weights, noise)

    def _output(self, flow: EACF, nll: Tensor, aux: Tensor, batch: AugmentedBatch, metric: str) -> LossOutput:
        """The frames' weighted mean of ``nll`` (batch,) plus ``aux_weight`` times the auxiliary loss."""
        weights = None if batch.weights is None else batch.weights.to(flow.device, flow.dtype)
        mean_nll = weighted_mean(nll, weights)
        aux_mean = aux.mean()
        metrics = {metric: float(mean_nll.detach()), "aux": float(aux_mean.detach())}
        return LossOutput(mean_nll + self.aux_weight * aux_mean, metrics)

    def loss(self, model: torch.nn.Module, batch: AugmentedBatch, step: int) -> LossOutput:
        """Weighted joint NLL (nats) plus the auxiliary loss; metrics ``joint_nll``, ``aux``."""
        _check_flow(model)
        flow: EACF = model  # type: ignore[assignment]
        x = batch.x.to(flow.device, flow.dtype)
        a = x.unsqueeze(1) + flow.aug_scale * batch.noise.to(flow.device, flow.dtype)
        log_q, aux = flow.log_prob_joint_and_aux(x, a)
        return self._output(flow, -log_q, aux, batch, "joint_nll")


class MarginalMaximumLikelihood(JointMaximumLikelihood):
    r"""Maximum likelihood of the marginal :math:`q(x)` through the importance-weighted bound over K draws of ``a``.

    The loss is :math:`-\mathbb E_x \mathbb E_{a_{1..K} \sim \pi(\cdot|x)}
    \log \frac1K \sum_k q(x, a_k) / \pi(a_k \mid x)`, the K-draw estimate of
    the marginal log-likelihood that the evaluation uses with M draws (Eq. 21),
    a lower bound of :math:`\log q(x)` that tightens as K grows (Burda et al.
    2016). K = 1 is :class:`JointMaximumLikelihood` less the entropy of
    :math:`\pi(a|x)`, a constant. For K > 1 the gradient weights each draw by
    its self-normalised importance weight, so the flow is no longer pushed to
    make :math:`q(a|x)` equal to :math:`\pi(a|x)` everywhere, only where that
    raises :math:`q(x)`: the marginal NLL improves and the joint bound (and with
    it the joint ESS) may get worse. A step costs K joint evaluations per
    configuration; ``batch_size / K`` configurations per step keep the cost of
    the joint objective.

    Parameters
    ----------
    flow : EACF
    n_draws : int
        K, draws of ``a`` per configuration (4 in ``docs/benchmarks.md``'s LJ13 fine-tune).
    aux_weight : float
        Weight of the collinearity loss of the frames (averaged over all draws).
    """

    def __init__(self, flow: EACF, n_draws: int = 4, *, aux_weight: float = 1.0) -> None:
        super().__init__(flow, aux_weight=aux_weight)
        _check_positive_int("n_draws", n_draws)
        self.n_draws = n_draws

    def __repr__(self) -> str:
        return f"MarginalMaximumLikelihood(n_draws={self.n_draws}, aux_weight={self.aux_weight})"

    def _noise_shape(self, n_frames: int) -> tuple[int, ...]:
        return (n_frames, self.n_draws, self.n_aug, self.n_particles, self.dim)  # K draws per frame

    def loss(self, model: torch.nn.Module, batch: AugmentedBatch, step: int) -> LossOutput:
        """Weighted negative K-draw bound (nats) plus the auxiliary loss; metrics ``marginal_nll_bound``, ``aux``."""
        _check_flow(model)
        flow: EACF = model  # type: ignore[assignment]
        if batch.noise.ndim != 5 or batch.noise.shape[1] != self.n_draws:
            raise ValueError(
                f"the batch has noise of shape {tuple(batch.noise.shape)}, not (batch, {self.n_draws}, ...): "
                "make it with this objective's make_batch"
            )
        x = batch.x.to(flow.device, flow.dtype)
        n, k = x.shape[0], self.n_draws
        xs = x.repeat_interleave(k, 0)
        a = xs.unsqueeze(1) + flow.aug_scale * batch.noise.to(flow.device, flow.dtype).flatten(0, 1)
        log_q, aux = flow.log_prob_joint_and_aux(xs, a)
        log_w = (log_q - flow.log_prob_aug(a, xs)).reshape(n, k)
        bound = torch.logsumexp(log_w, 1) - math.log(k)
        return self._output(flow, -bound, aux, batch, "marginal_nll_bound")


class JointReverseKL:
    """Joint reverse KL from the energy alone: ``E_q[log q(x, a) + u(x) - log pi(a|x)]``.

    Parameters
    ----------
    flow : EACF
    energy : callable
        ``energy(x) -> u`` (batch,) in kT, differentiable; non-finite marks a failed frame (left out).
    n_samples : int
        Flow samples per step.
    aux_weight : float
        Weight of the collinearity loss.
    energy_cutoff : float or None
        Linear-logarithmic regularisation of energies above this value (kT).
    """

    requires_data = False

    def __init__(
        self,
        flow: EACF,
        energy: EnergyFunction,
        n_samples: int,
        *,
        aux_weight: float = 1.0,
        energy_cutoff: float | None = None,
    ) -> None:
        _check_flow(flow)
        if not callable(energy):
            raise TypeError(f"energy must be callable as energy(x) -> u, got {type(energy).__name__}")
        _check_positive_int("n_samples", n_samples)
        self.energy = energy
        self.n_samples = n_samples
        self.aux_weight = float(aux_weight)
        self.energy_cutoff = energy_cutoff

    def __repr__(self) -> str:
        return f"JointReverseKL(n_samples={self.n_samples}, cutoff={self.energy_cutoff})"

    def make_batch(self, x1: Tensor | None, weights: Tensor | None, generator: torch.Generator) -> None:
        """No data: samples are drawn from the flow in :meth:`loss`."""
        if x1 is not None:
            raise ValueError("JointReverseKL uses no training data; pass data=None")

    def loss(self, model: torch.nn.Module, batch: None, step: int) -> LossOutput:
        """Joint KL estimate (kT) plus the auxiliary loss; metrics ``kl``, ``energy``, ``failed_frames``, ``aux``."""
        _check_flow(model)
        flow: EACF = model  # type: ignore[assignment]
        x, a, log_q, aux = flow.sample_joint_and_aux(self.n_samples)
        u = self.energy(x)
        finite = torch.isfinite(u.detach()) & torch.isfinite(log_q.detach())
        failed = int((~finite).sum())
        if not finite.any():
            nan = torch.full((), math.nan, dtype=log_q.dtype, device=log_q.device)
            metrics = {"kl": math.nan, "energy": math.nan, "failed_frames": float(failed), "aux": math.nan}
            return LossOutput(nan, metrics)
        u_ok = u[finite]
        u_train = u_ok if self.energy_cutoff is None else linlog_cutoff(u_ok, self.energy_cutoff)
        kl = (log_q[finite] + u_train - flow.log_prob_aug(a[finite], x[finite])).mean()
        aux_mean = aux.mean()
        metrics = {"kl": float(kl.detach()), "energy": float(u_ok.detach().mean()), "failed_frames": float(failed),
                   "aux": float(aux_mean.detach())}  # fmt: skip
        return LossOutput(kl + self.aux_weight * aux_mean, metrics)


class JointMLKL(KLMixture):
    r"""Mixture :math:`(1 - \lambda)` joint NLL on data :math:`+ \lambda` joint reverse KL (Noé et al. 2019).

    :class:`bgplugin.training.KLMixture` of :class:`JointMaximumLikelihood`
    and :class:`JointReverseKL`.

    Parameters
    ----------
    flow : EACF
    energy : callable
        ``energy(x) -> u`` (batch,) in kT, differentiable; non-finite marks a failed frame (left out).
    kl_samples : int
        Flow samples per step for the KL term.
    schedule : LambdaSchedule
        :math:`\lambda` per step.
    aux_weight : float
        Weight of the collinearity loss (in both terms).
    energy_cutoff : float or None
        Linear-logarithmic regularisation of energies above this value (kT).

    Notes
    -----
    A term whose weight is 0 at a step is not computed (its metrics are NaN),
    so the steps before the ramp cost what maximum likelihood costs. A step
    whose KL samples all fail (non-finite energy or density) trains on the
    data term alone, with weight 1. The run-away check of the trainer watches
    the data term (``LossOutput.watch``), whose scale does not move with
    :math:`\lambda`; the KL term alone when :math:`\lambda = 1`. Metrics
    ``joint_nll``, ``aux`` (of the data term when it is computed), ``kl``,
    ``energy``, ``failed_frames``, ``lambda``.
    """

    def __init__(
        self,
        flow: EACF,
        energy: EnergyFunction,
        kl_samples: int,
        schedule: LambdaSchedule,
        *,
        aux_weight: float = 1.0,
        energy_cutoff: float | None = None,
    ) -> None:
        self.ml = JointMaximumLikelihood(flow, aux_weight=aux_weight)
        self.kl = JointReverseKL(flow, energy, kl_samples, aux_weight=aux_weight, energy_cutoff=energy_cutoff)
        super().__init__(self.ml, self.kl, schedule, ("joint_nll", "kl", "energy", "failed_frames", "aux"))


class ReplayBuffer:
    """Prioritised replay buffer of joint samples with log-weights and the log q they were weighted with.

    Parameters
    ----------
    capacity : int
        Largest number of samples kept (oldest dropped first).
    """

    def __init__(self, capacity: int) -> None:
        _check_positive_int("capacity", capacity)
        self.capacity = capacity
        self.x: Tensor | None = None
        self.a: Tensor | None = None
        self.log_w: Tensor | None = None
        self.log_q: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.log_w is None else int(self.log_w.numel())

    def add(self, x: Tensor, a: Tensor, log_w: Tensor, log_q: Tensor) -> None:
        """Append samples (finite log-weights only), dropping the oldest beyond the capacity."""
        keep = torch.isfinite(log_w) & torch.isfinite(log_q)
        x, a, log_w, log_q = (v.detach()[keep] for v in (x, a, log_w, log_q))
        if self.log_w is None or self.x is None or self.a is None or self.log_q is None:
            self.x, self.a, self.log_w, self.log_q = x, a, log_w, log_q
        else:
            self.x = torch.cat((self.x, x))[-self.capacity :]
            self.a = torch.cat((self.a, a))[-self.capacity :]
            self.log_w = torch.cat((self.log_w, log_w))[-self.capacity :]
            self.log_q = torch.cat((self.log_q, log_q))[-self.capacity :]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Indices drawn with probability proportional to the weights (without replacement when possible).

        Returns
        -------
        index, x, a, log_q : Tensor
            ``index`` (n,) into the buffer, the samples and their stored log q.
        """
        if self.log_w is None or self.x is None or self.a is None or self.log_q is None or len(self) == 0:
            raise RuntimeError("the replay buffer is empty; add AIS samples first")
        probabilities = torch.softmax(self.log_w.double(), 0).cpu()
        replacement = n > int((probabilities > 0).sum())
        index = torch.multinomial(probabilities, n, replacement=replacement, generator=generator).to(self.x.device)
        return index, self.x[index], self.a[index], self.log_q[index]

    def adjust(self, index: Tensor, log_q_new: Tensor) -> None:
        """Re-weight used samples for the new flow: ``log w += log q_old - log q_new``; store ``log q_new``."""
        if self.log_w is None or self.log_q is None:
            raise RuntimeError("the replay buffer is empty")
        log_q_new = log_q_new.detach().to(self.log_q)
        self.log_w[index] = self.log_w[index] + self.log_q[index] - log_q_new
        self.log_q[index] = log_q_new


class FABAlpha2:
    r"""FAB with the :math:`\alpha = 2` divergence, AIS with HMC and a prioritised replay buffer.

    Parameters
    ----------
    flow : EACF
        The flow being trained (AIS runs with its current parameters).
    energy : callable
        ``energy(x) -> u`` (batch,) in kT, differentiable in ``x``.
    batch_size : int
        Samples per AIS run and per gradient step.
    n_intermediate : int
        Intermediate distributions of AIS (each with one HMC transition).
    n_leapfrog : int
        Leapfrog steps per HMC transition.
    step_size : float
        Initial leapfrog step size (length units), adapted per intermediate
        distribution towards ``target_accept`` between AIS runs.
    target_accept : float
        Target acceptance rate of HMC.
    buffer_size : int
        Replay-buffer capacity.
    min_buffer : int
        Samples collected by AIS before the first gradient step.
    updates_per_ais : int
        Gradient steps per AIS run.
    w_adjust_clip : float
        Upper clip of the ratio :math:`q_\text{old}/q_\theta` in the loss.
    aux_weight : float
        Weight of the collinearity loss.
    """

    requires_data = False

    def __init__(
        self,
        flow: EACF,
        energy: EnergyFunction,
        *,
        batch_size: int = 128,
        n_intermediate: int = 2,
        n_leapfrog: int = 5,
        step_size: float = 0.1,
        target_accept: float = 0.65,
        buffer_size: int = 51_200,
        min_buffer: int = 8192,
        updates_per_ais: int = 8,
        w_adjust_clip: float = 10.0,
        aux_weight: float = 1.0,
    ) -> None:
        _check_flow(flow)
        if not callable(energy):
            raise TypeError(f"energy must be callable as energy(x) -> u, got {type(energy).__name__}")
        for name, value in (("batch_size", batch_size), ("n_intermediate", n_intermediate),
                            ("n_leapfrog", n_leapfrog), ("buffer_size", buffer_size),
                            ("updates_per_ais", updates_per_ais)):  # fmt: skip
            _check_positive_int(name, value)
        _check_positive_int("min_buffer", min_buffer, 0)
        if min_buffer > buffer_size:
            raise ValueError(f"min_buffer ({min_buffer}) must be <= buffer_size ({buffer_size})")
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        if not 0.0 < target_accept < 1.0:
            raise ValueError(f"target_accept must be in (0, 1), got {target_accept}")
        if not w_adjust_clip > 0:
            raise ValueError(f"w_adjust_clip must be > 0, got {w_adjust_clip}")
        self.flow = flow
        self.energy = energy
        self.batch_size = batch_size
        self.betas = torch.linspace(0.0, 1.0, n_intermediate + 2, dtype=torch.float64).tolist()
        self.n_leapfrog = n_leapfrog
        self.step_sizes = [float(step_size)] * n_intermediate
        self.target_accept = float(target_accept)
        self.buffer = ReplayBuffer(buffer_size)
        self.min_buffer = min_buffer
        self.updates_per_ais = updates_per_ais
        self.w_adjust_clip = float(w_adjust_clip)
        self.aux_weight = float(aux_weight)
        self.last_acceptance: list[float] = [math.nan] * n_intermediate

    def state_dict(self) -> dict[str, Any]:
        """Replay buffer, adapted HMC step sizes and last acceptances (saved in training checkpoints)."""
        return {
            "buffer": {name: getattr(self.buffer, name) for name in ("x", "a", "log_w", "log_q")},
            "step_sizes": list(self.step_sizes),
            "last_acceptance": list(self.last_acceptance),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the buffer moves to the flow's device and dtype)."""
        if len(state["step_sizes"]) != len(self.step_sizes):
            raise ValueError(
                f"the saved FAB state has {len(state['step_sizes'])} intermediate distributions, this objective "
                f"{len(self.step_sizes)}; build FABAlpha2 with the n_intermediate of the saved run"
            )
        parameter = next(self.flow.parameters())
        for name, value in state["buffer"].items():
            if value is not None:
                value = value.to(device=parameter.device, dtype=parameter.dtype)[-self.buffer.capacity :]
            setattr(self.buffer, name, value)
        self.step_sizes = [float(v) for v in state["step_sizes"]]
        self.last_acceptance = [float(v) for v in state["last_acceptance"]]

    def __repr__(self) -> str:
        return (
            f"FABAlpha2(batch_size={self.batch_size}, n_intermediate={len(self.step_sizes)}, "
            f"n_leapfrog={self.n_leapfrog}, buffer={len(self.buffer)}/{self.buffer.capacity})"
        )

    # -- AIS ---------------------------------------------------------------------------------
    def _log_densities(self, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """log q(x, a) and log p~(x, a) = -u(x) + log pi(a|x); differentiable in x and a."""
        log_q = self.flow.log_prob_joint(x, a)
        log_p = -self.energy(x) + self.flow.log_prob_aug(a, x)
        return log_q, log_p

    def _log_target_and_grad(self, x: Tensor, a: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """log f_beta = (1 - 2 beta) log q + 2 beta log p~, its gradients (x projected to mean-free), log q, log p~."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            a = a.detach().requires_grad_(True)
            log_q, log_p = self._log_densities(x, a)
            log_f = (1.0 - 2.0 * beta) * log_q + 2.0 * beta * log_p
            ok = torch.isfinite(log_f)
            grad_x, grad_a = torch.autograd.grad(torch.where(ok, log_f, 0.0).sum(), (x, a))
        grad_x = grad_x - grad_x.mean(1, keepdim=True)
        bad = ~(ok & torch.isfinite(grad_x).flatten(1).all(1) & torch.isfinite(grad_a).flatten(1).all(1))
        grad_x = torch.where(bad[:, None, None], 0.0, grad_x)
        grad_a = torch.where(bad[:, None, None, None], 0.0, grad_a)
        log_f = torch.where(bad, -math.inf, log_f.detach())
        return log_f, grad_x, grad_a, log_q.detach(), log_p.detach()

    def _hmc(self, x: Tensor, a: Tensor, beta: float, step_size: float, generator: torch.Generator | None
             ) -> tuple[Tensor, Tensor, float]:  # fmt: skip
        """One HMC transition leaving f_beta invariant on {x mean-free} x R^{A n d}."""
        p_x = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        p_x = p_x - p_x.mean(1, keepdim=True)
        p_a = torch.randn(a.shape, generator=generator, device=a.device, dtype=a.dtype)
        log_f0, g_x, g_a, _, _ = self._log_target_and_grad(x, a, beta)
        hamiltonian0 = -log_f0 + 0.5 * (p_x.square().sum((1, 2)) + p_a.square().sum((1, 2, 3)))
        x_new, a_new = x, a
        q_x, q_a = p_x + 0.5 * step_size * g_x, p_a + 0.5 * step_size * g_a
        for index in range(self.n_leapfrog):
            x_new = x_new + step_size * q_x
            a_new = a_new + step_size * q_a
            log_f, g_x, g_a, _, _ = self._log_target_and_grad(x_new, a_new, beta)
            scale = step_size if index < self.n_leapfrog - 1 else 0.5 * step_size
            q_x, q_a = q_x + scale * g_x, q_a + scale * g_a
        hamiltonian = -log_f + 0.5 * (q_x.square().sum((1, 2)) + q_a.square().sum((1, 2, 3)))
        log_accept = (hamiltonian0 - hamiltonian).clamp(max=0.0)
        log_accept = torch.where(torch.isfinite(log_accept), log_accept, -math.inf)
        uniform = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
        accept = torch.log(uniform) < log_accept
        x = torch.where(accept[:, None, None], x_new, x)
        a = torch.where(accept[:, None, None, None], a_new, a)
        return x.detach(), a.detach(), float(accept.double().mean())

    def ais(self, n_samples: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        r"""AIS from q towards :math:`\tilde p^2 / q` (linear :math:`\beta` spacing, one HMC transition per step).

        Parameters
        ----------
        n_samples : int
        generator : torch.Generator, optional
            On the flow's device.

        Returns
        -------
        x : Tensor, shape (n_samples, n_particles, dim)
        a : Tensor, shape (n_samples, n_aug, n_particles, dim)
        log_w : Tensor, shape (n_samples,)
            AIS log-weights for the target :math:`\tilde p^2 / q` (unnormalised; -inf for failures).
        """
        with torch.no_grad():
            x, a, _ = self.flow.sample_joint(n_samples, generator=generator)
        log_w = torch.zeros(n_samples, dtype=x.dtype, device=x.device)
        for j in range(1, len(self.betas)):
            with torch.no_grad():
                log_q, log_p = self._log_densities(x, a)
            log_w = log_w + 2.0 * (self.betas[j] - self.betas[j - 1]) * (log_p - log_q)
            if j < len(self.betas) - 1:
                x, a, acceptance = self._hmc(x, a, self.betas[j], self.step_sizes[j - 1], generator)
                self.last_acceptance[j - 1] = acceptance
                # Adapt between AIS runs (the transition used in this run is already fixed).
                self.step_sizes[j - 1] *= 1.1 if acceptance > self.target_accept else 1.0 / 1.1
        log_w = torch.where(torch.isfinite(log_w), log_w, -math.inf)
        return x, a, log_w

    def _refill(self, generator: torch.Generator | None) -> None:
        x, a, log_w = self.ais(self.batch_size, generator=generator)
        with torch.no_grad():
            log_q = self.flow.log_prob_joint(x, a)
        self.buffer.add(x, a, log_w, log_q)

    # -- objective protocol --------------------------------------------------------------------
    def make_batch(self, x1: Tensor | None, weights: Tensor | None, generator: torch.Generator) -> None:
        """No data: samples come from AIS in :meth:`loss`."""
        if x1 is not None:
            raise ValueError("FABAlpha2 uses no training data; pass data=None")

    def loss(self, model: torch.nn.Module, batch: None, step: int) -> LossOutput:
        r"""Surrogate loss :math:`-\frac1N\sum_i \min(q_\text{old}/q_\theta, c)\log q_\theta(z_i)` on buffer samples.

        Metrics: ``alpha2_surrogate`` (the loss without the auxiliary term), ``aux``,
        ``buffer_size``, ``ais_acceptance`` (mean HMC acceptance of the last AIS run),
        ``ais_ess`` (Kish ESS / n of the last AIS weights).
        """
        if model is not self.flow:
            raise ValueError("FABAlpha2.loss must be called with the flow it was built with")
        started = time.perf_counter()
        while len(self.buffer) < self.min_buffer:
            self._refill(None)
        if step % self.updates_per_ais == 0:
            self._refill(None)
        index, x, a, log_q_old = self.buffer.sample(self.batch_size)
        log_q, aux = self.flow.log_prob_joint_and_aux(x, a)
        ratio = torch.exp(log_q_old - log_q.detach()).clamp(max=self.w_adjust_clip)
        finite = torch.isfinite(log_q.detach()) & torch.isfinite(ratio)
        surrogate = -(ratio[finite] * log_q[finite]).mean()
        self.buffer.adjust(index[finite], log_q.detach()[finite])
        aux_mean = aux.mean()
        log_w = self.buffer.log_w
        ess = math.nan
        if log_w is not None:
            recent = log_w[-self.batch_size :].double()
            ess = float(torch.exp(2 * torch.logsumexp(recent, 0) - torch.logsumexp(2 * recent, 0)) / recent.numel())
        metrics = {
            "alpha2_surrogate": float(surrogate.detach()),
            "aux": float(aux_mean.detach()),
            "buffer_size": float(len(self.buffer)),
            "ais_acceptance": float(np.nanmean(self.last_acceptance)),
            "ais_ess": ess,
            "fab_seconds": time.perf_counter() - started,
        }
        return LossOutput(surrogate + self.aux_weight * aux_mean, metrics)


# ------------------------------------------------------------------------ loop
def train_eacf(
    flow: EACF,
    objective: JointMaximumLikelihood | MarginalMaximumLikelihood | JointReverseKL | JointMLKL | FABAlpha2,
    *,
    data: TrainingData | Tensor | np.ndarray | None = None,
    steps: int = 1000,
    lr: float = 1e-3,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    schedule: Literal["constant", "cosine"] = "cosine",
    warmup_steps: int = 0,
    guard: bool = True,
    max_minutes: float | None = None,
    schedule_clock: Literal["steps", "time"] = "steps",
    ema_decay: float | None = None,
    max_rollbacks: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train an E-ACF in memory: :class:`bgplugin.training.Trainer` with the paper's gradient guard.

    A shortcut for ``Trainer(flow, objective, TrainerConfig(..., grad_guard=guard, out_dir=None))``: the same
    loop as protocols and ``bgplugin bench eacf`` (AdamW, schedule, skip/clip guard, roll-back after a run-away
    loss), without checkpoints or files. For runs worth resuming use :class:`~bgplugin.training.Trainer` with an
    ``out_dir``.

    Parameters
    ----------
    flow : EACF
    objective : JointMaximumLikelihood, MarginalMaximumLikelihood, JointReverseKL, JointMLKL or FABAlpha2
    data : TrainingData, Tensor or ndarray, optional
        Training configurations (batch, n_particles, dim) for objectives that need data.
    steps : int
        Optimiser steps (with the step clock also the length of the cosine schedule).
    lr : float
        Peak learning rate.
    batch_size : int
        Data samples per step (data objectives).
    weight_decay : float
        AdamW weight decay.
    schedule : {"constant", "cosine"}
        Learning-rate decay after the warm-up (cosine to 0).
    warmup_steps : int
        Linear warm-up steps.
    guard : bool
        Skip steps whose gradient norm exceeds 20x the running median of the last 100 and clip those above 5x
        (:class:`~bgplugin.training.guard.GradientGuard`); False: plain steps.
    max_minutes : float, optional
        Wall-clock budget; training stops at the first step past it.
    schedule_clock : {"steps", "time"}
        What the cosine decay after warm-up spans: ``steps`` or
        ``max_minutes`` (needs it; ``steps`` is then only a cap, and the run
        is not reproducible bit for bit), as in :class:`bgplugin.training.TrainerConfig`.
    ema_decay : float, optional
        Keep an exponential moving average of the weights with this decay (e.g. 0.999) and leave it in the flow
        at the end; None: the flow keeps the last weights.
    max_rollbacks : int
        Roll-backs after a run-away loss (``TrainerConfig.max_rollbacks``; 0: off).
    seed : int
        Seed of the minibatches and augmented noise.
    progress : bool
        Show a progress bar.

    Returns
    -------
    list of dict
        One row per step, the columns of the trainer's ``loss.csv``: ``step``, ``loss``, ``lr``, ``grad_norm``,
        ``data_seconds``, ``step_seconds``, ``elapsed_seconds`` and the objective's metrics.
    """
    _check_flow(flow)
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    config = TrainerConfig(
        max_steps=steps, max_minutes=max_minutes, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        schedule=schedule, warmup_steps=warmup_steps, schedule_clock=schedule_clock, grad_guard=guard,
        ema_decay=ema_decay, max_rollbacks=max_rollbacks, seed=seed, progress=progress, out_dir=None,
    )  # fmt: skip
    training = None if data is None else (data if isinstance(data, TrainingData) else TrainingData(data))
    # the Trainer refuses data for an objective that uses none, and no data for one that needs it
    trainer = Trainer(flow, objective, config, training, keep_rows=True)
    try:
        trainer.fit(resume=False)
    finally:
        if trainer.ema is not None:
            trainer.ema.copy_to()
        flow.eval()
    return trainer.rows
