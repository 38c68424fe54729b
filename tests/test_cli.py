"""The command line: ``bgplugin info`` and ``bgplugin bench energies`` on small settings."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from bgplugin.benchmarks.energies import bench_energies, format_energies
from bgplugin.cli import main


def test_info_reports_every_system_with_a_live_energy(tmp_path) -> None:
    out = tmp_path / "info.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bgplugin.cli", "info", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "OpenMM platforms:" in proc.stdout and "xTB backends:" in proc.stdout
    info = json.loads(out.read_text())
    assert {"dw4", "lj13", "lj55", "alanine_dipeptide", "alanine_dipeptide_vacuum"} <= set(info["systems"])
    ala = info["systems"]["alanine_dipeptide"]
    assert np.isfinite(ala["u_openmm_kT"]) and np.isfinite(ala["u_xtb_kT"])
    assert "CPU" in info["openmm_platforms"]
    assert info["xtb_backends"]["xtb"] and info["xtb_backends"]["tblite"]


def test_info_without_an_xtb_backend_reports_it_instead_of_failing(monkeypatch) -> None:
    """Seen on a machine without xtb-python and tblite: `bgplugin info` stopped with an ImportError."""
    from bgplugin import info as info_module
    from bgplugin.energies import XTBEnergy

    missing = {"xtb": None, "tblite": None}
    monkeypatch.setattr(info_module, "available_backends", lambda: missing)
    monkeypatch.setattr(info_module, "list_systems", lambda: ["alanine_dipeptide_vacuum", "dw4"])
    info = info_module.collect_info(evaluate=True)
    ala = info["systems"]["alanine_dipeptide_vacuum"]
    assert np.isfinite(ala["u_openmm_kT"]) and ala["u_xtb_kT"] is None and "pip install xtb" in ala["u_xtb_missing"]
    assert np.isfinite(info["systems"]["dw4"]["u_torch_kT"])
    assert "u[xtb] not evaluated: no xTB backend installed" in info_module.format_info(info)
    assert info_module.finite_energies(info)
    monkeypatch.setattr("bgplugin.energies.xtb_energy.available_backends", lambda: missing)
    with pytest.raises(ImportError, match="pip install tblite .no other xTB backend is installed either"):
        XTBEnergy([1, 1], backend="tblite")


def test_bench_energies_small(tmp_path) -> None:
    result = bench_energies(n_frames=40, n_xtb_frames=4, workers=(1,), repeats=1, backends=("tblite",))
    for key in ("openmm", "xtb_tblite"):
        section = result[key]
        assert section["raw"] > 0 and section["workers_1"] > 0
        assert section["per_worker_1"] == section["workers_1"] / section["raw"]
    assert "frames/s" in format_energies(result)
    assert result["machine"]["cpu_count"] >= 1 and result["wall_seconds"] > 0


def test_bad_arguments_exit_with_a_message(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["bench", "energies", "--frames", "0"])
    assert info.value.code == 2
    assert "must be a positive integer, got 0" in capsys.readouterr().err


def test_bench_divergence_small(monkeypatch) -> None:
    from bgplugin.benchmarks import divergence

    monkeypatch.setitem(
        divergence.MODELS, "dw4", {"n_layers": 2, "hidden": 16, "n_samples": 16, "batch_size": 16, "scale": 0.5}
    )
    result = divergence.bench_divergence(("dw4",))
    r = result["dw4"]
    assert r["samples_per_s_fast"] > 0 and r["samples_per_s_loop"] > 0
    assert r["speedup"] == pytest.approx(r["samples_per_s_fast"] / r["samples_per_s_loop"])
    assert r["logq_max_abs_difference_fast_vs_loop"] < 1e-3  # same model, same steps: same log q
    assert r["compiled"] and r["logq_max_abs_difference_compiled_vs_eager"] < 1e-3  # compiled by default
    table = divergence.format_divergence(result)
    assert "ratio" in table and "compile s" in table


def test_run_refuses_an_unknown_protocol_with_the_bundled_names(capsys) -> None:
    assert main(["run", "no_such_protocol"]) == 2  # one line naming the value and the bundled names, no traceback
    err = capsys.readouterr().err
    assert err.startswith("bgplugin run: error: protocol file 'no_such_protocol' does not exist")
    assert "quickstart" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="quickstart"):  # --verbose: the exception itself
        main(["--verbose", "run", "no_such_protocol"])


def test_bad_values_are_one_line_errors_before_any_work(capsys, tmp_path) -> None:
    assert main(["bench", "eacf", "--minutes", "-1", "--out-dir", str(tmp_path / "run")]) == 2
    assert "bgplugin bench eacf: error: minutes must be a finite number > 0, got -1.0" in capsys.readouterr().err
    assert main(["bench", "eacf", "--eval-test", "0", "--out-dir", str(tmp_path / "run")]) == 2
    assert "n_eval_test must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_error_after_a_minute_of_work_keeps_its_traceback(capsys, monkeypatch) -> None:
    import bgplugin.cli as cli

    def late_failure(args):
        raise ValueError("a bug found late")

    monkeypatch.setattr(cli, "_info", late_failure)  # build_parser() binds `bgplugin info` to it
    assert main(["info"]) == 2
    assert "Traceback" not in capsys.readouterr().err  # at once: bad input, one line
    monkeypatch.setattr(cli, "BAD_INPUT_SECONDS", -1.0)  # as if it had run for a while
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "late_failure" in err and "bgplugin info: error: a bug found late" in err


def test_run_twice_resumes_without_redoing_steps(tmp_path, capsys) -> None:
    """`bgplugin run FILE` twice: the second run finds the simulate step finished and does not redo it."""
    import yaml
    from test_protocols import tiny_quickstart

    protocol = tmp_path / "tiny.yaml"
    data = tiny_quickstart()
    for section in ("train", "sample", "reweight", "profile", "report"):
        del data[section]
    protocol.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    assert main(["run", str(protocol), "--out", str(out), "--no-progress"]) == 0
    state = json.loads((out / "state.json").read_text())
    assert state["steps"]["simulate"]["finished"]
    stamp = (out / "simulate" / "data.h5").stat().st_mtime_ns
    assert main(["run", str(protocol), "--out", str(out), "--no-progress"]) == 0
    assert (out / "simulate" / "data.h5").stat().st_mtime_ns == stamp
    assert "results:" in capsys.readouterr().out


def test_bench_mcmc_without_a_flow_says_how_to_make_one(capsys) -> None:
    assert main(["bench", "mcmc"]) == 2
    assert "--flow" in capsys.readouterr().err


def test_bench_particles_model_eacf_routes_to_the_eacf_benchmark(monkeypatch, tmp_path, capsys) -> None:
    import bgplugin.benchmarks.eacf as eacf_bench

    seen = {}

    def fake_bench(options):  # the routing is under test here; bench_eacf itself runs in tests/test_eacf.py
        seen.update(vars(options))
        raise SystemExit(0)

    monkeypatch.setattr(eacf_bench, "bench_eacf_from_args", fake_bench)
    with pytest.raises(SystemExit):
        main(["bench", "lj13", "--model", "eacf", "--objective", "fab", "--minutes", "3", "--seed", "4"])
    assert seen["system"] == "lj13" and seen["objective"] == "fab" and seen["minutes"] == 3.0 and seen["seed"] == 4
    assert seen["out_dir"] == "runs/bench_eacf_lj13_fab" and seen["projection"] == "spherical"
    assert seen["no_compile"] is False
    assert seen["hidden"] is None and seen["layers"] is None and seen["batch_size"] is None  # system defaults
    assert seen["eval_test"] is None and seen["prior_std"] is None and seen["device"] == "auto"
    with pytest.raises(SystemExit):
        main(["bench", "dw4", "--model", "eacf", "--no-compile", "--hidden", "16", "--layers", "2",
              "--batch-size", "8", "--eval-test", "300"])  # fmt: skip
    assert seen["no_compile"] is True
    assert (seen["hidden"], seen["layers"], seen["batch_size"], seen["eval_test"]) == (16, 2, 8, 300)
    with pytest.raises(SystemExit):
        main(["bench", "dw4", "--model", "eacf", "--prior-std", "1.5", "--device", "cuda"])
    assert seen["prior_std"] == 1.5 and seen["device"] == "cuda"  # bench eacf trains on a GPU too (stop 24)
    with pytest.raises(SystemExit, match="flow matching, which trains CNFs"):
        main(["bench", "dw4", "--model", "eacf", "--objective", "eqot"])
    with pytest.raises(SystemExit, match="add --model eacf"):
        main(["bench", "dw4", "--objective", "fab"])
    with pytest.raises(SystemExit, match="covers dw4 and lj13; for lj55 use the CNF"):
        main(["bench", "lj55", "--model", "eacf"])


def test_bench_particles_passes_the_model_size_to_the_cnf_benchmark(monkeypatch) -> None:
    import bgplugin.benchmarks.particles as particles_bench

    seen = {}

    def fake_bench(*args, **kwargs):  # the routing is under test; bench_particles runs in test_bench_particles.py
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(particles_bench, "bench_particles", fake_bench)
    with pytest.raises(SystemExit):
        main(["bench", "dw4", "--objective", "ot", "--hidden", "64", "--layers", "4", "--batch-size", "512"])
    assert (seen["hidden"], seen["n_layers"], seen["batch_size"]) == (64, 4, 512)
    assert seen["n_eval_test"] is None  # the system default (DW4: the whole test split)
    with pytest.raises(SystemExit):
        main(["bench", "dw4", "--objective", "ot", "--eval-test", "2000"])
    assert seen["n_eval_test"] == 2000 and seen["prior_std"] == 1.0  # the published prior by default
    with pytest.raises(SystemExit):
        main(["bench", "dw4", "--objective", "cfm", "--prior-std", "2.1"])
    assert seen["prior_std"] == 2.1
    with pytest.raises(SystemExit):
        main(["bench", "dw4", "--prior-std", "0"])  # argparse refuses it
    with pytest.raises(SystemExit):
        main(["bench", "dw4", "--hidden", "0"])  # argparse refuses it


def test_run_help_names_every_bundled_protocol() -> None:
    """The help listed five of the six bundled protocols (ala2_eacf was missing) until stop 25."""
    from bgplugin.cli import build_parser
    from bgplugin.protocols.config import bundled_protocols

    run_parser = build_parser()._subparsers._group_actions[0].choices["run"]
    help_text = " ".join(run_parser.format_help().split())
    missing = [name for name in bundled_protocols() if name not in help_text]
    assert not missing, f"`bgplugin run --help` does not name {missing}"
