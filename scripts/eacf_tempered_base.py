"""Reverse ESS of a trained molecular E-ACF when its joint base is scaled by tau ("cooled" sampling).

x0, a0 ~ base, both scaled by tau, then pushed through the flow; the density of the scaled sampler is exact
(log q_tau(y) = log q0(y / tau) - D log tau, D the base's dimension), so the joint weights stay exact. Prints the
reverse ESS, the fraction of all-L samples (mirror images get weight 0) and the sample energies per tau::

    python scripts/eacf_tempered_base.py runs/ala2_eacf [--samples 2000] [--tau 1.0 0.7 0.5]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from bgplugin.analysis.chirality import classify_chirality
from bgplugin.energies.openmm_energy import OpenMMEnergy
from bgplugin.flows import load_flow
from bgplugin.reweighting import ess
from bgplugin.systems import get_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a `bgplugin run` folder with an E-ACF in train/flow.pt")
    parser.add_argument("--samples", type=int, default=2000, help="samples per tau (default 2000)")
    parser.add_argument("--tau", type=float, nargs="+", default=[1.0, 0.7, 0.5], help="base scales")
    args = parser.parse_args()
    torch.set_num_threads(1)
    system = get_system(yaml.safe_load((args.run / "protocol.yaml").read_text())["system"])
    flow = load_flow(args.run / "train" / "flow.pt", device="cpu")
    energy = OpenMMEnergy(system, platform="CPU", n_workers=0)
    dimension = (flow.n_particles - 1) * flow.dim + flow.n_aug * flow.n_particles * flow.dim
    for tau in args.tau:
        generator = torch.Generator().manual_seed(1)
        xs, log_qs = [], []
        start = time.perf_counter()
        with torch.no_grad():
            for size in [500] * (args.samples // 500) + ([args.samples % 500] if args.samples % 500 else []):
                x0, a0 = flow.base_sample(size, generator=generator)
                x, a, log_det = flow.forward(tau * x0, tau * a0)
                log_q = flow.base_log_prob(x0, a0) - dimension * math.log(tau) - log_det - flow.log_prob_aug(a, x)
                xs.append(x.double())
                log_qs.append(log_q.double())
        x, log_q = torch.cat(xs), torch.cat(log_qs).numpy()
        u = energy.evaluate(x, need_forces=False).u.numpy()
        good = classify_chirality(x.numpy(), system.topology).all_l & np.isfinite(u)
        log_w = np.where(good, -u - log_q, -np.inf)
        print(
            f"tau {tau}: reverse ESS {ess(log_w) * len(log_w):.2f} samples of {len(log_w)}; all-L {good.mean():.2f}; "
            f"energy median {np.median(u[good]):.4g} kT, lowest 1 % {np.percentile(u[good], 1):.4g} kT; "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
    energy.close()


if __name__ == "__main__":
    main()
