r"""The training loop: AdamW, learning-rate schedule, EMA, clipping, exact resume, logs.

:class:`Trainer` runs any :class:`Objective` (flow matching, likelihood,
reverse KL, ML+KL) on a flow. Batches are a deterministic function of the
step number and the seed (each step draws from its own generator), so a run
resumed from a checkpoint repeats exactly the batches the uninterrupted run
would have seen, whether or not batches are built in worker processes.

Files written to ``out_dir`` (all replaced atomically):

``checkpoint.pt``
    model, optimiser, scheduler, EMA, RNG states, step, elapsed time, and the
    objective's own state if it has one (FAB's replay buffer);
``loss.csv``
    one row per step: loss, learning rate, gradient norm, time split and the
    objective's metrics;
``loss.png``
    the loss curve with a moving average.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import logging
import math
import os
import random
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, get_args

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bgplugin.fileio import atomic_write
from bgplugin.progress import bar_mininterval
from bgplugin.training.guard import GradientGuard, RunawayLoss

logger = logging.getLogger(__name__)

LRSchedule = Literal["constant", "cosine", "linear"]
ScheduleClock = Literal["steps", "time"]
StopReason = Literal["max_steps", "max_minutes", "stop_at"]

CHECKPOINT_FORMAT = "bgplugin.training.checkpoint"
CHECKPOINT_VERSION = 1
_FIXED_COLUMNS = ("step", "loss", "lr", "grad_norm", "data_seconds", "step_seconds", "elapsed_seconds")


# ------------------------------------------------------------------ objectives
class LossOutput(NamedTuple):
    """What an objective returns for one batch.

    Attributes
    ----------
    loss : Tensor, shape ()
        Scalar to minimise (differentiable in the model's parameters).
    metrics : dict of str to float
        Diagnostics logged next to the loss (same keys at every step).
    watch : float or None
        What the run-away check (``TrainerConfig.max_rollbacks``) watches
        instead of the loss: an objective whose loss changes scale on purpose
        (a mixture whose weights follow a schedule) names a term whose scale
        does not. ``None``: the loss.
    """

    loss: Tensor
    metrics: dict[str, float]
    watch: float | None = None


class Objective(Protocol):
    """A training objective: builds batches (possibly in worker processes) and scores them.

    ``make_batch`` runs on the CPU, in the main process or in a data-loader
    worker, and must draw all its randomness from ``generator``; ``loss`` runs
    in the main process on the model's device.
    """

    #: Whether the objective needs training data (False for reverse KL).
    requires_data: bool

    def make_batch(self, x1: Tensor | None, weights: Tensor | None, generator: torch.Generator) -> Any:
        """Build one batch from data ``x1`` (batch, n_particles, dim) and weights (batch,) or None."""
        ...

    def loss(self, model: nn.Module, batch: Any, step: int) -> LossOutput:
        """Loss of ``model`` on ``batch`` at optimiser step ``step``."""
        ...


def weighted_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    r"""Self-normalised weighted mean :math:`\sum_i w_i v_i / \sum_i w_i`.

    Parameters
    ----------
    values : Tensor, shape (batch,)
    weights : Tensor, shape (batch,), or None
        Non-negative sample weights, not all zero; ``None`` means uniform.

    Returns
    -------
    Tensor, shape ()
    """
    if weights is None:
        return values.mean()
    if weights.shape != values.shape:
        raise ValueError(f"weights must have shape {tuple(values.shape)}, got {tuple(weights.shape)}")
    weights = weights.to(values)
    total = weights.sum()
    if not total > 0:
        raise ValueError(f"weights of a batch must have a positive sum, got {float(total)}; check the sample weights")
    return (weights * values).sum() / total


# ------------------------------------------------------------------------ data
class TrainingData:
    r"""Training configurations with optional per-sample weights.

    Parameters
    ----------
    positions : Tensor or ndarray, shape (n_samples, n_particles, dim)
        Configurations in the system's length unit (nm for molecules,
        reduced units for particle systems). The centre of mass (uniform
        weights) is removed, as the flows work on mean-free coordinates.
    weights : Tensor or ndarray, shape (n_samples,), optional
        Non-negative importance weights (e.g. :math:`w \propto e^{\log w - \max \log w}`
        from biased simulations). Losses are self-normalised weighted means
        over each minibatch.
    """

    def __init__(self, positions: Tensor | np.ndarray, weights: Tensor | np.ndarray | None = None) -> None:
        x = torch.as_tensor(positions)
        if x.ndim != 3 or x.shape[0] < 1:
            raise ValueError(
                f"positions must have shape (n_samples, n_particles, dim), got {tuple(x.shape)}; "
                "reshape flattened coordinates with positions.reshape(n_samples, n_particles, dim)"
            )
        if not x.is_floating_point():
            raise ValueError(f"positions must be floating point, got dtype {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError("positions contain NaN or inf; remove those frames first")
        centre = x.mean(dim=1, keepdim=True)
        if centre.abs().max() > 1e-5 * max(1.0, float(x.abs().max())):
            logger.info("TrainingData: removed the centre of mass of %d configurations", x.shape[0])
        self.positions = (x - centre).detach().cpu().contiguous()
        self.weights: Tensor | None = None
        if weights is not None:
            w = torch.as_tensor(weights, dtype=self.positions.dtype).detach().cpu()
            if w.shape != (x.shape[0],):
                raise ValueError(f"weights must have shape ({x.shape[0]},), got {tuple(w.shape)}")
            if not torch.isfinite(w).all() or (w < 0).any():
                raise ValueError("weights must be finite and >= 0; pass exp(log_w - log_w.max()) for log-weights")
            if not w.sum() > 0:
                raise ValueError("weights must not all be zero")
            self.weights = w.contiguous()

    def __len__(self) -> int:
        return self.positions.shape[0]

    def __repr__(self) -> str:
        n, n_particles, dim = self.positions.shape
        return f"TrainingData({n} samples, {n_particles} particles in {dim}-d, weighted={self.weights is not None})"

    @property
    def n_particles(self) -> int:
        """Particles per configuration."""
        return self.positions.shape[1]

    @property
    def dim(self) -> int:
        """Spatial dimension."""
        return self.positions.shape[2]


class _StepBatches(torch.utils.data.Dataset[Any]):
    """Batch number ``step`` of a run: minibatch indices and all randomness from a per-step generator."""

    def __init__(self, objective: Objective, data: TrainingData | None, batch_size: int, seed: int) -> None:
        self.objective = objective
        self.data = data
        self.batch_size = batch_size
        self.seed = seed

    def __getitem__(self, step: int) -> Any:
        generator = torch.Generator().manual_seed(step_seed(self.seed, step))
        if self.data is None:
            return self.objective.make_batch(None, None, generator)
        index = torch.randint(len(self.data), (self.batch_size,), generator=generator)
        weights = None if self.data.weights is None else self.data.weights[index]
        return self.objective.make_batch(self.data.positions[index], weights, generator)


def step_seed(seed: int, step: int) -> int:
    """Seed of the generator that builds batch ``step`` of a run with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _unbatched(batch: Any) -> Any:
    return batch


