"""The measurement scripts in scripts/ run end to end on small saved flows and print what they promise."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA_DIR, randomise_parameters

from bgplugin.flows import build_flow
from bgplugin.systems import get_system

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run_script(name: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BGPLUGIN_DATA_DIR": str(DATA_DIR)}
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def numbers(line: str) -> list[float]:
    return [float(v) for v in re.findall(r"-?\d+\.\d+(?:e[-+]\d+)?", line.split(":", 1)[1])]


def saved_eacf(path: Path, dtype: torch.dtype) -> Path:
    flow = build_flow(get_system("lj13"), kind="eacf", n_blocks=1, hidden=8, n_layers=1, device="cpu").to(dtype)
    randomise_parameters(flow, 0.05, seed=3)  # a fresh E-ACF is the identity: nothing to round-trip
    flow.save(path)
    return path


def test_round_trip_script_reports_float64_round_off(tmp_path: Path) -> None:
    out = run_script("eacf_round_trip.py", str(saved_eacf(tmp_path / "flow.pt", torch.float64)), "--samples", "48")
    lines = {line.split(",")[0].split(" (")[0]: line for line in out.splitlines()}
    coordinates = numbers(lines["round trip"])
    log_dets = numbers(lines["|log det forward + log det inverse| in nats"])
    assert len(coordinates) == len(log_dets) == 4  # median, 99 %, 99.9 %, max
    assert coordinates == sorted(coordinates) and 0.0 <= coordinates[-1] < 1e-9, out
    assert log_dets == sorted(log_dets) and log_dets[-1] < 1e-8, out
    assert "48 samples" in out and "spherical-proj" in out


def test_round_trip_script_refuses_a_cnf(tmp_path: Path) -> None:
    path = tmp_path / "cnf.pt"
    build_flow(get_system("dw4"), "egnn", hidden=8, n_layers=1, device="cpu").save(path)
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "eacf_round_trip.py"), str(path)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode != 0 and "is not an E-ACF" in done.stderr


def test_marginal_proposal_script_prints_an_estimate_per_m_and_scale(tmp_path: Path) -> None:
    if not (DATA_DIR / "lj13").is_dir():
        pytest.skip(f"benchmark data not found at {DATA_DIR}; set BGPLUGIN_DATA_DIR")
    path = saved_eacf(tmp_path / "flow.pt", torch.float32)
    out = run_script(
        "eacf_marginal_proposal.py",
        *("--flow", str(path), "--system", "lj13", "--frames", "3", "--draws", "4", "16"),
        *("--scales", "1.0", "1.5", "--proposal-draws", "8"),
    )
    lines = out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "pi(a|x), M = 4",
        "pi(a|x), M = 16",
        "N(x, (1.0 eta)^2), M = 8",
        "N(x, (1.5 eta)^2), M = 8",
    ]
    # a log-density of 13 particles in 3-d: finite, and the same quantity whichever proposal estimates it
    values = [numbers(line)[0] for line in lines]
    assert all(math.isfinite(v) for v in values) and max(values) - min(values) < 10.0, values


def test_split_gap_script_compares_whole_split_and_subset(tmp_path: Path) -> None:
    """log q = -u + 3 + log cosh 0.1 exactly: the gaps of flow and target agree; a partial cache is refused."""
    if not (DATA_DIR / "dw4").is_dir():
        pytest.skip(f"benchmark data not found at {DATA_DIR}; set BGPLUGIN_DATA_DIR")
    from bgplugin.benchmarks.particles import evaluation_subset, load_split

    system = get_system("dw4")
    x = torch.as_tensor(load_split(system, "test", DATA_DIR), dtype=torch.float64)
    u = system.energy().evaluate(x, need_forces=False).u.double().numpy()
    log_ratios = np.stack([-u + 3.0 + 0.1, -u + 3.0 - 0.1])  # logsumexp - log 2 = -u + 3 + log cosh 0.1
    cache = tmp_path / "eval_log_ratios.npz"
    np.savez(cache, key="k", n_done=len(u), log_ratios=log_ratios)
    out = run_script("eacf_split_gap.py", str(cache), "--system", "dw4", "--subset", "500", "--seed", "2")
    lines = out.strip().splitlines()
    subset = evaluation_subset(len(u), 500, seed=2)
    offset = -3.0 - math.log(math.cosh(0.1))
    split_numbers, subset_numbers, gap_numbers = numbers(lines[0]), numbers(lines[1]), numbers(lines[2])
    assert split_numbers[0] == pytest.approx(u.mean() + offset, abs=1e-3)
    assert split_numbers[2] == pytest.approx(u.mean(), abs=1e-3)
    assert subset_numbers[0] == pytest.approx(u[subset].mean() + offset, abs=1e-3)
    assert gap_numbers[0] == pytest.approx(u.mean() - u[subset].mean(), abs=1e-3) and abs(gap_numbers[0]) > 1e-3
    assert gap_numbers[0] == pytest.approx(gap_numbers[1], abs=1e-3) and gap_numbers[2] == pytest.approx(0, abs=1e-3)
    np.savez(cache, key="k", n_done=100, log_ratios=log_ratios[:, :100])
    done = subprocess.run([sys.executable, str(SCRIPTS / "eacf_split_gap.py"), str(cache), "--system", "dw4"],
                          capture_output=True, text=True, env={**os.environ, "BGPLUGIN_DATA_DIR": str(DATA_DIR)},
                          timeout=600)  # fmt: skip
    assert done.returncode != 0 and "--eval-test 10000" in done.stderr
