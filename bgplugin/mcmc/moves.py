r"""Flow proposals as openmmtools MCMC moves, and Langevin MD mixed with them.

:class:`FlowIndependenceMove` is an independence Metropolis-Hastings move: it
draws :math:`x' \sim q` from a flow and accepts it with

.. math::

    \log a = -\big(u(x') - u(x)\big) + \log q(x) - \log q(x'),

where :math:`u` is the reduced potential of the thermodynamic state (kT) and
:math:`q` the flow's density. Flows model mean-free coordinates (the centroid
:math:`c = \frac1N\sum_i x_i` removed): a proposal is placed at the current
centroid and :math:`\log q(x)` is evaluated on the current coordinates with
their centroid removed. The move is then a Metropolis-within-Gibbs update of
the centroid-free coordinates :math:`y = x - c` at fixed :math:`c`, which
leaves :math:`\pi(x) \propto e^{-u(x)}` invariant for any potential; for a
translation-invariant potential :math:`\pi(y \mid c)` does not depend on
:math:`c`, so the flow alone samples the whole internal distribution
(other moves, e.g. Langevin dynamics, move the centroid).

An augmented flow (:class:`bgplugin.flows.eacf.EACF`) models a joint density
:math:`q(x, a)` of the coordinates and augmented variables, with the
augmented target :math:`\pi(a \mid x) = \prod_k \mathcal N(a_k; x, \eta^2 I)`;
its marginal :math:`\log q(x)` is only a random estimate. The move then
runs on the joint space with the target :math:`\pi(x)\,\pi(a \mid x)`,
whose :math:`x`-marginal is :math:`\pi`: each
:meth:`~FlowIndependenceMove.apply` first refreshes :math:`a` of the current
state by a Gibbs draw :math:`a \sim \pi(a \mid x)`, then proposes
:math:`(x', a') \sim q` and accepts with

.. math::

    \log \alpha = -\big(u(x') - u(x)\big)
        + \big[\log q(x, a) - \log \pi(a \mid x)\big] - \big[\log q(x', a') - \log \pi(a' \mid x')\big],

exact with one joint pass for the current state and one joint sampling pass
for the proposals.

:func:`run_flow_mcmc` runs ``SequenceMove([Langevin, FlowIndependenceMove])``
for a molecular system and returns the frames and the acceptance statistics.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import openmm
import openmm.unit as unit
import torch
from openmmtools import cache
from openmmtools.mcmc import LangevinDynamicsMove, MCMCMove, SequenceMove
from openmmtools.states import SamplerState, ThermodynamicState
from tqdm.auto import tqdm

from bgplugin.data import Dataset, provenance
from bgplugin.mcmc.registry import (
    ProposalDensity,
    flow_device,
    flow_dtype,
    get_registered_flow,
    is_augmented_flow,
    refreshed_log_ratio,
    register_flow,
    resolve_flow,
    sample_with_log_ratio,
)

__all__ = [
    "FlowIndependenceMove",
    "FlowMCMCResult",
    "Frame",
    "SeededLangevinDynamicsMove",
    "chirality_signs",
    "run_flow_mcmc",
]

logger = logging.getLogger(__name__)

Frame = Literal["mean_free", "absolute"]
_FRAMES: tuple[str, ...] = ("mean_free", "absolute")
_STATISTICS = ("n_proposed", "n_accepted", "n_energy_evaluations", "n_failed", "n_rejected_chirality")


def chirality_signs(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Signs of the chirality volumes :math:`(N - CA)\\cdot[(C - CA)\\times(CB - CA)]`.

    Parameters
    ----------
    x : ndarray, shape (batch, n_atoms, 3)
    centers : ndarray of int, shape (n_centers, 4)
        Atom indices ``(N, CA, C, CB)`` per chiral centre.

    Returns
    -------
    ndarray of bool, shape (batch, n_centers)
        True where the volume is positive (L for amino acids).
    """
    n, ca, c, cb = (x[:, centers[:, k]] for k in range(4))
    return np.einsum("bri,bri->br", n - ca, np.cross(c - ca, cb - ca)) > 0


