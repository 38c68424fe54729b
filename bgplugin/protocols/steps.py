"""The steps of a protocol. Each reads what earlier steps left in the run directory and returns a summary.

Every step can be interrupted and rerun: simulations resume from their
files, training from its checkpoint, sampling from its finished chunks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bgplugin.data import Dataset
from bgplugin.fileio import atomic_write, write_json
from bgplugin.flows import build_flow, fit_particle_covariance, load_flow, resolve_device
from bgplugin.protocols.config import (
    LoadConfig,
    MDConfig,
    ParallelTemperingConfig,
    Protocol,
    UmbrellaConfig,
    XTBRelaxConfig,
)
from bgplugin.protocols.run_dir import RunDirectory
from bgplugin.systems import get_system

__all__ = ["STEPS", "make_system", "run_mcmc_step", "run_profile", "run_reweight", "run_sample", "run_simulate",
           "run_train"]  # fmt: skip

logger = logging.getLogger(__name__)

DATA_FILE = "data.h5"
FLOW_FILE = "flow.pt"
SAMPLES_FILE = "samples.npz"
WEIGHTED_FILE = "weighted.h5"
DATA_ENERGIES_FILE = "data_energies.npz"


def make_system(protocol: Protocol) -> Any:
    """The protocol's system, with the atom types the model asks for (molecules only)."""
    model = protocol.train.model if protocol.train is not None else None
    system = get_system(protocol.system)
    if model is not None and model.distinguishable != "none" and getattr(system, "topology", None) is not None:
        system = system.with_distinguishable(model.distinguishable)
    return system


# --------------------------------------------------------------------- simulate
def run_simulate(protocol: Protocol, run: RunDirectory, progress: bool) -> dict[str, Any]:
    """Run the simulation stages in order; the last stage's frames become ``simulate/data.h5``."""
    system = make_system(protocol)
    folder = run.step_dir("simulate")
    dataset: Dataset | None = None
    stages: list[dict[str, Any]] = []
    for i, stage in enumerate(protocol.simulate):
        stage_dir = folder / f"stage{i}_{stage.engine}"
        stage_dir.mkdir(exist_ok=True)
        done = stage_dir / "frames.h5"
        start = time.perf_counter()
        info: dict[str, Any] = {"engine": stage.engine}
        if done.is_file():
            dataset = Dataset.load(done)
            info["resumed"] = True
        else:
            dataset, info = _run_stage(stage, system, dataset, stage_dir, protocol.seed + i, progress)
            dataset.save(done)
        info.update(n_frames=len(dataset), seconds=time.perf_counter() - start)
        stages.append(info)
        logger.info("simulate stage %d (%s): %d frames", i, stage.engine, len(dataset))
    if dataset is None:  # the config loader forbids an empty list when simulate runs
        raise RuntimeError("no simulation stage ran")
    dataset.save(folder / DATA_FILE)
    return {"stages": stages, "n_frames": len(dataset), "weighted": dataset.log_weights is not None,
            "data": str(folder / DATA_FILE)}  # fmt: skip


