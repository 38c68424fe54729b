"""``bgplugin bench divergence``: samples/s with exact log q, fast path vs the plain autograd loop."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import torch

from bgplugin.benchmarks.common import machine_record
from bgplugin.flows import build_flow, load_flow
from bgplugin.flows.bench import benchmark_divergence, select_rk4_steps
from bgplugin.systems import get_system

logger = logging.getLogger(__name__)

#: Per system: EGNN size, samples for the fast path, batch (= samples of the plain loop), output-weight scale.
MODELS: dict[str, dict[str, Any]] = {
    "dw4": {"n_layers": 3, "hidden": 32, "n_samples": 512, "batch_size": 512, "scale": 0.5},
    "lj13": {"n_layers": 3, "hidden": 32, "n_samples": 64, "batch_size": 64, "scale": 0.5},
    "alanine_dipeptide": {"n_layers": 5, "hidden": 64, "n_samples": 8, "batch_size": 8, "scale": 0.15},
}


def _untrained_flow(system_name: str, settings: Mapping[str, Any], seed: int) -> Any:
    """An EGNN CNF whose coordinate-output weights are redrawn so that the transport is non-trivial.

    A freshly initialised EGNN is close to the zero field (its log q is the
    prior's after any number of steps), which would flatter every solver.
    """
    torch.manual_seed(seed)
    flow = build_flow(get_system(system_name), "egnn", n_layers=settings["n_layers"], hidden=settings["hidden"])
    for layer in flow.field.layers:
        torch.nn.init.normal_(layer.coordinate_out.weight, std=settings["scale"] / math.sqrt(settings["hidden"]))
    return flow


def bench_divergence(
    systems: tuple[str, ...] = ("dw4", "lj13", "alanine_dipeptide"),
    models: Mapping[str, str] | None = None,
    tolerance: float | None = None,
    seed: int = 0,
    n_threads: int = 1,
    compiled: bool = True,
) -> dict[str, Any]:
    """Exact-likelihood throughput of the fast divergence against the per-dimension loop.

    Parameters
    ----------
    systems : tuple of str
        Systems to measure (keys of :data:`MODELS`).
    models : mapping of str to path, optional
        Trained flows (``CNF.save`` files) to use instead of the untrained models.
    tolerance : float, optional
        If given, the fast path uses the fewest RK4 steps whose log q error
        against dopri5 stays below this many nats (:func:`select_rk4_steps`);
        otherwise both paths use the flow's own steps (equal accuracy).
    seed : int
    n_threads : int
        torch threads during timing.
    compiled : bool
        Time the fast path through ``torch.compile`` too (the reported fast
        rate is the compiled one; the eager rate and the compilation time are
        reported beside it).
    """
    start = time.perf_counter()
    models = dict(models or {})
    unknown = set(systems) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown systems {sorted(unknown)}; choose from {sorted(MODELS)}")
    out: dict[str, Any] = {
        "machine": machine_record(),
        "settings": {"systems": list(systems), "tolerance": tolerance, "seed": seed, "n_threads": n_threads,
                     "compiled": compiled,
                     "models": {s: models.get(s, "untrained EGNN, output weights redrawn") for s in systems},
                     "sizes": {s: MODELS[s] for s in systems}},
    }  # fmt: skip
    for name in systems:
        settings = MODELS[name]
        flow = load_flow(models[name], device="cpu") if name in models else _untrained_flow(name, settings, seed)
        fast_steps = None
        if tolerance is not None:
            fast_steps, errors = select_rk4_steps(flow, tolerance, n_samples=min(64, settings["n_samples"]))
            logger.info("%s: RK4 steps chosen %d (errors %s)", name, fast_steps, errors)
        out[name] = benchmark_divergence(
            flow,
            settings["n_samples"],
            batch_size=settings["batch_size"],
            n_samples_loop=settings["batch_size"],
            fast_steps=fast_steps,
            compiled=compiled,
            n_threads=n_threads,
            seed=seed,
        )
    out["wall_seconds"] = time.perf_counter() - start
    return out


def format_divergence(result: dict[str, Any]) -> str:
    """A table of :func:`bench_divergence` results."""
    compiled = result["settings"].get("compiled", False)
    lines = [
        "samples/s with exact log q (RK4), fast divergence vs plain per-dimension autograd loop",
        f"{'system':<20}{'steps':>8}{'fast':>10}{'loop':>10}{'ratio':>8}{'|dlogq| fast':>14}{'|dlogq| loop':>14}"
        + (f"{'eager':>10}{'ratio':>8}{'compile s':>11}" if compiled else ""),
    ]
    for name in result["settings"]["systems"]:
        r = result[name]
        line = (
            f"{name:<20}{r['steps_fast']:>4}/{r['steps_loop']:<3}{r['samples_per_s_fast']:>10.3g}"
            f"{r['samples_per_s_loop']:>10.3g}{r['speedup']:>7.1f}x{r['logq_max_abs_error_fast']:>14.2e}"
            f"{r['logq_max_abs_error_loop']:>14.2e}"
        )
        if compiled:
            line += f"{r['samples_per_s_eager']:>10.3g}{r['speedup_eager']:>7.1f}x{r['compile_seconds']:>11.0f}"
        lines.append(line)
    lines.append("|dlogq|: max abs log q difference to dopri5 (rtol 1e-5), nats")
    if compiled:
        lines.append("fast: through torch.compile (compilation not counted, see 'compile s'); eager: the same path "
                     "without it")  # fmt: skip
    lines.append(f"wall time {result['wall_seconds']:.0f} s, {result['settings']['n_threads']} thread(s), "
                 f"{result['machine']['host_cpu']}")  # fmt: skip
    return "\n".join(lines)
