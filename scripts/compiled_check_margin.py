"""How close float32 round-off comes to the compiled-vs-eager check's tolerance on a real E-ACF training step.

Builds the LJ13 E-ACF of ``bgplugin bench eacf`` (3 transforms, prior std 0.7; ``--layers`` / ``--blocks`` as
given), trains it compiled for 3 steps at lr 1e-12 on the published split (the first step runs the check of
:mod:`bgplugin.flows.compiled` on every coupling layer) and prints the largest multiple of the tolerance that the
outputs and the gradients used (< 1 passes) and how many layers fell back to the eager path::

    python scripts/compiled_check_margin.py --layers 2 --blocks 4
"""

from __future__ import annotations

import argparse
import time

import torch

from bgplugin.benchmarks.particles import load_split
from bgplugin.flows import build_flow
from bgplugin.flows import compiled as compiled_module
from bgplugin.flows.eacf.training import JointMaximumLikelihood
from bgplugin.systems import get_system
from bgplugin.training import Trainer, TrainerConfig, TrainingData


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seen: list[tuple[str, float]] = []
    excess = compiled_module._excess

    def spy(fast: torch.Tensor, eager: torch.Tensor, kind: str) -> tuple[float, float]:
        result = excess(fast, eager, kind)
        seen.append((kind, result[0]))
        return result

    compiled_module._excess = spy
    system = get_system("lj13")
    torch.manual_seed(0)
    flow = build_flow(system, kind="eacf", device="cpu", n_blocks=args.blocks, n_layers=args.layers, n_transforms=3,
                      prior_std=0.7, compiled=True)  # fmt: skip
    config = TrainerConfig(max_steps=3, batch_size=64, lr=1e-12, progress=False, grad_guard=True, seed=0)
    start = time.perf_counter()
    Trainer(flow, JointMaximumLikelihood(flow), config, TrainingData(load_split(system, "train"))).fit()
    failed = sum(len(call.failed) for call in compiled_module._COUPLING.values())
    for kind in ("outputs", "gradients"):
        values = [value for k, value in seen if k == kind]
        print(f"{kind}: {len(values)} checks, largest {max(values):.4f} of the tolerance")
    print(f"{failed} coupling layers on the eager path; torch {torch.__version__}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
