"""YAML protocols as frozen dataclasses, checked key by key.

A protocol is one mapping with a fixed set of sections, each run as one step in
this order: ``simulate`` (a list of stages, each feeding the next),
``train``, ``sample``, ``reweight``, ``profile``, ``mcmc``, ``report``. A
missing section is a skipped step (``simulate`` is needed unless ``train``
reads a dataset file). Every key is validated: an unknown key, a wrong type or
a value outside what is allowed raises :class:`ProtocolError` naming the key
path (``train.model.hidden``), the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

__all__ = [
    "LoadConfig",
    "MCMCConfig",
    "MDConfig",
    "ModelConfig",
    "ParallelTemperingConfig",
    "ProfileConfig",
    "Protocol",
    "ProtocolError",
    "ReportConfig",
    "ReweightConfig",
    "SampleConfig",
    "StageConfig",
    "TrainConfig",
    "UmbrellaConfig",
    "XTBRelaxConfig",
    "bundled_protocols",
    "load_protocol",
    "protocols_dir",
]


class ProtocolError(ValueError):
    """A protocol file or mapping that cannot be run as written."""


# ----------------------------------------------------------------- simulate
@dataclass(frozen=True)
class MDConfig:
    """Langevin MD with OpenMM (:func:`bgplugin.simulation.run_md`); 1 fs because systems have no constraints."""

    engine: Literal["md"] = "md"
    n_frames: int = 1000
    stride: int = 100
    temperature: float | None = None
    timestep_fs: float = 1.0
    friction_per_ps: float = 1.0
    equilibration_steps: int = 10_000
    platform: str = "CPU"


@dataclass(frozen=True)
class ParallelTemperingConfig:
    """openmmtools parallel tempering (:func:`bgplugin.simulation.run_parallel_tempering`); frames of the lowest T."""

    engine: Literal["parallel_tempering"] = "parallel_tempering"
    t_min: float = 300.0
    t_max: float = 600.0
    n_replicas: int = 4
    n_iterations: int = 500
    steps_per_iteration: int = 500
    platform: str = "CPU"


@dataclass(frozen=True)
class UmbrellaConfig:
    """Umbrella sampling along a CV (:func:`bgplugin.simulation.run_umbrella`).

    ``training_frames``: ``"all"`` keeps every window's frames unweighted (a
    flat distribution along the CV, a good proposal that covers both basins)
    with their MBAR log-weights stored; :attr:`TrainConfig.weights` decides
    whether training uses them.
    """

    engine: Literal["umbrella"] = "umbrella"
    cv: str = "phi"
    n_windows: int = 36
    k: float = 200.0
    ns_per_window: float = 1.0
    stride: int = 100
    equilibration_ps: float = 20.0
    n_workers: int = 2
    platform: str = "Reference"
    n_bootstraps: int = 100


@dataclass(frozen=True)
class XTBRelaxConfig:
    """Short GFN2-xTB Langevin relaxation of every frame of the previous stage (:func:`relax_with_xtb`)."""

    engine: Literal["xtb_relax"] = "xtb_relax"
    fs: float = 100.0
    timestep_fs: float = 1.0
    friction: float = 0.5
    temperature: float = 300.0
    backend: Literal["xtb", "tblite"] = "xtb"
    solvent: str | None = None
    n_workers: int = 2
    max_frames: int | None = None


@dataclass(frozen=True)
class LoadConfig:
    """Frames from a file instead of a simulation.

    ``path``: a :class:`~bgplugin.data.Dataset` HDF5 file, a NumPy ``.npy``
    array of particle positions, or ``benchmark:train`` / ``benchmark:test``
    for the published DW4 / LJ13 / LJ55 splits (found in ``shared/data`` or
    ``$BGPLUGIN_DATA_DIR``). Relative paths are relative to the working directory.
    """

    engine: Literal["load"] = "load"
    path: str = "benchmark:train"


StageConfig = Union[MDConfig, ParallelTemperingConfig, UmbrellaConfig, XTBRelaxConfig, LoadConfig]  # noqa: UP007
_STAGES: dict[str, type] = {
    "load": LoadConfig,
    "md": MDConfig,
    "parallel_tempering": ParallelTemperingConfig,
    "umbrella": UmbrellaConfig,
    "xtb_relax": XTBRelaxConfig,
}


# -------------------------------------------------------------------- train
@dataclass(frozen=True)
class ModelConfig:
    """The flow: :func:`bgplugin.flows.build_flow` arguments.

    ``kind: cnf`` uses ``field``, ``symmetry``, ``length_scale`` and
    ``solver_steps``; ``kind: eacf`` (an augmented coupling flow,
    docs/eacf.md) uses ``projection``, ``n_blocks``, ``n_transforms`` (projection
    transforms in sequence inside each coupling layer), ``n_aug``,
    ``aug_scale``, ``n_bins`` and ``n_marginal``. ``hidden``, ``n_layers``,
    ``prior_std`` and ``distinguishable`` serve both.

    ``prior``: ``"isotropic"`` (default) starts from the mean-free Gaussian
    of standard deviation ``prior_std``; ``"data"`` from the correlated
    mean-free Gaussian whose particle covariance is fitted to the training
    frames (with their weights, if the training uses weights;
    :func:`bgplugin.flows.fit_particle_covariance`), which puts bonded atoms
    close together before training. An E-ACF keeps ``prior_std`` as its
    length scale. ``prior_floor``: the fitted covariance's eigenvalues are
    at least this fraction of their mean (``fit_particle_covariance(...,
    floor=...)``).

    ``compiled``: build the flow with ``compiled=True`` (saved with it):
    an E-ACF trains and samples through ``torch.compile`` (a training step
    1.3-1.6x faster on a CPU after a minute or two of compilation); a CNF
    regresses its field through it in flow matching and evaluates its exact
    divergence through it when sampling and reweighting.
    """

    kind: Literal["cnf", "eacf"] = "cnf"
    field: Literal["egnn", "kernel"] = "egnn"
    hidden: int = 64
    n_layers: int = 5
    symmetry: Literal["E(n)", "SE(n)"] = "SE(n)"
    prior_std: float = 0.16
    prior: Literal["isotropic", "data"] = "isotropic"
    prior_floor: float = 1e-4
    length_scale: float = 1.0
    solver_steps: int = 20
    distinguishable: Literal["all", "backbone", "none"] = "all"
    projection: Literal["spherical", "cartesian", "vector"] = "spherical"
    n_blocks: int = 4
    n_transforms: int = 1
    n_aug: int = 1
    aug_scale: float = 0.1
    n_bins: int = 8
    n_marginal: int = 20
    compiled: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Training of the flow (:class:`bgplugin.training.Trainer`).

    ``weights``: ``"none"`` trains on the frames as they are; ``"dataset"``
    uses the dataset's log-weights (e.g. MBAR weights of umbrella frames or
    the weights of a biased set); ``"von_mises"`` first resamples the frames
    with a von Mises bias along ``bias_cv`` (the EFM recipe) and trains on
    the result unweighted.

    ``grad_guard``: skip steps whose gradient norm exceeds 20x the running
    median and clip above 5x (:class:`bgplugin.training.GradientGuard`);
    ``None`` (default) turns it on for E-ACFs (the paper's optimiser) and
    off for CNFs, whose flow-matching gradients have no such outliers.

    ``max_rollbacks``: when the loss runs away (many steps far above the
    recent losses), restore the weights of a few hundred steps earlier and
    halve the learning rate, at most this many times
    (``TrainerConfig.max_rollbacks``); ``None`` (default): 3 for E-ACFs, 0
    for CNFs.

    ``kl_weight`` (default 0: off): train by example and by energy
    (Noé et al. 2019), the loss ``(1 - lambda) NLL + lambda KL(q || p)`` with
    the reverse KL from ``kl_samples`` flow samples per step and the
    system's force field (OpenMM CPU in the training process, or the
    particle potential); ``lambda`` is 0 for the first ``kl_start`` of the
    steps, then rises linearly to ``kl_weight`` over the next ``kl_ramp``.
    Energies above ``energy_cutoff`` kT enter logarithmically (``null``: as
    they are). Needs ``objective: nll`` (an E-ACF mixes the joint
    objectives, a CNF uses :class:`bgplugin.training.MLKL`).

    ``aug_draws`` (E-ACF only; default 1): draws of the augmented variables
    per training frame. 1 trains the joint likelihood (the paper); K > 1 the
    importance-weighted K-draw bound of the marginal likelihood
    (:class:`bgplugin.flows.eacf.training.MarginalMaximumLikelihood`), K joint
    evaluations per frame (``batch_size`` frames per step). Not with
    ``kl_weight`` > 0 (the mixture is joint).

    ``schedule_clock``: ``"steps"`` (default) spans the cosine decay over
    ``max_steps`` (estimated from a timing probe when null), so a rerun with
    the same seed gives the same flow; ``"time"`` spans it over ``minutes``
    of training, so it ends when the budget is spent however loaded the
    machine is (``max_steps`` is then only a cap).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    objective: Literal["eqot", "ot", "cfm", "nll"] = "ot"
    minutes: float = 10.0
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 5e-4
    sigma: float = 0.0
    ema_decay: float | None = 0.999
    grad_clip: float | None = 10.0
    grad_guard: bool | None = None
    max_rollbacks: int | None = None
    schedule_clock: Literal["steps", "time"] = "steps"
    kl_weight: float = 0.0
    kl_start: float = 0.5
    kl_ramp: float = 0.1
    kl_samples: int = 32
    energy_cutoff: float | None = 1000.0
    aug_draws: int = 1
    weights: Literal["none", "dataset", "von_mises"] = "none"
    bias_cv: str = "phi"
    bias_mu: float = 1.0
    bias_kappa: float = 10.0
    bias_scale: float = 150.0
    max_frames: int | None = None
    dataset: str | None = None


@dataclass(frozen=True)
class SampleConfig:
    """Flow samples with exact log-densities, written in resumable chunks.

    ``n_workers``: processes that draw chunks in parallel on a CPU (a GPU uses one).
    ``density`` (E-ACF only; a CNF's density is always exact): ``"joint"``
    stores :math:`\\log q(x, a) - \\log \\pi(a|x)` from one pass, whose weights are
    the exact joint importance weights; ``"marginal"`` stores the M-draw
    estimate of :math:`\\log q(x)` (``model.n_marginal`` draws, M + 1 passes).
    ``compiled``: sample through ``torch.compile`` (``flow.with_options(compiled=True)``:
    a CNF's exact divergence, an E-ACF's coupling layers; same log q, faster
    per sample after about a minute of compilation per worker process).
    It applies whatever ``train.model.compiled`` was (a flow trained
    compiled samples eagerly unless this is true), and also to the
    densities the reweight step evaluates (mirror images, forward ESS).
    """

    n_samples: int = 10_000
    chunk_size: int = 256
    n_workers: int = 2
    density: Literal["joint", "marginal"] = "joint"
    compiled: bool = False


@dataclass(frozen=True)
class ReweightConfig:
    """Importance weights against the target energy.

    ``energy``: ``"openmm"`` is the system's own force field (or its particle
    potential); ``"xtb"`` / ``"tblite"`` is GFN2-xTB (level transfer).
    ``forward_ess_frames``: training frames on which the flow's density is
    evaluated for the forward ESS (0 skips it; exact log q costs as much as
    sampling).
    """

    energy: Literal["openmm", "xtb", "tblite"] = "openmm"
    platform: str = "Reference"
    n_workers: int = 2
    chirality: Literal["filter", "mirror", "ignore"] = "filter"
    clip_quantile: float | None = None
    xtb_solvent: str | None = None
    forward_ess_frames: int = 200


@dataclass(frozen=True)
class ProfileConfig:
    """Free-energy profile and dF from the reweighted samples, compared with a reference.

    ``min_effective_samples``: below this Kish effective sample size the
    reweighted dF is not reported as a number (its delta-method error bar
    would be meaningless: one dominant weight gives a tiny error around an
    arbitrary value); the summary says why and keeps the raw estimate aside.
    """

    cv: str = "phi"
    bins: int = 36
    n_bootstrap: int = 100
    f_max: float = 6.0
    state_a: tuple[float, float] = (0.0, math.pi)
    state_b: tuple[float, float] = (-math.pi, 0.0)
    reference: str | None = "bundled"
    min_effective_samples: float = 20.0


@dataclass(frozen=True)
class MCMCConfig:
    """Langevin MD mixed with flow independence moves (:mod:`bgplugin.mcmc`)."""

    n_iterations: int = 200
    langevin_steps: int = 100
    n_proposals: int = 1
    platform: str = "Reference"


@dataclass(frozen=True)
class ReportConfig:
    """Plots and the written summary; ``full_run_note`` says how far a full run would go."""

    plots: bool = True
    full_run_note: str = ""


@dataclass(frozen=True)
class Protocol:
    """A whole study: system, settings of every step, seed and device."""

    name: str
    system: str
    seed: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    description: str = ""
    simulate: tuple[StageConfig, ...] = ()
    train: TrainConfig | None = None
    sample: SampleConfig | None = None
    reweight: ReweightConfig | None = None
    profile: ProfileConfig | None = None
    mcmc: MCMCConfig | None = None
    report: ReportConfig | None = None

    @property
    def steps(self) -> list[str]:
        """Names of the steps this protocol runs, in order."""
        names = ["simulate"] if self.simulate else []
        names += [s for s in ("train", "sample", "reweight", "profile", "mcmc", "report") if getattr(self, s)]
        return names

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (tuples as lists) that :func:`load_protocol` reads back to an equal protocol."""
        return _plain(dataclasses.asdict(self))

    def with_overrides(self, **changes: Any) -> Protocol:
        """A copy with top-level fields replaced (validated like the file)."""
        data = self.to_dict()
        data.update(changes)
        return load_protocol(data)


