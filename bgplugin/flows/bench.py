"""Benchmarks of the exact log-likelihood: fast exact divergence versus the plain loop.

:func:`benchmark_divergence` is what ``bgplugin bench divergence`` reports:
samples per second with an exact log-likelihood on the flow's own fast path
(the field's closed-form divergence) and with the plain per-coordinate
autograd loop on the same model and the same prior draws, measured in one run,
plus both log-likelihood errors against an adaptive dopri5 reference.
:func:`select_rk4_steps` picks the fewest RK4 steps whose log-likelihood
error stays below a stated tolerance.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from bgplugin.flows.cnf import CNF
from bgplugin.flows.divergence import DivergenceMode

__all__ = ["benchmark_divergence", "select_rk4_steps"]

logger = logging.getLogger(__name__)


@contextmanager
def torch_threads(n_threads: int | None) -> Iterator[None]:
    """Temporarily set ``torch.set_num_threads`` (None leaves it alone)."""
    if n_threads is None:
        yield
        return
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1 or None, got {n_threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _timed_log_q(flow: CNF, z: Tensor, batch_size: int, divergence: DivergenceMode) -> tuple[Tensor, float]:
    """log q of the samples pushed forward from prior draws ``z``, and the wall time in seconds."""
    start = time.perf_counter()
    log_q = []
    with torch.no_grad():
        for chunk in z.split(batch_size):
            _, logdet = flow.forward(chunk, divergence=divergence)
            log_q.append(flow.prior.log_prob(chunk) - logdet)
    return torch.cat(log_q), time.perf_counter() - start


def _reference_log_q(flow: CNF, z: Tensor, batch_size: int, rtol: float, atol: float) -> tuple[Tensor, int]:
    """log q from dopri5 at the given tolerances, and its number of field evaluations."""
    reference = flow.with_options(solver="dopri5", rtol=rtol, atol=atol)
    log_q, _ = _timed_log_q(reference, z, batch_size, "exact")
    return log_q, reference.last_n_evaluations


def benchmark_divergence(
    flow: CNF,
    n_samples: int = 256,
    *,
    batch_size: int | None = None,
    n_samples_loop: int | None = None,
    fast_steps: int | None = None,
    compiled: bool = False,
    reference_rtol: float = 1e-5,
    reference_atol: float = 1e-5,
    n_threads: int | None = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Samples/s with an exact log-likelihood: fast exact path versus the plain autograd loop.

    Both paths push the same prior draws through the same model with the
    flow's solver; the loop runs on the first ``n_samples_loop`` draws.

    Parameters
    ----------
    flow : CNF
        The model (its solver options are used; RK4 is what is measured).
    n_samples : int
        Samples for the fast path and the reference.
    batch_size : int, optional
        Samples per solve for both paths; default ``min(n_samples, flow.chunk_for("exact"))``.
    n_samples_loop : int, optional
        Samples for the plain loop (it is slow); default ``batch_size``.
    fast_steps : int, optional
        RK4 steps for the fast path (e.g. from :func:`select_rk4_steps`);
        default the flow's ``steps``, i.e. equal steps. The loop always uses
        the flow's ``steps``; compare the reported errors for equal accuracy.
    compiled : bool
        Time the fast path through ``torch.compile`` (``CNF(compiled=True)``)
        as well as eagerly; the compilation (one warm-up batch) is timed
        separately as ``compile_seconds`` and not counted in the rate.
    reference_rtol, reference_atol : float
        Tolerances of the dopri5 reference (exact divergence).
    n_threads : int or None
        ``torch.set_num_threads`` during the benchmark (restored after); None
        keeps the current setting.
    seed : int
        Seed of the prior draws.

    Returns
    -------
    dict
        ``samples_per_s_fast``, ``samples_per_s_loop``, ``speedup`` (their
        ratio), ``seconds_fast``, ``seconds_loop``, ``n_samples_fast``,
        ``n_samples_loop``, ``steps_fast``, ``steps_loop``, ``solver``,
        ``batch_size``, ``n_threads``, ``dtype``, ``field``, ``n_particles``,
        ``dim``, ``n_parameters``, ``reference`` (description),
        ``reference_n_evaluations``, ``logq_max_abs_error_fast`` /
        ``logq_mean_abs_error_fast`` (versus the reference, nats, over the
        fast samples), the same for ``_loop`` (over the loop samples), and
        ``logq_max_abs_difference_fast_vs_loop`` (same samples, same steps
        only; None when ``fast_steps`` differs). With ``compiled``, the
        ``_fast`` keys describe the compiled path and ``samples_per_s_eager``,
        ``speedup_eager``, ``compile_seconds`` and
        ``logq_max_abs_difference_compiled_vs_eager`` are added.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    batch = min(n_samples, flow.chunk_for("exact")) if batch_size is None else batch_size
    if batch < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch}")
    n_loop = min(batch, n_samples) if n_samples_loop is None else min(n_samples_loop, n_samples)
    if n_loop < 1:
        raise ValueError(f"n_samples_loop must be >= 1, got {n_samples_loop}")
    steps_fast = flow.steps if fast_steps is None else fast_steps
    eager_flow = flow.with_options(steps=steps_fast, compiled=False)
    fast_flow = flow.with_options(steps=steps_fast, compiled=compiled)

    generator = torch.Generator(device=flow.device).manual_seed(seed)
    with torch_threads(n_threads):
        z = flow.prior.sample(n_samples, generator=generator)
        # Warm-up on one small batch so that one-off costs are not timed.
        _timed_log_q(eager_flow, z[:1], 1, "exact")
        if compiled:
            # The first call compiles the one dynamic graph that every batch size then uses.
            _, compile_seconds = _timed_log_q(fast_flow, z[:2], 2, "exact")
            log_q_eager, seconds_eager = _timed_log_q(eager_flow, z, batch, "exact")
        log_q_fast, seconds_fast = _timed_log_q(fast_flow, z, batch, "exact")
        log_q_loop, seconds_loop = _timed_log_q(flow, z[:n_loop], batch, "autograd_loop")
        log_q_ref, n_ref = _reference_log_q(flow, z, batch, reference_rtol, reference_atol)
        threads = torch.get_num_threads()

    error_fast = (log_q_fast - log_q_ref).abs()
    error_loop = (log_q_loop - log_q_ref[:n_loop]).abs()
    result: dict[str, Any] = {
        "field": flow.field.kind,
        "n_particles": flow.n_particles,
        "dim": flow.dim,
        "n_parameters": sum(p.numel() for p in flow.parameters()),
        "dtype": str(flow.dtype).removeprefix("torch."),
        "solver": flow.solver,
        "steps_fast": steps_fast,
        "steps_loop": flow.steps,
        "batch_size": batch,
        "n_threads": threads,
        "n_samples_fast": n_samples,
        "n_samples_loop": n_loop,
        "seconds_fast": seconds_fast,
        "seconds_loop": seconds_loop,
        "samples_per_s_fast": n_samples / seconds_fast,
        "samples_per_s_loop": n_loop / seconds_loop,
        "speedup": (n_samples / seconds_fast) / (n_loop / seconds_loop),
        "reference": f"dopri5 rtol={reference_rtol:g} atol={reference_atol:g}, exact divergence",
        "reference_n_evaluations": n_ref,
        "logq_max_abs_error_fast": float(error_fast.max()),
        "logq_mean_abs_error_fast": float(error_fast.mean()),
        "logq_max_abs_error_loop": float(error_loop.max()),
        "logq_mean_abs_error_loop": float(error_loop.mean()),
        "logq_max_abs_difference_fast_vs_loop": (
            float((log_q_fast[:n_loop] - log_q_loop).abs().max()) if steps_fast == flow.steps else None
        ),
        "compiled": compiled,
    }
    if compiled:
        result.update(
            compile_seconds=compile_seconds,
            seconds_eager=seconds_eager,
            samples_per_s_eager=n_samples / seconds_eager,
            speedup_eager=(n_samples / seconds_eager) / (n_loop / seconds_loop),
            logq_max_abs_difference_compiled_vs_eager=float((log_q_fast - log_q_eager).abs().max()),
        )
    logger.info(
        "divergence benchmark (%s, n=%d, d=%d): fast %.3g samples/s, loop %.3g samples/s, speedup %.1fx; "
        "max |log q error| fast %.2e, loop %.2e",
        result["field"],
        flow.n_particles,
        flow.dim,
        result["samples_per_s_fast"],
        result["samples_per_s_loop"],
        result["speedup"],
        result["logq_max_abs_error_fast"],
        result["logq_max_abs_error_loop"],
    )
    return result


def select_rk4_steps(
    flow: CNF,
    tolerance: float,
    *,
    n_samples: int = 64,
    candidates: Sequence[int] = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 30, 40),
    reference_rtol: float = 1e-5,
    reference_atol: float = 1e-5,
    seed: int = 0,
) -> tuple[int, dict[int, float]]:
    """Fewest RK4 steps whose log-likelihood error stays below ``tolerance``.

    The error of each candidate is the largest ``|log q_rk4 - log q_ref|``
    over ``n_samples`` samples pushed forward from the prior, with a dopri5
    reference; candidates are tried in increasing order until one passes.

    Parameters
    ----------
    flow : CNF
        The (trained) model; straight transport paths need few steps.
    tolerance : float
        Largest acceptable log-likelihood error in nats.
    n_samples : int
        Prior draws used for the check.
    candidates : sequence of int
        Step counts to try.
    reference_rtol, reference_atol : float
        dopri5 tolerances of the reference.
    seed : int
        Seed of the prior draws.

    Returns
    -------
    steps : int
        The first candidate (in increasing order) that meets the tolerance.
    errors : dict of int to float
        Maximum log-likelihood error of every candidate that was tried.
    """
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0 nats, got {tolerance}")
    ordered = sorted({int(c) for c in candidates})
    if not ordered or ordered[0] < 1:
        raise ValueError(f"candidates must be step counts >= 1, got {list(candidates)}")
    generator = torch.Generator(device=flow.device).manual_seed(seed)
    z = flow.prior.sample(n_samples, generator=generator)
    reference, _ = _reference_log_q(flow, z, n_samples, reference_rtol, reference_atol)
    errors: dict[int, float] = {}
    for steps in ordered:
        log_q, _ = _timed_log_q(flow.with_options(solver="rk4", steps=steps), z, n_samples, "exact")
        errors[steps] = float((log_q - reference).abs().max())
        if errors[steps] <= tolerance:
            logger.info("RK4 with %d steps meets %.2e nats (error %.2e)", steps, tolerance, errors[steps])
            return steps, errors
    raise ValueError(
        f"no candidate in {ordered} meets the log-likelihood tolerance {tolerance:g} nats "
        f"(errors {errors}); add larger step counts or use solver='dopri5'"
    )
