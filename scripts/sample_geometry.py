"""How far a molecular protocol run's flow samples are from its training frames: bonds, energies, data log q.

Reads a finished ``bgplugin run`` folder (a molecular system with ``sample`` and ``reweight`` steps) and prints
the heavy-atom bond lengths of the reweighted samples against the training frames (offset: |mean over samples -
mean over frames|, averaged over bonds; spread: standard deviation over samples or frames, averaged over bonds;
the median over samples of each sample's median and worst bond deviation), the sample energies against the data
energies (kT), the flow's log q of training frames and the reverse ESS::

    python scripts/sample_geometry.py runs/ala2_eacf [--frames 200]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import yaml

from bgplugin.data import Dataset
from bgplugin.flows import load_flow
from bgplugin.reweighting import ess
from bgplugin.systems import get_system


def heavy_atom_bond_lengths(topology, x: np.ndarray) -> np.ndarray:
    """(frames, bonds) lengths of the bonds between two non-hydrogen atoms."""
    pairs = np.array([(a.index, b.index) for a, b in topology.bonds
                      if a.element.symbol != "H" and b.element.symbol != "H"])  # fmt: skip
    return np.linalg.norm(x[:, pairs[:, 0]] - x[:, pairs[:, 1]], axis=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished `bgplugin run` folder")
    parser.add_argument("--frames", type=int, default=200, help="training frames scored by the flow (default 200)")
    args = parser.parse_args()
    run = args.run
    for needed in ("protocol.yaml", "simulate/data.h5", "reweight/reweighted.npz", "train/flow.pt"):
        if not (run / needed).is_file():
            raise SystemExit(f"{run / needed} is missing: give the folder of a finished protocol run")
    protocol = yaml.safe_load((run / "protocol.yaml").read_text())
    system = get_system(protocol["system"])
    topology = system.topology
    frames = Dataset.load(run / "simulate" / "data.h5").positions
    reweighted = np.load(run / "reweight" / "reweighted.npz")

    data_bonds, sample_bonds = (
        heavy_atom_bond_lengths(topology, frames),
        heavy_atom_bond_lengths(topology, reweighted["x"]),
    )
    reference = data_bonds.mean(0)
    deviation = np.abs(sample_bonds - reference)
    print(f"heavy-atom bonds: {data_bonds.shape[1]}; samples {len(sample_bonds)}, training frames {len(frames)}")
    print(
        f"bond offset {np.abs(sample_bonds.mean(0) - reference).mean():.4f} nm; spread: samples "
        f"{sample_bonds.std(0).mean():.4f} nm, frames {data_bonds.std(0).mean():.4f} nm"
    )
    print(
        f"median over samples of the median bond deviation {np.median(np.median(deviation, 1)):.4f} nm, "
        f"of the worst bond {np.median(deviation.max(1)):.4f} nm"
    )

    u = reweighted["u"]
    finite = np.isfinite(u)
    data_u = np.load(run / "reweight" / "data_energies.npz")["u"]
    print(
        f"sample energy: median {np.median(u[finite]):.4g} kT, lowest 1 % {np.percentile(u[finite], 1):.4g} kT, "
        f"{(~finite).sum()} failed; data energy median {np.median(data_u):.4g} kT"
    )

    n = len(reweighted["log_w"])
    print(f"reverse ESS {ess(reweighted['log_w']) * n:.2f} samples of {n}")

    torch.manual_seed(0)
    flow = load_flow(run / "train" / "flow.pt", device="cpu")
    pick = np.random.default_rng(0).choice(len(frames), min(args.frames, len(frames)), replace=False)
    x = frames[pick] - frames[pick].mean(1, keepdims=True)
    with torch.no_grad():
        log_q = flow.log_prob(torch.as_tensor(x, dtype=torch.float32)).numpy()
    print(f"log q of {len(pick)} training frames: {log_q.mean():.1f} ± {log_q.std() / len(log_q) ** 0.5:.1f} nats")


if __name__ == "__main__":
    main()
