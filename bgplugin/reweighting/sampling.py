r"""Draw samples from a flow and reweight them to a target energy: :func:`reweight`, :func:`reweight_samples`.

The target is any :class:`~bgplugin.energies.Energy`: the classical force
field (``OpenMMEnergy``), GFN2-xTB (``XTBEnergy``), a particle potential or a
biased energy. Level transfer (a flow trained on force-field data reweighted
to GFN2-xTB) is just ``reweight(flow, XTBEnergy(...), n)``; the ESS it
reports says how much the change of target costs.

Conventions
-----------
* Flow samples are mean-free (centroid at the origin) and are kept that way:
  bgplugin's energies (no periodic box, no external field) are translation
  invariant, and the flow's :math:`\log q` is a density on the same mean-free
  coordinates, so :math:`\log w = -u - \log q` needs no correction.
* Energies are evaluated in float64 on the CPU array of the samples.
* A frame whose energy fails (``+inf``, see :class:`~bgplugin.energies.FrameStatus`)
  gets weight 0 and is counted in ``n_failed``; it stays in the result so
  that the ESS is a fraction of everything that was drawn.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import mdtraj
import numpy as np
import torch
from tqdm.auto import tqdm

from bgplugin.analysis.chirality import (
    CHIRALITY_MODES,
    ChiralityMode,
    chirality_info,
    classify_chirality,
    has_stereocenters,
    mirror,
)
from bgplugin.data import Dataset
from bgplugin.energies import Energy, FrameStatus
from bgplugin.reweighting.trajectory import WeightedTrajectory
from bgplugin.reweighting.weights import (
    LOG_WEIGHTS_DEFINITION,
    clip_log_weights,
    ess,
    log_weights,
    resolve_clip,
    weight_diagnostics,
)

logger = logging.getLogger(__name__)

#: Quantile levels of the finite energies reported in the diagnostics.
_ENERGY_QUANTILES = (0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0)


class Sampler(Protocol):
    """Anything :func:`reweight` can draw from: a CNF, a coupling flow, a Gaussian."""

    def sample(self, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log_q)``: x shape (n, n_particles, dim), log_q shape (n,) in nats."""
        ...


