"""Skip or clip outlying gradient steps relative to the recent median norm (Midgley et al. 2023).

Likelihood training of coupling flows meets rare batches whose gradient norm
is orders of magnitude above the usual one (a sample in a thin tail of the
flow, a near-singular frame). A fixed clipping threshold either never acts or
always does; :class:`GradientGuard` scales with the run instead: with
:math:`m` the median of the last ``history`` finite gradient norms, a step
whose norm exceeds ``skip_factor * m`` is skipped, one above
``clip_factor * m`` is scaled down to that norm, and a non-finite norm is
always skipped. Every finite norm (also of skipped steps) enters the
history, so a lasting change of scale is followed after about
``history / 2`` steps. No decision is taken before ``min_history`` norms are
recorded.

:class:`bgplugin.training.Trainer` applies it with ``TrainerConfig(grad_guard=True)``;
:class:`bgplugin.flows.eacf.training.GuardedOptimizer` wraps an optimiser with it.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any, Literal, NamedTuple

__all__ = ["GradientGuard", "GuardDecision", "RunawayLoss"]

GuardAction = Literal["step", "clip", "skip"]


def _check_history(history: int, min_history: int, **others: int) -> None:
    """Window sizes of :class:`GradientGuard` / :class:`RunawayLoss`: integers >= 1, ``min_history <= history``."""
    for name, value in (("history", history), *others.items(), ("min_history", min_history)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if min_history > history:
        raise ValueError(f"min_history ({min_history}) must be <= history ({history})")


class GuardDecision(NamedTuple):
    """What :meth:`GradientGuard.decide` says about one gradient.

    Attributes
    ----------
    action : {"step", "clip", "skip"}
    scale : float
        Factor to multiply the gradient by before the update (1 for "step",
        < 1 for "clip", 0 for "skip").
    median : float
        Median of the recorded norms the decision used (NaN during warm-up).
    """

    action: GuardAction
    scale: float
    median: float


class GradientGuard:
    """Running-median gradient-norm guard: skip above ``skip_factor`` x median, clip above ``clip_factor`` x median.

    Parameters
    ----------
    history : int
        Number of recent norms kept (100 in the paper).
    skip_factor, clip_factor : float
        Multiples of the median (20 and 5 in the paper); ``1 <= clip_factor <= skip_factor``.
    min_history : int
        Norms needed before skipping or clipping starts.

    Examples
    --------
    >>> guard = GradientGuard(history=10, min_history=3)
    >>> [guard.decide(1.0).action for _ in range(3)]
    ['step', 'step', 'step']
    >>> guard.decide(7.0).action, round(guard.decide(7.0).scale, 3), guard.decide(100.0).action
    ('clip', 0.714, 'skip')
    """

    def __init__(
        self,
        history: int = 100,
        skip_factor: float = 20.0,
        clip_factor: float = 5.0,
        min_history: int = 20,
    ) -> None:
        _check_history(history, min_history)
        if not 1.0 <= clip_factor <= skip_factor:
            raise ValueError(f"need 1 <= clip_factor <= skip_factor, got clip {clip_factor}, skip {skip_factor}")
        self.skip_factor = float(skip_factor)
        self.clip_factor = float(clip_factor)
        self.min_history = int(min_history)
        self.norms: deque[float] = deque(maxlen=history)
        self.n_skipped = 0
        self.n_clipped = 0

    def decide(self, norm: float) -> GuardDecision:
        """Decide about a gradient of global norm ``norm`` and record the norm (if finite)."""
        median = statistics.median(self.norms) if len(self.norms) >= self.min_history else math.nan
        if not math.isfinite(norm):
            self.n_skipped += 1
            return GuardDecision("skip", 0.0, median)
        self.norms.append(float(norm))
        if math.isfinite(median) and norm > self.skip_factor * median:
            self.n_skipped += 1
            return GuardDecision("skip", 0.0, median)
        if math.isfinite(median) and norm > self.clip_factor * median:
            self.n_clipped += 1
            return GuardDecision("clip", self.clip_factor * median / norm, median)
        return GuardDecision("step", 1.0, median)

    def state_dict(self) -> dict[str, Any]:
        """Norm history and counters (for checkpoints)."""
        return {"norms": list(self.norms), "n_skipped": self.n_skipped, "n_clipped": self.n_clipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.norms.clear()
        self.norms.extend(float(v) for v in state["norms"])
        self.n_skipped = int(state["n_skipped"])
        self.n_clipped = int(state["n_clipped"])


class RunawayLoss:
    r"""Recognise a run-away training loss: ``patience`` losses in a row far above the recent ones.

    With :math:`m` the median and :math:`s = 1.4826\,\mathrm{MAD}` the robust
    spread of the last ``history`` accepted losses, a loss is *high* when it
    is non-finite or exceeds :math:`m + z\,\max(s, 10^{-3}|m|, 10^{-12})`
    (the floors keep a noise-free loss from flagging rounding). High losses
    do not enter the history, so a blow-up cannot raise its own threshold;
    ``patience`` high losses in a row make :meth:`observe` return True. A
    single bad batch (one high loss among normal ones) does not. Nothing is
    flagged before ``min_history`` losses are recorded.

    Parameters
    ----------
    history : int
        Accepted losses kept.
    z : float
        Threshold in robust standard deviations above the median.
    patience : int
        Consecutive high losses that make a run-away.
    min_history : int
        Losses needed before anything is flagged.

    Examples
    --------
    >>> watch = RunawayLoss(history=50, patience=3, min_history=10)
    >>> any(watch.observe(1.0 + 0.01 * (i % 5)) for i in range(30))
    False
    >>> [watch.observe(v) for v in (50.0, 1.0, 80.0, 1e3, float("nan"))]
    [False, False, False, False, True]
    """

    def __init__(self, history: int = 200, z: float = 20.0, patience: int = 10, min_history: int = 50) -> None:
        _check_history(history, min_history, patience=patience)
        if not (z > 0 and math.isfinite(z)):
            raise ValueError(f"z must be a finite number > 0, got {z!r}")
        self.z = float(z)
        self.patience = int(patience)
        self.min_history = int(min_history)
        self.losses: deque[float] = deque(maxlen=history)
        self.streak = 0

    def threshold(self) -> float:
        """Loss above which a step counts as high (inf before ``min_history`` losses)."""
        if len(self.losses) < self.min_history:
            return math.inf
        median = statistics.median(self.losses)
        mad = statistics.median(abs(v - median) for v in self.losses)
        return median + self.z * max(1.4826 * mad, 1e-3 * abs(median), 1e-12)

    def observe(self, loss: float) -> bool:
        """Record one step's loss; True when the last ``patience`` losses were all high."""
        if math.isfinite(loss) and loss <= self.threshold():
            self.losses.append(float(loss))
            self.streak = 0
            return False
        self.streak += 1
        return self.streak >= self.patience

    def reset_streak(self) -> None:
        """Forget the current run of high losses (after the trainer has rolled back)."""
        self.streak = 0

    def state_dict(self) -> dict[str, Any]:
        """Loss history and the current streak (for checkpoints)."""
        return {"losses": list(self.losses), "streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.losses.clear()
        self.losses.extend(float(v) for v in state["losses"])
        self.streak = int(state["streak"])