# ---------------------------------------------------------------------- config
@dataclass(frozen=True)
class TrainerConfig:
    """Settings of a :class:`Trainer`.

    Parameters
    ----------
    max_steps : int
        Optimiser steps of the run; also the length of the learning-rate schedule.
    max_minutes : float or None
        Wall-clock budget of the run in minutes, summed over resumed sessions;
        training stops (and checkpoints) at the first step past it. The
        schedule still spans ``max_steps``.
    batch_size : int
        Data samples per step.
    lr : float
        Peak learning rate of AdamW.
    weight_decay : float
        AdamW's decoupled weight decay.
    betas : tuple of float
        AdamW's moment coefficients.
    schedule : {"constant", "cosine", "linear"}
        Learning-rate decay after warm-up, from ``lr`` to ``lr * min_lr_factor``.
    warmup_steps : int
        Linear warm-up from 0 to ``lr``.
    schedule_clock : {"steps", "time"}
        What the decay after warm-up follows: ``"steps"`` spans ``max_steps``
        (reproducible bit for bit, also across resumes); ``"time"`` spans
        ``max_minutes`` of training time (summed over sessions), so a
        time-budgeted run reaches the end of its decay when the budget is
        spent, however fast the machine turns out to be, and ``max_steps``
        is only a cap. With ``"time"`` the learning rate of a step depends on
        timing, so two runs are not identical. Resuming with a larger
        ``max_minutes`` stretches the rest of the decay over the new budget.
    min_lr_factor : float
        Final learning rate as a fraction of ``lr``.
    grad_clip : float or None
        Clip the global gradient norm to this value; ``None``: no clipping.
    grad_guard : bool
        Skip a step whose gradient norm exceeds 20 times the median of the
        last 100 norms and clip one above 5 times it
        (:class:`~bgplugin.training.guard.GradientGuard`, the optimiser guard
        of Midgley et al. 2023 for coupling flows); applied before
        ``grad_clip``. Guard-skipped steps still advance the schedule.
    ema_decay : float or None
        Keep an exponential moving average of the parameters with this decay
        (e.g. 0.999); ``None``: no EMA.
    seed : int
        Seed of the batch stream (minibatches, prior samples, times, noise).
    num_workers : int
        Data-loader worker processes that build batches (including the OT
        pairing) while the main process trains; 0 builds them in the main
        process. Results do not depend on it.
    prefetch_factor : int
        Batches prepared ahead per worker.
    checkpoint_every : int
        Steps between checkpoints (one is always written at the end).
    checkpoint_minutes : float or None
        Also write a checkpoint when this many minutes have passed since the
        last one (10), so that a long run of slow steps loses at most this
        much when it is killed without warning; None: by steps only.
    log_every : int
        Steps between flushes of ``loss.csv`` and progress-bar updates.
    out_dir : str, Path or None
        Where checkpoints and logs go; ``None``: nothing is written and runs
        cannot be resumed.
    progress : bool
        Show a tqdm progress bar.
    max_nonfinite_steps : int
        Consecutive steps with a non-finite loss or gradient (skipped) after
        which training stops with an error.
    max_rollbacks : int
        Roll-backs allowed when the loss runs away (0: off). The trainer
        keeps in-memory snapshots of the weights, optimiser, EMA and guard
        (every ``snapshot_every`` steps while the loss is normal); when
        :class:`~bgplugin.training.guard.RunawayLoss` sees 10 losses in a
        row far above the recent ones (or non-finite), it restores the
        older of the last two snapshots, multiplies the learning rate by
        ``rollback_lr_factor`` for the rest of the run, and goes on with the
        next batches (the step count and the schedule do not go back). One
        more run-away after ``max_rollbacks`` restores the snapshot, writes
        the checkpoint and stops with an error. Checkpoints are not written
        while the loss is high.
    rollback_lr_factor : float
        Factor in (0, 1) applied to the learning rate at each roll-back.
    snapshot_every : int
        Steps between in-memory snapshots (with ``max_rollbacks > 0``).
    """

    max_steps: int = 10_000
    max_minutes: float | None = None
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: LRSchedule = "cosine"
    warmup_steps: int = 0
    schedule_clock: ScheduleClock = "steps"
    min_lr_factor: float = 0.0
    grad_clip: float | None = None
    grad_guard: bool = False
    ema_decay: float | None = None
    seed: int = 0
    num_workers: int = 0
    prefetch_factor: int = 2
    checkpoint_every: int = 1000
    checkpoint_minutes: float | None = 10.0
    log_every: int = 50
    out_dir: str | Path | None = None
    progress: bool = True
    max_nonfinite_steps: int = 20
    max_rollbacks: int = 0
    rollback_lr_factor: float = 0.5
    snapshot_every: int = 200

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "checkpoint_every", "log_every", "prefetch_factor", "snapshot_every")
        for name in (*positive, "max_nonfinite_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("warmup_steps", "num_workers", "seed", "max_rollbacks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.checkpoint_minutes is not None and not (
            isinstance(self.checkpoint_minutes, (int, float)) and 0 < self.checkpoint_minutes < math.inf
        ):
            raise ValueError(f"checkpoint_minutes must be a finite number > 0 or None, got {self.checkpoint_minutes!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0 or None, got {self.max_minutes}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.schedule not in get_args(LRSchedule):
            raise ValueError(f"schedule must be one of {get_args(LRSchedule)}, got {self.schedule!r}")
        if self.schedule_clock not in get_args(ScheduleClock):
            raise ValueError(f"schedule_clock must be one of {get_args(ScheduleClock)}, got {self.schedule_clock!r}")
        if self.schedule_clock == "time" and self.max_minutes is None:
            raise ValueError("schedule_clock='time' needs max_minutes (the span of the schedule); set it")
        if not 0.0 <= self.min_lr_factor <= 1.0:
            raise ValueError(f"min_lr_factor must be in [0, 1], got {self.min_lr_factor}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if not 0.0 < self.rollback_lr_factor < 1.0:
            raise ValueError(
                f"rollback_lr_factor must be in (0, 1) (the learning rate is multiplied by it at each roll-back), "
                f"got {self.rollback_lr_factor}"
            )


class LearningRateFactor:
    """Multiplier of the peak learning rate at a step: linear warm-up, then constant/cosine/linear decay.

    With ``budget_seconds`` the decay follows ``elapsed_seconds`` (set by the
    caller before each evaluation) instead of the step count. ``scale``
    multiplies the whole schedule (lowered by the trainer's roll-backs). Used by
    :class:`Trainer` and by :func:`bgplugin.flows.eacf.training.train_eacf`.
    """

    def __init__(
        self,
        schedule: LRSchedule,
        max_steps: int,
        warmup_steps: int,
        min_factor: float,
        budget_seconds: float | None = None,
    ) -> None:
        self.schedule = schedule
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self.min_factor = min_factor
        self.budget_seconds = budget_seconds
        self.elapsed_seconds = 0.0
        self.scale = 1.0

    def __call__(self, step: int) -> float:
        return self.scale * self._shape(step)

    def _shape(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        if self.budget_seconds is not None:
            progress = min(1.0, self.elapsed_seconds / self.budget_seconds)
        else:
            span = max(1, self.max_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1.0 - progress
        return self.min_factor + (1.0 - self.min_factor) * shape


# ------------------------------------------------------------------------- EMA
class ExponentialMovingAverage:
    r"""Exponential moving average of parameters, :math:`\bar\theta \leftarrow \beta\bar\theta + (1-\beta)\theta`.

    Parameters
    ----------
    parameters : iterable of Parameter
        The parameters to average (their order defines the state).
    decay : float
        :math:`\beta \in (0, 1)`.
    """

    def __init__(self, parameters: Iterable[nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.parameters = list(parameters)
        self.shadow = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current parameters."""
        for average, parameter in zip(self.shadow, self.parameters, strict=True):
            average.lerp_(parameter.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self) -> None:
        """Overwrite the parameters with their averages."""
        for average, parameter in zip(self.shadow, self.parameters, strict=True):
            parameter.copy_(average)

    @contextlib.contextmanager
    def average_parameters(self) -> Iterator[None]:
        """Context in which the parameters hold their averages; restored on exit."""
        saved = [p.detach().clone() for p in self.parameters]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, value in zip(self.parameters, saved, strict=True):
                    parameter.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        """Decay and averages, for checkpoints."""
        return {"decay": self.decay, "shadow": [a.clone() for a in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the averages written by :meth:`state_dict`."""
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow):
            raise ValueError(
                f"EMA state has {len(shadow)} tensors but the model has {len(self.shadow)} parameters; "
                "load a checkpoint of the same model"
            )
        self.decay = float(state["decay"])
        with torch.no_grad():
            for average, value in zip(self.shadow, shadow, strict=True):
                average.copy_(value)


# --------------------------------------------------------------------- results
@dataclass(frozen=True)
class TrainingSummary:
    """What a call to :meth:`Trainer.fit` did.

    Attributes
    ----------
    step : int
        Optimiser steps completed in total (including earlier sessions).
    steps_this_session : int
        Steps run by this call.
    elapsed_seconds : float
        Training wall-clock time summed over sessions, in s.
    stopped_by : {"max_steps", "max_minutes", "stop_at"}
        Why training stopped.
    final_loss : float
        Mean loss of the last ``log_every`` steps (NaN when no step ran).
    mean_data_seconds : float
        Mean time the main process waited for a batch, in s (includes
        pairing when ``num_workers == 0``).
    mean_step_seconds : float
        Mean time of forward, backward and optimiser update, in s.
    mean_pairing_seconds : float or None
        Mean pairing time per batch reported by the objective, in s (also
        when it ran in a worker); ``None`` if the objective does not pair.
    skipped_steps : int
        Steps skipped in this session because of a non-finite loss or gradient.
    guard_skipped_steps, guard_clipped_steps : int
        Steps skipped or clipped by the gradient guard in this session
        (``grad_guard``; 0 without it).
    rollbacks : int
        Roll-backs after a run-away loss in this session (``max_rollbacks``).
    lr_scale : float
        Factor on the scheduled learning rate at the end (1 without
        roll-backs; ``rollback_lr_factor`` per roll-back, over all sessions).
    """

    step: int
    steps_this_session: int
    elapsed_seconds: float
    stopped_by: StopReason
    final_loss: float
    mean_data_seconds: float
    mean_step_seconds: float
    mean_pairing_seconds: float | None
    skipped_steps: int
    guard_skipped_steps: int = 0
    guard_clipped_steps: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0


@dataclass
class _SessionTimes:
    data: list[float] = field(default_factory=list)
    step: list[float] = field(default_factory=list)
    pairing: list[float] = field(default_factory=list)


# --------------------------------------------------------------------- trainer
def adamw(
    parameters: list[Tensor], *, lr: float, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0
) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where it supports the parameters, else the multi-tensor one.

    Same update rule either way; the fused step measured 2.4 ms against
    10 ms (multi-tensor) for the 232 tensors of a small E-ACF on a CPU.
    """
    try:
        return torch.optim.AdamW(parameters, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without the fused kernel
        return torch.optim.AdamW(parameters, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)


class Trainer:
    r"""Trains a flow on an objective with AdamW, a schedule, optional EMA and clipping.

    Parameters
    ----------
    model : nn.Module
        The flow being trained (e.g. :class:`bgplugin.flows.CNF`); every
        parameter that requires a gradient is optimised.
    objective : Objective
        E.g. :class:`~bgplugin.training.FlowMatching`,
        :class:`~bgplugin.training.MaximumLikelihood`,
        :class:`~bgplugin.training.ReverseKL`, :class:`~bgplugin.training.MLKL`.
    config : TrainerConfig
        Optimiser, schedule, budgets, logging.
    data : TrainingData or None
        Training configurations (and weights); required unless the objective
        needs no data (reverse KL).
    keep_rows : bool
        Also keep every logged row (the columns of ``loss.csv``) in memory, in
        :attr:`rows`, for runs without ``out_dir``; rows of earlier sessions
        of a resumed run are not loaded.

    Examples
    --------
    >>> trainer = Trainer(flow, FlowMatching(flow.prior, pairing="eqot"),
    ...                   TrainerConfig(max_steps=2000, out_dir="run"), TrainingData(x))  # doctest: +SKIP
    >>> summary = trainer.fit()  # resumes from run/checkpoint.pt if present  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        config: TrainerConfig,
        data: TrainingData | None = None,
        *,
        keep_rows: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if objective.requires_data and data is None:
            raise ValueError(f"{type(objective).__name__} needs training data; pass data=TrainingData(positions)")
        if not objective.requires_data and data is not None:
            raise ValueError(f"{type(objective).__name__} does not use training data; pass data=None")
        self.model = model
        self.objective = objective
        self.config = config
        self.data = data
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError("model has no parameters that require a gradient; nothing to train")
        self.optimizer = adamw(self.parameters, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
        budget = 60.0 * config.max_minutes if config.schedule_clock == "time" else None  # type: ignore[operator]
        self._lr_factor = LearningRateFactor(
            config.schedule, config.max_steps, config.warmup_steps, config.min_lr_factor, budget
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.ema = None if config.ema_decay is None else ExponentialMovingAverage(self.parameters, config.ema_decay)
        self.guard = GradientGuard() if config.grad_guard else None
        self.runaway = RunawayLoss() if config.max_rollbacks > 0 else None
        self.rollbacks = 0
        self._snapshots: deque[dict[str, Any]] = deque(maxlen=2)
        self.out_dir = None if config.out_dir is None else Path(config.out_dir)
        self.step = 0
        self.elapsed_seconds = 0.0
        self._history: list[tuple[int, float]] = []
        self._pending_rows: list[dict[str, float]] = []
        self._columns: list[str] | None = None
        self.keep_rows = bool(keep_rows)
        self.rows: list[dict[str, float]] = []

    # ------------------------------------------------------------------ paths
    @property
    def checkpoint_path(self) -> Path | None:
        """``out_dir/checkpoint.pt``, or None without an output directory."""
        return None if self.out_dir is None else self.out_dir / "checkpoint.pt"

    @property
    def csv_path(self) -> Path | None:
        """``out_dir/loss.csv``, or None without an output directory."""
        return None if self.out_dir is None else self.out_dir / "loss.csv"

    @property
    def plot_path(self) -> Path | None:
        """``out_dir/loss.png``, or None without an output directory."""
        return None if self.out_dir is None else self.out_dir / "loss.png"

    # -------------------------------------------------------------------- fit
    def fit(self, *, resume: bool = True, stop_at: int | None = None) -> TrainingSummary:
        """Train until ``max_steps``, the time budget, or ``stop_at``.

        Parameters
        ----------
        resume : bool
            Continue from ``out_dir/checkpoint.pt`` if it exists (exactly: the
            same batches, random numbers and updates as an uninterrupted run).
        stop_at : int or None
            Stop after this many total steps (for staged runs); the schedule
            still spans ``max_steps``.

        Returns
        -------
        TrainingSummary
        """
        if stop_at is not None and (isinstance(stop_at, bool) or not isinstance(stop_at, int) or stop_at < 0):
            raise ValueError(f"stop_at must be an integer >= 0 or None, got {stop_at!r}")
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load_checkpoint(self.checkpoint_path)
        self._prepare_csv()
        end = self.config.max_steps if stop_at is None else min(stop_at, self.config.max_steps)
        start_step = self.step
        times = _SessionTimes()
        skipped = 0
        guard_counts = (0, 0) if self.guard is None else (self.guard.n_skipped, self.guard.n_clipped)
        consecutive_bad = 0
        rollbacks_before = self.rollbacks
        checkpoint_due = False
        self._snapshots.clear()
        if self.runaway is not None:
            self._snapshot()
        stopped_by: StopReason = "max_steps" if end == self.config.max_steps else "stop_at"
        consistent = True
        session_start = last_checkpoint = time.perf_counter()
        elapsed_before = self.elapsed_seconds
        every_minutes = self.config.checkpoint_minutes
        checkpoint_seconds = math.inf if every_minutes is None else 60.0 * every_minutes
        by_time = self.config.schedule_clock == "time"
        # with the time clock the bar counts training seconds of the budget (the step count is open-ended)
        bar = tqdm(
            total=round(60.0 * self.config.max_minutes) if by_time else self.config.max_steps,  # type: ignore[operator]
            initial=int(self.elapsed_seconds) if by_time else self.step,
            unit="s" if by_time else "it",
            desc=type(self.objective).__name__,
            disable=not self.config.progress,
            dynamic_ncols=True,
            mininterval=bar_mininterval(),
        )
        batches = iter(self._loader(self.step, end))
        try:
            while self.step < end:
                if self._over_budget(elapsed_before + time.perf_counter() - session_start):
                    stopped_by = "max_minutes"
                    break
                wait_start = time.perf_counter()
                batch = next(batches)
                step_start = time.perf_counter()
                self.model.train()
                self.optimizer.zero_grad(set_to_none=True)
                output = self.objective.loss(self.model, batch, self.step)
                loss_value = float(output.loss.detach())
                grad_norm = math.nan
                good = math.isfinite(loss_value)
                update = good
                if good:
                    output.loss.backward()
                    if self.guard is None:
                        max_norm = math.inf if self.config.grad_clip is None else self.config.grad_clip
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, max_norm))
                        good = update = math.isfinite(grad_norm)
                    else:
                        grad_norm, good, update = self._guarded_clip()
                consistent = False
                if update:
                    self.optimizer.step()
                    if self.ema is not None:
                        self.ema.update()
                lr = self.scheduler.get_last_lr()[0]
                self._lr_factor.elapsed_seconds = elapsed_before + time.perf_counter() - session_start
                with warnings.catch_warnings():
                    # the schedule follows the step count, also when an update was skipped
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                    self.scheduler.step()
                self.step += 1
                consistent = True
                end_time = time.perf_counter()
                self.elapsed_seconds = elapsed_before + end_time - session_start
                times.data.append(step_start - wait_start)
                times.step.append(end_time - step_start)
                if "pairing_seconds" in output.metrics:
                    times.pairing.append(output.metrics["pairing_seconds"])
                if good:
                    consecutive_bad = 0
                else:
                    skipped += 1
                    consecutive_bad += 1
                    logger.warning(
                        "step %d: non-finite loss (%s) or gradient norm (%s); update skipped",
                        self.step, loss_value, grad_norm,
                    )
                    if consecutive_bad >= self.config.max_nonfinite_steps:
                        raise RuntimeError(
                            f"{consecutive_bad} consecutive steps had a non-finite loss or gradient "
                            f"(last loss {loss_value}); lower lr, set grad_clip, or check the energy/data"
                        )
                self._record(
                    {
                        "step": self.step,
                        "loss": loss_value,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "data_seconds": times.data[-1],
                        "step_seconds": times.step[-1],
                        "elapsed_seconds": self.elapsed_seconds,
                        **output.metrics,
                    }
                )
                if by_time:
                    bar.update(int(self.elapsed_seconds) - bar.n)
                else:
                    bar.update(1)
                if self.step % self.config.log_every == 0:
                    self._flush_csv()
                    postfix = {"step": self.step} if by_time else {}
                    bar.set_postfix(**postfix, loss=f"{self._recent_loss():.4g}", refresh=False)
                if self.runaway is not None:
                    if self.runaway.observe(loss_value if output.watch is None else output.watch):
                        self._roll_back(loss_value)
                        consecutive_bad = 0
                    elif self.runaway.streak == 0 and self.step % self.config.snapshot_every == 0:
                        self._snapshot()
                checkpoint_due = (
                    checkpoint_due
                    or self.step % self.config.checkpoint_every == 0
                    or time.perf_counter() - last_checkpoint >= checkpoint_seconds
                )
                if checkpoint_due and (self.runaway is None or self.runaway.streak == 0):
                    self._save_outputs()  # not while the loss is high: a checkpoint must be worth resuming
                    checkpoint_due = False
                    last_checkpoint = time.perf_counter()
        except KeyboardInterrupt:
            if consistent:
                logger.warning("interrupted at step %d; writing a checkpoint before stopping", self.step)
                self._save_outputs()
            raise
        finally:
            bar.close()
            del batches  # shuts down worker processes
        self._save_outputs()
        summary = TrainingSummary(
            step=self.step,
            steps_this_session=self.step - start_step,
            elapsed_seconds=self.elapsed_seconds,
            stopped_by=stopped_by,
            final_loss=self._recent_loss(),
            mean_data_seconds=float(np.mean(times.data)) if times.data else math.nan,
            mean_step_seconds=float(np.mean(times.step)) if times.step else math.nan,
            mean_pairing_seconds=float(np.mean(times.pairing)) if times.pairing else None,
            skipped_steps=skipped,
            guard_skipped_steps=0 if self.guard is None else self.guard.n_skipped - guard_counts[0],
            guard_clipped_steps=0 if self.guard is None else self.guard.n_clipped - guard_counts[1],
            rollbacks=self.rollbacks - rollbacks_before,
            lr_scale=self._lr_factor.scale,
        )
        pairing = (
            "" if summary.mean_pairing_seconds is None else f", pairing {1e3 * summary.mean_pairing_seconds:.1f} ms"
        )
        logger.info(
            "stopped at step %d (%s) after %.1f s: loss %.4g; per step: waited for data %.1f ms%s, network %.1f ms",
            summary.step, stopped_by, summary.elapsed_seconds, summary.final_loss,
            1e3 * summary.mean_data_seconds, pairing, 1e3 * summary.mean_step_seconds,
        )
        if self.guard is not None:
            logger.info(
                "gradient guard: %d steps skipped, %d clipped this session",
                summary.guard_skipped_steps, summary.guard_clipped_steps,
            )
        return summary

    # -------------------------------------------------------------- roll-back
    def _snapshot(self) -> None:
        """Keep an in-memory copy of the state a roll-back restores (the last two are kept)."""
        assert self.runaway is not None
        self._snapshots.append(
            copy.deepcopy(
                {
                    "step": self.step,
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "ema": None if self.ema is None else self.ema.state_dict(),
                    "guard": None if self.guard is None else self.guard.state_dict(),
                    "runaway": self.runaway.state_dict(),
                    "objective": self.objective.state_dict() if hasattr(self.objective, "state_dict") else None,
                }
            )
        )

    def _restore(self, snapshot: dict[str, Any]) -> None:
        # copies: the optimiser adopts tensors it is given, and the snapshot may be restored again
        snapshot = copy.deepcopy(snapshot)
        self.model.load_state_dict(snapshot["model"])
        self.optimizer.load_state_dict(snapshot["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(snapshot["ema"])
        if self.guard is not None:
            counts = self.guard.n_skipped, self.guard.n_clipped  # the counters keep what happened since
            self.guard.load_state_dict(snapshot["guard"])
            self.guard.n_skipped, self.guard.n_clipped = counts
        assert self.runaway is not None
        self.runaway.load_state_dict(snapshot["runaway"])
        self.runaway.reset_streak()
        if snapshot["objective"] is not None:
            self.objective.load_state_dict(snapshot["objective"])  # type: ignore[attr-defined]

    def _roll_back(self, loss_value: float) -> None:
        """Restore the older snapshot after a run-away loss and lower the learning rate (or stop)."""
        snapshot = self._snapshots[0]
        self._restore(snapshot)
        self._snapshots.clear()
        self._snapshots.append(snapshot)
        if self.rollbacks >= self.config.max_rollbacks:
            self._save_outputs()
            raise RuntimeError(
                f"the training loss ran away (last {loss_value:.4g}) at step {self.step} after "
                f"{self.rollbacks} roll-back(s) (max_rollbacks={self.config.max_rollbacks}); the checkpoint holds "
                f"the weights of step {snapshot['step']}. Lower lr (now {self.optimizer.param_groups[0]['lr']:.3g}) "
                "or raise max_rollbacks, and resume"
            )
        self.rollbacks += 1
        self._lr_factor.scale *= self.config.rollback_lr_factor
        self._apply_lr_factor()
        logger.warning(
            "step %d: the training loss ran away (last %.4g); rolled back to the weights of step %d and scaled the "
            "learning rate by %g (roll-back %d of %d)",
            self.step, loss_value, snapshot["step"], self._lr_factor.scale, self.rollbacks,
            self.config.max_rollbacks,
        )  # fmt: skip

    def _apply_lr_factor(self) -> None:
        """Set the learning rate of the current step from the schedule now (after its budget or scale changed)."""
        factor = self._lr_factor(self.scheduler.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # type: ignore[attr-defined]

    def _guarded_clip(self) -> tuple[float, bool, bool]:
        """Apply the gradient guard, then ``grad_clip``; return (norm, finite, take the update)."""
        assert self.guard is not None
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, math.inf))
        if not math.isfinite(grad_norm):
            return grad_norm, False, False
        decision = self.guard.decide(grad_norm)
        if decision.action == "skip":
            logger.debug("step %d: gradient norm %.3g > guard (median %.3g); skipped", self.step, grad_norm,
                         decision.median)  # fmt: skip
            return grad_norm, True, False
        scale = decision.scale
        if self.config.grad_clip is not None:
            scale *= min(1.0, self.config.grad_clip / (scale * grad_norm + 1e-6))
        if scale < 1.0:
            for p in self.parameters:
                if p.grad is not None:
                    p.grad.mul_(scale)
        return grad_norm, True, True

    def _loader(self, start: int, end: int) -> torch.utils.data.DataLoader[Any]:
        dataset = _StepBatches(self.objective, self.data, self.config.batch_size, self.config.seed)
        workers = self.config.num_workers
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            sampler=range(start, end),
            num_workers=workers,
            collate_fn=_unbatched,
            prefetch_factor=self.config.prefetch_factor if workers > 0 else None,
            # a private generator: creating the iterator must not consume the global RNG
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    def _over_budget(self, elapsed: float) -> bool:
        return self.config.max_minutes is not None and elapsed >= 60.0 * self.config.max_minutes

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Write the full training state to ``path`` atomically (temporary file + ``os.replace``)."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "elapsed_seconds": self.elapsed_seconds,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.config).items()},
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "guard": None if self.guard is None else self.guard.state_dict(),
            "runaway": None if self.runaway is None else self.runaway.state_dict(),
            "rollbacks": self.rollbacks,
            # objectives with state of their own (FAB's replay buffer) expose state_dict / load_state_dict
            "objective": self.objective.state_dict() if hasattr(self.objective, "state_dict") else None,
            "rng": _rng_state(),
        }
        atomic_write(Path(path), lambda stream: torch.save(state, stream))

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore the state written by :meth:`save_checkpoint` (model, optimiser, scheduler, EMA, RNG, step).

        An objective with state of its own (``state_dict`` / ``load_state_dict``, e.g. the replay buffer of
        :class:`~bgplugin.flows.eacf.FABAlpha2`) is restored too.
        """
        path = Path(path)
        device = self.parameters[0].device
        state = torch.load(path, map_location=device, weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a bgplugin training checkpoint (format {state.get('format')!r})")
        if state["version"] > CHECKPOINT_VERSION:
            raise ValueError(
                f"{path} has checkpoint version {state['version']}, newer than this bgplugin "
                f"({CHECKPOINT_VERSION}); upgrade bgplugin"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # the time clock spans this run's budget: a resumed run given more minutes stretches the rest of the decay
        if self.config.schedule_clock == "time":
            self._lr_factor.budget_seconds = 60.0 * self.config.max_minutes  # type: ignore[operator]
            self._apply_lr_factor()
        if (state["ema"] is None) != (self.ema is None):
            raise ValueError(
                f"{path} was written {'with' if state['ema'] is not None else 'without'} EMA but this trainer has "
                f"ema_decay={self.config.ema_decay}; use the configuration of the checkpointed run"
            )
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.guard is not None:
            if state.get("guard") is not None:
                self.guard.load_state_dict(state["guard"])
            else:
                logger.info("%s has no gradient-guard history; the guard starts a new one", path)
        if self.runaway is not None and state.get("runaway") is not None:
            self.runaway.load_state_dict(state["runaway"])
        self.rollbacks = int(state.get("rollbacks", 0))
        if hasattr(self.objective, "load_state_dict"):
            if state.get("objective") is not None:
                self.objective.load_state_dict(state["objective"])
            else:
                logger.warning("%s holds no state of %s; it starts afresh", path, type(self.objective).__name__)
        current = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.config).items()}
        changed = sorted(k for k, v in state["config"].items() if current.get(k) != v)
        if changed:
            logger.info("resuming with changed settings: %s", ", ".join(changed))
        self.step = int(state["step"])
        self.elapsed_seconds = float(state["elapsed_seconds"])
        _set_rng_state(state["rng"])
        logger.info("resumed from %s at step %d (%.1f s trained)", path, self.step, self.elapsed_seconds)

    def _save_outputs(self) -> None:
        if self.out_dir is None:
            return
        self._flush_csv()
        self.save_checkpoint(self.checkpoint_path)  # type: ignore[arg-type]
        self._plot()

    # -------------------------------------------------------------------- logs
    def _record(self, row: dict[str, float]) -> None:
        self._history.append((int(row["step"]), float(row["loss"])))
        if self.keep_rows:
            self.rows.append(row)
        if self.out_dir is not None:
            self._pending_rows.append(row)

    def _recent_loss(self) -> float:
        recent = [loss for _, loss in self._history[-self.config.log_every :] if math.isfinite(loss)]
        return float(np.mean(recent)) if recent else math.nan

    def _prepare_csv(self) -> None:
        """Keep the rows of steps up to the current step (a resumed run rewrites the rest)."""
        self._history = []
        self._pending_rows = []
        self._columns = None
        path = self.csv_path
        if path is None or not path.exists():
            return
        with path.open(newline="") as stream:
            reader = csv.DictReader(stream)
            columns = list(reader.fieldnames or [])
            rows = [row for row in reader if int(row["step"]) <= self.step]
        if self.step == 0 or not columns:
            path.unlink()
            return
        self._columns = columns
        self._history = [(int(row["step"]), float(row["loss"])) for row in rows]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(path, lambda stream: stream.write(text.getvalue().encode()))

    def _flush_csv(self) -> None:
        path = self.csv_path
        if path is None or not self._pending_rows:
            return
        new_file = self._columns is None
        if self._columns is None:
            extra = sorted(k for k in self._pending_rows[0] if k not in _FIXED_COLUMNS)
            self._columns = [*_FIXED_COLUMNS, *extra]
        with path.open("w" if new_file else "a", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=self._columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerows(self._pending_rows)
        self._pending_rows = []

    def _plot(self) -> None:
        path = self.plot_path
        if path is None or not self._history:
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        steps = np.array([s for s, _ in self._history])
        losses = np.array([v for _, v in self._history])
        finite = np.isfinite(losses)
        figure = Figure(figsize=(6.0, 4.0), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        axes.plot(steps[finite], losses[finite], lw=0.5, alpha=0.4, label="loss")
        window = max(1, int(finite.sum()) // 50)
        if window > 1:
            smooth = np.convolve(losses[finite], np.ones(window) / window, mode="valid")
            axes.plot(steps[finite][window - 1 :], smooth, lw=1.5, label=f"mean of {window} steps")
        axes.set_xlabel("step")
        axes.set_ylabel(f"{type(self.objective).__name__} loss")
        axes.legend(loc="upper right")
        figure.tight_layout()
        atomic_write(path, lambda stream: figure.savefig(stream, format="png"))


# ----------------------------------------------------------------- utilities
def _rng_state() -> dict[str, Any]:
    kind, key, position, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(key.astype(np.int64)), int(position), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    kind, key, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.cpu().numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def probe_max_steps(
    model: nn.Module,
    objective: Objective,
    data: TrainingData | None,
    *,
    minutes: float,
    batch_size: int,
    lr: float,
    seed: int,
    probe_steps: int = 30,
    probe_seconds: float = 3.0,
    margin: float = 1.0,
) -> int:
    """Optimiser steps that fit in ``minutes``, timed with a few steps on a throwaway copy of ``model``.

    The learning-rate schedule of a time-limited run spans ``max_steps``; this
    estimate makes it span the budget. ``margin`` (< 1) leaves room for a
    machine that is busier during the run than during the probe.
    """
    config = TrainerConfig(
        max_steps=probe_steps, max_minutes=probe_seconds / 60.0, batch_size=batch_size, lr=lr, seed=seed,
        progress=False, out_dir=None,
    )  # fmt: skip
    probe = copy.deepcopy(model)
    # one untimed step first: allocations, and the torch.compile of a compiled flow (a minute or more)
    Trainer(probe, objective, replace(config, max_steps=1, max_minutes=None), data).fit()
    summary = Trainer(probe, objective, config, data).fit()
    per_step = summary.elapsed_seconds / max(1, summary.steps_this_session)
    steps = max(10, int(margin * 60.0 * minutes / per_step))
    logger.info("timing probe: %.1f ms per step -> max_steps %d for %.2f min", 1e3 * per_step, steps, minutes)
    return steps
