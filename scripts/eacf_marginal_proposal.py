"""How the E-ACF's marginal log q estimate (paper Eq. 21) converges in M, and with wider augmented proposals.

Eq. 21 draws a_m from pi(a | x) = N(x, eta^2 I). Any proposal r(a | x) gives an unbiased estimate of q(x)
(mean of q(x, a_m) / r(a_m | x)), so its log is a stochastic lower bound of log q(x) whatever r is: a proposal
closer to the flow's own q(a | x) can only tighten it. This prints the mean estimate over frames from m draws of
pi (m in --draws) and from M = --proposal-draws draws of N(x, (c eta)^2 I) for each c in --scales::

    python scripts/eacf_marginal_proposal.py --run runs/ala2_eacf [--frames 20]
    python scripts/eacf_marginal_proposal.py --flow runs/bench_eacf_lj13_ml/flow.pt --system lj13 [--frames 100]

With --run the frames are the protocol's training frames (a random subset, seed 0), with --system the first
test configurations of evaluation_subset(n, 1000, seed=0), the frames `bgplugin bench eacf` scores.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from bgplugin.flows import load_flow


def log_q_estimate(flow, x: torch.Tensor, n_draws: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    """log of the mean of q(x, a_m) / r(a_m | x) over a_m ~ r = N(x, (scale * eta)^2 I); shape (batch,)."""
    width = scale * flow.aug_scale
    a = flow.sample_aug(x, n_draws, generator=generator)  # N(x, eta^2 I) draws, rescaled about x to width
    a = x.unsqueeze(1) + scale * (a - x.unsqueeze(1))
    xs = x.unsqueeze(0).expand(n_draws, *x.shape)
    # flow.augmented_log_ratios gives log q(x, a) - log pi(a | x); swap pi for r
    log_ratio = flow.augmented_log_ratios(x, a) + flow.log_prob_aug(a, xs) - flow._gaussian_aug_log_prob(a, xs, width)
    return torch.logsumexp(log_ratio, 0) - math.log(n_draws)


def frames(args: argparse.Namespace) -> tuple[Path, np.ndarray]:
    if args.run is not None:
        from bgplugin.data import Dataset

        positions = Dataset.load(args.run / "simulate" / "data.h5").positions
        pick = np.random.default_rng(0).choice(len(positions), min(args.frames, len(positions)), replace=False)
        return args.run / "train" / "flow.pt", positions[pick]
    from bgplugin.benchmarks.particles import evaluation_subset, load_split
    from bgplugin.systems import get_system

    test = load_split(get_system(args.system), "test")
    return args.flow, test[evaluation_subset(len(test), 1000, seed=0)][: args.frames]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="a finished `bgplugin run` folder with an E-ACF")
    source.add_argument("--flow", type=Path, help="a saved E-ACF of a particle system (with --system)")
    parser.add_argument("--system", default="lj13", help="the particle system of --flow (lj13)")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--draws", type=int, nargs="+", default=[20, 100, 500, 2000])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.2, 1.5, 2.0])
    parser.add_argument("--proposal-draws", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    path, x = frames(args)
    flow = load_flow(path, device="cpu")
    x = torch.as_tensor(x, dtype=flow.dtype)
    x = x - x.mean(1, keepdim=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in args.draws:
            start = time.perf_counter()
            value = log_q_estimate(flow, x, m, 1.0, generator).mean()
            print(f"pi(a|x), M = {m}: {value:.3f} nats ({time.perf_counter() - start:.0f} s)", flush=True)
        for scale in args.scales:
            start = time.perf_counter()
            value = log_q_estimate(flow, x, args.proposal_draws, scale, generator).mean()
            print(f"N(x, ({scale} eta)^2), M = {args.proposal_draws}: {value:.3f} nats "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
