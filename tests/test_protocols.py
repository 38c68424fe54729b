"""Protocols: every bundled file loads, bad keys fail with their path, run directories resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bgplugin.protocols import (
    Protocol,
    ProtocolError,
    RunDirectory,
    RunDirectoryError,
    bundled_protocols,
    load_protocol,
    run_protocol,
)

BUNDLED = sorted(bundled_protocols())


def test_the_promised_protocols_are_bundled() -> None:
    assert {"quickstart", "ala2_classical", "ala2_xtb", "dw4", "lj13"} <= set(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_protocol_loads_and_round_trips(name: str) -> None:
    protocol = load_protocol(bundled_protocols()[name])
    assert isinstance(protocol, Protocol)
    assert protocol.steps[0] in ("simulate", "train")
    assert load_protocol(protocol.to_dict()) == protocol
    assert load_protocol(name) == protocol  # a bundled name works as well as its path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trian": {}}, "unknown key 'trian'"),
        ({"train": {"modle": {}}}, "unknown key 'train.modle'"),
        ({"train": {"model": {"hidden": "wide"}}}, "train.model.hidden must be an integer, got 'wide'"),
        ({"train": {"objective": "adam"}}, "train.objective must be one of"),
        ({"train": {"minutes": -1}}, "train.minutes must be a number > 0, got -1"),
        ({"simulate": [{"engine": "langevin"}]}, "simulate[0].engine must be one of"),
        ({"simulate": [{"engine": "md", "n_frames": 0}]}, "simulate[0].n_frames must be an integer >= 1, got 0"),
        ({"simulate": [{"engine": "md", "stepsize": 2}]}, "unknown key 'simulate[0].stepsize'"),
        ({"sample": {"n_samples": 2.5}}, "sample.n_samples must be an integer, got 2.5"),
        ({"system": "ala3"}, "system must be one of"),
        ({"seed": 0}, "seed must be an integer in 1.."),
        ({"reweight": {"clip_quantile": 2.0}}, "reweight.clip_quantile must be in (0.5, 1)"),
        ({"profile": {"state_a": [0.0]}}, "profile.state_a must be a list of 2 values"),
        ({"train": {"model": {"kind": "eacf"}}}, "train.objective 'eqot' is flow matching, which trains CNFs"),
        (
            {"train": {"model": {"kind": "eacf"}, "objective": "nll"}},
            "reweight.chirality 'mirror' with the SE(3) projection 'spherical'",
        ),
        (
            {
                "train": {"model": {"kind": "eacf", "n_blocks": 0}, "objective": "nll"},
                "reweight": {"chirality": "filter"},
            },
            "train.model.n_blocks must be an integer >= 1, got 0",
        ),
        (
            {
                "train": {"model": {"kind": "eacf", "n_transforms": 0}, "objective": "nll"},
                "reweight": {"chirality": "filter"},
            },
            "train.model.n_transforms must be an integer >= 1, got 0",
        ),
        ({"sample": {"density": "exact"}}, "sample.density must be one of"),
        ({"train": {"schedule_clock": "wall"}}, "train.schedule_clock must be one of"),
        ({"train": {"grad_guard": "yes"}}, "train.grad_guard"),
        ({"sample": {"compiled": "yes"}}, "sample.compiled"),
        ({"train": {"model": {"compiled": 1}}}, "train.model.compiled"),
        ({"train": {"model": {"prior": "gaussian"}}}, "train.model.prior must be one of ['isotropic', 'data']"),
        ({"train": {"model": {"prior_floor": 1.5}}}, "train.model.prior_floor must be in (0, 1), got 1.5"),
        ({"train": {"kl_weight": 0.2}}, "train.kl_weight 0.2 mixes the reverse KL into maximum likelihood"),
        ({"train": {"kl_weight": 1.5}}, "train.kl_weight must be in [0, 1], got 1.5"),
        ({"train": {"kl_samples": 0}}, "train.kl_samples must be an integer >= 1, got 0"),
        ({"train": {"aug_draws": 0}}, "train.aug_draws must be an integer >= 1, got 0"),
        ({"train": {"aug_draws": 4}}, "train.aug_draws 4 draws augmented variables, which only an E-ACF has"),
        (
            {
                "train": {"model": {"kind": "eacf"}, "objective": "nll", "aug_draws": 4, "kl_weight": 0.3},
                "reweight": {"chirality": "filter"},
            },
            "train.aug_draws 4 trains the marginal bound, but train.kl_weight 0.3",
        ),
        ({"train": {"kl_start": 0.95, "kl_ramp": 0.1}}, "train.kl_start + train.kl_ramp must be <= 1"),
    ],
)
def test_bad_values_name_the_key(change: dict, message: str) -> None:
    data = load_protocol("quickstart").to_dict()
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            merged = dict(data[key])
            for k, v in value.items():
                merged[k] = {**merged[k], **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
            data[key] = merged
        else:
            data[key] = value
    with pytest.raises(ProtocolError) as info:
        load_protocol(data)
    assert message in str(info.value)


def test_missing_file_lists_bundled(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="bundled protocols"):
        load_protocol(tmp_path / "nope.yaml")


def test_invalid_yaml_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("system: [unclosed\n")
    with pytest.raises(ProtocolError, match="not valid YAML"):
        load_protocol(path)


def test_steps_need_their_inputs() -> None:
    data = load_protocol("quickstart").to_dict()
    del data["train"]
    with pytest.raises(ProtocolError, match="the sample step needs a train section"):
        load_protocol(data)


def test_short_budget_note_only_for_a_planned_run_that_ended_early() -> None:
    from bgplugin.protocols.steps import short_budget_note

    # the case measured at stop 29: 3209 planned steps took 1377 of 2400 s
    note = short_budget_note(1377.0, 40.0, "max_steps", 3209, planned=True)
    assert note is not None
    assert "used 22.9 of its 40 minutes (57 %)" in note and "3209 steps" in note
    assert f"about {int(3209 * 0.85 / (1377 / 2400))}" in note and "schedule_clock: time" in note
    assert short_budget_note(2040.0, 40.0, "max_steps", 3209, planned=True) is None  # 85 %: the probe's margin
    assert short_budget_note(1377.0, 40.0, "max_steps", 3209, planned=False) is None  # max_steps set by the user
    assert short_budget_note(1377.0, 40.0, "max_minutes", 3209, planned=True) is None

    from bgplugin.protocols.runner import _report_text

    train = {"steps": 3209, "max_steps": 3209, "train_seconds": 1377.0, "stopped_by": "max_steps",
             "budget_used": 1377.0 / 2400.0, "budget_note": note}  # fmt: skip
    results = {"steps": {"train": train}, "wall_seconds": {"train": 1400.0, "total": 1500.0}, "device": "cpu"}
    report = _report_text(load_protocol("ala2_eacf"), results, {}, "")
    assert "| training | 3209 steps of 3209, 1377 s (57 % of the budget), stopped by max_steps |" in report
    assert f"| training budget | {note} |" in report


def test_run_directory_refuses_another_protocol(tmp_path: Path) -> None:
    quick = load_protocol("quickstart")
    RunDirectory(tmp_path, quick)
    other = quick.with_overrides(seed=7)
    with pytest.raises(RunDirectoryError, match="seed"):
        RunDirectory(tmp_path, other)
    RunDirectory(tmp_path, other, overwrite=True)  # explicit start-over is allowed


def tiny_quickstart() -> dict:
    """The quickstart at a size that runs in about a minute: same steps, same code paths."""
    data = load_protocol("quickstart").to_dict()
    data["simulate"][0].update(n_windows=4, k=50.0, ns_per_window=0.002, equilibration_ps=0.5, stride=20,
                               n_bootstraps=5)  # fmt: skip
    data["train"].update(minutes=0.5, max_steps=15, batch_size=16)
    data["train"]["model"].update(hidden=8, n_layers=1, solver_steps=2)
    data["sample"].update(n_samples=24, chunk_size=8)
    data["reweight"].update(n_workers=1, forward_ess_frames=8)
    data["profile"].update(n_bootstrap=10)
    return data


def test_sample_chunk_compiled_matches_eager(tmp_path: Path) -> None:
    """sample.compiled: the same prior draws give the same samples and log q through torch.compile."""
    from bgplugin.flows import build_flow
    from bgplugin.protocols.steps import _sample_chunk
    from bgplugin.systems import get_system

    torch.manual_seed(0)
    flow = build_flow(get_system("dw4"), "egnn", hidden=8, n_layers=2, steps=4, device="cpu")
    with torch.no_grad():
        for layer in flow.field.layers:
            torch.nn.init.normal_(layer.coordinate_out.weight, std=0.3)
    flow.save(tmp_path / "flow.pt")
    for compiled in (False, True):
        _sample_chunk(str(tmp_path / "flow.pt"), "cpu", 7, 6, str(tmp_path / f"{compiled}.npz"), {}, compiled)
    with np.load(tmp_path / "False.npz") as eager, np.load(tmp_path / "True.npz") as fast:
        np.testing.assert_allclose(fast["x"], eager["x"], atol=1e-5)
        np.testing.assert_allclose(fast["log_q"], eager["log_q"], atol=1e-4)
        assert np.ptp(eager["log_q"]) > 0


def test_sample_chunk_compiled_false_overrides_a_flow_trained_compiled(tmp_path: Path, monkeypatch) -> None:
    """sample.compiled: false samples eagerly even when the saved flow has compiled=True."""
    from bgplugin.flows import build_flow
    from bgplugin.flows import compiled as compiled_module
    from bgplugin.protocols.steps import _sample_chunk
    from bgplugin.systems import get_system

    torch.manual_seed(0)
    flow = build_flow(get_system("dw4"), "egnn", hidden=8, n_layers=2, steps=4, device="cpu", compiled=True)
    flow.save(tmp_path / "flow.pt")

    def refuse(*args, **kwargs):
        raise AssertionError("the compiled divergence was called although sample.compiled is false")

    monkeypatch.setattr(compiled_module, "_FIELD", refuse)
    _sample_chunk(str(tmp_path / "flow.pt"), "cpu", 7, 4, str(tmp_path / "eager.npz"), {}, False)
    with np.load(tmp_path / "eager.npz") as eager:
        assert eager["x"].shape == (4, 4, 2) and np.isfinite(eager["log_q"]).all()
    with pytest.raises(AssertionError, match="compiled divergence was called"):
        _sample_chunk(str(tmp_path / "flow.pt"), "cpu", 7, 4, str(tmp_path / "fast.npz"), {}, True)


def test_quickstart_end_to_end_and_resume(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"
    first = run_protocol(tiny_quickstart(), out, device="cpu", stop_after="simulate", progress=False)
    assert list(first["steps"]) == ["simulate"]
    data_file = out / "simulate" / "data.h5"
    stamp = data_file.stat().st_mtime_ns
    simulate_seconds = first["wall_seconds"]["simulate"]

    results = run_protocol(tiny_quickstart(), out, device="cpu", progress=False)
    assert data_file.stat().st_mtime_ns == stamp, "the finished simulate step was redone"
    assert results["wall_seconds"]["simulate"] == simulate_seconds
    assert list(results["steps"]) == ["simulate", "train", "sample", "reweight", "profile", "report"]
    on_disk = json.loads((out / "results.json").read_text())
    for key in ("ess", "forward_ess", "delta_f", "delta_f_error", "reference_delta_f", "reference_delta_f_error",
                "profile_rmse", "n_samples", "wall_seconds", "device"):  # fmt: skip
        assert key in on_disk, key
    assert on_disk["n_samples"] == 24
    assert 0.0 <= on_disk["ess"] <= 1.0
    assert on_disk["reference_delta_f"] == pytest.approx(3.934, abs=1e-3)
    assert set(on_disk["wall_seconds"]) >= {"simulate", "train", "sample", "reweight", "profile", "report", "total"}
    for plot in ("profile", "ramachandran", "energies", "weights", "training_loss"):
        assert (out / "plots" / f"{plot}.png").is_file(), plot
    assert (out / "report.md").is_file() and (out / "protocol.yaml").is_file()
    with np.load(out / "reweight" / "reweighted.npz") as saved:
        assert np.isfinite(saved["log_q"]).all()
        log_w = saved["log_w"]
    # KL(p||q) on the training frames: the mirrored proposal's density log[q(x) + q(Mx)] on the data, log Z from
    # the samples' weights (quickstart: chirality mirror, an E(n) flow, so q(Mx) = q(x))
    fit = results["steps"]["reweight"]["target_likelihood"]
    with np.load(out / "reweight" / "data_energies.npz") as frames:
        u_data, lq_data, data_lw = frames["u"], frames["log_q"], frames["log_w"]
    from bgplugin.flows import load_flow
    from bgplugin.reweighting import target_likelihood

    flow = load_flow(out / "train" / "flow.pt", device="cpu", compiled=False)
    with np.load(out / "reweight" / "data_energies.npz") as frames:
        positions = frames["positions"]
    with torch.no_grad():
        raw = flow.log_prob(torch.as_tensor(positions - positions.mean(1, keepdims=True), dtype=torch.float32))
    np.testing.assert_allclose(lq_data, raw.double().numpy() + np.log(2.0), rtol=1e-5, atol=1e-4)
    expected = target_likelihood(log_w, u_data, lq_data, data_lw)
    assert fit["kl"] == pytest.approx(expected.kl) and fit["n_data"] == 8 and fit["n_samples"] == 24
    assert on_disk["target_kl"] == pytest.approx(fit["kl"]) and "KL(p‖q) on training frames" in (
        out / "report.md").read_text()  # fmt: skip

    again = run_protocol(tiny_quickstart(), out, device="cpu", progress=False)  # everything finished: nothing reruns
    assert again["wall_seconds"] == results["wall_seconds"]

    # too few effective samples: neither dF nor the profile RMSE is reported (the numbers are kept aside), and the
    # profile plot leaves the reweighted curve out; umbrella frames as the "samples" (on a copy of the run) give a
    # profile that overlaps the reference: with even weights both are reported, with one dominant weight neither
    import bgplugin.simulation
    from bgplugin.data import Dataset
    from bgplugin.protocols.runner import write_report
    from bgplugin.protocols.steps import run_profile

    drawn = []
    plot_profile = bgplugin.simulation.plot_profile

    def recording(profiles, path, **options):
        drawn.append((options["labels"], options["title"]))
        return plot_profile(profiles, path, **options)

    monkeypatch.setattr(bgplugin.simulation, "plot_profile", recording)
    frames = Dataset.load(out / "simulate" / "data.h5").positions
    proto = load_protocol(tiny_quickstart())
    for name, log_w in (("even", np.zeros(len(frames))), ("one", np.r_[0.0, np.full(len(frames) - 1, -30.0)])):
        copy = tmp_path / name
        shutil.copytree(out, copy)
        np.savez(copy / "reweight" / "reweighted.npz", x=frames, u=np.zeros(len(frames)), log_w=log_w,
                 log_q=np.zeros(len(frames)))  # fmt: skip
        run = RunDirectory(copy, proto)
        summary = run_profile(proto, run, False)
        run.mark_finished("profile", summary, 1.0)
        write_report(proto, run, "cpu")
        report = (copy / "report.md").read_text()
        rmse = summary["profile_comparison"]["rmse"]
        assert rmse > 0
        labels, title = drawn.pop()
        if name == "even":
            assert labels == ["flow (raw)", "flow, reweighted", "reference (bundled)"] and "\n" not in title
            assert summary["n_effective"] == pytest.approx(len(frames))
            assert summary["profile_rmse"] == rmse and summary["delta_f"] is not None
            assert "profile_comparison_failure" not in summary and "profile comparison failure" not in report
        else:
            assert summary["n_effective"] < 1.001 and summary["profile_rmse"] is None and summary["delta_f"] is None
            assert summary["profile_comparison_failure"] == (
                "RMSE not reported: the weights leave 1.0 effective samples (< profile.min_effective_samples = 20); "
                f"the raw RMSE {rmse:.2f} kT is kept in profile_comparison"
            )
            assert "| profile RMSE (F < 6.0 kT) | n/a kT |" in report
            assert "| profile comparison failure | RMSE not reported" in report
            assert labels == ["flow (raw)", "reference (bundled)"]
            assert title.endswith("reweighted profile not drawn: 1.0 effective samples (< 20)")


def test_eacf_protocol_trains_samples_with_joint_weights_and_profiles(tmp_path: Path) -> None:
    data = tiny_quickstart()
    data["train"].update(objective="nll", ema_decay=None, schedule_clock="time")
    data["train"]["model"] = {"kind": "eacf", "hidden": 8, "n_layers": 1, "n_blocks": 1, "projection": "spherical",
                              "prior_std": 0.16, "aug_scale": 0.05, "n_bins": 4, "n_marginal": 4,
                              "distinguishable": "all", "prior": "data", "n_transforms": 2}  # fmt: skip
    data["reweight"].update(chirality="filter")
    out = tmp_path / "run"
    results = run_protocol(data, out, device="cpu", progress=False)
    assert list(results["steps"]) == ["simulate", "train", "sample", "reweight", "profile", "report"]
    train = results["steps"]["train"]
    assert train["grad_guard"] is True and train["schedule_clock"] == "time"  # guard: the default for E-ACFs
    assert train["steps"] == 15  # max_steps caps a time-clock run
    from bgplugin.flows import load_flow
    from bgplugin.flows.eacf import EACF

    flow = load_flow(out / "train" / "flow.pt", device="cpu")
    assert isinstance(flow, EACF) and flow.n_blocks == 1 and flow.aug_scale == 0.05 and flow.n_transforms == 2
    # prior: data -> the correlated base fitted to the training frames (all of them: no max_frames here)
    from bgplugin.data import Dataset
    from bgplugin.flows import CorrelatedMeanFreeGaussian, fit_particle_covariance

    assert isinstance(flow.prior, CorrelatedMeanFreeGaussian) and flow.prior_std == 0.16
    frames = Dataset.load(out / "simulate" / "data.h5").positions
    np.testing.assert_allclose(flow.prior.covariance, fit_particle_covariance(frames), rtol=1e-6, atol=1e-9)
    assert results["steps"]["sample"]["log_q"].startswith("joint")
    with np.load(out / "sample" / "samples.npz") as saved:
        x, log_q = saved["x"], saved["log_q"]
    # the stored values are the joint log-ratios of the first chunk's seeded draw
    generator = torch.Generator().manual_seed(data["seed"] * 1_000_003)
    with torch.no_grad():
        x0, a0, lq0 = flow.sample_joint(8, generator=generator)
        expected = (lq0 - flow.log_prob_aug(a0, x0)).double().numpy()
    np.testing.assert_allclose(x[:8], x0.numpy(), atol=1e-6)
    np.testing.assert_allclose(log_q[:8], expected, rtol=1e-6, atol=1e-5)
    assert 0.0 <= results["ess"] <= 1.0 and results["n_samples"] == 24


def test_eacf_protocol_trains_the_marginal_bound_with_aug_draws(tmp_path: Path) -> None:
    """train.aug_draws: K > 1 trains MarginalMaximumLikelihood (its metric in loss.csv), 1 the joint likelihood."""
    import csv

    for draws, metric in ((3, "marginal_nll_bound"), (1, "joint_nll")):
        data = tiny_quickstart()
        data["train"].update(objective="nll", ema_decay=None, max_steps=3, aug_draws=draws)
        data["train"]["model"] = {"kind": "eacf", "hidden": 8, "n_layers": 1, "n_blocks": 1, "n_bins": 4,
                                  "prior_std": 0.16, "aug_scale": 0.05, "distinguishable": "all"}  # fmt: skip
        data["reweight"].update(chirality="filter")
        out = tmp_path / f"run{draws}"
        results = run_protocol(data, out, device="cpu", progress=False, stop_after="train")
        assert results["steps"]["train"]["steps"] == 3
        rows = list(csv.DictReader((out / "train" / "loss.csv").open()))
        assert len(rows) == 3 and all(math.isfinite(float(r[metric])) for r in rows), rows[0].keys()


@pytest.mark.parametrize("kind", ["eacf", "cnf"])
def test_kl_weight_mixes_the_force_field_into_training(tmp_path: Path, kind: str) -> None:
    """train.kl_weight: ML alone before kl_start, then a linear ramp of the KL weight; the KL energies are OpenMM's."""
    data = tiny_quickstart()
    data["train"].update(objective="nll", ema_decay=None, max_steps=10, kl_weight=0.5, kl_start=0.2, kl_ramp=0.4,
                         kl_samples=4, energy_cutoff=1.0e4)  # fmt: skip
    if kind == "eacf":
        data["train"]["model"] = {"kind": "eacf", "hidden": 8, "n_layers": 1, "n_blocks": 1, "n_bins": 4,
                                  "prior_std": 0.16, "aug_scale": 0.05, "distinguishable": "all"}  # fmt: skip
        data["reweight"].update(chirality="filter")
    out = tmp_path / "run"
    results = run_protocol(data, out, device="cpu", progress=False, stop_after="train")
    train = results["steps"]["train"]
    assert train["steps"] == 10
    assert train["kl"] == {"weight": 0.5, "ramp_start": 2, "ramp_steps": 4, "samples": 4, "energy_cutoff": 1.0e4}
    import csv

    rows = list(csv.DictReader((out / "train" / "loss.csv").open()))
    lam = [float(r["lambda"]) for r in rows]
    assert lam == pytest.approx([0.0, 0.0, 0.0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5, 0.5])  # steps 1..10
    kl = [float(r["kl"]) for r in rows]
    assert all(math.isnan(v) for v in kl[:3]) and all(math.isfinite(v) for v in kl[3:])
    energies = [float(r["energy"]) for r in rows[3:]]
    assert all(math.isfinite(u) and u > -100.0 for u in energies)  # reduced force-field energies of 4 samples


