r"""Likelihood and energy objectives: maximum likelihood, reverse KL, and their mixture.

Maximum likelihood (forward KL up to a constant, the E-NF objective of Satorras et al. 2021):

.. math::
    J_\mathrm{ML} = -\mathbb E_{x \sim \text{data}} \log q_\theta(x) ,

trained with the Hutchinson estimate of the divergence (unbiased in
:math:`\log q`, cheap); evaluate with the exact divergence.

Reverse KL (energy training; Noé et al. 2019, Köhler et al. 2020), for a
target :math:`\mu(x) \propto e^{-u(x)}` with :math:`u` in kT:

.. math::
    J_\mathrm{KL} = \mathbb E_{x \sim q_\theta}\big[u(x) + \log q_\theta(x)\big]
    = \mathrm{KL}(q_\theta \,\|\, \mu) - \log Z ,

with samples drawn by the flow (reparameterised, so the gradient flows
through them). Frames whose energy is not finite (failed evaluations, +inf)
are left out of the average and counted.

The mixture (Noé et al. 2019) is :math:`J = (1 - \lambda) J_\mathrm{ML} + \lambda J_\mathrm{KL}`
with :math:`\lambda` ramped by a :class:`LambdaSchedule` (start with ML, add KL).

References
----------
Noé, Olsson, Köhler & Wu, *Boltzmann generators*, Science 2019.
Köhler, Klein & Noé, *Equivariant flows: exact likelihood generative learning for
symmetric densities*, ICML 2020.
Satorras, Hoogeboom, Fuchs, Posner & Welling, *E(n) equivariant normalizing flows*, NeurIPS 2021.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from bgplugin.training.trainer import LossOutput, weighted_mean

logger = logging.getLogger(__name__)

DivergenceEstimate = Literal["hutchinson", "exact"]
EnergyFunction = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class DataBatch:
    """A minibatch of training data.

    Attributes
    ----------
    x : Tensor, shape (batch, n_particles, dim)
        Mean-free configurations (length units).
    weights : Tensor, shape (batch,), or None
        Per-sample weights.
    """

    x: Tensor
    weights: Tensor | None


# ------------------------------------------------------------------ functions
def nll_loss(
    flow: nn.Module, x: Tensor, weights: Tensor | None = None, *, divergence: DivergenceEstimate = "hutchinson"
) -> Tensor:
    r"""Weighted negative log-likelihood :math:`-\sum_i w_i \log q(x_i) / \sum_i w_i`.

    Parameters
    ----------
    flow : nn.Module
        Has ``log_prob(x, divergence=...)`` returning shape (batch,), differentiable.
    x : Tensor, shape (batch, n_particles, dim)
        Data (length units of the flow).
    weights : Tensor, shape (batch,), optional
        Non-negative per-sample weights; ``None``: uniform.
    divergence : {"hutchinson", "exact"}
        Divergence estimate inside ``log_prob`` (Hutchinson for training).

    Returns
    -------
    Tensor, shape ()
        NLL in nats per sample (on the mean-free subspace, prior constant included).
    """
    _check_divergence(divergence)
    return weighted_mean(-flow.log_prob(x, divergence=divergence), weights)


def linlog_cutoff(u: Tensor, cutoff: float) -> Tensor:
    r"""Energy regularisation of Noé et al. 2019: linear below ``cutoff``, logarithmic above.

    :math:`\tilde u = u` for :math:`u \le u_c` and :math:`u_c + \log(1 + u - u_c)` above,
    continuous with a continuous first derivative; it keeps the huge energies of
    overlapping atoms early in training from dominating the reverse-KL gradient.

    Parameters
    ----------
    u : Tensor, shape (batch,)
        Reduced energies in kT (finite).
    cutoff : float
        :math:`u_c` in kT.

    Returns
    -------
    Tensor, shape (batch,)
    """
    excess = (u - cutoff).clamp(min=0.0)
    return torch.where(u <= cutoff, u, cutoff + torch.log1p(excess))


def reverse_kl_loss(
    flow: nn.Module,
    energy: EnergyFunction,
    n_samples: int,
    *,
    divergence: DivergenceEstimate = "hutchinson",
    energy_cutoff: float | None = None,
) -> LossOutput:
    r"""Reverse-KL loss :math:`\mathbb E_q[u(x) + \log q(x)]` on ``n_samples`` fresh flow samples.

    Parameters
    ----------
    flow : nn.Module
        Has ``sample(n, divergence=...) -> (x, log_q)``, differentiable in its parameters.
    energy : callable
        ``energy(x) -> u`` of shape (batch,) in kT, differentiable in ``x``;
        ``+inf`` (or any non-finite value) marks a failed frame.
    n_samples : int
        Samples per estimate.
    divergence : {"hutchinson", "exact"}
        Divergence estimate for ``log q`` of the samples.
    energy_cutoff : float or None
        Apply :func:`linlog_cutoff` at this energy (kT); ``None``: no regularisation.

    Returns
    -------
    LossOutput
        Loss in kT; metrics ``kl`` (the loss value), ``energy`` (mean finite
        ``u``, kT) and ``failed_frames`` (count of non-finite frames).
    """
    _check_divergence(divergence)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    x, log_q = flow.sample(n_samples, divergence=divergence)
    u = energy(x)
    if u.shape != log_q.shape:
        raise ValueError(f"energy returned shape {tuple(u.shape)}, expected ({n_samples},)")
    finite = torch.isfinite(u.detach()) & torch.isfinite(log_q.detach())
    failed = int((~finite).sum())
    if failed:
        logger.debug("reverse KL: %d of %d frames have a non-finite energy or log q; left out", failed, n_samples)
    if not finite.any():
        nan = torch.full((), math.nan, dtype=log_q.dtype, device=log_q.device)
        return LossOutput(nan, {"kl": math.nan, "energy": math.nan, "failed_frames": float(failed)})
    u_ok = u[finite]
    u_train = u_ok if energy_cutoff is None else linlog_cutoff(u_ok, energy_cutoff)
    loss = (u_train + log_q[finite]).mean()
    metrics = {"kl": float(loss.detach()), "energy": float(u_ok.detach().mean()), "failed_frames": float(failed)}
    return LossOutput(loss, metrics)


# ----------------------------------------------------------------- objectives
def _data_batch(x1: Tensor | None, weights: Tensor | None) -> DataBatch:
    if x1 is None:
        raise ValueError("this objective needs data samples; pass TrainingData to the Trainer")
    return DataBatch(x1, weights)


def _to_model(model: nn.Module, batch: DataBatch) -> DataBatch:
    reference = next(model.parameters())
    weights = None if batch.weights is None else batch.weights.to(reference.device, reference.dtype)
    return DataBatch(batch.x.to(reference.device, reference.dtype), weights)


class MaximumLikelihood:
    """Maximum-likelihood objective (weighted NLL of the data under the flow).

    Parameters
    ----------
    divergence : {"hutchinson", "exact"}
        Divergence estimate during training.
    """

    requires_data = True

    def __init__(self, *, divergence: DivergenceEstimate = "hutchinson") -> None:
        _check_divergence(divergence)
        self.divergence: DivergenceEstimate = divergence

    def __repr__(self) -> str:
        return f"MaximumLikelihood(divergence={self.divergence!r})"

    def make_batch(self, x1: Tensor | None, weights: Tensor | None, generator: torch.Generator) -> DataBatch:
        """The data minibatch itself (no extra randomness)."""
        return _data_batch(x1, weights)

    def loss(self, model: nn.Module, batch: DataBatch, step: int) -> LossOutput:
        """Weighted NLL in nats; metric ``nll``."""
        batch = _to_model(model, batch)
        loss = nll_loss(model, batch.x, batch.weights, divergence=self.divergence)
        return LossOutput(loss, {"nll": float(loss.detach())})


class ReverseKL:
    """Reverse-KL (energy) objective; needs no data.

    Parameters
    ----------
    energy : callable
        ``energy(x) -> u`` in kT (any :class:`bgplugin.energies.Energy`).
    n_samples : int
        Flow samples per step.
    divergence : {"hutchinson", "exact"}
        Divergence estimate for ``log q`` during training.
    energy_cutoff : float or None
        Linear-logarithmic regularisation of high energies (kT), see :func:`linlog_cutoff`.
    """

    requires_data = False

    def __init__(
        self,
        energy: EnergyFunction,
        n_samples: int,
        *,
        divergence: DivergenceEstimate = "hutchinson",
        energy_cutoff: float | None = None,
    ) -> None:
        if not callable(energy):
            raise TypeError(f"energy must be callable as energy(x) -> u, got {type(energy).__name__}")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        _check_divergence(divergence)
        self.energy = energy
        self.n_samples = n_samples
        self.divergence: DivergenceEstimate = divergence
        self.energy_cutoff = energy_cutoff

    def __repr__(self) -> str:
        return f"ReverseKL(n_samples={self.n_samples}, divergence={self.divergence!r}, cutoff={self.energy_cutoff})"

    def make_batch(self, x1: Tensor | None, weights: Tensor | None, generator: torch.Generator) -> None:
        """No data: samples are drawn from the flow in :meth:`loss`."""
        if x1 is not None:
            raise ValueError("ReverseKL uses no training data; pass data=None to the Trainer")

    def loss(self, model: nn.Module, batch: None, step: int) -> LossOutput:
        """Reverse-KL loss in kT; metrics ``kl``, ``energy``, ``failed_frames``."""
        return reverse_kl_loss(
            model, self.energy, self.n_samples, divergence=self.divergence, energy_cutoff=self.energy_cutoff
        )


@dataclass(frozen=True)
class LambdaSchedule:
    r"""Weight :math:`\lambda` of the KL term as a function of the step.

    :math:`\lambda = \lambda_0` before ``ramp_start``, then linear to
    :math:`\lambda_1` over ``ramp_steps`` steps, then :math:`\lambda_1`.

    Parameters
    ----------
    start, end : float
        :math:`\lambda_0` and :math:`\lambda_1` in [0, 1].
    ramp_start : int
        First step of the ramp.
    ramp_steps : int
        Length of the ramp (0: jump to ``end`` at ``ramp_start``).
    """

    start: float = 0.0
    end: float = 0.5
    ramp_start: int = 0
    ramp_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.ramp_start < 0 or self.ramp_steps < 0:
            raise ValueError(
                f"ramp_start and ramp_steps must be >= 0, got {self.ramp_start} and {self.ramp_steps}"
            )

    def __call__(self, step: int) -> float:
        if step < self.ramp_start:
            return self.start
        if step >= self.ramp_start + self.ramp_steps:
            return self.end
        fraction = (step - self.ramp_start) / self.ramp_steps
        return self.start + (self.end - self.start) * fraction


class KLMixture:
    r"""Mixture :math:`(1-\lambda)` data term :math:`+ \lambda` energy term (Noé et al. 2019's ML + KL).

    The shared logic of :class:`MLKL` (CNF) and
    :class:`bgplugin.flows.eacf.JointMLKL` (E-ACF); either term is any
    :class:`~bgplugin.training.Objective`, the energy term one that uses no
    data (its batch is ``None``).

    Parameters
    ----------
    data_term : Objective
        Trained on the minibatch (maximum likelihood); it makes the batches.
    energy_term : Objective
        Trained on the flow's own samples (reverse KL); a non-finite loss
        means that all its samples failed.
    schedule : LambdaSchedule
        :math:`\lambda` per step.
    metric_keys : sequence of str
        The metrics of both terms, logged at every step (NaN for a term not
        computed); ``failed_frames`` and ``lambda`` are added.

    Notes
    -----
    A term whose weight is 0 at a step is not computed, so the steps before
    a ramp cost what the data term alone costs. A step whose energy-term
    samples all fail trains on the data term alone, with weight 1 (its
    ``failed_frames`` are logged). Where both terms report a metric (the
    E-ACF's ``aux``), the data term's value is logged. The trainer's run-away
    check watches the data term (``LossOutput.watch``), whose scale does not
    move with :math:`\lambda`; the energy term when :math:`\lambda = 1`.
    """

    requires_data = True

    def __init__(self, data_term: Any, energy_term: Any, schedule: LambdaSchedule, metric_keys: Sequence[str]) -> None:
        if not isinstance(schedule, LambdaSchedule):
            raise TypeError(f"schedule must be a LambdaSchedule, got {type(schedule).__name__}")
        self.data_term = data_term
        self.energy_term = energy_term
        self.schedule = schedule
        self.metric_keys = tuple(dict.fromkeys((*metric_keys, "failed_frames", "lambda")))

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(data={self.data_term!r}, energy={self.energy_term!r}, schedule={self.schedule!r})"

    def make_batch(self, x1: Tensor | None, weights: Tensor | None, generator: torch.Generator) -> Any:
        """The data term's minibatch."""
        return self.data_term.make_batch(x1, weights, generator)

    def loss(self, model: nn.Module, batch: Any, step: int) -> LossOutput:
        """Mixed loss; metrics ``metric_keys``."""
        weight = self.schedule(step)
        metrics = dict.fromkeys(self.metric_keys, math.nan)
        metrics.update(failed_frames=0.0, **{"lambda": weight})
        energy = self.energy_term.loss(model, None, step) if weight > 0.0 else None
        if energy is not None and not torch.isfinite(energy.loss):
            self._log(metrics, energy.metrics)
            energy, weight = None, 0.0
        total: Tensor | None = None
        watch = math.nan
        data_keys: set[str] = set()
        if weight < 1.0:
            data = self.data_term.loss(model, batch, step)
            total = (1.0 - weight) * data.loss
            self._log(metrics, data.metrics)
            data_keys = set(data.metrics)
            watch = float(data.loss.detach())
        if energy is not None:
            total = weight * energy.loss if total is None else total + weight * energy.loss
            self._log(metrics, energy.metrics, keep=data_keys)
            if weight == 1.0:
                watch = float(energy.loss.detach())
        assert total is not None
        return LossOutput(total, metrics, watch)

    @staticmethod
    def _log(metrics: dict[str, float], values: dict[str, float], keep: AbstractSet[str] = frozenset()) -> None:
        """Copy the values of the logged keys into ``metrics``, except the keys in ``keep``."""
        for key, value in values.items():
            if key in metrics and key not in keep:
                metrics[key] = value


class MLKL(KLMixture):
    r"""Mixture :math:`(1-\lambda) J_\mathrm{ML} + \lambda J_\mathrm{KL}` for a CNF (Noé et al. 2019).

    :class:`KLMixture` of :class:`MaximumLikelihood` and :class:`ReverseKL`.

    Parameters
    ----------
    energy : callable
        ``energy(x) -> u`` in kT.
    kl_samples : int
        Flow samples per step for the KL term.
    schedule : LambdaSchedule
        :math:`\lambda` per step.
    divergence : {"hutchinson", "exact"}
        Divergence estimate of both terms during training.
    energy_cutoff : float or None
        See :func:`linlog_cutoff`.

    Notes
    -----
    A term whose weight is 0 at a step is not computed (its metric is NaN);
    a step whose KL samples all fail trains on the NLL alone (since stop 22;
    before, the step was skipped). Metrics ``nll``, ``kl``, ``energy``,
    ``failed_frames``, ``lambda``.
    """

    def __init__(
        self,
        energy: EnergyFunction,
        kl_samples: int,
        schedule: LambdaSchedule,
        *,
        divergence: DivergenceEstimate = "hutchinson",
        energy_cutoff: float | None = None,
    ) -> None:
        self.ml = MaximumLikelihood(divergence=divergence)
        self.kl = ReverseKL(energy, kl_samples, divergence=divergence, energy_cutoff=energy_cutoff)
        self.divergence: DivergenceEstimate = divergence
        super().__init__(self.ml, self.kl, schedule, ("nll", "kl", "energy"))


def _check_divergence(divergence: str) -> None:
    if divergence not in get_args(DivergenceEstimate):
        raise ValueError(f"divergence must be one of {get_args(DivergenceEstimate)}, got {divergence!r}")