# ------------------------------------------------------------------ loading
def protocols_dir() -> Path:
    """The bundled ``protocols/`` folder (source tree or install prefix)."""
    from bgplugin.systems import systems_dir

    candidate = systems_dir().parent / "protocols"  # source tree, or share/bgplugin/ when installed
    if (candidate / "quickstart.yaml").is_file():
        return candidate
    raise FileNotFoundError(f"bundled protocols not found (looked in {candidate})")


def bundled_protocols() -> dict[str, Path]:
    """Name -> path of every bundled protocol."""
    return {p.stem: p for p in sorted(protocols_dir().glob("*.yaml"))}


def load_protocol(source: str | Path | Mapping[str, Any]) -> Protocol:
    """Read a protocol from a YAML file, the name of a bundled protocol, or a mapping.

    Raises
    ------
    ProtocolError
        With the key path, the bad value and what is allowed.
    FileNotFoundError
        When a file or bundled name does not exist (the message lists the bundled ones).
    """
    if isinstance(source, Mapping):
        data: Any = dict(source)
        origin = "<mapping>"
    else:
        path = Path(source)
        if not path.is_file() and path.suffix == "" and str(source) in bundled_protocols():
            path = bundled_protocols()[str(source)]
        if not path.is_file():
            raise FileNotFoundError(
                f"protocol file {str(source)!r} does not exist; bundled protocols: {sorted(bundled_protocols())}"
            )
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ProtocolError(f"{path} is not valid YAML: {exc}") from exc
        origin = str(path)
    if not isinstance(data, Mapping):
        raise ProtocolError(f"{origin}: a protocol must be a mapping of sections, got {type(data).__name__}")
    if "name" not in data and not isinstance(source, Mapping):
        data["name"] = Path(source).stem
    protocol = _build(Protocol, data, "")
    _check_values(protocol)
    return protocol


