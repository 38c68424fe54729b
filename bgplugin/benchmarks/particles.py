r"""``bgplugin bench dw4|lj13|lj55``: train a flow on the published particle data, then score it.

:func:`bench_particles` trains an EGNN (or kernel) CNF on the public splits of
the equivariant flow matching benchmark (Klein, Krämer & Noé 2023; the files
described in ``shared/data/README.md``) for a wall-clock budget, then reports
the numbers of that paper's Table 1 and a few more:

``nll``
    test negative log-likelihood :math:`-\frac1n\sum_i \log q(x_i)` over test
    configurations, in nats, **without** the normalising constant of the
    prior, :math:`\frac{(N-1)D}{2}\ln 2\pi` (the convention of the published
    tables);
``nll_with_prior_constant``
    the same with the constant, i.e. the NLL of the normalised density on the
    :math:`(N-1)D`-dimensional mean-free subspace (what
    :meth:`bgplugin.flows.CNF.log_prob` returns);
``ess``
    reverse effective sample size, Kish :math:`(\sum w)^2 / (n \sum w^2)` with
    :math:`\log w = -u(x) - \log q(x)` for flow samples :math:`x \sim q`;
``forward_ess``
    :math:`n^2 / (\sum_i w_i \sum_i w_i^{-1})` over test configurations
    :math:`x_i \sim p` (Midgley et al. 2023), sensitive to modes the flow misses;
``path_length``
    mean :math:`|x_1 - x_0|` (all coordinates) between test configurations
    :math:`x_1` and their images :math:`x_0` in the prior under the learned map;
``target_density``
    the NLL of the *exact* target density on the same test configurations,
    :math:`\frac1n\sum_i [u(x_i) + \log Z]` with :math:`\log Z` estimated by
    importance sampling from the flow samples of ``ess``, with and without the
    prior constant, and the paired estimate of :math:`\mathrm{KL}(p\,\|\,q)`
    (``kl`` = flow NLL minus target NLL), with standard errors
    (:func:`bgplugin.reweighting.target_likelihood`): the floor for ``nll`` on
    this split, and how far the flow is from it;
``integration_error``
    largest, mean and median :math:`|\Delta\log q|` and :math:`|\Delta x|` of
    the fixed-step RK4 solver used for every number above, against adaptive
    dopri5: forward on the first prior draws of the ESS samples (keys without
    prefix) and inverse on the first test configurations (``test_`` keys).

Exact log-densities are the expensive part on a CPU (closed-form divergence,
one ODE solve per sample), so the default sample counts are sized for a few
minutes of evaluation on two cores; the result records the counts and the
measured evaluation time.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from bgplugin.benchmarks.common import (
    SETTINGS_FILE,
    auto_ema_decay,
    machine_record,
    nothing,
    resolve_training_settings,
)
from bgplugin.energies.particles import pairwise_distances
from bgplugin.fileio import write_json
from bgplugin.flows import CNF, DeviceSpec, FieldKind, build_flow
from bgplugin.flows.bench import torch_threads
from bgplugin.reweighting import log_weights, target_likelihood
from bgplugin.systems import System, get_system
from bgplugin.training import (
    FlowMatching,
    MaximumLikelihood,
    Trainer,
    TrainerConfig,
    TrainingData,
    probe_max_steps,
)

__all__ = [
    "DATA_FILES",
    "PUBLISHED",
    "BenchObjective",
    "ParticleBenchmark",
    "bench_particles",
    "data_dir",
    "evaluation_subset",
    "format_particles",
    "forward_ess",
    "kish_ess",
    "load_split",
    "prior_constant",
]

logger = logging.getLogger(__name__)

BenchObjective = Literal["eqot", "ot", "cfm", "nll"]
ParticleBenchmark = Literal["dw4", "lj13", "lj55"]
Split = Literal["train", "test"]

#: Files (relative to :func:`data_dir`) used for training and for evaluation, per system.
#: LJ13 has no public training split; its validation split is used for training.
DATA_FILES: dict[str, dict[Split, str]] = {
    "dw4": {"train": "dw4/train_split_DW4.npy", "test": "dw4/test_split_DW4.npy"},
    "lj13": {"train": "lj13/val_split_LJ13-1000.npy", "test": "lj13/test_split_LJ13-1000.npy"},
    "lj55": {"train": "lj55/train_split_LJ55-1000-part1.npy", "test": "lj55/test_split_LJ55-1000-part1.npy"},
}

#: Published numbers (Klein, Krämer & Noé 2023, Table 1, GPU, hours of training), as quoted in issue 3.
#: ``path_length`` depends on the pairing; NLL excludes the prior constant; ESS is a fraction.
PUBLISHED: dict[str, dict[str, Any]] = {
    "dw4": {"nll": 1.68, "ess": 0.912, "path_length": {"eqot": 2.92, "ot": 2.92}},
    "lj13": {"nll": -16.70, "ess": 0.397, "path_length": {"eqot": 2.15, "ot": 2.83}},
}

#: Per-system defaults: EGNN of the EFM paper (DW4: 3 layers, width 32), narrower for LJ13/LJ55 on a CPU;
#: flow-matching batch sizes at which eq-OT pairing does not dominate a CPU step (docs/training.md);
#: evaluation sizes that keep exact log q at a few minutes on 2 cores (closed-form divergence, RK4-20,
#: measured 110-120 samples/s for a trained DW4 model and 9 samples/s for LJ13 on one thread, eager: DW4 about
#: 2.5 min, LJ13 about 2 min plus the dopri5 check, whose cost grows with the stiffness of the trained field).
#: DW4 scores the whole test split: its NLL's standard error is then about 0.019 instead of 0.027.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "dw4": {"hidden": 32, "n_layers": 3, "batch_size": 256, "n_eval_samples": 5000, "n_eval_test": 10_000,
            "n_integration_samples": 64},
    "lj13": {"hidden": 32, "n_layers": 3, "batch_size": 32, "n_eval_samples": 500, "n_eval_test": 500,
             "n_integration_samples": 32},
    "lj55": {"hidden": 64, "n_layers": 5, "batch_size": 16, "n_eval_samples": 100, "n_eval_test": 100,
             "n_integration_samples": 8},
}

#: Settings that must match for a run in an existing ``out_dir`` to resume it.
_TRAINING_KEYS = (
    "system", "objective", "field", "field_hyperparameters", "prior_std", "solver", "steps", "batch_size",
    "lr", "sigma", "ema_decay", "grad_clip", "schedule", "schedule_clock", "seed", "max_steps", "train_file",
)  # fmt: skip
_PROBE_SECONDS = 3.0
_PROBE_MAX_STEPS = 30


# ------------------------------------------------------------------ helpers
def prior_constant(n_particles: int, dim: int) -> float:
    r"""Normalising constant :math:`\frac{(N-1)D}{2}\ln 2\pi` of the standard mean-free Gaussian prior, in nats.

    ``nll_with_prior_constant = nll + prior_constant(N, D)``: 5.514 for DW4,
    33.082 for LJ13, 148.868 for LJ55.
    """
    if n_particles < 2 or dim < 1:
        raise ValueError(f"need n_particles >= 2 and dim >= 1, got n_particles={n_particles}, dim={dim}")
    return 0.5 * (n_particles - 1) * dim * math.log(2.0 * math.pi)


def kish_ess(log_w: Tensor | np.ndarray, n_total: int | None = None) -> float:
    r"""Kish effective sample size divided by the number of samples, from log-weights.

    :math:`(\sum_i w_i)^2 / (n \sum_i w_i^2)`, computed in log space.

    Parameters
    ----------
    log_w : array, shape (n,)
        Unnormalised log importance weights; non-finite entries must be removed first.
    n_total : int, optional
        Denominator ``n`` (default ``len(log_w)``); pass the number of samples
        drawn when failed samples (weight 0) were removed from ``log_w``.

    Returns
    -------
    float
        In [0, 1]; 0 when there is no weight.
    """
    lw = torch.as_tensor(log_w, dtype=torch.float64).flatten()
    n = lw.numel() if n_total is None else int(n_total)
    if n < 1:
        raise ValueError(f"need at least one sample, got n_total={n}")
    if lw.numel() == 0:
        return 0.0
    if not torch.isfinite(lw).all():
        raise ValueError("log_w contains non-finite values; drop failed samples and pass n_total")
    log_ess = 2.0 * torch.logsumexp(lw, 0) - torch.logsumexp(2.0 * lw, 0)
    return float(torch.exp(log_ess) / n)


def forward_ess(log_w: Tensor | np.ndarray) -> float:
    r"""Forward effective sample size divided by ``n``, from log-weights of *target* samples.

    :math:`n^2 / (\sum_i w_i \sum_i w_i^{-1})` for :math:`x_i \sim p` and
    :math:`w = \tilde p / q` (Midgley et al. 2023, Eq. 9); 1 when ``q = p``.

    Parameters
    ----------
    log_w : array, shape (n,)
        Finite log-weights :math:`-u(x_i) - \log q(x_i)` of test configurations.

    Returns
    -------
    float
        In (0, 1].
    """
    lw = torch.as_tensor(log_w, dtype=torch.float64).flatten()
    if lw.numel() < 1:
        raise ValueError("need at least one finite log-weight for the forward ESS")
    if not torch.isfinite(lw).all():
        raise ValueError("log_w contains non-finite values; drop those samples first")
    n = lw.numel()
    log_ratio = 2.0 * math.log(n) - torch.logsumexp(lw, 0) - torch.logsumexp(-lw, 0)
    return float(torch.exp(log_ratio))


def data_dir() -> Path:
    """Where the benchmark splits live: ``$BGPLUGIN_DATA_DIR``, else ``shared/data`` next to the checkout."""
    configured = os.environ.get("BGPLUGIN_DATA_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def load_split(system: System, split: Split, directory: str | os.PathLike[str] | None = None) -> np.ndarray:
    """One published split as float32 ``(n, n_particles, dim)``, centre of mass removed.

    Parameters
    ----------
    system : System
        ``dw4``, ``lj13`` or ``lj55`` (from :func:`bgplugin.systems.get_system`).
    split : {"train", "test"}
        ``"train"``: the split used for training (LJ13: the validation split).
    directory : path, optional
        Data folder; default :func:`data_dir`.

    Returns
    -------
    ndarray, shape (n, n_particles, dim), reduced units
    """
    if system.name not in DATA_FILES:
        raise ValueError(f"no benchmark data defined for system {system.name!r}; choose one of {sorted(DATA_FILES)}")
    if split not in get_args(Split):
        raise ValueError(f"split must be one of {get_args(Split)}, got {split!r}")
    root = data_dir() if directory is None else Path(directory)
    path = root / DATA_FILES[system.name][split]
    if not path.is_file():
        wanted = ", ".join(str(root / f) for f in DATA_FILES[system.name].values())
        raise FileNotFoundError(
            f"{system.name} benchmark data missing: {path} does not exist. bench_particles({system.name!r}) needs "
            f"{wanted} (the splits of Klein, Kraemer & Noe 2023); put them there or set BGPLUGIN_DATA_DIR "
            "to the folder that holds them"
        )
    x = np.load(path).astype(np.float32)
    size = system.n_particles * system.dim
    if x.ndim != 2 or x.shape[1] != size:
        raise ValueError(f"{path} has shape {x.shape}, expected (n, {size}) for {system.name}")
    x = x.reshape(-1, system.n_particles, system.dim)
    return x - x.mean(axis=1, keepdims=True)


def evaluation_subset(n_available: int, n: int, seed: int) -> np.ndarray:
    """Sorted indices of the ``n`` test configurations :func:`bench_particles` evaluates (all if ``n >= n_available``).

    A seeded random subset without replacement (``numpy.random.default_rng(seed)``).
    """
    if n >= n_available:
        return np.arange(n_available)
    return np.sort(np.random.default_rng(seed).choice(n_available, size=n, replace=False))




def _make_objective(objective: BenchObjective, flow: CNF, system: System, sigma: float) -> Any:
    if objective == "nll":
        return MaximumLikelihood(divergence="hutchinson")
    pairing = {"eqot": "eqot", "ot": "ot", "cfm": "none"}[objective]
    symmetry = getattr(flow.field, "symmetry", "E(n)")
    return FlowMatching(
        flow.prior,
        sigma=sigma,
        pairing=pairing,  # type: ignore[arg-type]
        atom_types=system.atom_types,
        allow_reflections=symmetry == "E(n)",
    )


def _savefig(figure: Any, path: Path) -> Path:
    """Write a matplotlib figure as PNG atomically (temporary file + ``os.replace``)."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            figure.savefig(stream, format="png")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _density(values: np.ndarray, bins: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Histogram normalised over *all* ``values`` (mass outside the bins is not renormalised away)."""
    w = np.ones_like(values) if weights is None else weights
    counts, _ = np.histogram(values, bins=bins, weights=w)
    return counts / (w.sum() * np.diff(bins))


