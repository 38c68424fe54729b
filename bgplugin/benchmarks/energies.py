"""``bgplugin bench energies``: frames/s of OpenMMEnergy and XTBEnergy against raw engine loops."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import openmm
import torch

from bgplugin.benchmarks.common import machine_record
from bgplugin.energies import OpenMMEnergy, XTBEnergy, make_context
from bgplugin.systems import MolecularSystem, get_system
from bgplugin.units import BOHR_PER_NM

logger = logging.getLogger(__name__)


def _elapsed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved_rates(
    raw: Callable[[], object], make: Callable[[int], Any], x: torch.Tensor, workers: list[int], repeats: int
) -> dict[str, float]:
    """Best-of-``repeats`` frames/s of the raw loop and of each worker count.

    The passes are interleaved (raw, 1 worker, 2 workers, raw, ...) so that a
    noisy machine slows all of them alike instead of whichever ran last.
    """
    energies = {n: make(n) for n in workers}
    try:
        for n, energy in energies.items():
            energy.evaluate(x[: max(4, 2 * n)])  # start the workers before timing
        best = {"raw": np.inf} | {f"workers_{n}": np.inf for n in workers}
        for _ in range(repeats):
            best["raw"] = min(best["raw"], _elapsed(raw))
            for n, energy in energies.items():
                best[f"workers_{n}"] = min(best[f"workers_{n}"], _elapsed(lambda e=energy: e.evaluate(x)))
    finally:
        for energy in energies.values():
            energy.close()
    return {key: len(x) / seconds for key, seconds in best.items()}


def raw_openmm_loop(context: openmm.Context, frames: np.ndarray) -> None:
    """The reference: one Context, energies and forces frame by frame."""
    for x in frames:
        context.setPositions(x)
        state = context.getState(getEnergy=True, getForces=True)
        state.getPotentialEnergy()
        state.getForces(asNumpy=True)


def raw_xtb_loop(numbers: np.ndarray, frames: np.ndarray, backend: str) -> None:
    """The reference: one calculator with wavefunction restarts, frame by frame.

    The calculator is built inside the loop (as the pooled energy builds one per
    worker the first time); that costs one frame's worth of time.
    """
    if backend == "xtb":
        from xtb.interface import Calculator, Param
        from xtb.libxtb import VERBOSITY_MUTED

        calc = Calculator(Param.GFN2xTB, numbers, frames[0] * BOHR_PER_NM)
        calc.set_verbosity(VERBOSITY_MUTED)
    else:
        from tblite.interface import Calculator as TBCalculator

        calc = TBCalculator("GFN2-xTB", numbers, frames[0] * BOHR_PER_NM)
        calc.set("verbosity", 0)
    result = None
    for x in frames:
        calc.update(x * BOHR_PER_NM)
        result = calc.singlepoint(result)


def bench_energies(
    n_frames: int = 2000,
    n_xtb_frames: int = 1000,
    workers: tuple[int, ...] = (1, 2),
    repeats: int = 3,
    backends: tuple[str, ...] = ("xtb", "tblite"),
    system_name: str = "alanine_dipeptide",
) -> dict[str, Any]:
    """Frames/s (energy + forces) for raw loops and bgplugin's pooled energies.

    Returns a dict with ``openmm`` and ``xtb_<backend>`` sections, each holding
    ``raw`` (frames/s of the single-engine loop in this process),
    ``workers_<n>`` (frames/s of the bgplugin energy) and the ratios
    ``per_worker_<n>`` = rate / (n * raw) and ``speedup_<n>`` = rate / raw.
    """
    start = time.perf_counter()
    system = get_system(system_name)
    if not isinstance(system, MolecularSystem):
        raise ValueError(f"bench energies needs a molecular system, got {system_name!r}")
    rng = np.random.default_rng(0)
    frames = system.positions[None] + 0.003 * rng.standard_normal((n_frames, system.n_particles, 3))
    x = torch.as_tensor(frames)
    worker_list = list(workers)
    out: dict[str, Any] = {
        "machine": machine_record(),
        "settings": {
            "system": system_name, "n_frames_openmm": n_frames, "n_frames_xtb": n_xtb_frames,
            "workers": worker_list, "repeats": repeats, "openmm_platform": "CPU (Threads=1)",
            "what": "energy + forces per frame; best of repeats",
        },
    }  # fmt: skip

    def summarize(rates: dict[str, float]) -> dict[str, float]:
        section = dict(rates)
        for n in worker_list:
            section[f"speedup_{n}"] = rates[f"workers_{n}"] / rates["raw"]
            section[f"per_worker_{n}"] = rates[f"workers_{n}"] / (n * rates["raw"])
        return section

    logger.info("OpenMM: %d frames", n_frames)
    context = make_context(system.openmm_system, "CPU")  # built once, outside the timing
    out["openmm"] = summarize(
        _interleaved_rates(
            lambda: raw_openmm_loop(context, frames),
            lambda n: OpenMMEnergy(system, "CPU", n_workers=n),
            x, worker_list, repeats,
        )  # fmt: skip
    )
    xf = frames[:n_xtb_frames]
    for backend in backends:
        logger.info("xTB (%s): %d frames", backend, n_xtb_frames)
        out[f"xtb_{backend}"] = summarize(
            _interleaved_rates(
                lambda b=backend: raw_xtb_loop(system.atomic_numbers, xf, b),
                lambda n, b=backend: XTBEnergy(system.atomic_numbers, backend=b, n_workers=n),
                torch.as_tensor(xf), worker_list, repeats,
            )  # fmt: skip
        )
    out["wall_seconds"] = time.perf_counter() - start
    return out


def format_energies(result: dict[str, Any]) -> str:
    """A table of :func:`bench_energies` results."""
    workers = result["settings"]["workers"]
    head = f"{'engine':<14}{'raw loop':>12}" + "".join(f"{f'{n} worker(s)':>14}{'per worker':>12}" for n in workers)
    lines = [f"frames/s, energy + forces, {result['settings']['system']}", head]
    for key in [k for k in result if k == "openmm" or k.startswith("xtb_")]:
        s = result[key]
        row = f"{key:<14}{s['raw']:>12.1f}"
        row += "".join(f"{s[f'workers_{n}']:>14.1f}{s[f'per_worker_{n}']:>11.2f}x" for n in workers)
        lines.append(row)
    lines.append(f"wall time {result['wall_seconds']:.0f} s on {result['machine']['cpu_count']} CPUs "
                 f"({result['machine']['host_cpu']})")
    return "\n".join(lines)