class FlowIndependenceMove(MCMCMove):
    r"""Independence Metropolis-Hastings move with proposals from a flow (an openmmtools ``MCMCMove``).

    Parameters
    ----------
    flow : ProposalDensity or path-like
        A flow (e.g. :class:`bgplugin.flows.CNF` or the augmented
        :class:`bgplugin.flows.eacf.EACF`) or the path of a file written by
        its ``save``. Coordinates in nm for OpenMM systems.
    n_proposals : int
        Proposals per :meth:`apply`, drawn in one batch and tried one after
        the other against the current state (each is an independence MH step).
    frame : {"mean_free", "absolute"}
        ``"mean_free"``: the flow's density lives on centroid-free coordinates
        (all bgplugin flows); proposals are placed at the current centroid.
        ``"absolute"``: the flow is a density on all :math:`N\cdot D`
        coordinates (for systems that are not translation invariant and
        proposals that model that, e.g. a single particle in a well).
    chiral_centers : sequence of (int, int, int, int) or None
        Atom indices ``(N, CA, C, CB)``; proposals whose chirality differs
        from the current state's are rejected without an energy evaluation.
        That samples the target restricted to the current chirality (exact;
        what MD samples, since MD cannot invert a chiral centre).
        :func:`bgplugin.simulation.chiral_centers` finds them in a topology.
    recompute_proposal_log_q : bool
        Evaluate :math:`\log q(x')` with ``flow.log_prob`` instead of taking
        the value returned by ``flow.sample``. For an ODE flow the two differ by
        the solver's round-trip error; recomputing makes :math:`\log q` one
        function for both terms of the acceptance at twice the flow cost.
        Ignored for augmented flows, whose joint density is exact in one pass.
    seed : int or None
        Seeds the proposals and the acceptance draws; None draws fresh entropy.
        Copies (``copy.deepcopy``, as the multistate samplers make one per
        state) get independent child streams.
    device : {"auto", "cpu", "cuda"} or torch.device
        Where a flow given by path is loaded.
    flow_key : str or None
        Registry key for a flow object (default: a unique one); see
        :func:`bgplugin.mcmc.register_flow`. The registry keeps the flow
        alive; ``unregister_flow(move.flow_key)`` releases it.

    Attributes
    ----------
    n_proposed, n_accepted : int
        Proposals drawn and accepted (over the move's lifetime).
    n_energy_evaluations : int
        Reduced potentials computed: the current state once per ``apply``,
        each proposal with a matching chirality, and the accepted state when
        the sampler state is refreshed.
    n_failed : int
        Proposals with a non-finite energy (rejected).
    n_rejected_chirality : int
        Proposals rejected for a chirality change.
    flow_seconds, energy_seconds : float
        Time spent in the flow and in OpenMM.

    Notes
    -----
    The system must have no constraints: flow samples do not satisfy them.
    Velocities are left untouched, which is valid because the stationary
    distribution factorises over positions and velocities. Inside
    ``ReplicaExchangeSampler``/``ParallelTemperingSampler`` each state gets a
    copy, so read the statistics from ``sampler.mcmc_moves[k]``.
    Serialisation (pickle, openmmtools storage) keeps the flow's path or
    registry key, never the weights.

    An augmented flow (one with ``sample_joint``, ``log_prob_joint``,
    ``log_prob_aug`` and ``sample_aug``, e.g. an E-ACF) is used on the joint
    space of coordinates and augmented variables (see the module docstring):
    its marginal ``log_prob`` is a random estimate, biased low, that would
    make the acceptance inexact, so the move never calls ``sample`` or
    ``log_prob``. Each :meth:`apply` draws the current state's augmented
    variables afresh from :math:`\pi(a \mid x)` (valid because the other
    moves change :math:`x` only and leave :math:`\pi(x)` invariant), with
    this move's random stream; an accepted proposal :math:`(x', a')` is the
    current joint state for the rest of that :meth:`apply`.
    """

    def __init__(
        self,
        flow: ProposalDensity | str | os.PathLike[str],
        n_proposals: int = 1,
        *,
        frame: Frame = "mean_free",
        chiral_centers: Sequence[Sequence[int]] | None = None,
        recompute_proposal_log_q: bool = False,
        seed: int | None = None,
        device: str | torch.device = "auto",
        flow_key: str | None = None,
    ) -> None:
        super().__init__()
        resolved, path = resolve_flow(flow, device)
        key = None if path is not None else register_flow(resolved, flow_key)
        self._configure(
            resolved, path, key, n_proposals, frame, chiral_centers, recompute_proposal_log_q, seed, (), str(device)
        )

    # ------------------------------------------------------------------ configuration
    def _configure(
        self,
        flow: ProposalDensity,
        path: str | None,
        key: str | None,
        n_proposals: int,
        frame: str,
        chiral_centers: Sequence[Sequence[int]] | None,
        recompute_proposal_log_q: bool,
        seed: int | None,
        spawn_key: tuple[int, ...],
        device: str,
    ) -> None:
        if isinstance(n_proposals, bool) or not isinstance(n_proposals, int) or n_proposals < 1:
            raise ValueError(f"n_proposals must be an integer >= 1, got {n_proposals!r}")
        if frame not in _FRAMES:
            raise ValueError(f"frame must be one of {list(_FRAMES)}, got {frame!r}")
        if frame == "absolute" and _is_mean_free_flow(flow):
            raise ValueError(
                f"frame='absolute' needs a density on all coordinates, but {type(flow).__name__} is a density on "
                "mean-free coordinates; use frame='mean_free'"
            )
        centers = None
        if chiral_centers is not None:
            centers = np.asarray(chiral_centers, dtype=np.int64).reshape(-1, 4)
            if centers.size and (centers.min() < 0 or centers.max() >= flow.n_particles):
                raise ValueError(f"chiral_centers {centers.tolist()} index atoms outside 0..{flow.n_particles - 1}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
        self.flow = flow
        self.flow_path = path
        self.flow_key = key
        self.n_proposals = int(n_proposals)
        self.frame: Frame = frame  # type: ignore[assignment]
        self.chiral_centers = centers
        self.recompute_proposal_log_q = bool(recompute_proposal_log_q)
        self.seed = seed
        self.device = device
        self._seed_sequence = np.random.SeedSequence(seed, spawn_key=spawn_key)
        self._start_rngs()
        self.n_proposed = self.n_accepted = self.n_energy_evaluations = 0
        self.n_failed = self.n_rejected_chirality = 0
        self.flow_seconds = self.energy_seconds = 0.0

    def _start_rngs(self) -> None:
        self._rng = np.random.default_rng(self._seed_sequence)
        device = flow_device(self.flow)
        self._generator = torch.Generator(device=device).manual_seed(int(self._rng.integers(2**62)))

    # ------------------------------------------------------------------ statistics
    @property
    def statistics(self) -> dict[str, int]:
        """Acceptance statistics: ``n_proposed``, ``n_accepted``, ``n_energy_evaluations``, ``n_failed``,
        ``n_rejected_chirality`` (openmmtools reads and writes this)."""
        return {name: int(getattr(self, name)) for name in _STATISTICS}

    @statistics.setter
    def statistics(self, value: dict[str, int]) -> None:
        for name in _STATISTICS:
            setattr(self, name, int(value.get(name, 0)))

    @property
    def acceptance_rate(self) -> float:
        """``n_accepted / n_proposed`` (NaN before the first proposal)."""
        return self.n_accepted / self.n_proposed if self.n_proposed else math.nan

    def reset_statistics(self) -> None:
        """Set all counters and timers to zero."""
        self.statistics = {}
        self.flow_seconds = self.energy_seconds = 0.0

    # ------------------------------------------------------------------ the move
    def apply(
        self,
        thermodynamic_state: ThermodynamicState,
        sampler_state: SamplerState,
        context_cache: cache.ContextCache | None = None,
    ) -> None:
        """Try ``n_proposals`` flow proposals; ``sampler_state`` is updated in place.

        Parameters
        ----------
        thermodynamic_state : openmmtools.states.ThermodynamicState
            Its reduced potential :math:`u` is the target :math:`-\\log\\pi` (kT).
        sampler_state : openmmtools.states.SamplerState
            Positions in nm; velocities are kept.
        context_cache : openmmtools.cache.ContextCache or None
            None uses openmmtools' global cache.
        """
        context, _ = self._get_context_cache(context_cache).get_context(thermodynamic_state)
        self._check_system(context.getSystem())
        sampler_state.apply_to_context(context, ignore_velocities=True)
        x = np.asarray(sampler_state.positions.value_in_unit(unit.nanometer), dtype=np.float64)
        u_x = self._reduced_potential(thermodynamic_state, context, x)
        centre = x.mean(axis=0) if self.frame == "mean_free" else np.zeros(x.shape[1])
        start = time.perf_counter()
        with torch.no_grad():
            # for an augmented flow "log q" is log q(x, a) - log pi(a | x) of the joint state
            current = torch.as_tensor(x[None] - centre, dtype=flow_dtype(self.flow), device=flow_device(self.flow))
            if is_augmented_flow(self.flow):
                log_q_x = float(refreshed_log_ratio(self.flow, current, self._generator)[0])
                y, log_q_y_tensor = sample_with_log_ratio(self.flow, self.n_proposals, self._generator)
            else:
                log_q_x = float(self.flow.log_prob(current)[0])
                y, log_q_y_tensor = self.flow.sample(self.n_proposals, generator=self._generator)
                if self.recompute_proposal_log_q:
                    log_q_y_tensor = self.flow.log_prob(y)
        y_np = y.detach().cpu().to(torch.float64).numpy()
        log_q_y = log_q_y_tensor.detach().cpu().to(torch.float64).numpy()
        self.flow_seconds += time.perf_counter() - start
        if self.frame == "mean_free":
            y_np = y_np - y_np.mean(axis=1, keepdims=True) + centre
        keep = self._chirality_matches(x, y_np)
        log_uniform = np.log(self._rng.random(self.n_proposals))
        accepted_any = False
        for j in range(self.n_proposals):
            self.n_proposed += 1
            if not keep[j]:
                self.n_rejected_chirality += 1
                continue
            u_y = self._reduced_potential(thermodynamic_state, context, y_np[j])
            if not math.isfinite(u_y) or not math.isfinite(log_q_y[j]):
                self.n_failed += 1
                continue
            log_a = -(u_y - u_x) + log_q_x - log_q_y[j]
            if log_uniform[j] < log_a:
                x, u_x, log_q_x = y_np[j], u_y, float(log_q_y[j])
                self.n_accepted += 1
                accepted_any = True
        if accepted_any:
            context.setPositions(x)
            start = time.perf_counter()
            sampler_state.update_from_context(context, ignore_velocities=True)
            self.energy_seconds += time.perf_counter() - start
            self.n_energy_evaluations += 1
        else:
            sampler_state.apply_to_context(context, ignore_velocities=True)

    def _check_system(self, system: openmm.System) -> None:
        if system.getNumConstraints() > 0:
            raise ValueError(
                f"the system has {system.getNumConstraints()} constraints; flow samples do not satisfy them, so "
                "FlowIndependenceMove needs a system built without constraints (createSystem(..., constraints=None), "
                "e.g. openmmtools test systems with constraints=None) and MD with a timestep of at most 1 fs"
            )
        if system.getNumParticles() != self.flow.n_particles:
            raise ValueError(
                f"the system has {system.getNumParticles()} particles but the flow models {self.flow.n_particles}; "
                "use a flow trained for this system"
            )
        if self.flow.dim != 3:
            raise ValueError(f"OpenMM systems are 3-dimensional but the flow models dim={self.flow.dim}")

    def _chirality_matches(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        if self.chiral_centers is None or self.chiral_centers.size == 0:
            return np.ones(len(y), dtype=bool)
        reference = chirality_signs(x[None], self.chiral_centers)
        return np.all(chirality_signs(y, self.chiral_centers) == reference, axis=1)

    def _reduced_potential(self, state: ThermodynamicState, context: openmm.Context, x: np.ndarray) -> float:
        """Reduced potential at ``x`` (nm), +inf where OpenMM fails or returns a non-finite energy."""
        start = time.perf_counter()
        self.n_energy_evaluations += 1
        try:
            context.setPositions(x)
            value = float(state.reduced_potential(context))
        except openmm.OpenMMException as exc:
            logger.debug("FlowIndependenceMove: OpenMM failed on a proposal (%s); rejected", exc)
            value = math.inf
        finally:
            self.energy_seconds += time.perf_counter() - start
        return value if math.isfinite(value) else math.inf

    # ------------------------------------------------------------------ copies and serialisation
    def __getstate__(self) -> dict[str, Any]:
        """A YAML-friendly dict: flow path or registry key, settings, RNG seed and statistics (no weights)."""
        return {
            "flow_path": self.flow_path,
            "flow_key": self.flow_key,
            "n_proposals": self.n_proposals,
            "frame": self.frame,
            "chiral_centers": None if self.chiral_centers is None else self.chiral_centers.tolist(),
            "recompute_proposal_log_q": self.recompute_proposal_log_q,
            "seed": self.seed,
            "spawn_key": [int(k) for k in self._seed_sequence.spawn_key],
            "device": self.device,
            "flow_seconds": self.flow_seconds,
            "energy_seconds": self.energy_seconds,
            **self.statistics,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        path, key = state.get("flow_path"), state.get("flow_key")
        if path is not None:
            flow, path = resolve_flow(path, state.get("device", "auto"))
        elif key is not None:
            flow = get_registered_flow(key)
        else:
            raise ValueError("this FlowIndependenceMove state names neither a flow file nor a registry key")
        # a restored move continues with a new stream: the spawn key gains the number of proposals so far
        spawn_key = (*state.get("spawn_key", ()), int(state.get("n_proposed", 0)))
        self._configure(
            flow, path, key, state["n_proposals"], state["frame"], state.get("chiral_centers"),
            state.get("recompute_proposal_log_q", False), state.get("seed"), spawn_key, state.get("device", "auto"),
        )  # fmt: skip
        self.statistics = state
        self.flow_seconds = float(state.get("flow_seconds", 0.0))
        self.energy_seconds = float(state.get("energy_seconds", 0.0))

    def __deepcopy__(self, memo: dict[int, Any]) -> FlowIndependenceMove:
        """A copy that shares the (read-only) flow and draws from an independent child random stream."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("_rng", "_generator")})
        new.chiral_centers = None if self.chiral_centers is None else self.chiral_centers.copy()
        new._seed_sequence = self._seed_sequence.spawn(1)[0]
        new._start_rngs()
        return new

    def __repr__(self) -> str:
        source = self.flow_path if self.flow_path is not None else f"registry:{self.flow_key}"
        return (
            f"FlowIndependenceMove({source!r}, n_proposals={self.n_proposals}, frame={self.frame!r}, "
            f"n_proposed={self.n_proposed}, n_accepted={self.n_accepted})"
        )


def _is_mean_free_flow(flow: object) -> bool:
    from bgplugin.flows import CNF
    from bgplugin.flows.eacf import EACF

    return isinstance(flow, CNF | EACF)


class SeededLangevinDynamicsMove(LangevinDynamicsMove):
    """openmmtools' ``LangevinDynamicsMove`` whose integrator noise is seeded.

    Parameters
    ----------
    random_seed : int
        Seed of the ``LangevinMiddleIntegrator`` (1..2**31-1). It takes effect
        when the context cache creates the Context for this integrator, so a
        fresh cache gives a reproducible trajectory.
    **kwargs
        ``timestep``, ``collision_rate``, ``n_steps``, ``reassign_velocities``, ... of ``LangevinDynamicsMove``.
    """

    def __init__(self, random_seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(random_seed, bool) or not isinstance(random_seed, int) or not 1 <= random_seed < 2**31:
            raise ValueError(f"random_seed must be an integer in 1..2**31-1, got {random_seed!r}")
        self.random_seed = random_seed

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["random_seed"] = self.random_seed
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.random_seed = int(state["random_seed"])

    def _get_integrator(self, thermodynamic_state: ThermodynamicState) -> openmm.Integrator:
        integrator = super()._get_integrator(thermodynamic_state)
        integrator.setRandomNumberSeed(self.random_seed)
        return integrator


@dataclass(frozen=True)
class FlowMCMCResult:
    """Frames and statistics of :func:`run_flow_mcmc`.

    Attributes
    ----------
    dataset : Dataset
        One frame after each iteration, positions (n_iterations, n_atoms, 3) nm;
        Boltzmann samples (no log-weights), correlated in iteration order.
    reduced_potential : ndarray, shape (n_iterations,)
        u of each frame, kT.
    accepted : ndarray of int, shape (n_iterations,)
        Flow proposals accepted in each iteration.
    n_proposed, n_accepted : int
        Flow proposals drawn and accepted.
    n_energy_evaluations : int
        Langevin steps (one force evaluation each) plus the flow move's energy
        evaluations (see :class:`FlowIndependenceMove`).
    wall_time_s, flow_time_s : float
        Total time of the iterations and the part spent in the flow.
    settings : dict
    """

    dataset: Dataset
    reduced_potential: np.ndarray
    accepted: np.ndarray
    n_proposed: int
    n_accepted: int
    n_energy_evaluations: int
    wall_time_s: float
    flow_time_s: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def acceptance(self) -> float | None:
        """Fraction of flow proposals accepted (None without flow moves)."""
        return self.n_accepted / self.n_proposed if self.n_proposed else None

    @property
    def evaluations_per_iteration(self) -> float:
        return self.n_energy_evaluations / max(1, len(self.reduced_potential))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no frames)."""
        return {
            "n_iterations": len(self.reduced_potential),
            "acceptance": self.acceptance,
            "n_proposed": self.n_proposed,
            "n_accepted": self.n_accepted,
            "n_energy_evaluations": self.n_energy_evaluations,
            "evaluations_per_iteration": self.evaluations_per_iteration,
            "mean_reduced_potential": float(np.mean(self.reduced_potential)),
            "wall_time_s": self.wall_time_s,
            "flow_time_s": self.flow_time_s,
            "settings": dict(self.settings),
        }


def run_flow_mcmc(
    system: Any,
    flow: ProposalDensity | str | os.PathLike[str] | None,
    *,
    n_iterations: int,
    langevin_steps: int = 500,
    n_proposals: int = 1,
    timestep: float = 1.0,
    friction: float = 1.0,
    temperature: float | None = None,
    platform: str = "CPU",
    platform_properties: dict[str, str] | None = None,
    initial_positions: np.ndarray | None = None,
    minimize: bool = True,
    equilibration_steps: int = 0,
    keep_chirality: bool = True,
    recompute_proposal_log_q: bool = False,
    seed: int | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> FlowMCMCResult:
    """Langevin MD mixed with flow proposals (openmmtools moves) for a molecular system.

    Each iteration applies ``SequenceMove([LangevinDynamicsMove(langevin_steps),
    FlowIndependenceMove(flow, n_proposals)])`` and records one frame. With
    ``flow=None`` (or ``n_proposals=0``) it is plain Langevin MD with the same
    bookkeeping, the baseline at equal numbers of energy evaluations.

    Parameters
    ----------
    system : MolecularSystem
        Unconstrained OpenMM system, topology, positions (nm) and temperature (K).
    flow : ProposalDensity, path-like or None
        A flow in nm for this system, the path of a saved one, or None.
    n_iterations : int
        Iterations (frames).
    langevin_steps : int
        ``LangevinMiddleIntegrator`` steps per iteration (>= 1).
    n_proposals : int
        Flow proposals per iteration (>= 0).
    timestep : float
        fs; at most 1 fs for unconstrained systems.
    friction : float
        Collision rate, 1/ps.
    temperature : float or None
        K; default ``system.temperature``.
    platform, platform_properties : str, dict or None
        OpenMM platform (``Threads=1`` on CPU by default).
    initial_positions : ndarray, shape (n_atoms, 3), nm, or None
        Start here instead of ``system.positions``.
    minimize : bool
        Minimise the energy first.
    equilibration_steps : int
        Langevin steps before the first iteration (not counted as evaluations).
    keep_chirality : bool
        Reject proposals that invert an amino-acid chiral centre (see
        :class:`FlowIndependenceMove`); ignored for topologies without one.
    recompute_proposal_log_q : bool
        See :class:`FlowIndependenceMove`.
    seed : int or None
        Seeds the Langevin integrator, the initial velocities and the flow
        move (1..2**31-1); None draws one, recorded in the settings.
    device : {"auto", "cpu", "cuda"} or torch.device
        Where a flow given by path is loaded.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    FlowMCMCResult
    """
    from bgplugin.simulation._openmm import (
        check_md_settings,
        platform_and_properties,
        require_molecular,
        resolve_seed,
    )
    from bgplugin.simulation.chirality import chiral_centers

    require_molecular(system, "run_flow_mcmc")
    temperature = float(system.temperature if temperature is None else temperature)
    check_md_settings(temperature, timestep, friction, langevin_steps)
    for name, value, low in (("n_iterations", n_iterations, 1), ("n_proposals", n_proposals, 0),
                             ("equilibration_steps", equilibration_steps, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    seed = resolve_seed(seed)
    omm_platform, properties = platform_and_properties(platform, platform_properties)
    context_cache = cache.ContextCache(platform=omm_platform, platform_properties=properties)
    state = ThermodynamicState(system.openmm_system, temperature=temperature * unit.kelvin)
    langevin = SeededLangevinDynamicsMove(
        random_seed=seed, timestep=timestep * unit.femtosecond, collision_rate=friction / unit.picosecond,
        n_steps=int(langevin_steps), reassign_velocities=False,
    )  # fmt: skip
    flow_move = None
    if flow is not None and n_proposals > 0:
        centers = chiral_centers(system.topology) if keep_chirality else None
        flow_move = FlowIndependenceMove(
            flow, n_proposals, chiral_centers=centers or None, seed=seed, device=device,
            recompute_proposal_log_q=recompute_proposal_log_q,
        )  # fmt: skip
    move: MCMCMove = SequenceMove([langevin, flow_move]) if flow_move is not None else langevin

    x0 = system.positions if initial_positions is None else np.asarray(initial_positions, dtype=np.float64)
    if x0.shape != (system.topology.n_atoms, 3):
        raise ValueError(f"initial_positions must have shape ({system.topology.n_atoms}, 3), got {x0.shape}")
    context, integrator = context_cache.get_context(state, langevin._get_integrator(state))
    context.setPositions(x0)
    if minimize:
        openmm.LocalEnergyMinimizer.minimize(context)
    context.setVelocitiesToTemperature(temperature * unit.kelvin, seed)
    if equilibration_steps:
        integrator.step(equilibration_steps)
    sampler_state = SamplerState.from_context(context)

    n_atoms = system.topology.n_atoms
    frames = np.empty((n_iterations, n_atoms, 3))
    reduced = np.empty(n_iterations)
    accepted = np.zeros(n_iterations, dtype=np.int64)
    start = time.perf_counter()
    for i in tqdm(range(n_iterations), desc="flow MCMC" if flow_move else "Langevin MD", disable=not progress):
        before = flow_move.n_accepted if flow_move is not None else 0
        move.apply(state, sampler_state, context_cache=context_cache)
        frames[i] = sampler_state.positions.value_in_unit(unit.nanometer)
        reduced[i] = state.reduced_potential(sampler_state)
        if flow_move is not None:
            accepted[i] = flow_move.n_accepted - before
    wall = time.perf_counter() - start
    context_cache.empty()

    n_flow_evals = flow_move.n_energy_evaluations if flow_move is not None else 0
    settings: dict[str, Any] = {
        "system": getattr(system, "name", "?"), "temperature": temperature, "n_iterations": n_iterations,
        "langevin_steps": int(langevin_steps), "n_proposals": int(n_proposals if flow_move else 0),
        "timestep_fs": float(timestep), "friction_per_ps": float(friction), "platform": platform,
        "minimize": bool(minimize), "equilibration_steps": int(equilibration_steps),
        "keep_chirality": bool(keep_chirality), "recompute_proposal_log_q": bool(recompute_proposal_log_q),
        "seed": seed, "flow": None if flow_move is None else (flow_move.flow_path or f"registry:{flow_move.flow_key}"),
    }  # fmt: skip
    metadata = {"method": "flow MCMC" if flow_move else "Langevin MD", "engine": "openmmtools", **settings,
                "provenance": provenance()}  # fmt: skip
    result = FlowMCMCResult(
        dataset=Dataset(frames, system.topology, metadata=metadata),
        reduced_potential=reduced,
        accepted=accepted,
        n_proposed=flow_move.n_proposed if flow_move is not None else 0,
        n_accepted=flow_move.n_accepted if flow_move is not None else 0,
        n_energy_evaluations=n_iterations * int(langevin_steps) + n_flow_evals,
        wall_time_s=wall,
        flow_time_s=flow_move.flow_seconds if flow_move is not None else 0.0,
        settings=settings,
    )
    logger.info(
        "%s: %d iterations, acceptance %s, %d energy evaluations, %.1f s",
        metadata["method"], n_iterations, result.acceptance, result.n_energy_evaluations, wall,
    )  # fmt: skip
    return result
