"""The energy contract: reduced energies u(x) in kT, batched, differentiable, failure-safe.

Every energy in bgplugin maps coordinates ``x`` of shape ``(batch, n_particles,
dim)`` to reduced energies ``u`` of shape ``(batch,)`` in kT at the system
temperature, so that ``u.sum().backward()`` yields ``-F/kT``. A frame whose
evaluation fails (NaN coordinates, overlapping atoms, a non-finite result, an
engine exception, a dead or hung worker) gets ``u = +inf`` and zero force,
and the reason is recorded in a per-call status array; nothing returns 0 kT,
nothing raises out of a batch unless :attr:`FailurePolicy.RAISE` is chosen.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)


class FailurePolicy(str, enum.Enum):
    """What an energy does with frames it cannot evaluate.

    ``INF``: the frame's energy is ``+inf``, its force 0, and the status array
    says why (the default). ``RAISE``: an :class:`EnergyEvaluationError` is
    raised after the whole batch was tried.
    """

    INF = "inf"
    RAISE = "raise"


class FrameStatus(enum.IntEnum):
    """Why a frame failed; ``OK`` for frames that were evaluated."""

    OK = 0
    NAN_COORDINATES = 1
    OVERLAP = 2
    NON_FINITE = 3
    ENERGY_TOO_HIGH = 4
    ENGINE_ERROR = 5
    SCF_NOT_CONVERGED = 6
    WORKER_DIED = 7
    TIMEOUT = 8


class EnergyEvaluationError(RuntimeError):
    """Raised under :attr:`FailurePolicy.RAISE` when frames of a batch failed."""

    def __init__(self, message: str, status: np.ndarray) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class EnergyResult:
    """Energies, forces and per-frame status of one call.

    Attributes
    ----------
    u : Tensor, shape (batch,)
        Reduced energies in kT; ``+inf`` where ``status != OK``.
    forces : Tensor, shape (batch, n_particles, dim)
        Reduced forces ``-du/dx`` in kT per length unit (nm for molecules); 0
        where ``status != OK``.
    status : ndarray of int8, shape (batch,)
        :class:`FrameStatus` codes.
    """

    u: Tensor
    forces: Tensor
    status: np.ndarray

    @property
    def failed(self) -> np.ndarray:
        """Boolean mask of the frames that failed, shape (batch,)."""
        return self.status != FrameStatus.OK


def summarize_status(status: np.ndarray) -> str:
    """Human-readable count of failure reasons, e.g. ``"2 OVERLAP, 1 TIMEOUT"``."""
    counts = Counter(int(s) for s in status if s != FrameStatus.OK)
    return ", ".join(f"{n} {FrameStatus(code).name}" for code, n in sorted(counts.items()))


class Energy:
    r"""Base class of all reduced energies.

    Subclasses implement :meth:`_evaluate`, which returns an
    :class:`EnergyResult`; the base class validates shapes, applies the
    failure policy, logs failures (each of the first
    ``FAILURE_WARNINGS_IN_FULL`` calls with failures, then a summary at most
    every ``FAILURE_SUMMARY_SECONDS``, so that training on the energy for
    hours does not flood the log), keeps counts, and (for
    engines that are not written in torch) injects the engine's forces as the
    gradient through a :class:`torch.autograd.Function`.

    Parameters
    ----------
    n_particles, dim : int
        Expected shape of one configuration.
    temperature : float
        Temperature in K (molecules) or reduced temperature (particle systems)
        at which ``u`` is measured in kT.
    failure_policy : FailurePolicy or {"inf", "raise"}
        What to do with frames that cannot be evaluated.
    """

    #: True for energies written in torch (autograd gives the forces).
    differentiable_in_torch: bool = False
    #: Calls with failed frames that are logged one by one before summaries take over.
    FAILURE_WARNINGS_IN_FULL: int = 5
    #: Least time between two summaries of failed frames, in s.
    FAILURE_SUMMARY_SECONDS: float = 60.0

    def __init__(
        self,
        n_particles: int,
        dim: int,
        temperature: float,
        failure_policy: FailurePolicy | str = FailurePolicy.INF,
    ) -> None:
        if n_particles < 1:
            raise ValueError(f"n_particles must be >= 1, got {n_particles}")
        if dim not in (1, 2, 3):
            raise ValueError(f"dim must be 1, 2 or 3, got {dim}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.n_particles = int(n_particles)
        self.dim = int(dim)
        self.temperature = float(temperature)
        try:
            self.failure_policy = FailurePolicy(failure_policy)
        except ValueError:
            allowed = [p.value for p in FailurePolicy]
            raise ValueError(f"failure_policy must be one of {allowed}, got {failure_policy!r}") from None
        self.last_status: np.ndarray | None = None
        self.failure_counts: Counter[str] = Counter()
        self.n_evaluated = 0
        self._failing_calls = 0
        self._unreported = [0, 0, 0]  # calls, failed frames, frames evaluated since the last message
        self._last_report = -math.inf

    # ------------------------------------------------------------------ public
    def __call__(self, x: Tensor) -> Tensor:
        r"""Reduced energies, differentiable in ``x``.

        Parameters
        ----------
        x : Tensor, shape (batch, n_particles, dim)
            Coordinates (nm for molecules, reduced units for particle systems).

        Returns
        -------
        Tensor, shape (batch,)
            :math:`u(x)` in kT; ``+inf`` for failed frames (see :attr:`last_status`).
        """
        x = self._check_input(x)
        if self.differentiable_in_torch:
            result = self._evaluate(x, need_forces=False)
            self._record(result.status)
            return result.u
        return _InjectForces.apply(x, self)

    def evaluate(self, x: Tensor | np.ndarray, need_forces: bool = True) -> EnergyResult:
        """Energies, forces and status without building an autograd graph.

        Parameters
        ----------
        x : Tensor or ndarray, shape (batch, n_particles, dim)
        need_forces : bool
            Skip the force computation where the engine allows it.
        """
        x = self._check_input(torch.as_tensor(x))
        if self.differentiable_in_torch and need_forces:
            xg = x.detach().requires_grad_(True)
            with torch.enable_grad():
                result = self._evaluate(xg, need_forces=True)
            result = EnergyResult(result.u.detach(), result.forces.detach(), result.status)
        else:
            with torch.no_grad():
                result = self._evaluate(x, need_forces=need_forces)
        self._record(result.status)
        return result

    def forces(self, x: Tensor | np.ndarray) -> Tensor:
        """Reduced forces ``-du/dx``, shape (batch, n_particles, dim), kT per length unit."""
        return self.evaluate(x, need_forces=True).forces

    # --------------------------------------------------------------- internals
    def _evaluate(self, x: Tensor, need_forces: bool) -> EnergyResult:
        raise NotImplementedError

    def _check_input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}; use torch.as_tensor(x)")
        expected = (self.n_particles, self.dim)
        if x.ndim != 3 or tuple(x.shape[1:]) != expected:
            hint = " (add a batch axis with x[None])" if tuple(x.shape) == expected else ""
            raise ValueError(
                f"x must have shape (batch, {expected[0]}, {expected[1]}), got {tuple(x.shape)}{hint}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        return x

    def _record(self, status: np.ndarray) -> None:
        self.last_status = status
        self.n_evaluated += len(status)
        self._unreported[2] += len(status)
        failed = status != FrameStatus.OK
        if not failed.any():
            return
        summary = summarize_status(status)
        for code in status[failed]:
            self.failure_counts[FrameStatus(int(code)).name] += 1
        message = f"{type(self).__name__}: {int(failed.sum())} of {len(status)} frames failed ({summary})"
        if self.failure_policy is FailurePolicy.RAISE:
            raise EnergyEvaluationError(message + "; pass failure_policy='inf' to get +inf instead", status)
        self._failing_calls += 1
        self._unreported[0] += 1
        self._unreported[1] += int(failed.sum())
        now = time.monotonic()
        if self._failing_calls <= self.FAILURE_WARNINGS_IN_FULL:
            last = self._failing_calls == self.FAILURE_WARNINGS_IN_FULL
            later = f"; later failures are summarised at most every {self.FAILURE_SUMMARY_SECONDS:g} s" if last else ""
            logger.warning("%s; their energy is +inf%s", message, later)
        elif now - self._last_report >= self.FAILURE_SUMMARY_SECONDS:
            calls, frames, total = self._unreported
            counts = ", ".join(f"{count} {name}" for name, count in sorted(self.failure_counts.items()))
            logger.warning(
                "%s: %d of %d frames evaluated since the last message failed, in %d calls (their energy is +inf); "
                "all failures so far: %s (failure_counts)",
                type(self).__name__, frames, total, calls, counts,
            )  # fmt: skip
        else:
            return
        self._unreported = [0, 0, 0]
        self._last_report = now


class _InjectForces(torch.autograd.Function):
    """Energies from an external engine, with its forces injected as the gradient."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, energy: Energy) -> Tensor:  # type: ignore[override]
        result = energy._evaluate(x.detach(), need_forces=x.requires_grad)
        energy._record(result.status)
        ctx.save_for_backward(result.forces)
        return result.u

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_u: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (forces,) = ctx.saved_tensors
        return -grad_u[:, None, None] * forces, None