def _run_stage(
    stage: Any, system: Any, previous: Dataset | None, folder: Path, seed: int, progress: bool
) -> tuple[Dataset, dict[str, Any]]:
    from bgplugin.simulation import relax_with_xtb, run_md, run_parallel_tempering, run_umbrella

    if isinstance(stage, LoadConfig):
        return _load_frames(stage.path, system), {"engine": "load", "path": stage.path}
    if isinstance(stage, MDConfig):
        data = run_md(
            system, stage.n_frames, stage.stride, temperature=stage.temperature, timestep=stage.timestep_fs,
            friction=stage.friction_per_ps, seed=seed, platform=stage.platform,
            equilibration_steps=stage.equilibration_steps, output=folder / "md.h5", progress=progress,
        )  # fmt: skip
        return data, {"engine": "md"}
    if isinstance(stage, ParallelTemperingConfig):
        result = run_parallel_tempering(
            system, None, stage.n_iterations, stage.steps_per_iteration, storage=folder / "pt.nc",
            temperature_range=(stage.t_min, stage.t_max, stage.n_replicas), platform=stage.platform,
            progress=progress,
        )  # fmt: skip
        acceptance = (result.n_accepted.sum() / max(1, result.n_proposed.sum())).item()
        return result.datasets[0], {"engine": "parallel_tempering", "temperatures": result.temperatures.tolist(),
                                    "swap_acceptance": acceptance}  # fmt: skip
    if isinstance(stage, UmbrellaConfig):
        result = run_umbrella(
            system, stage.cv, k=stage.k, ns_per_window=stage.ns_per_window, n_windows=stage.n_windows,
            stride=stage.stride, equilibration_ps=stage.equilibration_ps, seed=seed, platform=stage.platform,
            n_workers=stage.n_workers, n_bootstraps=stage.n_bootstraps, output_dir=folder, progress=progress,
        )  # fmt: skip
        result.profile.save(folder / "umbrella_profile.json")
        from bgplugin.simulation import delta_f

        diff = delta_f(result.profile)
        return result.dataset, {"engine": "umbrella", "delta_f": diff.to_dict(),
                                "min_neighbour_overlap": float(np.min(result.neighbour_overlap)),
                                "profile": str(folder / "umbrella_profile.json")}  # fmt: skip
    if isinstance(stage, XTBRelaxConfig):
        if previous is None:
            raise RuntimeError("xtb_relax needs the frames of an earlier stage")
        frames = previous
        if stage.max_frames is not None and len(previous) > stage.max_frames:  # evenly spaced over all stages' frames
            frames = previous[np.unique(np.linspace(0, len(previous) - 1, stage.max_frames).round().astype(int))]
        result = relax_with_xtb(
            frames, stage.fs, stage.timestep_fs, stage.friction, stage.temperature, stage.backend,
            stage.n_workers, solvent=stage.solvent, seed=seed, progress=progress,
        )  # fmt: skip
        return result.dataset, {"engine": "xtb_relax", "kept": int(np.sum(result.kept)),
                                "failures": len(result.failures)}  # fmt: skip
    raise TypeError(f"unknown stage {stage!r}")


def _load_frames(path: str, system: Any) -> Dataset:
    if path.startswith("benchmark:"):
        from bgplugin.benchmarks.particles import DATA_FILES, data_dir, load_split

        split = path.removeprefix("benchmark:")
        x = load_split(system, split)  # type: ignore[arg-type]
        source = str(data_dir() / DATA_FILES[system.name][split])
        return Dataset(x, None, metadata={"system": system.name, "source": source, "split": split})
    if path.endswith(".npy"):
        return Dataset.from_npy(path, system.n_particles, system.dim)
    return Dataset.load(path)


def _training_dataset(protocol: Protocol, run: RunDirectory) -> Dataset:
    train = protocol.train
    if train is not None and train.dataset is not None:
        return Dataset.load(train.dataset)
    return Dataset.load(run.step_dir("simulate") / DATA_FILE)


