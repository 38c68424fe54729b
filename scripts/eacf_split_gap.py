"""How much harder the whole test split is than the subset `bgplugin bench eacf` scores, for the flow and the target.

`bench eacf` scores LJ13 on 1000 test configurations (evaluation_subset(10000, 1000, seed=0)); the CNFs are scored
on the whole split. Given the evaluation cache of an E-ACF run scored on the whole split (`eval_log_ratios.npz` of
a run with `--eval-test 10000`), this prints, on the whole split and on the subset, the flow's NLL with the
prior constant (the marginal estimate from the cache's M draws, the same draws for both) and the mean reduced
energy of the configurations (the exact density's NLL up to log Z, which cancels in differences), and the
difference split - subset of each: what to add to a subset NLL to compare it with a whole-split one::

    python scripts/eacf_split_gap.py runs/lj13_split/eval_log_ratios.npz [--system lj13] [--subset 1000]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from bgplugin.benchmarks.particles import evaluation_subset, load_split
from bgplugin.systems import get_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path, help="eval_log_ratios.npz of a run scored on the whole test split")
    parser.add_argument("--system", default="lj13", help="the particle system of the run (lj13)")
    parser.add_argument("--subset", type=int, default=1000, help="size of the subset to compare (1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset (bench eacf's --seed, 0)")
    args = parser.parse_args()
    system = get_system(args.system)
    x = torch.as_tensor(load_split(system, "test"), dtype=torch.float64)
    with np.load(args.cache) as saved:
        n_done, log_ratios = int(saved["n_done"]), torch.from_numpy(saved["log_ratios"][:, : int(saved["n_done"])])
    if n_done != len(x):
        sys.exit(f"{args.cache} holds {n_done} finished configurations, not the {len(x)} of the {args.system} test "
                 f"split: score the run with --eval-test {len(x)} (and let it finish) first")  # fmt: skip
    if not 1 <= args.subset < len(x):
        sys.exit(f"--subset must be between 1 and {len(x) - 1}, got {args.subset}")
    n_draws = log_ratios.shape[0]
    nll = -(torch.logsumexp(log_ratios, 0) - math.log(n_draws))  # the flow's log q includes the prior constant
    u = system.energy().evaluate(x, need_forces=False).u.double()
    subset = evaluation_subset(len(x), args.subset, seed=args.seed)
    rows = {"split": np.arange(len(x)), "subset": subset}
    for name, index in rows.items():
        values = nll[index]
        print(f"{name} ({len(index)} configurations, M = {n_draws}): flow NLL {values.mean():.3f} +- "
              f"{values.std() / math.sqrt(len(index)):.3f} with the prior constant; mean reduced energy "
              f"{u[index].mean():.3f}")  # fmt: skip
    flow_gap = float(nll.mean() - nll[subset].mean())
    target_gap = float(u.mean() - u[subset].mean())
    print(f"split - subset: flow {flow_gap:.3f} nats, exact density {target_gap:.3f} nats; "
          f"the flow's distance to the exact density changes by {flow_gap - target_gap:.3f}")


if __name__ == "__main__":
    main()
