"""``torch.compile`` of the flows' inner functions: a CNF field's closed form, an E-ACF coupling layer.

Both are long chains of small elementwise operations and batched
contractions; on a CPU the inductor backend fuses them into a few loops.

- :func:`compiled_velocity_and_divergence`: the closed-form velocity and
  exact divergence of a CNF field, for inference only (:class:`~bgplugin.flows.CNF`
  built with ``compiled=True`` uses it without autograd; training keeps the
  eager path). Measured 1.5x (LJ13) to 1.8x (alanine dipeptide) per call.
- :func:`compiled_velocity`: a CNF field's velocity with autograd, for
  flow-matching training of a CNF built with ``compiled=True``. A training
  step (loss, backward, AdamW; EGNN L3 h32) measured 1.6x faster for LJ13
  at batch 32, 1.5x for DW4 at batch 256 (``bgplugin bench training``).
- :func:`compiled_coupling`: one coupling layer of an E-ACF, with autograd
  (training) or without (sampling, densities); used by an
  :class:`~bgplugin.flows.eacf.EACF` built with ``compiled=True``. A
  training step (loss, backward, AdamW) measured 1.6x (DW4, LJ13) and
  1.3x (22 atoms) faster.

Compilation itself takes about a minute per function and mode, so it pays for
long runs only. One compiled function serves every module of a kind (the
module is an argument, so its weights are inputs, not constants: training
never triggers a recompilation), with dynamic batch sizes: one graph serves
every batch size (a single sample is evaluated as a duplicated pair). If
compilation fails (no C compiler, an unsupported backend) the module falls
back to the eager path, with one warning per compiled function.

The first compiled call of each module, with and without autograd, is
checked against the eager call on the same input: the outputs and, with
autograd, the gradients of every parameter and input (for a random
cotangent). A module whose compiled results disagree runs eagerly from then
on, with the same one warning. This is not hypothetical: with torch 2.11
(CPU) the compiled E-ACF coupling layer returned the right values but
gradients that differed from the eager ones (and from finite differences)
by up to 0.9 in float64, so compiled training followed a wrong gradient;
torch 2.13 is right.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from bgplugin.flows.field import VectorField

__all__ = ["compiled_coupling", "compiled_velocity", "compiled_velocity_and_divergence"]

logger = logging.getLogger(__name__)


class CompiledMismatch(RuntimeError):
    """The compiled function's outputs or gradients differ from the eager function's on the same input."""


#: Tolerances (rtol, atol) of the compiled-vs-eager check, per dtype, for the outputs and for the gradients: the
#: Euclidean norm of the difference may be ``rtol * |eager| + atol * sqrt(n)``. Norms, not largest elements: in float32
#: a single gradient element that is a sum of cancelling terms differed by 2e-3 of the largest gradient (torch 2.13,
#: LJ13 E-ACF with 2 EGNN layers), pure round-off, while the whole gradient differed by far less. Measured on the
#: first training batch of the LJ13 E-ACFs of docs/eacf.md (4 or 6 blocks, 1 or 2 EGNN layers, 3 transforms): at most
#: 0.02 of the gradient tolerance and 0.012 of the output one. The torch 2.11 error was of order 1 relative
#: (gradients of 0.03-0.2 off by up to 0.9).
_CHECK_TOLERANCE = {
    "outputs": {torch.float64: (1e-6, 1e-10), torch.float32: (1e-3, 1e-4)},
    "gradients": {torch.float64: (1e-6, 1e-10), torch.float32: (1e-2, 1e-5)},
}


def _excess(fast: Tensor, eager: Tensor, kind: str) -> tuple[float, float]:
    """|fast - eager| (Euclidean) as a multiple of the tolerance of ``kind`` (> 1: a real discrepancy), and its
    size relative to |eager|."""
    if fast.shape != eager.shape:
        return float("inf"), float("inf")
    if eager.numel() == 0:
        return 0.0, 0.0
    tolerances = _CHECK_TOLERANCE[kind]
    rtol, atol = tolerances.get(eager.dtype, tolerances[torch.float32])
    difference = float((fast.detach() - eager.detach()).double().norm())
    size = float(eager.detach().double().norm())
    return difference / (rtol * size + atol * eager.numel() ** 0.5), difference / max(size, 1e-300)


def _as_tuple(value: Any) -> tuple[Tensor, ...]:
    return (value,) if isinstance(value, Tensor) else tuple(value)


class _CompiledCall:
    """``function(module, *tensors)`` through one lazily made ``torch.compile``, eager per module if that fails.

    Every tensor argument and every output (a tensor or a tuple of them) has the batch on dimension 0.
    """

    def __init__(self, function: Callable[..., Any], what: str, inputs_require_grad: bool) -> None:
        self.function = function
        self.what = what
        self.inputs_require_grad = inputs_require_grad
        self.compiled: Callable[..., Any] | None = None
        self.failed: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        #: why each module in ``failed`` runs eagerly (the message of the warning)
        self.reasons: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
        # modules whose compiled call was checked against the eager one, without (False) and with (True) autograd
        self.checked: dict[bool, weakref.WeakSet[nn.Module]] = {False: weakref.WeakSet(), True: weakref.WeakSet()}
        self.warned = False

    def __call__(self, module: nn.Module, *tensors: Tensor) -> Any:
        if module in self.failed:
            return self.function(module, *tensors)
        if tensors[0].shape[0] == 1:
            # torch.compile specialises batch size 1; a duplicated sample reuses the graph of every other size.
            doubled = self(module, *(t.expand(2, *t.shape[1:]) for t in tensors))
            return doubled[:1] if isinstance(doubled, Tensor) else tuple(out[:1] for out in doubled)
        # Fresh contiguous inputs: the guards compare strides, and views of earlier blocks made them fail.
        tensors = tuple(t.clone(memory_format=torch.contiguous_format) for t in tensors)
        if self.inputs_require_grad and torch.is_grad_enabled():
            # One training graph whether or not an input carries a gradient (earlier layers' outputs do, data does
            # not): the guards compare requires_grad. The unused input gradient is cheap.
            tensors = tuple(t if t.requires_grad else t.requires_grad_() for t in tensors)
        # One graph for every batch size >= 2 from the first call (dynamic=True alone specialises the first size).
        for t in tensors:
            torch._dynamo.mark_dynamic(t, 0)
        if self.compiled is None:
            self.compiled = torch.compile(self.function, dynamic=True)
        try:
            with _without_autograd_cache():
                grad_mode = torch.is_grad_enabled()
                if module not in self.checked[grad_mode]:
                    self.check(module, tensors)
                    self.checked[grad_mode].add(module)
                return self.compiled(module, *tensors)
        except Exception as error:  # noqa: BLE001 - any compiler failure falls back to the exact eager path
            self.failed.add(module)
            # one warning per function, not per module (an E-ACF has two coupling layers per block)
            if isinstance(error, CompiledMismatch):
                reason = f"its results differ from the eager path's with torch {torch.__version__} ({error})"
            else:
                reason = f"failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            self.reasons[module] = reason
            logger.log(
                logging.DEBUG if self.warned else logging.WARNING,
                "torch.compile of the %s %s; using the eager path. Build the flow with compiled=False to silence this.",
                self.what,
                reason,
            )
            self.warned = True
            return self.function(module, *tensors)

    def check(self, module: nn.Module, tensors: tuple[Tensor, ...]) -> None:
        """Raise :class:`CompiledMismatch` unless the compiled call equals the eager one on ``tensors``.

        Compares each output and, with autograd on, the gradient of the module's parameters and of the inputs that
        require one (all together, for one random cotangent) by the Euclidean norm of the difference against
        ``rtol * |eager| + atol * sqrt(n)`` (``_CHECK_TOLERANCE``: float32 outputs 1e-3, gradients 1e-2; float64
        1e-6; round-off is far below, the torch 2.11 gradient error was of order 1). Leaves no gradient behind in
        ``.grad``.
        """
        assert self.compiled is not None
        grad_mode = torch.is_grad_enabled()
        copies = [tuple(t.detach().clone().requires_grad_(t.requires_grad and grad_mode) for t in tensors)
                  for _ in range(2)]  # fmt: skip
        for t in copies[1]:
            torch._dynamo.mark_dynamic(t, 0)
        eager = _as_tuple(self.function(module, *copies[0]))
        fast = _as_tuple(self.compiled(module, *copies[1]))
        worst, what = max(_excess(f, e, "outputs") for f, e in zip(fast, eager, strict=True)), "outputs"
        if grad_mode and worst[0] <= 1.0:
            parameters = [p for p in module.parameters() if p.requires_grad]
            pairs = [(e, f) for e, f in zip(eager, fast, strict=True) if e.requires_grad and f.requires_grad]
            wrt = [[*parameters, *(t for t in copy if t.requires_grad)] for copy in copies]
            if pairs and wrt[0]:
                generator = torch.Generator(pairs[0][0].device).manual_seed(0)
                cotangents = [torch.randn(e.shape, generator=generator, device=e.device, dtype=e.dtype)
                              for e, _ in pairs]  # fmt: skip
                grads = [
                    torch.autograd.grad([pair[k] for pair in pairs], wrt[k], cotangents, allow_unused=True)
                    for k in (0, 1)
                ]
                flat: list[list[Tensor]] = [[], []]
                for eager_grad, fast_grad in zip(*grads, strict=True):
                    if eager_grad is None and fast_grad is None:
                        continue
                    # an input that one path reaches and the other does not has a zero gradient on the other
                    like = eager_grad if eager_grad is not None else fast_grad
                    flat[0].append((torch.zeros_like(like) if eager_grad is None else eager_grad).reshape(-1))
                    flat[1].append((torch.zeros_like(like) if fast_grad is None else fast_grad).reshape(-1))
                if flat[0]:
                    excess = _excess(torch.cat(flat[1]), torch.cat(flat[0]), "gradients")
                    if excess[0] > worst[0]:
                        worst, what = excess, "gradients"
        if not worst[0] <= 1.0:
            raise CompiledMismatch(
                f"{what} differ by {worst[1]:.1e} of their norm, {worst[0]:.0f}x the round-off tolerance"
            )


def _without_autograd_cache() -> contextlib.AbstractContextManager[Any]:
    """Compile without AOTAutograd's on-disk cache, which returns wrong graphs for these modules.

    Measured with torch 2.13 (CPU): after one process compiled an E-ACF coupling layer with ``prior_std=1.0``, a
    later process compiling the same architecture with ``prior_std=1.8`` (a different ``radius_max`` and
    ``length_scale``, Python floats on the module) was served the cached graph and computed joint NLLs of 18.6
    instead of 8.0 nats; with this cache off (``TORCHINDUCTOR_AUTOGRAD_CACHE=0``) the values are right. Inductor's
    FX-graph cache, whose key includes those constants, stays on.
    """
    config = getattr(getattr(torch, "_functorch", None), "config", None)
    if config is None or not hasattr(config, "enable_autograd_cache"):
        return contextlib.nullcontext()
    return config.patch(enable_autograd_cache=False)  # type: ignore[no-any-return]


def _velocity_and_divergence(field: VectorField, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    return field._velocity_and_divergence(t, x)


def _velocity(field: VectorField, t: Tensor, x: Tensor) -> Tensor:
    return field(t, x)


def _coupling_forward(coupling: nn.Module, target: Tensor, condition: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return coupling._transform(target, condition, inverse=False)  # type: ignore[operator]


def _coupling_inverse(coupling: nn.Module, target: Tensor, condition: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return coupling._transform(target, condition, inverse=True)  # type: ignore[operator]


_FIELD = _CompiledCall(_velocity_and_divergence, "field's divergence", inputs_require_grad=False)
_VELOCITY = _CompiledCall(_velocity, "field", inputs_require_grad=False)
# one function per direction: each gets dynamo's own recompilation budget
_COUPLING = {
    False: _CompiledCall(_coupling_forward, "E-ACF coupling layer", inputs_require_grad=True),
    True: _CompiledCall(_coupling_inverse, "E-ACF coupling layer (inverse)", inputs_require_grad=True),
}


def compiled_velocity_and_divergence(field: VectorField, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``field._velocity_and_divergence(t, x)`` through ``torch.compile`` (eager if that fails).

    Parameters
    ----------
    field : VectorField
        A field with a closed-form divergence.
    t : Tensor, shape (batch,)
    x : Tensor, shape (batch, n_particles, dim)

    Returns
    -------
    v : Tensor, shape (batch, n_particles, dim)
    div : Tensor, shape (batch,)
        Same values as the eager call up to round-off.
    """
    if torch.is_grad_enabled():
        raise RuntimeError("the compiled closed form is for inference; call it under torch.no_grad()")
    v, div = _FIELD(field, t, x)
    return v, div