def _histogram_figure(
    path: Path, bins: np.ndarray, curves: list[tuple[str, np.ndarray]], xlabel: str, title: str, note: str
) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, (label, density) in enumerate(curves):
        style = {"color": "k", "lw": 1.5} if index == 0 else {"lw": 1.2}
        axes.stairs(density, bins, label=label, **style)
    if note:
        axes.text(0.02, 0.97, note, transform=axes.transAxes, va="top", fontsize=8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("density")
    axes.set_title(title)
    axes.legend(loc="upper right")
    figure.tight_layout()
    return _savefig(figure, path)


def _plot_energies(path: Path, u_data: np.ndarray, u_flow: np.ndarray, log_w: np.ndarray, title: str) -> Path:
    """Energy histograms of test data, flow samples and reweighted flow samples (finite energies only)."""
    lo, top = np.percentile(u_data, [0.0, 99.5])
    span = max(top - lo, 1e-6)
    # Show where the flow puts its mass, but do not let a few huge energies squash the plot.
    hi = float(np.clip(np.percentile(u_flow, 95.0), top, top + 2.0 * span)) if len(u_flow) else top
    bins = np.linspace(lo - 0.1 * span, hi + 0.1 * span, 81)
    curves = [("test data", _density(u_data, bins))]
    if len(u_flow):
        curves.append(("flow", _density(u_flow, bins)))
        curves.append(("flow, reweighted", _density(u_flow, bins, np.exp(log_w - log_w.max()))))
    outside = int(((u_flow < bins[0]) | (u_flow > bins[-1])).sum())
    note = f"{outside} of {len(u_flow)} flow samples outside the range" if outside else ""
    return _histogram_figure(path, bins, curves, "energy u(x) / kT", title, note)


def _plot_distances(path: Path, d_data: np.ndarray, d_flow: np.ndarray, title: str) -> Path:
    """Histograms of all interatomic distances, test data versus flow samples."""
    d_flow = d_flow[np.isfinite(d_flow)]
    top = float(np.percentile(d_data, 99.9))
    hi = max(top, float(np.percentile(d_flow, 99.0))) if len(d_flow) else top
    bins = np.linspace(0.0, min(1.2 * hi, 2.0 * top), 101)
    curves = [("test data", _density(d_data, bins)), ("flow", _density(d_flow, bins))]
    return _histogram_figure(path, bins, curves, "interatomic distance (reduced units)", title, "")


# --------------------------------------------------------------- evaluation
def _errors(prefix: str, log_q: Tensor, log_q_ref: Tensor, x: Tensor, x_ref: Tensor) -> dict[str, float]:
    """Largest, mean and median |log q - log q_ref| (nats) and |x - x_ref| (per configuration, all coordinates)."""
    dq = (log_q - log_q_ref).abs()
    dx = (x - x_ref).flatten(1).norm(dim=1).double().cpu()
    return {
        f"{prefix}log_q_max_abs": float(dq.max()),
        f"{prefix}log_q_mean_abs": float(dq.mean()),
        f"{prefix}log_q_median_abs": float(dq.median()),
        f"{prefix}x_max_abs": float(dx.max()),
        f"{prefix}x_mean_abs": float(dx.mean()),
    }


def _energies(system: System, x: Tensor) -> tuple[Tensor, int]:
    """Reduced energies in float64 on the CPU (``+inf`` for failed frames) and the number of failures."""
    energy = system.energy()
    u = energy.evaluate(x.detach().to("cpu", torch.float64), need_forces=False).u
    return u, int((~torch.isfinite(u)).sum())


def target_density(log_w_samples: Any, u_test: Any, log_q_test: Any, constant: float) -> dict[str, Any] | None:
    """``target_density`` of a benchmark result: :func:`bgplugin.reweighting.target_likelihood` in the table's units.

    None (and a warning) when no flow sample has a positive weight, so that
    ``log Z`` cannot be estimated.
    """
    try:
        t = target_likelihood(log_w_samples, u_test, log_q_test)
    except ValueError as error:
        logger.warning("no target-density NLL: %s", error)
        return None
    return {
        "nll": t.nll_target - constant,
        "nll_with_prior_constant": t.nll_target,
        "nll_stderr": t.nll_target_stderr,
        "kl": t.kl,
        "kl_stderr": t.kl_stderr,
        "log_z": t.log_z,
        "log_z_stderr": t.log_z_stderr,
        "log_z_forward": t.log_z_forward,
        "log_z_forward_stderr": t.log_z_forward_stderr,
        "nll_forward": t.nll_target - t.log_z + t.log_z_forward - constant,
        "sample_ess": t.ess,
        "n_samples": t.n_samples,
        "n_test": t.n_data,
        "definition": "nll: mean of u(x) + log Z over the test configurations (the exact target density's NLL, "
                      "prior constant excluded as in the table); log Z by importance sampling from the flow "
                      "samples of ess; kl: paired mean of log p - log q = flow NLL - target NLL; log_z_forward = "
                      "-log mean(exp(u + log q)) over the test configurations, the same constant from the data "
                      "(reverse estimates tend low, forward ones high), nll_forward the target NLL with it",
    }  # fmt: skip


def _evaluate(
    flow: CNF,
    system: System,
    x_test: Tensor,
    n_samples: int,
    n_integration: int,
    seed: int,
    reference_tol: float,
) -> dict[str, Any]:
    """All metrics of a trained flow; see the module docstring."""
    constant = prior_constant(system.n_particles, system.dim)
    generator = torch.Generator(device=flow.device).manual_seed(seed)
    out: dict[str, Any] = {}
    with torch.no_grad():
        # Test data: NLL, forward ESS and path length from one inverse solve.
        start = time.perf_counter()
        x1 = x_test.to(device=flow.device, dtype=flow.dtype)
        x0, logdet = flow.inverse(x1)
        log_q_test = (flow.prior.log_prob(x0) + logdet).double().cpu()
        test_seconds = time.perf_counter() - start
        ok = torch.isfinite(log_q_test)
        nll_values = -log_q_test[ok]
        u_test, failed_u_test = _energies(system, x1)
        lw_test = -u_test - log_q_test
        ok_w = torch.isfinite(lw_test)
        out["nll_with_prior_constant"] = float(nll_values.mean())
        out["nll"] = out["nll_with_prior_constant"] - constant
        out["nll_stderr"] = float(nll_values.std() / math.sqrt(max(1, nll_values.numel())))
        out["prior_constant"] = constant
        out["forward_ess"] = forward_ess(lw_test[ok_w])
        out["path_length"] = float((x1 - x0).flatten(1).norm(dim=1)[ok.to(x1.device)].mean())
        out["failed_test_frames"] = int((~ok_w).sum())

        # Flow samples: reverse ESS.
        start = time.perf_counter()
        z = flow.prior.sample(n_samples, generator=generator)
        x, logdet = flow.forward(z)
        log_q = (flow.prior.log_prob(z) - logdet).double().cpu()
        sample_seconds = time.perf_counter() - start
        u, failed_u = _energies(system, x)
        lw = -u - log_q
        ok_s = torch.isfinite(lw)
        out["ess"] = kish_ess(lw[ok_s], n_total=n_samples)
        out["failed_frames"] = int((~ok_s).sum())
        out["target_density"] = target_density(log_weights(u, log_q), u_test, log_q_test, constant)
        if out["failed_frames"]:
            logger.warning(
                "%d of %d flow samples have a non-finite energy or log q (%d energy failures); "
                "they count as weight 0 in the ESS",
                out["failed_frames"], n_samples, failed_u,
            )  # fmt: skip

        # Fixed-step solver against dopri5: forward on the same prior draws, inverse on the same test data.
        start = time.perf_counter()
        reference = flow.with_options(solver="dopri5", rtol=reference_tol, atol=reference_tol)
        z_check = z[:n_integration]
        x_ref, logdet_ref = reference.forward(z_check)
        n_forward_evaluations = reference.last_n_evaluations
        log_q_ref = (flow.prior.log_prob(z_check) - logdet_ref).double().cpu()
        x1_check = x1[:n_integration]
        x0_ref, logdet_ref_test = reference.inverse(x1_check)
        log_q_ref_test = (flow.prior.log_prob(x0_ref) + logdet_ref_test).double().cpu()
        out["integration_error"] = {
            "solver": f"{flow.solver}-{flow.steps}" if flow.solver == "rk4" else flow.solver,
            "reference": f"dopri5 rtol=atol={reference_tol:g}",
            "n_samples": int(z_check.shape[0]),
            **_errors("", log_q[:n_integration], log_q_ref, x[:n_integration], x_ref),
            **_errors("test_", log_q_test[:n_integration], log_q_ref_test, x0[:n_integration], x0_ref),
            "reference_n_evaluations": n_forward_evaluations,
        }
        check_seconds = time.perf_counter() - start

    out["eval_timing"] = {
        "test_seconds": test_seconds,
        "sample_seconds": sample_seconds,
        "integration_check_seconds": check_seconds,
        "test_per_second": x_test.shape[0] / test_seconds,
        "samples_per_second": n_samples / sample_seconds,
    }
    out["_arrays"] = {
        "u_test": u_test[torch.isfinite(u_test)].numpy(),
        "u_flow": u[ok_s].numpy(),
        "log_w": lw[ok_s].numpy(),
        "d_test": pairwise_distances(x1.cpu()).flatten().numpy(),
        "d_flow": pairwise_distances(x.cpu()).flatten().numpy(),
    }
    if failed_u_test:
        logger.warning("%d test configurations have a non-finite energy", failed_u_test)
    return out


# --------------------------------------------------------------- benchmark
def bench_particles(
    system: ParticleBenchmark,
    objective: BenchObjective = "eqot",
    minutes: float = 10.0,
    out_dir: str | os.PathLike[str] = "bench_particles",
    *,
    seed: int = 0,
    n_eval_samples: int | None = None,
    n_eval_test: int | None = None,
    n_integration_samples: int | None = None,
    reference_tol: float = 1e-6,
    batch_size: int | None = None,
    max_steps: int | None = None,
    field: FieldKind = "egnn",
    hidden: int | None = None,
    n_layers: int | None = None,
    field_options: dict[str, Any] | None = None,
    steps: int = 20,
    prior_std: float = 1.0,
    lr: float = 5e-4,
    sigma: float = 0.01,
    ema_decay: float | Literal["auto"] | None = "auto",
    grad_clip: float | None = 10.0,
    schedule_clock: Literal["time", "steps"] = "time",
    num_workers: int = 0,
    compiled: bool = True,
    device: DeviceSpec = "auto",
    n_threads: int | None = 1,
    resume: bool = True,
    progress: bool = True,
    data_directory: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    r"""Train a CNF on a particle benchmark for ``minutes``, evaluate it, and write plots.

    Parameters
    ----------
    system : {"dw4", "lj13", "lj55"}
        Benchmark (LJ55 needs data that are not shipped; a clear error says which files).
    objective : {"eqot", "ot", "cfm", "nll"}
        Flow matching with equivariant-OT, OT or independent pairing, or
        maximum likelihood (Hutchinson divergence while training).
    minutes : float
        Training wall-clock budget (summed over resumed sessions).
    out_dir : path
        Checkpoint, loss log, settings, saved flow, ``result.json`` and PNG plots.
    seed : int
        Seed of training batches and of the evaluation draws.
    n_eval_samples : int, optional
        Flow samples for the reverse ESS and the plots; default per system
        (DW4 5000, LJ13 500), sized for a few minutes of exact log q on 2 cores.
    n_eval_test : int, optional
        Test configurations for NLL, forward ESS and path length (a seeded
        random subset of the test split, capped at its size); default per
        system: DW4 the whole test split (10 000), LJ13 500, LJ55 100.
    n_integration_samples : int, optional
        Prior draws (forward) and test configurations (inverse) integrated
        again with dopri5 for ``integration_error``; default DW4 64, LJ13 32.
    reference_tol : float
        rtol = atol of the dopri5 reference.
    batch_size : int, optional
        Training batch; default DW4 256, LJ13 32, LJ55 16.
    max_steps : int, optional
        Step budget; with ``schedule_clock="steps"`` also the length of the
        learning-rate schedule. Default: the number of steps that fit in
        ``minutes`` estimated from a few timed steps (with the time clock the
        estimate only sets the warm-up and the EMA window, and there is no cap).
    field : {"egnn", "kernel"}
        Vector field.
    hidden, n_layers : int, optional
        EGNN width and depth; default DW4 32/3 (as in the EFM paper), LJ13 32/3
        (the paper uses 64), LJ55 64/5 (the paper uses 128).
    field_options : dict, optional
        Further field hyperparameters for :func:`bgplugin.flows.build_flow`
        (e.g. ``{"symmetry": "SE(n)"}``, or the kernel field's options).
    steps : int
        RK4 steps of the flow (training for ``"nll"`` and all evaluation).
    prior_std : float
        Standard deviation of the mean-free Gaussian prior (length units).
        1.0 is the published setting (and the one the path-length numbers of
        the papers refer to); a prior closer to the data's scale (DW4: 2.1,
        the root mean square of a mean-free test coordinate) shortens the
        transport. ``nll_with_prior_constant`` is -log q whatever the prior;
        ``nll`` subtracts the fixed conventional constant of the unit prior.
    lr, sigma, ema_decay, grad_clip
        Peak AdamW learning rate (cosine decay to 0 over ``max_steps``), path
        width of flow matching, EMA decay (evaluation uses the averaged
        weights; ``"auto"``: ``min(0.999, 1 - 20 / max_steps)``, an averaging
        window of about 5 % of the run, so short runs are not dominated by the
        initial weights; ``None``: no EMA), global gradient-norm clip.
    schedule_clock : {"time", "steps"}
        ``"time"``: the cosine decay spans the ``minutes`` of training, so it
        ends when the budget is spent whatever the machine's load (runs are
        then not identical bit for bit); ``"steps"``: it spans ``max_steps``
        (reproducible, but a wrong estimate stops training early, before the
        learning rate has decayed, or leaves time unused).
    compiled : bool
        Build the CNF with ``compiled=True``: flow-matching training regresses
        the field through ``torch.compile`` (a step 1.6x faster for LJ13 and
        1.5x for DW4, ``bgplugin bench training``) and evaluation integrates the exact
        divergence through it (1.6-1.9x). Compilation happens in the
        untimed warm-up step of the timing probe (``max_steps=None``) or in
        the first training step.
    num_workers : int
        Processes that build (pair) training batches while the network
        trains (:class:`~bgplugin.training.TrainerConfig` ``num_workers``; the
        batches are the same as with 0). On a 2-core machine with nothing else
        running, 1 moves OT pairing off the training core.
    device : {"auto", "cpu", "cuda"} or torch.device
        Where the flow trains and is evaluated (energies run on the CPU).
    n_threads : int or None
        ``torch.set_num_threads`` during the benchmark (restored after).
    resume : bool
        Continue the run in ``out_dir`` if it has a checkpoint (the training
        settings must match; the schedule length is that of the first run).
    progress : bool
        Show the training progress bar.
    data_directory : path, optional
        Folder with the splits; default :func:`data_dir`.

    Returns
    -------
    dict
        ``nll``, ``nll_with_prior_constant``, ``prior_constant``, ``nll_stderr``,
        ``ess``, ``forward_ess``, ``path_length``, ``integration_error`` (dict),
        ``failed_frames`` / ``failed_test_frames`` (left out of the ESS; failed
        flow samples count as weight 0), ``train_seconds``, ``n_parameters``,
        ``device``, ``training`` (steps, stop reason, loss, time per step),
        ``eval_seconds``, ``eval_timing``, ``plots``, ``published``,
        ``machine``, ``settings``, ``wall_seconds``. Also written to
        ``out_dir/result.json``.
    """
    wall_start = time.perf_counter()
    if objective not in get_args(BenchObjective):
        raise ValueError(f"objective must be one of {get_args(BenchObjective)}, got {objective!r}")
    if system not in DATA_FILES:
        raise ValueError(f"system must be one of {sorted(DATA_FILES)}, got {system!r}")
    if not (isinstance(minutes, (int, float)) and minutes > 0 and math.isfinite(minutes)):
        raise ValueError(f"minutes must be a finite number > 0, got {minutes!r}")
    for name, value in (
        ("n_eval_samples", n_eval_samples),
        ("n_eval_test", n_eval_test),
        ("n_integration_samples", n_integration_samples),
        ("max_steps", max_steps),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
    if not reference_tol > 0:
        raise ValueError(f"reference_tol must be > 0, got {reference_tol}")
    if schedule_clock not in ("time", "steps"):
        raise ValueError(f"schedule_clock must be 'time' or 'steps', got {schedule_clock!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    if not isinstance(compiled, bool):
        raise ValueError(f"compiled must be True or False, got {compiled!r}")
    if isinstance(prior_std, bool) or not isinstance(prior_std, (int, float)) or not (0 < prior_std < math.inf):
        raise ValueError(f"prior_std must be a finite number > 0 (length units; 1.0 is the published prior), got "
                         f"{prior_std!r}")

    defaults = _DEFAULTS[system]
    sys_ = get_system(system)
    # Fail on missing data before anything is trained or written.
    x_train = load_split(sys_, "train", data_directory)
    x_test_all = load_split(sys_, "test", data_directory)

    n_samples = defaults["n_eval_samples"] if n_eval_samples is None else n_eval_samples
    n_test = min(defaults["n_eval_test"] if n_eval_test is None else n_eval_test, len(x_test_all))
    n_check = min(
        defaults["n_integration_samples"] if n_integration_samples is None else n_integration_samples, n_samples, n_test
    )
    hyper = dict(field_options or {})
    both = [name for name, value in (("hidden", hidden), ("n_layers", n_layers)) if value is not None and name in hyper]
    if both:
        raise ValueError(f"{both} given both as arguments and in field_options; give each once")
    if field == "egnn":
        hyper.setdefault("hidden", defaults["hidden"] if hidden is None else hidden)
        hyper.setdefault("n_layers", defaults["n_layers"] if n_layers is None else n_layers)
    elif hidden is not None or n_layers is not None:
        raise ValueError("hidden and n_layers are EGNN options; pass kernel-field options in field_options")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    requested: dict[str, Any] = {
        "system": system,
        "objective": objective,
        "field": field,
        "field_hyperparameters": hyper,
        "prior_std": float(prior_std),
        "solver": "rk4",
        "steps": steps,
        "batch_size": defaults["batch_size"] if batch_size is None else batch_size,
        "lr": lr,
        "sigma": sigma,
        "ema_decay": ema_decay,
        "grad_clip": grad_clip,
        "schedule": "cosine",
        "schedule_clock": schedule_clock,
        "warmup_steps": None,
        "seed": seed,
        "max_steps": max_steps,
        "train_file": DATA_FILES[system]["train"],
    }

    with torch_threads(n_threads):
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, global RNG left alone
            torch.manual_seed(seed)
            flow = build_flow(
                sys_, field, steps=steps, prior_std=float(prior_std), compiled=compiled, device=device, **hyper
            )
        train_objective = _make_objective(objective, flow, sys_, sigma)
        data = TrainingData(x_train)
        saved, resumed = resolve_training_settings(out, requested, resume, _TRAINING_KEYS, "bench_particles")
        settings = dict(requested)
        if saved is not None:
            settings["max_steps"] = saved["max_steps"]
            settings["warmup_steps"] = saved["warmup_steps"]
            settings["ema_decay_used"] = saved["ema_decay_used"]
        else:
            if max_steps is None:
                settings["max_steps"] = probe_max_steps(
                    flow, train_objective, data, minutes=minutes, batch_size=settings["batch_size"],
                    lr=settings["lr"], seed=settings["seed"], probe_steps=_PROBE_MAX_STEPS,
                    probe_seconds=_PROBE_SECONDS,
                )  # fmt: skip
            settings["warmup_steps"] = min(100, settings["max_steps"] // 10)
            settings["ema_decay_used"] = auto_ema_decay(ema_decay, settings["max_steps"])
            write_json(out / SETTINGS_FILE, settings)
        by_time = schedule_clock == "time"
        config = TrainerConfig(
            max_steps=(max_steps or 10**9) if by_time else settings["max_steps"],
            max_minutes=minutes,
            batch_size=settings["batch_size"],
            lr=lr,
            schedule="cosine",
            schedule_clock=schedule_clock,
            warmup_steps=settings["warmup_steps"],
            grad_clip=grad_clip,
            ema_decay=settings["ema_decay_used"],
            seed=seed,
            checkpoint_every=max(50, settings["max_steps"] // 20),
            num_workers=num_workers,
            out_dir=out,
            progress=progress,
        )
        trainer = Trainer(flow, train_objective, config, data)
        summary = trainer.fit(resume=resume)

        x_test = torch.as_tensor(x_test_all[evaluation_subset(len(x_test_all), n_test, seed)])
        eval_start = time.perf_counter()
        averaged = trainer.ema.average_parameters() if trainer.ema is not None else nothing()
        with averaged:
            flow.eval()
            flow.save(out / "flow.pt")
            metrics = _evaluate(flow, sys_, x_test, n_samples, n_check, seed, reference_tol)
        eval_seconds = time.perf_counter() - eval_start
        threads = torch.get_num_threads()

    arrays = metrics.pop("_arrays")
    title = f"{system.upper()}, {objective}, {summary.elapsed_seconds / 60:.1f} min"
    plots = {
        "energy_histogram": str(
            _plot_energies(out / "energy_histogram.png", arrays["u_test"], arrays["u_flow"], arrays["log_w"], title)
        ),
        "distance_histogram": str(
            _plot_distances(out / "distance_histogram.png", arrays["d_test"], arrays["d_flow"], title)
        ),
    }
    published = PUBLISHED.get(system, {})
    result: dict[str, Any] = {
        "system": system,
        "objective": objective,
        **metrics,
        "train_seconds": summary.elapsed_seconds,
        "n_parameters": sum(p.numel() for p in flow.parameters()),
        "device": str(flow.device),
        "training": {
            "steps": summary.step,
            "steps_this_session": summary.steps_this_session,
            "resumed": resumed and summary.step > summary.steps_this_session,
            "stopped_by": summary.stopped_by,
            "final_loss": _finite_or_none(summary.final_loss),
            "mean_step_seconds": _finite_or_none(summary.mean_step_seconds),
            "mean_data_seconds": _finite_or_none(summary.mean_data_seconds),
            "mean_pairing_seconds": summary.mean_pairing_seconds,
            "skipped_steps": summary.skipped_steps,
        },
        "eval_seconds": eval_seconds,
        "plots": plots,
        "published": {
            "source": "Klein, Kraemer & Noe 2023 (EFM), Table 1, GPU; as quoted in issue 3",
            "nll": published.get("nll"),
            "ess": published.get("ess"),
            "path_length": published.get("path_length", {}).get(objective),
        },
        "machine": machine_record() | {"torch_threads": threads},
        "settings": {
            **settings,
            "minutes": minutes,
            "device_requested": str(device),
            "n_threads": n_threads,
            "num_workers": num_workers,
            "compiled": compiled,
            "n_eval_samples": n_samples,
            "n_eval_test": n_test,
            "n_integration_samples": n_check,
            "reference_tol": reference_tol,
            "test_file": DATA_FILES[system]["test"],
            "n_train": len(x_train),
            "evaluation": (
                "exact log q (closed-form divergence where the field has one), RK4 with the flow's steps, "
                "EMA weights; n_eval_samples flow samples for ESS and plots, n_eval_test test configurations "
                "(seeded subset) for NLL, forward ESS and path length. Defaults (DW4: 5000 samples and the whole "
                "test split of 10000; LJ13: 500 and 500) keep evaluation to a few minutes on 2 CPU cores; see "
                "eval_timing for the measured rates"
            ),
            "nll_convention": (
                "nll excludes the prior constant ((N-1)*D/2)*ln(2*pi) (the EFM tables); "
                "nll_with_prior_constant is -log q on the mean-free subspace as CNF.log_prob returns it"
            ),
        },
        "out_dir": str(out),
    }
    result["wall_seconds"] = time.perf_counter() - wall_start
    write_json(out / "result.json", result)
    logger.info(
        "%s %s: NLL %.3f (with prior constant %.3f), ESS %.1f %%, forward ESS %.1f %%, path %.3f",
        system, objective, result["nll"], result["nll_with_prior_constant"], 100 * result["ess"],
        100 * result["forward_ess"], result["path_length"],
    )  # fmt: skip
    return result


def _finite_or_none(value: float) -> float | None:
    """``value``, or None when it is NaN/inf (no session steps), so that result.json stays strict JSON."""
    return value if math.isfinite(value) else None


def _target_rows(target: dict[str, Any] | None, row: Any) -> list[str]:
    """The exact target density's NLL and the paired KL, when the result has them."""
    if not target:
        return []
    return [
        row("NLL of the exact target density", f"{target['nll']:.3f} ± {target['nll_stderr']:.3f}"),
        row("  flow - target (KL(p||q))", f"{target['kl']:.3f} ± {target['kl_stderr']:.3f}"),
        row("  log Z (IS, flow samples)", f"{target['log_z']:.3f} ± {target['log_z_stderr']:.3f}"),
        *([row("  log Z (from the test data)", f"{target['log_z_forward']:.3f} ± "
                                                f"{target['log_z_forward_stderr']:.3f}")]
          if "log_z_forward" in target else []),
    ]  # fmt: skip


def format_particles(result: dict[str, Any]) -> str:
    """A table of one :func:`bench_particles` result, with the published numbers next to it."""
    s, t, p = result["settings"], result["training"], result["published"]
    hyper = ", ".join(f"{k}={v}" for k, v in s["field_hyperparameters"].items())
    err = result["integration_error"]

    def published(key: str, scale: float = 1.0, unit: str = "") -> str:
        value = p.get(key)
        return "" if value is None else f"{scale * value:>12.2f}{unit}"

    def row(label: str, value: str, reference: str = "") -> str:
        return f"{label:<34}{value:>14}{reference:>16}"

    pc = result["prior_constant"]
    loss = "n/a" if t["final_loss"] is None else f"{t['final_loss']:.4g}"
    lines = [
        f"{result['system'].upper()}, objective {result['objective']}, {s['field']} ({hyper}), "
        f"{result['n_parameters']} parameters, {result['device']}",
        f"training: {t['steps']} steps in {result['train_seconds']:.0f} s (stopped by {t['stopped_by']}"
        f"{', resumed' if t['resumed'] else ''}), batch {s['batch_size']}, final loss {loss}"
        f"{', torch.compile' if s.get('compiled') else ', eager'}",
        row("metric", "this run", "published"),
        row("NLL, prior constant excluded", f"{result['nll']:.3f} ± {result['nll_stderr']:.3f}", published("nll")),
        row(f"NLL, with prior constant (+{pc:.3f})", f"{result['nll_with_prior_constant']:.3f}",
            "" if p.get("nll") is None else f"{p['nll'] + pc:>12.2f}"),
        row("reverse ESS (Kish / n)", f"{100 * result['ess']:.1f} %", published("ess", 100.0, " %")),
        row("forward ESS / n", f"{100 * result['forward_ess']:.1f} %"),
        row("path length |x1 - x0|", f"{result['path_length']:.3f}", published("path_length")),
        *_target_rows(result.get("target_density"), row),
        f"{err['solver']} vs {err['reference']}, {err['n_samples']} samples / test configurations:",
        row("  samples: |dlog q| max / median", f"{err['log_q_max_abs']:.1e} / {err['log_q_median_abs']:.1e}"),
        row("  samples: |dx| max / mean", f"{err['x_max_abs']:.1e} / {err['x_mean_abs']:.1e}"),
        row("  test: |dlog q| max / median", f"{err['test_log_q_max_abs']:.1e} / {err['test_log_q_median_abs']:.1e}"),
        row("  test: |dx| max / mean", f"{err['test_x_max_abs']:.1e} / {err['test_x_mean_abs']:.1e}"),
        f"evaluation: {s['n_eval_samples']} flow samples, {s['n_eval_test']} test configurations, "
        f"{result['eval_seconds']:.0f} s; failed frames {result['failed_frames']} (flow), "
        f"{result['failed_test_frames']} (test)",
        f"wall time {result['wall_seconds']:.0f} s on {result['machine']['cpu_count']} CPUs "
        f"({result['machine']['host_cpu']}), {result['machine']['torch_threads']} torch thread(s)",
    ]  # fmt: skip
    return "\n".join(lines)
