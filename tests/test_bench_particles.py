"""``bench_particles``: a tiny DW4 run end to end, resume, the NLL convention and the ESS estimators.

One short run (a few seconds of OT flow matching, 64 evaluation samples) is
shared by the tests that read its result; the resume and mismatch tests work
on copies of its output folder.
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bgplugin.benchmarks.particles import (
    DATA_FILES,
    bench_particles,
    data_dir,
    evaluation_subset,
    format_particles,
    forward_ess,
    kish_ess,
    load_split,
    prior_constant,
    target_density,
)
from bgplugin.flows import build_flow, load_flow
from bgplugin.systems import get_system

torch.set_num_threads(1)

# A wall-clock budget well below the step budget, so the first run stops by time (mid-schedule).
SMALL = {
    "n_eval_samples": 64,
    "n_eval_test": 64,
    "n_integration_samples": 8,
    "batch_size": 64,
    "max_steps": 5000,
    "progress": False,
    "seed": 3,
    "compiled": False,  # compilation is tested in tests/test_training.py and tests/test_flows_api.py
}
MINUTES = 0.05  # 3 s

needs_data = pytest.mark.skipif(
    not (data_dir() / DATA_FILES["dw4"]["train"]).is_file(),
    reason=f"DW4 benchmark data not found under {data_dir()}; set BGPLUGIN_DATA_DIR",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    if not (data_dir() / DATA_FILES["dw4"]["train"]).is_file():
        pytest.skip(f"DW4 benchmark data not found under {data_dir()}; set BGPLUGIN_DATA_DIR")
    out = tmp_path_factory.mktemp("dw4_ot")
    return bench_particles("dw4", "ot", MINUTES, out, **SMALL), out


def _copy(out: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(out, target)
    return target


# ----------------------------------------------------------------- the run
@needs_data
def test_result_has_every_key(run: tuple[dict[str, Any], Path]) -> None:
    result, _ = run
    required = {
        "nll", "nll_with_prior_constant", "ess", "forward_ess", "path_length", "integration_error",
        "train_seconds", "n_parameters", "device", "machine", "settings", "wall_seconds",
    }  # fmt: skip
    assert required <= set(result), f"missing keys: {sorted(required - set(result))}"
    errors = {"log_q_max_abs", "log_q_mean_abs", "log_q_median_abs", "x_max_abs", "x_mean_abs"}
    assert errors | {f"test_{key}" for key in errors} <= set(result["integration_error"])
    assert result["settings"]["n_eval_samples"] == 64
    assert result["device"].split(":")[0] == ("cuda" if torch.cuda.is_available() else "cpu")


@needs_data
def test_numbers_are_finite_and_in_range(run: tuple[dict[str, Any], Path]) -> None:
    result, _ = run
    for key in ("nll", "nll_with_prior_constant", "path_length", "train_seconds", "wall_seconds"):
        assert math.isfinite(result[key]), f"{key} = {result[key]}"
    for key, value in result["integration_error"].items():
        if isinstance(value, float):
            assert math.isfinite(value) and value >= 0.0, f"integration_error[{key}] = {value}"
    assert 0.0 < result["ess"] <= 1.0
    assert 0.0 < result["forward_ess"] <= 1.0
    assert result["path_length"] > 0.0
    assert result["n_parameters"] > 0
    assert result["failed_frames"] == 0
    # It trained, and stopped by time. train_seconds is the time at the end of the last step; checkpoint
    # and plot writes in between count towards the budget check, so it can be somewhat below the budget.
    assert result["training"]["stopped_by"] == "max_minutes"
    assert result["training"]["steps"] > 0
    assert 0.5 * 60 * MINUTES <= result["train_seconds"] < 60 * MINUTES + 5.0


@needs_data
def test_prior_constant_difference(run: tuple[dict[str, Any], Path]) -> None:
    result, _ = run
    difference = result["nll_with_prior_constant"] - result["nll"]
    assert difference == pytest.approx(5.514, abs=1e-3)
    assert difference == pytest.approx(3.0 * math.log(2.0 * math.pi), abs=1e-9)


@needs_data
def test_nll_with_prior_constant_is_minus_log_prob_of_the_saved_flow(run: tuple[dict[str, Any], Path]) -> None:
    """The reported NLL is -CNF.log_prob (EMA weights, saved as flow.pt) on the documented test subset."""
    result, out = run
    system = get_system("dw4")
    x_all = load_split(system, "test")
    x = torch.as_tensor(x_all[evaluation_subset(len(x_all), result["settings"]["n_eval_test"], SMALL["seed"])])
    flow = load_flow(out / "flow.pt", device="cpu")
    with torch.no_grad():
        nll = float(-flow.log_prob(x).double().mean())
    assert result["nll_with_prior_constant"] == pytest.approx(nll, abs=1e-4)
    assert result["nll"] == pytest.approx(nll - prior_constant(4, 2), abs=1e-4)


@needs_data
def test_plots_are_written(run: tuple[dict[str, Any], Path]) -> None:
    result, out = run
    for name in ("energy_histogram", "distance_histogram"):
        path = Path(result["plots"][name])
        assert path.parent == out
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert (out / "result.json").is_file()


@needs_data
def test_format_particles_shows_both_nlls(run: tuple[dict[str, Any], Path]) -> None:
    result, _ = run
    text = format_particles(result)
    assert f"{result['nll']:.3f}" in text
    assert f"{result['nll_with_prior_constant']:.3f}" in text
    assert "prior constant excluded" in text


@needs_data
def test_target_density_is_consistent_with_the_flow_nll(run: tuple[dict[str, Any], Path]) -> None:
    """KL = flow NLL - exact-target NLL on the same test frames; both NLLs carry the same prior constant."""
    result, _ = run
    target = result["target_density"]
    assert target["n_samples"] == 64 and target["n_test"] == 64
    assert result["nll"] - target["nll"] == pytest.approx(target["kl"], abs=1e-9)
    assert target["nll_with_prior_constant"] - target["nll"] == pytest.approx(result["prior_constant"])
    for key in ("nll_stderr", "kl_stderr", "log_z_stderr", "log_z_forward_stderr"):
        assert math.isfinite(target[key]) and target[key] > 0.0
    assert target["nll_forward"] - target["nll"] == pytest.approx(target["log_z_forward"] - target["log_z"])
    assert "exact target density" in format_particles(result)


def test_target_density_in_table_units_and_none_without_weights(caplog: pytest.LogCaptureFixture) -> None:
    """The helper subtracts the prior constant like ``nll``; no positive weight gives None and a warning."""
    rng = np.random.default_rng(0)
    lw, u, lq = rng.normal(size=500), rng.normal(size=50), rng.normal(size=50)
    row = target_density(lw, u, lq, constant=5.0)
    assert row["nll_with_prior_constant"] - row["nll"] == pytest.approx(5.0)
    assert row["kl"] == pytest.approx(float(np.mean(-u - lq)) - row["log_z"])
    assert target_density(np.full(5, -np.inf), u, lq, constant=5.0) is None
    assert "no target-density NLL" in caplog.text


# ----------------------------------------------------------------- resume
@needs_data
def test_rerun_resumes_from_the_checkpoint(run: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    first, out = run
    copy = _copy(out, tmp_path)
    second = bench_particles("dw4", "ot", 2 * MINUTES, copy, **SMALL)
    steps_before = first["training"]["steps"]
    assert second["training"]["resumed"]
    assert second["training"]["steps"] - second["training"]["steps_this_session"] == steps_before
    assert second["training"]["steps_this_session"] > 0
    assert second["train_seconds"] >= first["train_seconds"]
    with (copy / "loss.csv").open() as stream:
        steps = [int(row["step"]) for row in csv.DictReader(stream)]
    assert steps == list(range(1, second["training"]["steps"] + 1))


@needs_data
def test_rerun_with_other_settings_is_refused(run: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    _, out = run
    copy = _copy(out, tmp_path)
    with pytest.raises(ValueError, match="objective"):
        bench_particles("dw4", "eqot", MINUTES, copy, **SMALL)


# ------------------------------------------------------------- conventions
def test_cnf_log_prob_includes_the_prior_constant() -> None:
    """With a zero field the flow is the prior: -log q = |x|^2/2 + ((N-1)D/2) ln 2 pi."""
    system = get_system("dw4")
    flow = build_flow(system, "egnn", hidden=8, n_layers=2, device="cpu")
    with torch.no_grad():
        for parameter in flow.field.parameters():
            parameter.zero_()
    x = torch.randn(16, 4, 2, generator=torch.Generator().manual_seed(0))
    x = x - x.mean(1, keepdim=True)
    with torch.no_grad():
        minus_log_q = -flow.log_prob(x).double()
    expected = 0.5 * x.double().square().sum((1, 2)) + prior_constant(4, 2)
    torch.testing.assert_close(minus_log_q, expected, atol=1e-5, rtol=0.0)


def test_prior_constants_of_the_benchmarks() -> None:
    assert prior_constant(4, 2) == pytest.approx(5.514, abs=1e-3)
    assert prior_constant(13, 3) == pytest.approx(33.082, abs=1e-3)
    assert prior_constant(55, 3) == pytest.approx(148.868, abs=1e-3)


def test_kish_ess_limits() -> None:
    assert kish_ess(np.zeros(100)) == pytest.approx(1.0)
    assert kish_ess(np.array([0.0, -1e3, -1e3, -1e3])) == pytest.approx(0.25)
    # Failed samples are dropped from log_w but still count in n: weight 0.
    assert kish_ess(np.zeros(50), n_total=100) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="non-finite"):
        kish_ess(np.array([0.0, -np.inf]))


def test_kish_ess_matches_the_direct_formula() -> None:
    log_w = np.random.default_rng(0).normal(size=1000)
    w = np.exp(log_w)
    assert kish_ess(log_w) == pytest.approx(w.sum() ** 2 / (len(w) * (w**2).sum()), rel=1e-12)


def test_forward_ess_limits() -> None:
    assert forward_ess(np.full(10, 3.7)) == pytest.approx(1.0)
    log_w = np.random.default_rng(1).normal(size=500)
    w = np.exp(log_w)
    assert forward_ess(log_w) == pytest.approx(len(w) ** 2 / (w.sum() * (1.0 / w).sum()), rel=1e-12)
    assert forward_ess(log_w) < 1.0


def test_lj55_without_data_names_the_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"lj55.*train_split_LJ55-1000-part1\.npy"):
        bench_particles("lj55", "eqot", 0.1, tmp_path / "out", data_directory=tmp_path, progress=False)
    assert not (tmp_path / "out").exists(), "nothing must be written before the data are found"


def test_unknown_objective_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="objective must be one of"):
        bench_particles("dw4", "kl", 0.1, tmp_path)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_num_workers_is_refused_before_anything_is_written(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        bench_particles("dw4", "ot", 0.1, tmp_path / "out", num_workers=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


@needs_data
def test_a_wider_prior_reaches_the_flow_and_the_settings(run: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    """``prior_std`` builds the CNF on that prior; the NLL with the constant stays -log q of the saved flow."""
    _, out = run
    with pytest.raises(ValueError, match="prior_std"):  # a finished unit-prior run is not resumed with another prior
        bench_particles("dw4", "ot", MINUTES, _copy(out, tmp_path), **SMALL, prior_std=2.1)
    result = bench_particles("dw4", "ot", MINUTES, tmp_path / "wide", **{**SMALL, "n_eval_test": 16}, prior_std=2.1)
    assert result["settings"]["prior_std"] == 2.1
    flow = load_flow(tmp_path / "wide" / "flow.pt", device="cpu")
    assert flow.prior.std == 2.1
    x_all = load_split(get_system("dw4"), "test")
    x = torch.as_tensor(x_all[evaluation_subset(len(x_all), 16, SMALL["seed"])])
    with torch.no_grad():
        assert result["nll_with_prior_constant"] == pytest.approx(float(-flow.log_prob(x).double().mean()), abs=1e-4)
    assert result["nll"] == pytest.approx(result["nll_with_prior_constant"] - prior_constant(4, 2), abs=1e-9)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, True])
def test_bad_prior_std_is_refused_before_anything_is_written(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="prior_std must be a finite number > 0"):
        bench_particles("dw4", "ot", 0.1, tmp_path / "out", prior_std=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