# ------------------------------------------------------------------------ train
def run_train(protocol: Protocol, run: RunDirectory, progress: bool, device: str) -> dict[str, Any]:
    """Flow matching (or likelihood) training with checkpoints; writes the EMA flow to ``train/flow.pt``."""
    from bgplugin.simulation import bias_training_set
    from bgplugin.training import FlowMatching, MaximumLikelihood, TrainingData

    train = protocol.train
    if train is None:
        raise RuntimeError("the train step needs a train section")
    system = make_system(protocol)
    folder = run.step_dir("train")
    data = _training_dataset(protocol, run)
    if train.max_frames is not None and len(data) > train.max_frames:
        keep = np.random.default_rng(protocol.seed).choice(len(data), train.max_frames, replace=False)
        data = data[np.sort(keep)]
    weights = None
    if train.weights == "dataset":
        if data.log_weights is None:
            raise ValueError("train.weights is 'dataset' but the training frames carry no log-weights; use 'none'")
        weights = data.weights
    elif train.weights == "von_mises":
        data = bias_training_set(
            data, system.cvs[train.bias_cv], mu=train.bias_mu, kappa=train.bias_kappa, scale=train.bias_scale,
            seed=protocol.seed,
        )  # fmt: skip
    positions = data.positions - data.positions.mean(axis=1, keepdims=True)
    model = train.model
    prior_covariance = None
    if model.prior == "data":
        prior_covariance = fit_particle_covariance(
            positions, system.atom_types, weights=weights, floor=model.prior_floor
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(protocol.seed)
        if model.kind == "eacf":
            flow = build_flow(
                system, kind="eacf", prior_std=model.prior_std, prior_covariance=prior_covariance, device=device,
                hidden=model.hidden, n_layers=model.n_layers, projection=model.projection, n_blocks=model.n_blocks,
                n_transforms=model.n_transforms, n_aug=model.n_aug, aug_scale=model.aug_scale, n_bins=model.n_bins,
                n_marginal=model.n_marginal, compiled=model.compiled,
            )  # fmt: skip
        else:
            flow = build_flow(
                system, model.field, prior_std=model.prior_std, prior_covariance=prior_covariance,
                steps=model.solver_steps, compiled=model.compiled, device=device,
                **({"hidden": model.hidden, "n_layers": model.n_layers, "symmetry": model.symmetry,
                    "length_scale": model.length_scale} if model.field == "egnn" else {}),
            )  # fmt: skip
    if model.kind == "eacf":
        from bgplugin.flows.eacf.training import JointMaximumLikelihood, MarginalMaximumLikelihood

        objective: Any = JointMaximumLikelihood(flow) if train.aug_draws == 1 else MarginalMaximumLikelihood(
            flow, n_draws=train.aug_draws
        )
    elif train.objective == "nll":
        objective = MaximumLikelihood(divergence="hutchinson")
    else:
        objective = FlowMatching(
            flow.prior, sigma=train.sigma, pairing={"eqot": "eqot", "ot": "ot", "cfm": "none"}[train.objective],
            atom_types=system.atom_types, allow_reflections=model.symmetry == "E(n)",
        )  # fmt: skip
    energy = _training_energy(system) if train.kl_weight > 0 else None
    with contextlib.closing(energy) if hasattr(energy, "close") else contextlib.nullcontext():
        return _fit(protocol, flow, objective, energy, TrainingData(positions, weights), folder, progress)


def _training_energy(system: Any) -> Any:
    """The target energy of the KL term: the system's force field in this process (OpenMM CPU, one thread)."""
    if getattr(system, "openmm_system", None) is None:
        return system.energy()
    from bgplugin.energies.openmm_energy import available_platforms

    return system.energy(platform="CPU" if "CPU" in available_platforms() else "Reference", n_workers=0)


def _mixed_objective(protocol: Protocol, flow: Any, energy: Any, schedule: Any) -> Any:
    """(1 - lambda) maximum likelihood + lambda reverse KL: the joint one for an E-ACF, :class:`MLKL` for a CNF."""
    train = protocol.train
    assert train is not None
    if train.model.kind == "eacf":
        from bgplugin.flows.eacf.training import JointMLKL

        return JointMLKL(flow, energy, train.kl_samples, schedule, energy_cutoff=train.energy_cutoff)
    from bgplugin.training import MLKL

    return MLKL(energy, train.kl_samples, schedule, divergence="hutchinson", energy_cutoff=train.energy_cutoff)


def _fit(
    protocol: Protocol, flow: Any, objective: Any, energy: Any, training_data: Any, folder: Path, progress: bool
) -> dict[str, Any]:
    from bgplugin.training import LambdaSchedule, Trainer, TrainerConfig, probe_max_steps

    train = protocol.train
    assert train is not None
    model = train.model
    max_steps = train.max_steps
    settings_file = folder / "settings.json"
    if max_steps is None:
        if settings_file.is_file():
            import json

            max_steps = int(json.loads(settings_file.read_text())["max_steps"])
        else:
            # 15 % margin: the probe runs on a quieter machine more often than the run does.
            def probe(timed: Any) -> int:
                return probe_max_steps(
                    flow, timed, training_data, minutes=train.minutes, batch_size=min(train.batch_size,
                    len(training_data)), lr=train.lr, seed=protocol.seed, probe_steps=8, probe_seconds=30.0,
                    margin=PROBE_MARGIN,
                )  # fmt: skip

            max_steps = probe(objective)
            if energy is not None:  # steps before kl_start cost what ML costs, the rest what both terms cost
                both = probe(_mixed_objective(protocol, flow, energy, LambdaSchedule(train.kl_weight, train.kl_weight)))
                max_steps = max(10, int(1.0 / (train.kl_start / max_steps + (1.0 - train.kl_start) / both)))
    write_json(settings_file, {"max_steps": max_steps, "n_frames": len(training_data)})
    if energy is not None:
        schedule = LambdaSchedule(0.0, train.kl_weight, ramp_start=int(train.kl_start * max_steps),
                                  ramp_steps=int(train.kl_ramp * max_steps))  # fmt: skip
        objective = _mixed_objective(protocol, flow, energy, schedule)
    grad_guard = model.kind == "eacf" if train.grad_guard is None else train.grad_guard
    max_rollbacks = (3 if model.kind == "eacf" else 0) if train.max_rollbacks is None else train.max_rollbacks
    by_time = train.schedule_clock == "time"
    config = TrainerConfig(
        max_steps=(train.max_steps or 10**9) if by_time else max_steps, max_minutes=train.minutes,
        batch_size=min(train.batch_size, len(training_data)), lr=train.lr, schedule="cosine",
        schedule_clock=train.schedule_clock, warmup_steps=min(100, max_steps // 10), grad_clip=train.grad_clip,
        grad_guard=grad_guard, max_rollbacks=max_rollbacks, ema_decay=train.ema_decay, seed=protocol.seed,
        checkpoint_every=max(25, max_steps // 20), out_dir=folder, progress=progress,
    )  # fmt: skip
    trainer = Trainer(flow, objective, config, training_data)
    summary = trainer.fit(resume=True)
    averaged = trainer.ema.average_parameters() if trainer.ema is not None else contextlib.nullcontext()
    with averaged:
        flow.eval()
        flow.save(folder / FLOW_FILE)
    budget_note = short_budget_note(
        summary.elapsed_seconds, train.minutes, summary.stopped_by, max_steps, planned=train.max_steps is None
    )
    if budget_note is not None:
        logger.warning(budget_note)
    return {
        "steps": summary.step, "max_steps": max_steps, "stopped_by": summary.stopped_by,
        "final_loss": summary.final_loss, "train_seconds": summary.elapsed_seconds,
        "budget_used": summary.elapsed_seconds / (60.0 * train.minutes), "budget_note": budget_note,
        "grad_guard": grad_guard, "schedule_clock": train.schedule_clock,
        "guard_skipped_steps": summary.guard_skipped_steps,
        "guard_clipped_steps": summary.guard_clipped_steps,
        "rollbacks": summary.rollbacks, "lr_scale": summary.lr_scale,
        "n_training_frames": len(training_data), "n_parameters": sum(p.numel() for p in flow.parameters()),
        "device": str(flow.device), "flow": str(folder / FLOW_FILE), "loss_plot": str(folder / "loss.png"),
        "kl": None if energy is None else {
            "weight": train.kl_weight, "ramp_start": schedule.ramp_start, "ramp_steps": schedule.ramp_steps,
            "samples": train.kl_samples, "energy_cutoff": train.energy_cutoff,
        },
    }  # fmt: skip


#: The timing probe plans this fraction of the steps it measures fit in the minutes (the machine is often busier
#: during the run than during the probe).
PROBE_MARGIN = 0.85
#: A planned run that trained less than this fraction of its minutes gets a note (below :data:`PROBE_MARGIN`).
SHORT_BUDGET_FRACTION = 0.7


def short_budget_note(
    train_seconds: float, minutes: float, stopped_by: str, max_steps: int, *, planned: bool
) -> str | None:
    """Why a run whose step count came from the timing probe trained well short of its minutes, or None.

    The probe times a few steps before training; when the machine is busier then (another job's simulation or
    compilation) than during the run, it plans too few steps and the run ends early. Only a run stopped by a
    planned ``max_steps`` (``planned``: not set in the protocol) that used less than
    :data:`SHORT_BUDGET_FRACTION` of its budget gets the note, with the settings that avoid it.
    """
    used = train_seconds / (60.0 * minutes)
    if not planned or stopped_by != "max_steps" or used >= SHORT_BUDGET_FRACTION:
        return None
    suggested = int(max_steps * PROBE_MARGIN / max(used, 1e-6))
    return (
        f"training used {train_seconds / 60.0:.1f} of its {minutes:g} minutes ({100.0 * used:.0f} %): the timing "
        f"probe planned {max_steps} steps, timed while the machine was busier than during training; set "
        f"train.max_steps (about {suggested} fit this machine) or train.schedule_clock: time to use the budget"
    )


# ----------------------------------------------------------------------- sample
def run_sample(protocol: Protocol, run: RunDirectory, progress: bool, device: str) -> dict[str, Any]:
    """Draw flow samples with exact log q in chunks (``sample/chunk_*.npz``), then join them.

    Chunk ``k`` is drawn with its own seed, so the samples do not depend on
    ``n_workers`` or on how often the step was interrupted. On a CPU,
    ``n_workers`` processes (one torch thread each) share the chunks.
    """
    from tqdm.auto import tqdm

    cfg = protocol.sample
    if cfg is None:
        raise RuntimeError("the sample step needs a sample section")
    flow_path = run.step_dir("train") / FLOW_FILE
    folder = run.step_dir("sample")
    n_chunks = math.ceil(cfg.n_samples / cfg.chunk_size)
    todo = [k for k in range(n_chunks) if not (folder / f"chunk_{k:05d}.npz").is_file()]
    sizes = {k: min(cfg.chunk_size, cfg.n_samples - k * cfg.chunk_size) for k in todo}
    options = {"density": cfg.density} if protocol.train is not None and protocol.train.model.kind == "eacf" else {}
    jobs = [(str(flow_path), device, protocol.seed * 1_000_003 + k, sizes[k], str(folder / f"chunk_{k:05d}.npz"),
             options, cfg.compiled) for k in todo]  # fmt: skip
    workers = 1 if device.startswith("cuda") else min(cfg.n_workers, max(1, len(jobs)))
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="sampling (exact log q)", disable=not progress, unit="chunk")
    if workers == 1:
        for job in jobs:
            _sample_chunk(*job)
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        from bgplugin.energies.pool import single_threaded

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=single_threaded) as pool:
            for future in as_completed([pool.submit(_sample_chunk, *job) for job in jobs]):
                future.result()
                bar.update()
    bar.close()
    seconds = time.perf_counter() - start
    drawn = sum(sizes.values())
    x_all, lq_all = [], []
    for k in range(n_chunks):
        with np.load(folder / f"chunk_{k:05d}.npz") as chunk:
            x_all.append(chunk["x"])
            lq_all.append(chunk["log_q"])
    x_cat, lq_cat = np.concatenate(x_all), np.concatenate(lq_all)
    atomic_write(folder / SAMPLES_FILE, lambda handle: np.savez(handle, x=x_cat, log_q=lq_cat))
    rate = drawn / seconds if drawn and seconds > 0 else None
    log_q_kind = "exact" if not options else (
        "joint: log q(x, a) - log pi(a|x), exact joint importance weights" if options["density"] == "joint"
        else f"marginal estimate, M = {protocol.train.model.n_marginal} draws"  # type: ignore[union-attr]
    )  # fmt: skip
    return {"n_samples": len(x_cat), "samples_per_second": rate, "log_q": log_q_kind, "n_workers": workers,
            "device": device, "compiled": cfg.compiled,
            "samples": str(folder / SAMPLES_FILE)}  # fmt: skip


def _sample_chunk(
    flow_path: str, device: str, seed: int, n: int, out: str, options: dict[str, Any], compiled: bool = False
) -> None:
    """Draw ``n`` samples with log q from the flow in ``flow_path`` and write them to ``out`` atomically.

    ``options`` go to ``flow.sample`` (for an E-ACF: ``density``); ``compiled``
    samples through ``torch.compile`` (or not), whatever the flow was trained with.
    """
    flow = load_flow(flow_path, device=device, compiled=compiled)
    generator = torch.Generator(device=flow.device).manual_seed(seed)
    with torch.no_grad():
        x, log_q = flow.sample(n, generator=generator, **options)
    arrays = {"x": x.cpu().numpy().astype(np.float32), "log_q": log_q.cpu().numpy().astype(np.float64)}
    atomic_write(out, lambda handle: np.savez(handle, **arrays))


# --------------------------------------------------------------------- reweight
def _target_energy(protocol: Protocol, system: Any) -> Any:
    from bgplugin.energies import OpenMMEnergy, XTBEnergy

    cfg = protocol.reweight
    if cfg is None:
        raise RuntimeError("the reweight step needs a reweight section")
    if cfg.energy == "openmm":
        if getattr(system, "openmm_system", None) is None:
            return system.energy()
        return OpenMMEnergy(system, platform=cfg.platform, n_workers=cfg.n_workers)
    numbers = [atom.element.atomic_number for atom in system.topology.atoms]
    return XTBEnergy(numbers, solvent=cfg.xtb_solvent, backend=cfg.energy, temperature=system.temperature,
                     n_workers=cfg.n_workers)  # fmt: skip


def run_reweight(protocol: Protocol, run: RunDirectory, progress: bool, device: str) -> dict[str, Any]:
    """Importance weights of the samples against the target energy; forward ESS and KL(p || q) on training frames."""
    from bgplugin.analysis import mirror
    from bgplugin.reweighting import forward_ess, proposal_is_reflection_symmetric, reweight_samples

    cfg = protocol.reweight
    if cfg is None:
        raise RuntimeError("the reweight step needs a reweight section")
    system = make_system(protocol)
    folder = run.step_dir("reweight")
    with np.load(run.step_dir("sample") / SAMPLES_FILE) as samples:
        x, log_q = samples["x"], samples["log_q"]
    energy = _target_energy(protocol, system)
    # the densities of mirror images and training frames follow sample.compiled, like the samples' own log q
    compiled = protocol.sample.compiled if protocol.sample is not None else None
    flow = load_flow(run.step_dir("train") / FLOW_FILE, device=device, compiled=compiled)

    def flow_log_prob(positions: np.ndarray) -> np.ndarray:  # q of mirror images, and of data for the forward ESS
        xs = torch.as_tensor(positions, dtype=torch.float32)
        with torch.no_grad():
            return torch.cat([flow.log_prob(c.to(flow.device)).cpu() for c in xs.split(64)]).double().numpy()

    symmetric = proposal_is_reflection_symmetric(flow)

    def proposal_log_prob(positions: np.ndarray) -> np.ndarray:  # the density the samples' weights divide by
        lq = flow_log_prob(positions)
        if cfg.chirality != "mirror":
            return lq
        return lq + np.log(2.0) if symmetric else np.logaddexp(lq, flow_log_prob(mirror(positions)))

    try:
        result = reweight_samples(
            x, log_q, energy, system=system, chirality=cfg.chirality,
            clip=None if cfg.clip_quantile is None else {"quantile": cfg.clip_quantile},
            reflection_symmetric=symmetric, log_prob=flow_log_prob, progress=progress,
        )  # fmt: skip
        summary: dict[str, Any] = dict(result.to_dict())
        topology = getattr(system, "topology", None)
        if topology is not None:
            result.to_trajectory(topology).save(folder / WEIGHTED_FILE)
        arrays = {"x": result.positions, "u": result.u, "log_q": result.log_q, "log_w": result.log_w}
        atomic_write(folder / "reweighted.npz", lambda handle: np.savez(handle, **arrays))
        # Forward ESS: the flow's density on frames from the target (training data carry their own weights).
        data = _training_dataset(protocol, run)
        n_fwd = min(len(data), cfg.forward_ess_frames)
        if n_fwd > 0:
            pick = np.sort(np.random.default_rng(protocol.seed).choice(len(data), n_fwd, replace=False))
            frames = data[pick]
            xd = frames.positions - frames.positions.mean(axis=1, keepdims=True)
            lq_data = proposal_log_prob(xd)
            u_data = energy.evaluate(torch.as_tensor(xd, dtype=torch.float64)).u.numpy()
            data_lw = None if frames.log_weights is None else frames.log_weights
            summary["forward_ess"] = forward_ess(lq_data, u_data, data_lw)
            summary["forward_ess_frames"] = int(n_fwd)
            summary["target_likelihood"] = _target_fit(result.log_w_unclipped, u_data, lq_data, data_lw)
            atomic_write(folder / DATA_ENERGIES_FILE,
                         lambda handle: np.savez(handle, u=u_data, log_q=lq_data,
                                                 log_w=np.zeros(n_fwd) if data_lw is None else data_lw,
                                                 positions=frames.positions))  # fmt: skip
        else:
            summary["forward_ess"] = summary["target_likelihood"] = None
    finally:
        close = getattr(energy, "close", None)
        if close is not None:
            close()
    summary["energy"] = cfg.energy
    return summary


def _target_fit(log_w: np.ndarray, u_data: np.ndarray, lq_data: np.ndarray,
                data_lw: np.ndarray | None) -> dict[str, Any] | None:  # fmt: skip
    """KL(p || q) on the training frames, log Z from the samples (None, logged, when no sample has weight)."""
    from bgplugin.reweighting import target_likelihood

    try:
        return target_likelihood(log_w, u_data, lq_data, data_lw).to_dict()
    except ValueError as error:
        logger.warning("no KL estimate on the training frames: %s", error)
        return None


# ---------------------------------------------------------------------- profile
def run_profile(protocol: Protocol, run: RunDirectory, progress: bool) -> dict[str, Any]:
    """F(cv) from raw and reweighted flow samples, dF between two states, and the comparison with a reference."""
    from bgplugin.analysis import compare_profiles, delta_f, free_energy_profile

    cfg = protocol.profile
    if cfg is None:
        raise RuntimeError("the profile step needs a profile section")
    system = make_system(protocol)
    folder = run.step_dir("profile")
    with np.load(run.step_dir("reweight") / "reweighted.npz") as saved:
        x, log_w = saved["x"], saved["log_w"]
    cv = system.cvs[cfg.cv]
    values = np.asarray(cv(x))
    temperature = float(system.temperature)
    rw = free_energy_profile(values, cfg.cv, cfg.bins, log_weights=log_w, n_bootstrap=cfg.n_bootstrap,
                             temperature=temperature, seed=protocol.seed)  # fmt: skip
    raw = free_energy_profile(values, cfg.cv, cfg.bins, n_bootstrap=cfg.n_bootstrap, temperature=temperature,
                              seed=protocol.seed)  # fmt: skip
    rw.save(folder / "profile_reweighted.json")
    raw.save(folder / "profile_flow.json")
    from bgplugin.reweighting import ess

    n_effective = ess(log_w) * len(log_w)
    out: dict[str, Any] = {"cv": cfg.cv, "delta_f": None, "delta_f_error": None, "n_effective": n_effective}
    too_few = too_few_effective_samples(n_effective, cfg.min_effective_samples)
    diff = None
    try:
        estimate = delta_f(values, cfg.state_a, cfg.state_b, log_weights=log_w, temperature=temperature)
        out["delta_f_detail"] = estimate.to_dict()
        if too_few:
            out["delta_f_failure"] = (
                f"{too_few}, where the error bar means nothing; the raw estimate "
                f"{estimate.value:.2f} +- {estimate.error:.2f} kT is kept in delta_f_detail"
            )
            logger.warning("reweighted dF %s", out["delta_f_failure"])
        else:
            diff = estimate
            out.update(delta_f=diff.value, delta_f_error=diff.error)
    except ValueError as exc:  # e.g. no weighted sample in one state: a flow too poor for this question
        logger.warning("no free-energy difference from the reweighted samples: %s", exc)
        out["delta_f_failure"] = str(exc)
    reference, ref_diff = _reference(protocol, run, cfg.reference)
    out["profile_rmse"] = None
    if reference is not None:
        reference.save(folder / "profile_reference.json")
        try:
            comparison = compare_profiles(rw, reference, f_max=cfg.f_max)
            out["profile_comparison"] = comparison
            if too_few:  # the same rule as dF: a profile from a handful of weights is not an estimate
                out["profile_comparison_failure"] = (
                    f"RMSE {too_few}; the raw RMSE {comparison['rmse']:.2f} kT is kept in profile_comparison"
                )
                logger.warning("reweighted profile %s", out["profile_comparison_failure"])
            else:
                out["profile_rmse"] = comparison["rmse"]
        except ValueError as exc:
            logger.warning("the profile could not be compared with the reference: %s", exc)
            out["profile_comparison_failure"] = str(exc)
    out.update(reference_delta_f=None if ref_diff is None else ref_diff.value,
               reference_delta_f_error=None if ref_diff is None else ref_diff.error)  # fmt: skip
    if ref_diff is not None and diff is not None:
        out.update(delta_f_minus_reference=diff.value - ref_diff.value,
                   delta_f_z=(diff.value - ref_diff.value) / math.hypot(diff.error, ref_diff.error))  # fmt: skip
    out["reference"] = cfg.reference
    return out


def too_few_effective_samples(n_effective: float, minimum: float) -> str | None:
    """Why a reweighted estimate from ``n_effective`` Kish effective samples is not reported (None: it is)."""
    if n_effective >= minimum:
        return None
    return (
        f"not reported: the weights leave {n_effective:.1f} effective samples (< profile.min_effective_samples = "
        f"{minimum:g})"
    )


def _reference(protocol: Protocol, run: RunDirectory, spec: str | None) -> tuple[Any, Any]:
    from bgplugin.simulation import FreeEnergyProfile, delta_f
    from bgplugin.simulation.reference import bundled_reference

    cfg = protocol.profile
    if spec is None or cfg is None:
        return None, None
    if spec == "bundled":
        try:
            ref = bundled_reference(protocol.system)
        except FileNotFoundError as exc:
            logger.warning("no reference to compare with: %s", exc)
            return None, None
        if ref.profile.cv_name != cfg.cv:
            logger.warning("the bundled reference is along %s, not %s; no comparison", ref.profile.cv_name, cfg.cv)
            return None, None
        return ref.profile, delta_f(ref.profile, cfg.state_a, cfg.state_b)
    if spec == "umbrella":
        found = sorted(run.step_dir("simulate").glob("stage*_umbrella/umbrella_profile.json"))
        if not found:
            raise ValueError("profile.reference is 'umbrella' but no simulate stage ran umbrella sampling")
        profile = FreeEnergyProfile.load(found[-1])
        return profile, delta_f(profile, cfg.state_a, cfg.state_b)
    profile = FreeEnergyProfile.load(spec)
    return profile, delta_f(profile, cfg.state_a, cfg.state_b)


# ------------------------------------------------------------------------- mcmc
def run_mcmc_step(protocol: Protocol, run: RunDirectory, progress: bool, device: str) -> dict[str, Any]:
    """Langevin MD mixed with flow independence moves (:func:`bgplugin.mcmc.run_flow_mcmc`)."""
    from bgplugin.mcmc import run_flow_mcmc

    cfg = protocol.mcmc
    if cfg is None:
        raise RuntimeError("the mcmc step needs an mcmc section")
    system = make_system(protocol)
    flow = load_flow(run.step_dir("train") / FLOW_FILE, device=device)
    result = run_flow_mcmc(
        system, flow, n_iterations=cfg.n_iterations, langevin_steps=cfg.langevin_steps,
        n_proposals=cfg.n_proposals, platform=cfg.platform, seed=protocol.seed, progress=progress,
    )  # fmt: skip
    summary = result.to_dict()
    write_json(run.step_dir("mcmc") / "mcmc.json", summary)
    return summary


STEPS = ("simulate", "train", "sample", "reweight", "profile", "mcmc", "report")


def device_name(device: str) -> str:
    return str(resolve_device(device))  # type: ignore[arg-type]
