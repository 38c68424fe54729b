"""Run a protocol step by step in a run directory, resuming where an earlier run stopped."""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bgplugin.protocols.config import Protocol, load_protocol
from bgplugin.protocols.run_dir import RunDirectory
from bgplugin.protocols.steps import (
    DATA_ENERGIES_FILE,
    make_system,
    run_mcmc_step,
    run_profile,
    run_reweight,
    run_sample,
    run_simulate,
    run_train,
    too_few_effective_samples,
)

__all__ = ["results_of", "run_protocol"]

logger = logging.getLogger(__name__)


def run_protocol(
    protocol: Protocol | str | Path | Mapping[str, Any],
    out_dir: str | Path | None = None,
    *,
    device: Literal["auto", "cpu", "cuda"] | None = None,
    overwrite: bool = False,
    stop_after: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every step of a protocol, skipping the steps an earlier run in ``out_dir`` finished.

    Parameters
    ----------
    protocol : Protocol, path, bundled name or mapping
        What to run (see :func:`bgplugin.protocols.load_protocol`).
    out_dir : path or None
        The run directory; default ``runs/<protocol name>`` in the working directory.
    device : {"auto", "cpu", "cuda"} or None
        Overrides the protocol's ``device`` (where the flow trains and samples).
    overwrite : bool
        Start over in a folder that holds a run of another protocol (or of this one).
    stop_after : str or None
        Stop after this step (e.g. to inspect the data before training).
    progress : bool
        Show progress bars.

    Returns
    -------
    dict
        The contents of ``results.json``.
    """
    proto = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
    if stop_after is not None and stop_after not in proto.steps:
        raise ValueError(f"stop_after must be one of this protocol's steps {proto.steps}, got {stop_after!r}")
    out = Path(out_dir) if out_dir is not None else Path("runs") / proto.name
    if overwrite and out.exists():
        for step in ("simulate", "train", "sample", "reweight", "profile", "mcmc", "plots"):
            shutil.rmtree(out / step, ignore_errors=True)
    run = RunDirectory(out, proto, overwrite=overwrite)
    chosen = device or proto.device
    from bgplugin.flows import resolve_device

    device_str = str(resolve_device(chosen))
    handler = run.attach_log()
    total_start = time.perf_counter()
    try:
        logger.info("protocol %s -> %s (device %s); steps %s", proto.name, out, device_str, proto.steps)
        for step in proto.steps:
            if run.finished(step):
                logger.info("step %s: finished in an earlier run, skipped", step)
            else:
                logger.info("step %s: running", step)
                start = time.perf_counter()
                try:
                    summary = _run_step(step, proto, run, progress, device_str)
                except BaseException:
                    run.add_partial_time(step, time.perf_counter() - start)
                    raise
                seconds = time.perf_counter() - start
                run.mark_finished(step, summary, seconds)
                logger.info("step %s: done in %.1f s", step, seconds)
            results = results_of(run, device_str)
            run.write_results(results)
            if step == stop_after:
                logger.info("stopping after %s as asked; rerun the same command to continue", step)
                break
    finally:
        logging.getLogger("bgplugin").removeHandler(handler)
        handler.close()
    logger.info("protocol %s: this session took %.1f s", proto.name, time.perf_counter() - total_start)
    return results_of(run, device_str)


def _run_step(step: str, proto: Protocol, run: RunDirectory, progress: bool, device: str) -> dict[str, Any]:
    if step == "simulate":
        return run_simulate(proto, run, progress)
    if step == "train":
        return run_train(proto, run, progress, device)
    if step == "sample":
        return run_sample(proto, run, progress, device)
    if step == "reweight":
        return run_reweight(proto, run, progress, device)
    if step == "profile":
        return run_profile(proto, run, progress)
    if step == "mcmc":
        return run_mcmc_step(proto, run, progress, device)
    if step == "report":
        return write_report(proto, run, device)
    raise ValueError(f"unknown step {step!r}")


def results_of(run: RunDirectory, device: str) -> dict[str, Any]:
    """Every number of the run so far, with the headline keys at the top level."""
    rw, prof = run.summary("reweight"), run.summary("profile")
    fit = rw.get("target_likelihood") or {}
    wall = run.wall_seconds()
    results: dict[str, Any] = {
        "protocol": run.protocol.name,
        "system": run.protocol.system,
        "ess": rw.get("ess"),
        "forward_ess": rw.get("forward_ess"),
        "target_kl": fit.get("kl"),
        "target_kl_stderr": fit.get("kl_stderr"),
        "delta_f": prof.get("delta_f"),
        "delta_f_error": prof.get("delta_f_error"),
        "reference_delta_f": prof.get("reference_delta_f"),
        "reference_delta_f_error": prof.get("reference_delta_f_error"),
        "profile_rmse": prof.get("profile_rmse"),
        "simulation_delta_f": _simulation_delta_f(run),
        "n_samples": run.summary("sample").get("n_samples"),
        "wall_seconds": {**wall, "total": float(sum(wall.values()))},
        "device": device,
        "steps": {step: run.summary(step) for step in run.protocol.steps if run.finished(step)},
    }
    from bgplugin.benchmarks.common import machine_record

    results["machine"] = machine_record()
    return results


def _simulation_delta_f(run: RunDirectory) -> dict[str, Any] | None:
    """dF of this run's own umbrella stage (MBAR profile, bootstrap error), if it ran one."""
    for stage in run.summary("simulate").get("stages", []):
        if stage.get("engine") == "umbrella" and "delta_f" in stage:
            d = stage["delta_f"]
            return {"delta_f": d["delta_f_kT"], "delta_f_error": d["error_kT"],
                    "method": "umbrella sampling (this run)"}  # fmt: skip
    return None


# ----------------------------------------------------------------------- report
def write_report(proto: Protocol, run: RunDirectory, device: str) -> dict[str, Any]:
    """Plots (profile, Ramachandran, energies, weights, loss) and ``report.md``."""
    plots: dict[str, str] = {}
    cfg = proto.report
    if cfg is not None and cfg.plots:
        plots = _plots(proto, run)
    results = results_of(run, device)
    text = _report_text(proto, results, plots, "" if cfg is None else cfg.full_run_note)
    from bgplugin.fileio import atomic_write_text

    atomic_write_text(run.path / "report.md", text)
    return {"plots": plots, "report": str(run.path / "report.md")}


def _plots(proto: Protocol, run: RunDirectory) -> dict[str, str]:
    from bgplugin.analysis import (
        plot_energy_histograms,
        plot_ramachandran,
        plot_weight_distribution,
    )
    from bgplugin.data import Dataset
    from bgplugin.reweighting import normalized_weights
    from bgplugin.simulation import FreeEnergyProfile, plot_profile

    out = run.plots_dir
    plots: dict[str, str] = {}
    system = make_system(proto)
    loss = run.step_dir("train") / "loss.png"
    if loss.is_file():
        shutil.copyfile(loss, out / "training_loss.png")
        plots["training_loss"] = str(out / "training_loss.png")
    reweighted = run.step_dir("reweight") / "reweighted.npz"
    if not reweighted.is_file():
        return plots
    with np.load(reweighted) as saved:
        x, u, log_w = saved["x"], saved["u"], saved["log_w"]
    w = normalized_weights(log_w) if np.isfinite(log_w).any() else np.zeros_like(log_w)
    plots["weights"] = str(plot_weight_distribution(log_w, out / "weights.png"))
    energies: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    data_file = run.step_dir("reweight") / DATA_ENERGIES_FILE
    if data_file.is_file():
        with np.load(data_file) as d:
            lw = d["log_w"]
            energies["data"] = (d["u"], normalized_weights(lw) if np.any(lw != 0) else None)
    energies["flow"] = (u, None)
    energies["flow, reweighted"] = (u, w)
    plots["energies"] = str(plot_energy_histograms(out / "energies.png", energies))
    prof = run.step_dir("profile")
    if (prof / "profile_reweighted.json").is_file():
        profiles = [FreeEnergyProfile.load(prof / "profile_flow.json"), FreeEnergyProfile.load(prof /
                    "profile_reweighted.json")]  # fmt: skip
        labels = ["flow (raw)", "flow, reweighted"]
        title = f"{proto.system}: F({profiles[0].cv_name})"
        n_effective = run.summary("profile").get("n_effective")
        minimum = proto.profile.min_effective_samples if proto.profile else 0.0
        if n_effective is not None and too_few_effective_samples(n_effective, minimum):
            # its bins scatter by hundreds of kT and would hide the other curves; the report says why
            del profiles[1], labels[1]
            title += f"\nreweighted profile not drawn: {n_effective:.1f} effective samples (< {minimum:g})"
        if (prof / "profile_reference.json").is_file():
            profiles.append(FreeEnergyProfile.load(prof / "profile_reference.json"))
            labels.append(f"reference ({proto.profile.reference if proto.profile else ''})")
        plots["profile"] = str(plot_profile(profiles, out / "profile.png", labels=labels, units="kT", title=title))
    if {"phi", "psi"} <= set(getattr(system, "cvs", {})):
        phi, psi = system.cvs["phi"], system.cvs["psi"]
        panels = []
        data = (
            Dataset.load(run.step_dir("simulate") / "data.h5")
            if (run.step_dir("simulate") / "data.h5").is_file()
            else None
        )
        if data is not None:
            pick = np.random.default_rng(0).choice(len(data), min(len(data), 20_000), replace=False)
            sub = data[np.sort(pick)]
            # The frames as simulated (umbrella or biased sets are not Boltzmann-distributed).
            panels.append(
                ("training data (as sampled)", np.asarray(phi(sub.positions)), np.asarray(psi(sub.positions)), None)
            )
        panels.append(("flow", np.asarray(phi(x)), np.asarray(psi(x)), None))
        panels.append(("flow, reweighted", np.asarray(phi(x)), np.asarray(psi(x)), w))
        plots["ramachandran"] = str(plot_ramachandran(panels, out / "ramachandran.png"))
    return plots


def _fmt(value: Any, error: Any = None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    text = f"{value:.{digits}f}"
    if error is not None:
        text += f" ± {error:.{digits}f}"
    return text


def _report_text(proto: Protocol, results: dict[str, Any], plots: dict[str, str], note: str) -> str:
    steps = results["steps"]
    lines = [f"# {proto.name}: {proto.system}", "", proto.description.strip(), ""]
    lines += ["| quantity | value |", "|---|---|"]
    ess = results.get("ess")
    fwd = results.get("forward_ess")
    lines.append(f"| reverse ESS | {_fmt(None if ess is None else 100 * ess, digits=2)} % |")
    lines.append(f"| forward ESS | {_fmt(None if fwd is None else 100 * fwd, digits=2)} % |")
    fit = steps.get("reweight", {}).get("target_likelihood")
    if fit:
        lines.append(f"| KL(p‖q) on training frames (flow NLL − exact target NLL; log Z from the samples, "
                     f"their ESS {100 * fit['ess']:.2f} %) | {_fmt(fit['kl'], fit['kl_stderr'])} nats"
                     + (" (conservative: ESS < 5 %)" if fit["ess"] < 0.05 else "") + " |")  # fmt: skip
    lines.append(f"| ΔF (flow, reweighted) | {_fmt(results.get('delta_f'), results.get('delta_f_error'))} kT |")
    sim = results.get("simulation_delta_f")
    if sim is not None:
        lines.append(f"| ΔF (this run's umbrella sampling, MBAR) | {_fmt(sim['delta_f'], sim['delta_f_error'])} kT |")
    lines.append(
        f"| ΔF (reference) | {_fmt(results.get('reference_delta_f'), results.get('reference_delta_f_error'))} kT |"
    )
    lines.append(f"| profile RMSE (F < {proto.profile.f_max if proto.profile else 6} kT) | "
                 f"{_fmt(results.get('profile_rmse'))} kT |")  # fmt: skip
    n_eff = steps.get("profile", {}).get("n_effective")
    lines.append(f"| samples | {results.get('n_samples')}"
                 + ("" if n_eff is None else f" ({n_eff:.1f} effective)") + " |")  # fmt: skip
    wall = results["wall_seconds"]
    lines.append(f"| wall time | {wall['total'] / 60:.1f} min ("
                 + ", ".join(f"{k} {v:.0f} s" for k, v in wall.items() if k != "total") + ") |")  # fmt: skip
    lines.append(f"| device | {results['device']} |")
    if "train" in steps:
        t = steps["train"]
        used = t.get("budget_used")
        lines.append(f"| training | {t.get('steps')} steps of {t.get('max_steps')}, {t.get('train_seconds', 0):.0f} s"
                     + ("" if used is None else f" ({100 * used:.0f} % of the budget)")
                     + f", stopped by {t.get('stopped_by')} |")  # fmt: skip
        if t.get("budget_note"):
            lines.append(f"| training budget | {t['budget_note']} |")
    if "reweight" in steps:
        r = steps["reweight"]
        for key in ("n_failed", "chirality"):
            if key in r:
                lines.append(f"| {key.replace('_', ' ')} | {r[key]} |")
    for key in ("delta_f_failure", "profile_comparison_failure"):
        if key in steps.get("profile", {}):
            lines.append(f"| {key.replace('_', ' ')} | {steps['profile'][key]} |")
    lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"- {k}: `{Path(v).name}`" for k, v in plots.items()] + [""]
    if note.strip():
        lines += ["## How far a full run goes", "", note.strip(), ""]
    return "\n".join(lines) + "\n"