@dataclass
class ReweightingResult:
    r"""Samples with their energies, proposal log-densities and importance weights.

    Attributes
    ----------
    positions : ndarray, shape (n, n_particles, dim), float64
        Mean-free samples (nm for molecules, reduced units for particle
        systems), mirrored where ``chirality["mode"] == "mirror"``.
    log_q : ndarray, shape (n,)
        Log-density of each returned frame under the proposal (nats); after
        mirroring this is the density of the mirrored proposal,
        :math:`\log[q(y) + q(My)]`.
    u : ndarray, shape (n,)
        Reduced target energy, kT (``+inf`` where the evaluation failed).
    log_w : ndarray, shape (n,)
        Log importance weights used for estimates: :math:`-u - \log q`, ``-inf``
        for failed frames and frames removed by the chirality filter, clipped
        when clipping was asked for.
    ess : float
        Kish ESS of ``log_w`` as a fraction of ``n`` (all drawn frames).
    n_failed : int
        Frames whose energy evaluation failed.
    status : ndarray of int8, shape (n,)
        :class:`~bgplugin.energies.FrameStatus` code of each frame.
    chirality : dict or None
        Counts of frames with the wrong handedness and the action taken
        (``mode``, ``n_wrong``, ``fraction_wrong``, ``n_mirrored``,
        ``n_removed``, ...); None for systems without stereocentres.
    clipped_fraction : float
        Fraction of frames whose weight was clipped (0 when clipping is off).
    diagnostics : dict
        Weight diagnostics before and after clipping, energy quantiles, failure
        reasons, timings.
    log_w_unclipped : ndarray, shape (n,)
        ``log_w`` before clipping (equal to it when clipping is off).
    temperature : float or None
        Temperature of the energy's kT (K for molecules).
    """

    positions: np.ndarray
    log_q: np.ndarray
    u: np.ndarray
    log_w: np.ndarray
    ess: float
    n_failed: int
    status: np.ndarray
    chirality: dict[str, Any] | None
    clipped_fraction: float
    diagnostics: dict[str, Any]
    log_w_unclipped: np.ndarray = field(repr=False)
    temperature: float | None = None

    def __post_init__(self) -> None:
        n = len(self.positions)
        for name in ("log_q", "u", "log_w", "status", "log_w_unclipped"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} frames")

    @property
    def n_samples(self) -> int:
        return int(len(self.positions))

    @property
    def n_effective(self) -> float:
        """Kish ESS in samples."""
        return self.ess * self.n_samples

    @property
    def valid(self) -> np.ndarray:
        """Boolean mask (n,) of frames with positive weight."""
        return np.isfinite(self.log_w)

    def to_trajectory(self, topology: mdtraj.Topology, *, drop_zero_weight: bool = False) -> WeightedTrajectory:
        """The samples as a :class:`WeightedTrajectory` (molecules; positions become float32 nm).

        Parameters
        ----------
        topology : mdtraj.Topology
            E.g. ``system.topology``.
        drop_zero_weight : bool
            Leave out frames with weight 0 (failed energies, wrong handedness).
        """
        if self.positions.shape[1:] != (topology.n_atoms, 3):
            raise ValueError(
                f"samples have shape {self.positions.shape[1:]} per frame but the topology has {topology.n_atoms} atoms"
            )
        keep = self.valid if drop_zero_weight else np.ones(self.n_samples, dtype=bool)
        traj = mdtraj.Trajectory(self.positions[keep].astype(np.float32), topology)
        return WeightedTrajectory(traj, self.log_w[keep], LOG_WEIGHTS_DEFINITION, self._metadata())

    def to_dataset(self, topology: mdtraj.Topology | None = None) -> Dataset:
        """The samples and log-weights as a :class:`~bgplugin.data.Dataset` (any system; topology for molecules)."""
        return Dataset(self.positions, topology, self.log_w.copy(), LOG_WEIGHTS_DEFINITION, self._metadata())

    def _metadata(self) -> dict[str, Any]:
        return {"method": "flow_reweighting", "temperature": self.temperature, "reweighting": self.to_dict()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no per-frame arrays)."""
        return {
            "n_samples": self.n_samples,
            "n_failed": self.n_failed,
            "ess": self.ess,
            "n_effective": self.n_effective,
            "clipped_fraction": self.clipped_fraction,
            "chirality": self.chirality,
            "temperature": self.temperature,
            "diagnostics": self.diagnostics,
        }


def reweight(
    flow: Sampler,
    energy: Energy,
    n_samples: int,
    *,
    batch_size: int = 1000,
    system: Any | None = None,
    chirality: ChiralityMode | None = None,
    clip: Mapping[str, float] | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    sample_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> ReweightingResult:
    r"""Draw ``n_samples`` from ``flow`` and weight them towards :math:`e^{-u}` of ``energy``.

    Parameters
    ----------
    flow : object with ``sample(n) -> (x, log_q)``
        A :class:`~bgplugin.flows.CNF` or any sampler with an exact
        log-density; called in batches under ``torch.no_grad()``.
    energy : Energy
        The target, e.g. ``OpenMMEnergy(system)`` or ``XTBEnergy(system.atomic_numbers)``.
    n_samples : int
    batch_size : int
        Samples drawn (and energies evaluated) per call.
    system : System or None
        Supplies the topology for the chirality check (molecules).
    chirality : {"filter", "mirror", "ignore"} or None
        What to do with frames of the wrong handedness; None means
        ``"filter"`` when the system's topology has stereocentres and
        ``"ignore"`` otherwise. See :func:`reweight_samples`.
    clip : {"quantile": q} or {"max_fraction": f} or None
        Weight clipping (:func:`~bgplugin.reweighting.clip_log_weights`); off
        by default.
    generator : torch.Generator or None
        Passed to ``flow.sample`` (on the flow's device).
    seed : int or None
        Seeds a new generator instead (not together with ``generator``).
    sample_kwargs : mapping or None
        More keyword arguments of ``flow.sample``; for an E-ACF
        ``{"density": "joint"}`` gives the exact joint importance weights in
        one pass (see :meth:`bgplugin.flows.eacf.EACF.sample`).
    progress : bool
        Progress bars over sampling and energy batches.

    Returns
    -------
    ReweightingResult
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    sample_kwargs = dict(sample_kwargs or {})
    if "generator" in sample_kwargs:
        raise ValueError("pass the generator as generator=..., not inside sample_kwargs")
    joint_ratio = sample_kwargs.get("density") == "joint"
    reflection_symmetric = proposal_is_reflection_symmetric(flow)
    if joint_ratio and chirality == "mirror" and not reflection_symmetric:
        raise ValueError(
            "chirality='mirror' needs q(Mx) of the same kind as the sampled log q, but density='joint' gives joint "
            "log-ratios: use chirality='filter', or density='marginal'"
        )
    if seed is not None:
        device = getattr(flow, "device", torch.device("cpu"))
        generator = torch.Generator(device=device).manual_seed(int(seed))
    if generator is not None:
        if not _accepts_keyword(flow.sample, "generator"):
            raise TypeError(
                f"{type(flow).__name__}.sample takes no generator argument; leave seed/generator unset and seed "
                "torch's global generator yourself (torch.manual_seed)"
            )
        sample_kwargs["generator"] = generator
    start = time.perf_counter()
    xs, log_qs = [], []
    sizes = [min(batch_size, n_samples - i) for i in range(0, n_samples, batch_size)]
    with torch.no_grad():
        for size in tqdm(sizes, desc="sampling flow", disable=not progress or len(sizes) < 2):
            x, log_q = flow.sample(size, **sample_kwargs)
            x, log_q = _to_numpy(x), _to_numpy(log_q)
            if x.shape[0] != size or log_q.shape != (size,):
                raise ValueError(
                    f"{type(flow).__name__}.sample({size}) returned x of shape {x.shape} and log_q of shape "
                    f"{log_q.shape}; expected ({size}, n_particles, dim) and ({size},)"
                )
            xs.append(x)
            log_qs.append(log_q)
    sampling_seconds = time.perf_counter() - start
    log_prob = getattr(flow, "log_prob", None)
    result = reweight_samples(
        np.concatenate(xs),
        np.concatenate(log_qs),
        energy,
        system=system,
        chirality=chirality,
        clip=clip,
        batch_size=batch_size,
        reflection_symmetric=reflection_symmetric,
        log_prob=None if log_prob is None else _numpy_log_prob(flow, batch_size),
        progress=progress,
    )
    result.diagnostics["timing"]["sampling_seconds"] = sampling_seconds
    result.diagnostics["timing"]["total_seconds"] = time.perf_counter() - start
    result.diagnostics["proposal"] = type(flow).__name__
    if joint_ratio:
        result.diagnostics["log_q"] = "joint: log q(x, a) - log pi(a|x) (exact joint importance weights)"
    return result


def reweight_samples(
    x: Any,
    log_q: Any,
    energy: Energy,
    *,
    system: Any | None = None,
    topology: mdtraj.Topology | None = None,
    chirality: ChiralityMode | None = None,
    clip: Mapping[str, float] | None = None,
    batch_size: int = 1000,
    reflection_symmetric: bool | None = None,
    log_prob: Callable[[np.ndarray], np.ndarray] | None = None,
    progress: bool = True,
) -> ReweightingResult:
    r"""Weight samples you already have (e.g. read from a file) towards :math:`e^{-u}` of ``energy``.

    Parameters
    ----------
    x : ndarray or Tensor, shape (n, n_particles, dim)
        Samples (nm for molecules), in the coordinates their ``log_q`` refers to.
    log_q : ndarray or Tensor, shape (n,)
        Their log-densities under the proposal (nats).
    energy : Energy
    system : System or None
        Its ``topology`` (if any) is used for the chirality check.
    topology : mdtraj.Topology or None
        Instead of ``system``.
    chirality : {"filter", "mirror", "ignore"} or None
        For molecules with amino-acid stereocentres. ``"filter"`` gives frames
        that are not all-L weight 0 (they stay in the arrays and count in the
        ESS); ``"mirror"`` reflects all-D frames (:math:`x \to -x`) and
        replaces :math:`\log q` of every kept frame :math:`y` by
        :math:`\log[q(y) + q(My)]`, the density of the mirrored proposal; mixed
        frames get weight 0. ``"ignore"`` only reports the counts. None:
        ``"filter"`` when there are stereocentres, else ``"ignore"``.
    clip : {"quantile": q} or {"max_fraction": f} or None
        Weight clipping; off by default.
    batch_size : int
        Frames per energy call.
    reflection_symmetric : bool or None
        Whether the proposal satisfies :math:`q(My) = q(y)` (an E(3)-equivariant
        flow); then :math:`\log[q(y) + q(My)] = \log q(y) + \ln 2`. Needed with
        ``chirality="mirror"`` unless ``log_prob`` is given.
    log_prob : callable or None
        ``log_prob(x) -> log_q`` (ndarray in and out) of the proposal, used for
        :math:`q(My)` with ``chirality="mirror"`` when the proposal is not
        reflection-symmetric.
    progress : bool
        Progress bar over energy batches.

    Returns
    -------
    ReweightingResult
    """
    start = time.perf_counter()
    positions = np.array(_to_numpy(x), dtype=np.float64)
    lq = np.array(_to_numpy(log_q), dtype=np.float64).reshape(-1)
    if positions.ndim != 3:
        raise ValueError(f"x must have shape (n, n_particles, dim), got {positions.shape}")
    n = len(positions)
    if n == 0:
        raise ValueError("no samples to reweight")
    if lq.shape != (n,):
        raise ValueError(f"log_q must have shape ({n},), got {np.shape(log_q)}")
    if np.isnan(lq).any():
        raise ValueError(f"log_q contains {int(np.isnan(lq).sum())} NaN values; the proposal's density failed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    clip_spec = resolve_clip(clip)
    if topology is None and system is not None:
        topology = getattr(system, "topology", None)

    zero_weight, chirality_summary = _apply_chirality(
        positions, lq, topology, chirality, reflection_symmetric, log_prob
    )

    u = np.empty(n)
    status = np.empty(n, dtype=np.int8)
    energy_start = time.perf_counter()
    starts = range(0, n, batch_size)
    for i in tqdm(starts, desc="target energies", disable=not progress or len(starts) < 2):
        batch = torch.as_tensor(positions[i : i + batch_size])
        result = energy.evaluate(batch, need_forces=False)
        u[i : i + batch_size] = result.u.detach().cpu().numpy().astype(np.float64)
        status[i : i + batch_size] = result.status
    energy_seconds = time.perf_counter() - energy_start
    not_finite = (status == FrameStatus.OK) & ~np.isfinite(u)
    status[not_finite] = FrameStatus.NON_FINITE
    failed = status != FrameStatus.OK
    u[failed] = np.inf

    log_w_raw = log_weights(u, lq)
    log_w_raw[zero_weight] = -np.inf
    if clip_spec is not None:
        log_w, clipped_fraction = clip_log_weights(log_w_raw, **clip_spec)
    else:
        log_w, clipped_fraction = log_w_raw.copy(), 0.0
    fraction = ess(log_w)
    finite_u = u[np.isfinite(u)]
    reasons = Counter(FrameStatus(int(code)).name for code in status[failed])
    diagnostics: dict[str, Any] = {
        "weights": weight_diagnostics(log_w).to_dict(),
        "weights_unclipped": weight_diagnostics(log_w_raw).to_dict(),
        "clip": clip_spec,
        "energy": repr(energy),
        "energy_failures": dict(reasons),
        "energy_quantiles_kT": (
            {f"q{level:g}": float(v) for level, v in zip(_ENERGY_QUANTILES, np.quantile(finite_u, _ENERGY_QUANTILES))}
            if len(finite_u)
            else {}
        ),
        "timing": {"energy_seconds": energy_seconds, "reweight_seconds": time.perf_counter() - start},
    }
    if chirality_summary is not None and chirality_summary["n_removed"]:
        kept = n - chirality_summary["n_removed"]
        diagnostics["ess_fraction_of_kept_chirality"] = fraction * n / kept if kept else 0.0
    n_failed = int(failed.sum())
    logger.info(
        "reweighted %d samples to %r: ESS %.3g%% (%.1f samples), %d energy failures%s",
        n, energy, 100 * fraction, fraction * n, n_failed,
        f", clipped {clipped_fraction:.3g}" if clip_spec else "",
    )  # fmt: skip
    return ReweightingResult(
        positions=positions,
        log_q=lq,
        u=u,
        log_w=log_w,
        ess=fraction,
        n_failed=n_failed,
        status=status,
        chirality=chirality_summary,
        clipped_fraction=clipped_fraction,
        diagnostics=diagnostics,
        log_w_unclipped=log_w_raw,
        temperature=getattr(energy, "temperature", None),
    )


def proposal_is_reflection_symmetric(flow: Any) -> bool | None:
    """Whether ``flow``'s density is invariant under reflections (None if it cannot tell).

    A flow may say so with a ``reflection_symmetric`` attribute. A
    :class:`~bgplugin.flows.CNF` is, when its field is an ``EGNNField`` with
    ``symmetry="E(n)"`` or a ``KernelField`` (pair distances only), since its
    prior is an isotropic Gaussian; an E-ACF is with ``projection="vector"``.
    """
    declared = getattr(flow, "reflection_symmetric", None)
    if isinstance(declared, bool):
        return declared
    from bgplugin.flows import CNF, EGNNField, KernelField
    from bgplugin.flows.eacf import EACF

    if isinstance(flow, EACF):  # isotropic base and augmented target: Vector-proj flows are E(3)-equivariant
        return flow.reflection_equivariant
    if isinstance(flow, CNF):
        if isinstance(flow.field, EGNNField):
            return flow.field.symmetry == "E(n)"
        if isinstance(flow.field, KernelField):
            return True
    return None


# --------------------------------------------------------------------- helpers
def _apply_chirality(
    positions: np.ndarray,
    log_q: np.ndarray,
    topology: mdtraj.Topology | None,
    mode: ChiralityMode | None,
    reflection_symmetric: bool | None,
    log_prob: Callable[[np.ndarray], np.ndarray] | None,
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Classify frames; mirror ``positions`` and update ``log_q`` in place for ``"mirror"``.

    Returns the mask of frames that get weight 0 and the JSON summary (None
    without stereocentres).
    """
    n = len(positions)
    if mode is not None and mode not in CHIRALITY_MODES:
        raise ValueError(f"chirality must be one of {list(CHIRALITY_MODES)} or None, got {mode!r}")
    if topology is None or not has_stereocenters(topology):
        if mode not in (None, "ignore"):
            raise ValueError(
                f"chirality={mode!r} needs a molecular topology with amino-acid stereocentres; pass system=... "
                "(or topology=...), or chirality='ignore'"
            )
        return np.zeros(n, dtype=bool), None
    if positions.shape[1:] != (topology.n_atoms, 3):
        raise ValueError(
            f"samples have shape {positions.shape[1:]} per frame but the topology has {topology.n_atoms} atoms in 3D"
        )
    mode = "filter" if mode is None else mode
    classes = classify_chirality(positions, topology)
    mirrored = np.zeros(n, dtype=bool)
    if mode == "ignore":
        keep = np.ones(n, dtype=bool)
    elif mode == "filter":
        keep = classes.all_l.copy()
    else:
        keep = classes.all_l | classes.all_d
        mirrored = classes.all_d.copy()
        # the mirrored proposal puts x and Mx on the same output, so its density at a kept frame is q(x) + q(Mx)
        log_q_image = _log_q_of_mirror_images(positions, log_q, keep, reflection_symmetric, log_prob)
        log_q[keep] = np.logaddexp(log_q[keep], log_q_image)
        positions[mirrored] = mirror(positions[mirrored])
    summary = chirality_info(classes, mode, keep, mirrored)
    if mode == "mirror":
        summary["mirror_log_q"] = (
            "log[q(x) + q(Mx)] = log q(x) + ln 2 (reflection-symmetric proposal)"
            if reflection_symmetric
            else "log[q(x) + q(Mx)], q(Mx) from the proposal's log_prob"
        )
    if summary["n_wrong"]:
        logger.info(
            "chirality (%s): %d of %d samples had the wrong handedness (%.3g%%); %d mirrored, %d given weight 0",
            mode, summary["n_wrong"], n, 100 * summary["fraction_wrong"], summary["n_mirrored"], summary["n_removed"],
        )  # fmt: skip
    return ~keep, summary


def _log_q_of_mirror_images(
    positions: np.ndarray,
    log_q: np.ndarray,
    keep: np.ndarray,
    reflection_symmetric: bool | None,
    log_prob: Callable[[np.ndarray], np.ndarray] | None,
) -> np.ndarray:
    """log q(M x) for the kept frames, shape (n_kept,)."""
    if reflection_symmetric:
        return log_q[keep].copy()
    if log_prob is None:
        raise ValueError(
            "chirality='mirror' changes the proposal density to q(x) + q(Mx): give log_prob=... (the proposal's "
            "log-density), or reflection_symmetric=True if q(Mx) = q(x) (an E(3)-equivariant flow); "
            "or use chirality='filter'"
        )
    images = log_prob(mirror(positions[keep]))
    images = np.asarray(images, dtype=np.float64).reshape(-1)
    if images.shape != (int(keep.sum()),):
        raise ValueError(f"log_prob returned shape {images.shape} for {int(keep.sum())} frames")
    return images


def _numpy_log_prob(flow: Any, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """``flow.log_prob`` on ndarrays, in batches, without gradients, in the flow's dtype and device."""

    def log_prob(x: np.ndarray) -> np.ndarray:
        parameter = next(iter(flow.parameters()), None) if hasattr(flow, "parameters") else None
        dtype = parameter.dtype if parameter is not None else torch.float64
        device = getattr(flow, "device", torch.device("cpu"))
        out = []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                batch = torch.as_tensor(x[i : i + batch_size], dtype=dtype, device=device)
                out.append(_to_numpy(flow.log_prob(batch)).astype(np.float64))
        return np.concatenate(out) if out else np.zeros(0)

    return log_prob


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _accepts_keyword(function: Callable[..., Any], name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