def compiled_velocity(field: VectorField, t: Tensor, x: Tensor) -> Tensor:
    """``field(t, x)`` through ``torch.compile`` (eager if that fails), differentiable: flow-matching training.

    Parameters
    ----------
    field : VectorField
    t : Tensor, shape (batch,)
    x : Tensor, shape (batch, n_particles, dim)

    Returns
    -------
    Tensor, shape (batch, n_particles, dim)
        The velocity, as the eager call up to round-off; with autograd on, the backward pass is compiled too.
    """
    velocity: Tensor = _VELOCITY(field, t, x)
    return velocity


def compiled_coupling(
    coupling: nn.Module, target: Tensor, condition: Tensor, inverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``coupling._transform(target, condition, inverse)`` through ``torch.compile`` (eager if that fails).

    Differentiable: with autograd on, the backward pass is compiled too.

    Parameters
    ----------
    coupling : nn.Module
        An E-ACF coupling layer.
    target : Tensor, shape (batch, n_particles, T, dim)
    condition : Tensor, shape (batch, n_particles, C, dim)
    inverse : bool

    Returns
    -------
    target, log_det, aux : Tensor
        As the eager call, up to round-off.
    """
    new_target, log_det, aux = _COUPLING[bool(inverse)](coupling, target, condition)
    return new_target, log_det, aux
