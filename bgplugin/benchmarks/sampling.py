"""``bgplugin bench sampling``: samples/s with a density, E-ACF against the CNF, on the same system in one run.

For each system the E-ACF (:mod:`bgplugin.flows.eacf`) draws samples with
its exact joint log-density (one pass; the quantity its importance weights
use) and with the ``M``-draw marginal estimate, and the CNF of
``bgplugin bench divergence`` (EGNN, RK4, closed-form exact divergence)
draws samples with its exact log q. The ratios are taken within the run, so
they hold for this machine's load at that moment. Without trained models the
flows are untrained: the cost of either kind does not depend on the weights
(fixed-step RK4; a fixed number of coupling layers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import torch

from bgplugin.benchmarks.common import machine_record
from bgplugin.benchmarks.divergence import MODELS as CNF_MODELS
from bgplugin.benchmarks.divergence import _untrained_flow
from bgplugin.benchmarks.eacf import _speed
from bgplugin.flows import CNF, build_flow, load_flow
from bgplugin.flows.bench import torch_threads
from bgplugin.flows.eacf import EACF
from bgplugin.systems import get_system

__all__ = ["EACF_SIZES", "bench_sampling", "format_sampling"]

logger = logging.getLogger(__name__)

#: Per system: E-ACF hyperparameters (those of ``bench eacf`` and ``protocols/ala2_eacf.yaml``) and samples timed.
EACF_SIZES: dict[str, dict[str, Any]] = {
    "dw4": {"flow": {"n_blocks": 4, "hidden": 32, "n_layers": 1, "prior_std": 1.0}, "n_samples": 2000},
    "lj13": {"flow": {"n_blocks": 4, "hidden": 32, "n_layers": 1, "prior_std": 1.0}, "n_samples": 500},
    "alanine_dipeptide": {"flow": {"n_blocks": 4, "hidden": 32, "n_layers": 1, "prior_std": 0.16, "aug_scale": 0.05},
                          "n_samples": 200},
}  # fmt: skip


def _system(name: str) -> Any:
    return get_system(name, distinguishable="all") if name == "alanine_dipeptide" else get_system(name)


def bench_sampling(
    systems: tuple[str, ...] = ("dw4", "lj13", "alanine_dipeptide"),
    eacf_models: Mapping[str, str] | None = None,
    cnf_models: Mapping[str, str] | None = None,
    n_marginal: int = 20,
    seed: int = 0,
    n_threads: int = 1,
    sizes: Mapping[str, Mapping[str, int]] | None = None,
) -> dict[str, Any]:
    """Samples/s with log q: E-ACF joint (exact), E-ACF marginal (M draws), CNF (exact), and the ratios.

    Parameters
    ----------
    systems : tuple of str
        Keys of :data:`EACF_SIZES`.
    eacf_models, cnf_models : mapping of system name to path, optional
        Saved flows (``EACF.save`` / ``CNF.save``) to time instead of untrained ones.
    n_marginal : int
        ``M`` of the marginal estimate.
    seed : int
        Seeds the untrained flows.
    n_threads : int
        torch threads while timing.
    sizes : mapping, optional
        Per system ``{"n_eacf": ..., "n_cnf": ...}``: samples per timed call
        (defaults: :data:`EACF_SIZES` and the ``bench divergence`` sizes).

    Returns
    -------
    dict
        ``machine``, ``settings``, one entry per system (``_speed`` keys:
        ``eacf_joint_samples_per_s``, ``eacf_marginal_samples_per_s``,
        ``cnf_samples_per_s``, ``ratio_joint_vs_cnf``,
        ``ratio_marginal_vs_cnf``, ...) and ``wall_seconds``.
    """
    start = time.perf_counter()
    eacf_models, cnf_models, sizes = dict(eacf_models or {}), dict(cnf_models or {}), dict(sizes or {})
    unknown = (set(systems) | set(eacf_models) | set(cnf_models)) - set(EACF_SIZES)
    if unknown:
        raise ValueError(f"unknown systems {sorted(unknown)}; choose from {sorted(EACF_SIZES)}")
    if isinstance(n_marginal, bool) or not isinstance(n_marginal, int) or n_marginal < 1:
        raise ValueError(f"n_marginal must be an integer >= 1, got {n_marginal!r}")
    out: dict[str, Any] = {
        "machine": machine_record(),
        "settings": {
            "systems": list(systems), "n_marginal": n_marginal, "seed": seed, "n_threads": n_threads,
            "eacf": {s: eacf_models.get(s, f"untrained, {EACF_SIZES[s]['flow']}") for s in systems},
            "cnf": {s: cnf_models.get(s, f"untrained EGNN CNF, {CNF_MODELS[s]}") for s in systems},
        },
    }  # fmt: skip
    with torch_threads(n_threads):
        for name in systems:
            if name in eacf_models:
                flow = load_flow(eacf_models[name], device="cpu")
                if not isinstance(flow, EACF):
                    raise ValueError(f"{eacf_models[name]!r} is not an E-ACF file (got {type(flow).__name__})")
            else:
                torch.manual_seed(seed)
                flow = build_flow(_system(name), kind="eacf", device="cpu", **EACF_SIZES[name]["flow"])
            if name in cnf_models:
                cnf = load_flow(cnf_models[name], device="cpu")
                if not isinstance(cnf, CNF):
                    raise ValueError(f"{cnf_models[name]!r} is not a CNF file (got {type(cnf).__name__})")
            else:
                cnf = _untrained_flow(name, CNF_MODELS[name], seed)
            n_eacf = sizes.get(name, {}).get("n_eacf", EACF_SIZES[name]["n_samples"])
            n_cnf = sizes.get(name, {}).get("n_cnf", CNF_MODELS[name]["n_samples"])
            logger.info("%s: timing %d E-ACF and %d CNF samples", name, n_eacf, n_cnf)
            out[name] = _speed(flow, cnf, n_eacf, n_cnf, n_marginal)
    out["wall_seconds"] = time.perf_counter() - start
    return out


def format_sampling(result: dict[str, Any]) -> str:
    """A table of :func:`bench_sampling` results."""
    m = result["settings"]["n_marginal"]
    lines = [
        f"samples/s with a density: E-ACF joint (exact, one pass), E-ACF marginal (M = {m} draws), CNF (exact)",
        f"{'system':<20}{'E-ACF joint':>12}{'marginal':>10}{'CNF':>10}{'joint/CNF':>11}{'marginal/CNF':>14}",
    ]
    for name in result["settings"]["systems"]:
        r = result[name]
        lines.append(
            f"{name:<20}{r['eacf_joint_samples_per_s']:>12.4g}{r['eacf_marginal_samples_per_s']:>10.4g}"
            f"{r['cnf_samples_per_s']:>10.4g}{r['ratio_joint_vs_cnf']:>10.1f}x{r['ratio_marginal_vs_cnf']:>13.1f}x"
        )
    lines.append(f"wall time {result['wall_seconds']:.0f} s, {result['settings']['n_threads']} thread(s), "
                 f"{result['machine']['host_cpu']}")  # fmt: skip
    return "\n".join(lines)