def _build(cls: type, data: Any, path: str) -> Any:
    where = path or "protocol"
    if not isinstance(data, Mapping):
        raise ProtocolError(f"{where} must be a mapping with keys {_names(cls)}, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ProtocolError(
            f"unknown key {_join(path, str(unknown[0]))!r} (value {data[unknown[0]]!r}); "
            f"allowed keys in {where}: {sorted(known)}"
        )
    missing = [
        n for n, f in known.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in data
    ]  # fmt: skip
    if missing:
        raise ProtocolError(f"{where} needs the key {_join(path, missing[0])!r}")
    values = {name: _convert(hints[name], value, _join(path, name)) for name, value in data.items()}
    return cls(**values)


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if path == "simulate":
        return _convert_stages(value, path)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ProtocolError(f"{path} may not be null")
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, path)
            except ProtocolError as exc:
                errors.append(str(exc))
        raise ProtocolError(errors[0] if len(errors) == 1 else f"{path}: {'; or '.join(errors)}")
    if origin is Literal:
        if value not in args:
            raise ProtocolError(f"{path} must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise ProtocolError(f"{path} must be a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{path} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{path} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            value = _parse_number(value, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ProtocolError(f"{path} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ProtocolError(f"{path} must be a string, got {value!r}")
        return value
    raise ProtocolError(f"{path}: unsupported type {hint}")  # a bug in the schema, not in the file


def _convert_stages(value: Any, path: str) -> tuple[Any, ...]:
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(f"{path} must be a list of stages (each with an 'engine' key), got {value!r}")
    stages = []
    for i, stage in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(stage, Mapping) or "engine" not in stage:
            raise ProtocolError(f"{where} must be a mapping with an 'engine' key, one of {sorted(_STAGES)}")
        engine = stage["engine"]
        if engine not in _STAGES:
            raise ProtocolError(f"{where}.engine must be one of {sorted(_STAGES)}, got {engine!r}")
        stages.append(_build(_STAGES[engine], stage, where))
    return tuple(stages)


def _check_values(p: Protocol) -> None:
    """Range checks that types alone cannot express."""
    from bgplugin.systems import list_systems

    if p.system not in list_systems():
        raise ProtocolError(f"system must be one of {list_systems()}, got {p.system!r}")
    if isinstance(p.seed, bool) or not 1 <= p.seed < 2**31 - 1000:
        raise ProtocolError(
            f"seed must be an integer in 1..{2**31 - 1001}, got {p.seed!r} (OpenMM reads 0 as 'random'; stages use "
            "seed, seed + 1, ...)"
        )
    checks: list[tuple[str, Any, str]] = []
    for i, stage in enumerate(p.simulate):
        where = f"simulate[{i}]"
        if isinstance(stage, XTBRelaxConfig) and i == 0:
            raise ProtocolError(f"{where}: xtb_relax relaxes the frames of an earlier stage; put an md stage first")
        for name in ("n_frames", "stride", "n_iterations", "steps_per_iteration", "n_windows", "n_workers",
                     "n_replicas", "n_bootstraps", "max_frames"):  # fmt: skip
            if hasattr(stage, name) and getattr(stage, name) is not None:
                checks.append((f"{where}.{name}", getattr(stage, name), "int>=1"))
        for name in ("timestep_fs", "friction_per_ps", "ns_per_window", "k", "fs", "temperature", "t_min", "t_max"):
            if hasattr(stage, name) and getattr(stage, name) is not None:
                checks.append((f"{where}.{name}", getattr(stage, name), ">0"))
        if isinstance(stage, ParallelTemperingConfig) and not stage.t_max > stage.t_min:
            raise ProtocolError(f"{where}: t_max ({stage.t_max}) must exceed t_min ({stage.t_min})")
    if p.train is not None:
        t = p.train
        checks += [("train.minutes", t.minutes, ">0"), ("train.batch_size", t.batch_size, "int>=1"),
                   ("train.lr", t.lr, ">0"), ("train.sigma", t.sigma, ">=0"),
                   ("train.model.hidden", t.model.hidden, "int>=1"),
                   ("train.model.n_layers", t.model.n_layers, "int>=1"),
                   ("train.model.prior_std", t.model.prior_std, ">0"),
                   ("train.model.length_scale", t.model.length_scale, ">0"),
                   ("train.model.solver_steps", t.model.solver_steps, "int>=1")]  # fmt: skip
        if t.max_steps is not None:
            checks.append(("train.max_steps", t.max_steps, "int>=1"))
        if t.max_frames is not None:
            checks.append(("train.max_frames", t.max_frames, "int>=1"))
        if t.max_rollbacks is not None:
            checks.append(("train.max_rollbacks", t.max_rollbacks, ">=0"))
        if not 0 < t.model.prior_floor < 1:
            raise ProtocolError(f"train.model.prior_floor must be in (0, 1), got {t.model.prior_floor}")
        for name in ("kl_weight", "kl_start", "kl_ramp"):
            if not 0 <= getattr(t, name) <= 1:
                raise ProtocolError(f"train.{name} must be in [0, 1], got {getattr(t, name)}")
        checks.append(("train.kl_samples", t.kl_samples, "int>=1"))
        checks.append(("train.aug_draws", t.aug_draws, "int>=1"))
        several_draws = isinstance(t.aug_draws, int) and not isinstance(t.aug_draws, bool) and t.aug_draws > 1
        if several_draws and t.model.kind != "eacf":
            raise ProtocolError(
                f"train.aug_draws {t.aug_draws} draws augmented variables, which only an E-ACF has "
                "(train.model.kind 'eacf'); leave train.aug_draws at 1"
            )
        if several_draws and t.kl_weight > 0:
            raise ProtocolError(
                f"train.aug_draws {t.aug_draws} trains the marginal bound, but train.kl_weight {t.kl_weight} mixes "
                "in the joint reverse KL, which trains the joint likelihood: set one of them back (aug_draws 1 or "
                "kl_weight 0)"
            )
        if t.kl_weight > 0 and t.objective != "nll":
            raise ProtocolError(
                f"train.kl_weight {t.kl_weight} mixes the reverse KL into maximum likelihood, but train.objective is "
                f"{t.objective!r} (flow matching): set train.objective to 'nll' or train.kl_weight to 0"
            )
        if t.kl_start + t.kl_ramp > 1:
            raise ProtocolError(
                f"train.kl_start + train.kl_ramp must be <= 1 (the ramp ends within the run), got "
                f"{t.kl_start} + {t.kl_ramp}"
            )
        if t.ema_decay is not None and not 0 < t.ema_decay < 1:
            raise ProtocolError(f"train.ema_decay must be in (0, 1) or null, got {t.ema_decay}")
        if t.model.kind == "eacf":
            if t.objective != "nll":
                raise ProtocolError(
                    f"train.objective {t.objective!r} is flow matching, which trains CNFs; an E-ACF "
                    "(train.model.kind 'eacf') trains by maximum likelihood: set train.objective to 'nll'"
                )
            checks += [("train.model.n_blocks", t.model.n_blocks, "int>=1"),
                       ("train.model.n_transforms", t.model.n_transforms, "int>=1"),
                       ("train.model.n_aug", t.model.n_aug, "int>=1"),
                       ("train.model.aug_scale", t.model.aug_scale, ">0"),
                       ("train.model.n_bins", t.model.n_bins, "int>=1"),
                       ("train.model.n_marginal", t.model.n_marginal, "int>=1")]  # fmt: skip
            reflection_free = t.model.projection != "vector"
            if (p.reweight is not None and p.reweight.chirality == "mirror" and reflection_free
                    and (p.sample is None or p.sample.density == "joint")):  # fmt: skip
                raise ProtocolError(
                    f"reweight.chirality 'mirror' with the SE(3) projection {t.model.projection!r} needs the "
                    "marginal density of mirror images, which joint weights (sample.density 'joint') cannot be "
                    "combined with: use reweight.chirality 'filter', sample.density 'marginal', or "
                    "train.model.projection 'vector' (reflection-symmetric)"
                )
        if not p.simulate and t.dataset is None:
            raise ProtocolError("train needs data: add a simulate section or set train.dataset to a Dataset file")
    if p.sample is not None:
        checks += [("sample.n_samples", p.sample.n_samples, "int>=1"), ("sample.chunk_size", p.sample.chunk_size,
                   "int>=1"), ("sample.n_workers", p.sample.n_workers, "int>=1")]  # fmt: skip
    if p.reweight is not None:
        checks.append(("reweight.n_workers", p.reweight.n_workers, "int>=1"))
        checks.append(("reweight.forward_ess_frames", p.reweight.forward_ess_frames, ">=0"))
        q = p.reweight.clip_quantile
        if q is not None and not 0.5 < q < 1:
            raise ProtocolError(f"reweight.clip_quantile must be in (0.5, 1) or null (no clipping), got {q}")
    if p.profile is not None:
        checks += [("profile.bins", p.profile.bins, "int>=1"), ("profile.n_bootstrap", p.profile.n_bootstrap,
                   "int>=1"), ("profile.f_max", p.profile.f_max, ">0"),
                   ("profile.min_effective_samples", p.profile.min_effective_samples, ">=0")]  # fmt: skip
    if p.mcmc is not None:
        checks += [("mcmc.n_iterations", p.mcmc.n_iterations, "int>=1"),
                   ("mcmc.langevin_steps", p.mcmc.langevin_steps, "int>=1"),
                   ("mcmc.n_proposals", p.mcmc.n_proposals, "int>=1")]  # fmt: skip
    for path, value, rule in checks:
        ok = value >= 1 if rule == "int>=1" else value > 0 if rule == ">0" else value >= 0
        if not ok:
            allowed = {"int>=1": "an integer >= 1", ">0": "a number > 0", ">=0": "a value >= 0"}[rule]
            raise ProtocolError(f"{path} must be {allowed}, got {value!r}")
    needs = {"sample": "train", "reweight": "sample", "profile": "reweight", "mcmc": "train"}
    for step, before in needs.items():
        if getattr(p, step) is not None and getattr(p, before) is None:
            raise ProtocolError(f"the {step} step needs a {before} section (it uses that step's output)")


def _parse_number(value: str, path: str) -> float:
    try:
        return float(value)  # YAML 1.1 reads "1e-4" as a string
    except ValueError:
        raise ProtocolError(f"{path} must be a number, got {value!r}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
