"""Shared fixtures: one torch thread, the benchmark data, the bundled systems."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

DATA_DIR = Path(os.environ.get("BGPLUGIN_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def load_benchmark(name: str, split: str) -> np.ndarray:
    """A published split as (n, particles, dim) float64, centre of mass removed."""
    files = {
        ("dw4", "test"): ("dw4/test_split_DW4.npy", 4, 2),
        ("dw4", "train"): ("dw4/train_split_DW4.npy", 4, 2),
        ("lj13", "test"): ("lj13/test_split_LJ13-1000.npy", 13, 3),
        ("lj13", "val"): ("lj13/val_split_LJ13-1000.npy", 13, 3),
    }
    rel, n, d = files[(name, split)]
    path = DATA_DIR / rel
    if not path.is_file():
        pytest.skip(f"benchmark data not found at {path}; set BGPLUGIN_DATA_DIR")
    x = np.load(path).astype(np.float64).reshape(-1, n, d)
    return x - x.mean(axis=1, keepdims=True)


def randomise_parameters(module: torch.nn.Module, scale: float, seed: int = 0) -> None:
    """Move every parameter off its initial value (a fresh E-ACF is the identity) by ``scale`` N(0, 1) noise.

    The noise is drawn on the CPU from ``seed`` and moved to each parameter's device, so the same module gets the
    same weights on every device.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(scale * noise.to(parameter.device))


@pytest.fixture(scope="session")
def ala2():
    from bgplugin.systems import get_system

    return get_system("alanine_dipeptide")


@pytest.fixture(scope="session")
def ala2_vacuum():
    from bgplugin.systems import get_system

    return get_system("alanine_dipeptide_vacuum")


@pytest.fixture(scope="session")
def ala2_frames(ala2) -> np.ndarray:
    """Perturbed alanine dipeptide frames (64, 22, 3) in nm, all well-formed."""
    rng = np.random.default_rng(0)
    return ala2.positions[None] + 0.003 * rng.standard_normal((64, 22, 3))
