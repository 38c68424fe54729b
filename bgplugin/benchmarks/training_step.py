"""``bgplugin bench training``: seconds per training step, eager against ``torch.compile``, in one run.

For each system and model the same step — the objective's loss on one
batch, its backward pass and a fused AdamW update — is timed on an eager
flow and on the same flow with ``compiled=True`` (shared weights, so both
time the same function). The E-ACF step is joint maximum likelihood
(:class:`~bgplugin.flows.eacf.training.JointMaximumLikelihood`); the CNF step
is conditional flow matching without pairing (:class:`~bgplugin.training.FlowMatching`;
pairing runs beside the network, see docs/training.md). The losses of the
two variants on one batch are reported too (they must agree to round-off).
Compilation is timed separately and not counted. Untrained flows on
synthetic mean-free batches: a step's cost does not depend on the values.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal

import torch
from torch import nn

from bgplugin.benchmarks.common import machine_record
from bgplugin.benchmarks.divergence import MODELS as CNF_MODELS
from bgplugin.benchmarks.sampling import EACF_SIZES, _system
from bgplugin.flows import build_flow
from bgplugin.flows.bench import torch_threads
from bgplugin.flows.eacf.training import JointMaximumLikelihood
from bgplugin.training import FlowMatching
from bgplugin.training.trainer import adamw

__all__ = ["BATCH_SIZES", "bench_training_step", "format_training_step"]

logger = logging.getLogger(__name__)

StepModel = Literal["eacf", "cnf"]

#: Batch per step: the E-ACF batch of ``bench eacf`` / ``ala2_eacf``, the CNF batch of ``bench dw4|lj13`` and the
#: CPU alanine dipeptide study.
BATCH_SIZES: dict[str, dict[str, int]] = {
    "dw4": {"eacf": 64, "cnf": 256},
    "lj13": {"eacf": 64, "cnf": 32},
    "alanine_dipeptide": {"eacf": 64, "cnf": 64},
}


def _flow(name: str, model: StepModel, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if model == "eacf":
        return build_flow(_system(name), kind="eacf", device="cpu", **EACF_SIZES[name]["flow"])
    settings = CNF_MODELS[name]
    prior_std = EACF_SIZES[name]["flow"]["prior_std"]
    return build_flow(_system(name), "egnn", hidden=settings["hidden"], n_layers=settings["n_layers"],
                      prior_std=prior_std, device="cpu")  # fmt: skip


def _step_timer(flow: nn.Module, model: StepModel, batch_size: int, seed: int) -> tuple[Any, Any]:
    """``(step, loss_on_fixed_batch)`` closures for one flow (its own AdamW)."""
    objective: Any = JointMaximumLikelihood(flow) if model == "eacf" else FlowMatching(flow.prior, sigma=0.01)  # type: ignore[arg-type]
    prior = flow.prior  # type: ignore[union-attr]
    scale = 0.5 * prior.std
    generator = torch.Generator().manual_seed(seed)
    data = scale * prior.sample(256, generator=generator)
    optimizer = adamw([p for p in flow.parameters() if p.requires_grad], lr=1e-6)

    def batch(step_generator: torch.Generator) -> Any:
        index = torch.randint(len(data), (batch_size,), generator=step_generator)
        return objective.make_batch(data[index], None, step_generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        objective.loss(flow, batch(generator), 0).loss.backward()
        optimizer.step()

    def fixed_loss() -> float:
        return float(objective.loss(flow, batch(torch.Generator().manual_seed(seed + 1)), 0).loss.detach())

    return step, fixed_loss


def _time_steps(step: Any, n_steps: int) -> float:
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    return (time.perf_counter() - start) / n_steps


def bench_training_step(
    systems: tuple[str, ...] = ("dw4", "lj13", "alanine_dipeptide"),
    models: tuple[StepModel, ...] = ("eacf", "cnf"),
    *,
    compiled: bool = True,
    n_steps: int = 20,
    n_warmup: int = 3,
    batch_sizes: dict[str, dict[str, int]] | None = None,
    seed: int = 0,
    n_threads: int = 1,
) -> dict[str, Any]:
    """Seconds per training step of each model, eager and compiled, with the speed-up.

    Parameters
    ----------
    systems : tuple of str
        Keys of :data:`BATCH_SIZES`.
    models : tuple of {"eacf", "cnf"}
        E-ACF (``bench sampling`` sizes) and EGNN CNF (``bench divergence`` sizes).
    compiled : bool
        Also time the compiled flow (False: eager only).
    n_steps, n_warmup : int
        Timed steps and untimed steps before them (the compiled flow's first
        warm-up step compiles; its wall time is ``compile_seconds``).
    batch_sizes : dict, optional
        Per system and model, overriding :data:`BATCH_SIZES`.
    seed : int
    n_threads : int
        torch threads while timing.

    Returns
    -------
    dict
        ``machine``, ``settings``, ``results`` (one row per system and model:
        ``eager_seconds_per_step``, ``compiled_seconds_per_step``, ``speedup``,
        ``compile_seconds``, ``loss_eager``, ``loss_compiled``, ``batch_size``,
        ``n_parameters``) and ``wall_seconds``.
    """
    start = time.perf_counter()
    unknown = set(systems) - set(BATCH_SIZES)
    if unknown:
        raise ValueError(f"unknown systems {sorted(unknown)}; choose from {sorted(BATCH_SIZES)}")
    bad_models = set(models) - {"eacf", "cnf"}
    if bad_models:
        raise ValueError(f"unknown models {sorted(bad_models)}; choose from ['cnf', 'eacf']")
    for name, value, low in (("n_steps", n_steps, 1), ("n_warmup", n_warmup, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    sizes = {name: {**BATCH_SIZES[name], **(batch_sizes or {}).get(name, {})} for name in systems}
    results = []
    with torch_threads(n_threads):
        for name in systems:
            for model in models:
                flow = _flow(name, model, seed)
                batch = sizes[name][model]
                row: dict[str, Any] = {"system": name, "model": model, "batch_size": batch,
                                       "n_parameters": sum(p.numel() for p in flow.parameters())}  # fmt: skip
                step, fixed_loss = _step_timer(flow, model, batch, seed)
                for _ in range(n_warmup):
                    step()
                row["eager_seconds_per_step"] = _time_steps(step, n_steps)
                row["compiled_seconds_per_step"] = row["speedup"] = row["compile_seconds"] = None
                row["loss_compiled"] = None
                if compiled:
                    fast = flow.with_options(compiled=True)  # type: ignore[operator]
                    fast_step, fast_loss = _step_timer(fast, model, batch, seed)
                    compile_start = time.perf_counter()
                    fast_step()
                    row["compile_seconds"] = time.perf_counter() - compile_start
                    for _ in range(n_warmup - 1):
                        fast_step()
                    row["compiled_seconds_per_step"] = _time_steps(fast_step, n_steps)
                    row["speedup"] = row["eager_seconds_per_step"] / row["compiled_seconds_per_step"]
                    row["loss_compiled"] = fast_loss()  # same weights as the eager loss below
                row["loss_eager"] = fixed_loss()
                logger.info("%s %s: %s", name, model, row)
                results.append(row)
    return {
        "machine": machine_record(),
        "settings": {
            "systems": list(systems), "models": list(models), "compiled": compiled, "n_steps": n_steps,
            "n_warmup": n_warmup, "batch_sizes": sizes, "seed": seed, "n_threads": n_threads,
            "eacf": {name: EACF_SIZES[name]["flow"] for name in systems},
            "cnf": {name: {k: CNF_MODELS[name][k] for k in ("hidden", "n_layers")} for name in systems},
            "method": "mean wall time of n_steps steps (loss, backward, fused AdamW) after n_warmup untimed ones; "
            "E-ACF: joint maximum likelihood; CNF: flow matching without pairing; synthetic mean-free batches; "
            "the compiled flow shares the eager flow's weights",
        },  # fmt: skip
        "results": results,
        "wall_seconds": time.perf_counter() - start,
    }


def format_training_step(result: dict[str, Any]) -> str:
    """A table of :func:`bench_training_step` results."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{1e3 * value:.1f}"

    lines = [
        "seconds per training step (loss, backward, fused AdamW), eager vs torch.compile",
        f"{'system':<19}{'model':<7}{'batch':>6}{'eager ms':>10}{'compiled ms':>13}{'speed-up':>10}"
        f"{'compile s':>11}{'|loss diff|':>13}",
    ]
    for row in result["results"]:
        diff = None if row["loss_compiled"] is None else abs(row["loss_compiled"] - row["loss_eager"])
        speedup = "-" if row["speedup"] is None else f"{row['speedup']:.2f}x"
        compile_s = "-" if row["compile_seconds"] is None else f"{row['compile_seconds']:.0f}"
        lines.append(
            f"{row['system']:<19}{row['model']:<7}{row['batch_size']:>6}{ms(row['eager_seconds_per_step']):>10}"
            f"{ms(row['compiled_seconds_per_step']):>13}{speedup:>10}{compile_s:>11}"
            f"{'-' if diff is None or not math.isfinite(diff) else f'{diff:.1e}':>13}"
        )
    lines.append(f"wall time {result['wall_seconds']:.0f} s, {result['settings']['n_threads']} thread(s), "
                 f"{result['machine']['host_cpu']}")  # fmt: skip
    return "\n".join(lines)