def test_training_energy_is_the_force_field_called_directly() -> None:
    """The KL term's energy: the system's OpenMM force field in the training process, in kT."""
    import openmm
    from openmm import unit

    from bgplugin.energies import OpenMMEnergy
    from bgplugin.protocols.steps import _training_energy
    from bgplugin.systems import get_system

    system = get_system("alanine_dipeptide")
    energy = _training_energy(system)
    try:
        assert isinstance(energy, OpenMMEnergy)
        x = np.asarray(system.positions, dtype=np.float64)[None]
        u = energy(torch.as_tensor(x)).item()
    finally:
        energy.close()
    reference = openmm.Platform.getPlatformByName("Reference")
    context = openmm.Context(system.openmm_system, openmm.VerletIntegrator(0.001), reference)
    context.setPositions(x[0])
    potential = context.getState(getEnergy=True).getPotentialEnergy()
    kt = unit.MOLAR_GAS_CONSTANT_R * system.temperature * unit.kelvin
    assert u == pytest.approx(potential / kt, rel=1e-5, abs=1e-4)
    assert get_system("dw4").energy().__class__ is type(_training_energy(get_system("dw4")))


def test_mcmc_step_runs_flow_moves_with_langevin(tmp_path: Path) -> None:
    data = tiny_quickstart()
    for section in ("sample", "reweight", "profile", "report"):
        del data[section]
    data["mcmc"] = {"n_iterations": 3, "langevin_steps": 10, "n_proposals": 2, "platform": "Reference"}
    results = run_protocol(data, tmp_path / "run", device="cpu", progress=False)
    summary = results["steps"]["mcmc"]
    assert summary["n_iterations"] == 3
    assert summary["n_proposed"] == 6
    assert 0 <= summary["n_accepted"] <= summary["n_proposed"]
    assert json.loads((tmp_path / "run" / "mcmc" / "mcmc.json").read_text())["n_proposed"] == 6
