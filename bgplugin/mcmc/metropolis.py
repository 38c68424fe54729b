r"""Batched Metropolis-Hastings in torch for energies without OpenMM (DW4, LJ13, ...).

Many independent chains advance together. Each iteration makes
``random_walk_steps`` symmetric Gaussian random-walk steps, accepted with
:math:`\min(1, e^{-\Delta u})`, then ``n_proposals`` independence proposals
from a flow, accepted with
:math:`\log a = -(u(x') - u(x)) + \log q(x) - \log q(x')` (the same move as
:class:`~bgplugin.mcmc.FlowIndependenceMove`). In the ``"mean_free"`` frame
random-walk steps have no centroid component and flow proposals are placed
at the chain's current centroid, so both are updates of the centroid-free
coordinates at a fixed centroid (exact for any energy; for a
translation-invariant energy they sample the whole internal distribution).

Cost: every flow proposal is one flow sample; :math:`\log q` of the current
state is known after an accepted flow proposal and is recomputed (one
inverse pass) only for chains that a random-walk step has moved since.

An augmented flow (:class:`bgplugin.flows.eacf.EACF`, a joint density
:math:`q(x, a)` whose marginal is only estimated) is used on the joint space
with the target :math:`\pi(x)\,\pi(a \mid x)`: every independence step
draws :math:`a \sim \pi(a \mid x)` afresh for every chain (a Gibbs step,
one joint pass per chain, so no cache), proposes :math:`(x', a') \sim q`, and
accepts with :math:`\log q(x, a) - \log\pi(a \mid x)` in place of
:math:`\log q(x)` (and likewise for the proposal); see
:class:`~bgplugin.mcmc.FlowIndependenceMove`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from bgplugin.energies import Energy
from bgplugin.mcmc.moves import _FRAMES, Frame, _is_mean_free_flow
from bgplugin.mcmc.registry import (
    ProposalDensity,
    flow_device,
    flow_dtype,
    is_augmented_flow,
    refreshed_log_ratio,
    resolve_flow,
    sample_with_log_ratio,
)

__all__ = ["ChainSamples", "MetropolisResult", "MetropolisSampler"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChainSamples:
    """States of many independent chains, with the statistics of the run that made them.

    Attributes
    ----------
    samples : Tensor, shape (n_recorded, n_chains, n_particles, dim)
        States after every ``record_every``-th iteration (length units of the energy).
    u : Tensor, shape (n_recorded, n_chains)
        Their reduced energies, kT.
    final_positions : Tensor, shape (n_chains, n_particles, dim)
        Last state of every chain (to continue a run).
    statistics : dict
        Counters and timers of the sampler (see the sampler's ``run``).
    wall_time_s : float
    settings : dict
    """

    samples: Tensor
    u: Tensor
    final_positions: Tensor
    statistics: dict[str, float]
    wall_time_s: float
    settings: dict[str, Any] = field(default_factory=dict)

    def chain_means(self, values: Tensor, discard: int = 0) -> np.ndarray:
        """Per-chain time averages of ``values`` (n_recorded, n_chains) after ``discard`` records."""
        if not 0 <= discard < values.shape[0]:
            raise ValueError(f"discard must be in 0..{values.shape[0] - 1}, got {discard}")
        return values[discard:].double().mean(0).cpu().numpy()

    def mean_and_error(self, values: Tensor, discard: int = 0) -> tuple[float, float]:
        """Mean of ``values`` (n_recorded, n_chains) and its standard error from the spread of chain means.

        The chains are independent, so the standard error
        :math:`s/\\sqrt{n_\\text{chains}}` of the chain means accounts for
        autocorrelation within each chain (it needs >= 2 chains).
        """
        means = self.chain_means(values, discard)
        if len(means) < 2:
            raise ValueError("the error from chain means needs at least 2 chains")
        return float(means.mean()), float(means.std(ddof=1) / math.sqrt(len(means)))

    def mean_energy(self, discard: int = 0) -> tuple[float, float]:
        """Mean reduced energy (kT) and its standard error, see :meth:`mean_and_error`."""
        return self.mean_and_error(self.u, discard)

    def _summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n_recorded": int(self.samples.shape[0]),
            "n_chains": int(self.samples.shape[1]),
            **self.statistics,
            "wall_time_s": self.wall_time_s,
            "settings": dict(self.settings),
        }
        if self.samples.shape[0] >= 1 and self.samples.shape[1] >= 2:
            out["mean_energy"], out["mean_energy_error"] = self.mean_energy()
        return out


@dataclass(frozen=True)
class MetropolisResult(ChainSamples):
    """Chains of :meth:`MetropolisSampler.run`.

    ``statistics`` holds ``n_proposed_flow``, ``n_accepted_flow``,
    ``n_proposed_random_walk``, ``n_accepted_random_walk``,
    ``n_energy_evaluations`` (frames evaluated, summed over chains),
    ``n_flow_samples``, ``n_flow_log_prob`` (inverse passes; for an augmented
    flow the joint passes of the current states), ``n_failed``
    (non-finite proposal energies), ``flow_seconds`` and ``energy_seconds``.
    """

    @property
    def acceptance_flow(self) -> float | None:
        """Fraction of flow proposals accepted (None without flow moves)."""
        n = self.statistics["n_proposed_flow"]
        return self.statistics["n_accepted_flow"] / n if n else None

    @property
    def acceptance_random_walk(self) -> float | None:
        """Fraction of random-walk steps accepted (None without them)."""
        n = self.statistics["n_proposed_random_walk"]
        return self.statistics["n_accepted_random_walk"] / n if n else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no samples)."""
        return {
            "acceptance_flow": self.acceptance_flow,
            "acceptance_random_walk": self.acceptance_random_walk,
            **self._summary(),
        }


class MetropolisSampler:
    """Batched Metropolis-Hastings with random-walk and flow independence moves.

    Parameters
    ----------
    energy : Energy
        Reduced energy ``u(x)`` in kT (e.g. ``get_system("dw4").energy()``);
        failed frames (``+inf``) are rejected.
    proposal : ProposalDensity, path-like or None
        Flow for independence proposals (or the path of a saved one); None
        for random-walk moves only. An augmented flow (E-ACF) is used on the
        joint space of coordinates and augmented variables (module docstring).
    n_proposals : int
        Flow proposals per iteration (each an independence MH step for every chain).
    random_walk_steps : int
        Random-walk steps per iteration.
    step_size : float
        Standard deviation of a random-walk step per coordinate (length units).
    frame : {"mean_free", "absolute"}
        See :class:`~bgplugin.mcmc.FlowIndependenceMove`; also whether the
        random walk moves the centroid.
    recompute_proposal_log_q : bool
        Evaluate ``log q(x')`` with ``log_prob`` rather than taking it from
        ``sample``. Ignored for augmented flows (their joint density is exact in one pass).
    seed : int or None
        Seeds all random draws; None draws fresh entropy.
    device : {"auto", "cpu", "cuda"} or torch.device
        Where a proposal given by path is loaded.
    """

    def __init__(
        self,
        energy: Energy,
        proposal: ProposalDensity | str | os.PathLike[str] | None = None,
        *,
        n_proposals: int = 1,
        random_walk_steps: int = 0,
        step_size: float = 0.1,
        frame: Frame = "mean_free",
        recompute_proposal_log_q: bool = False,
        seed: int | None = None,
        device: str | torch.device = "auto",
    ) -> None:
        if not isinstance(energy, Energy):
            raise TypeError(f"energy must be a bgplugin Energy, got {type(energy).__name__}")
        for name, value in (("n_proposals", n_proposals), ("random_walk_steps", random_walk_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not (step_size > 0 and math.isfinite(step_size)):
            raise ValueError(f"step_size must be a finite number > 0, got {step_size}")
        if frame not in _FRAMES:
            raise ValueError(f"frame must be one of {list(_FRAMES)}, got {frame!r}")
        self.proposal: ProposalDensity | None = None
        self.proposal_path: str | None = None
        if proposal is not None:
            self.proposal, self.proposal_path = resolve_flow(proposal, device)
            shape = (self.proposal.n_particles, self.proposal.dim)
            if shape != (energy.n_particles, energy.dim):
                raise ValueError(f"the proposal models {shape} but the energy {(energy.n_particles, energy.dim)}")
            if frame == "absolute" and _is_mean_free_flow(self.proposal):
                raise ValueError(
                    f"frame='absolute' needs a density on all coordinates, but {type(self.proposal).__name__} is a "
                    "density on mean-free coordinates; use frame='mean_free'"
                )
        if self.proposal is None and n_proposals > 0 and random_walk_steps == 0:
            raise ValueError("without a proposal flow, set random_walk_steps >= 1 (nothing would move)")
        self.energy = energy
        self.n_proposals = int(n_proposals) if self.proposal is not None else 0
        self.random_walk_steps = int(random_walk_steps)
        self.step_size = float(step_size)
        self.frame: Frame = frame
        self.recompute_proposal_log_q = bool(recompute_proposal_log_q)
        self.seed = seed
        self._seed_sequence = np.random.SeedSequence(seed)

    def run(
        self,
        x0: Tensor | np.ndarray,
        n_iterations: int,
        *,
        record_every: int = 1,
        progress: bool = True,
    ) -> MetropolisResult:
        """Advance all chains ``n_iterations`` times.

        Parameters
        ----------
        x0 : Tensor or ndarray, shape (n_chains, n_particles, dim)
            Starting states (finite energies); the chains keep their dtype and device.
        n_iterations : int
        record_every : int
            Keep every ``record_every``-th state.
        progress : bool
            Show a tqdm progress bar.

        Returns
        -------
        MetropolisResult
        """
        if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
            raise ValueError(f"n_iterations must be an integer >= 1, got {n_iterations!r}")
        if isinstance(record_every, bool) or not isinstance(record_every, int) or record_every < 1:
            raise ValueError(f"record_every must be an integer >= 1, got {record_every!r}")
        x = torch.as_tensor(x0)
        if not x.is_floating_point():
            x = x.double()
        x = x.clone()
        expected = (self.energy.n_particles, self.energy.dim)
        if x.ndim != 3 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x0 must have shape (n_chains, {expected[0]}, {expected[1]}), got {tuple(x.shape)}")
        seeds = self._seed_sequence.spawn(2)
        generator = torch.Generator(device=x.device).manual_seed(int(seeds[0].generate_state(1, np.uint64)[0] >> 1))
        flow_generator = None
        if self.proposal is not None:
            flow_generator = torch.Generator(device=flow_device(self.proposal)).manual_seed(
                int(seeds[1].generate_state(1, np.uint64)[0] >> 1)
            )
        stats: dict[str, float] = dict.fromkeys(
            ("n_proposed_flow", "n_accepted_flow", "n_proposed_random_walk", "n_accepted_random_walk",
             "n_energy_evaluations", "n_flow_samples", "n_flow_log_prob", "n_failed"), 0)  # fmt: skip
        stats.update(flow_seconds=0.0, energy_seconds=0.0)
        u = self._energy(x, stats)
        if not torch.isfinite(u).all():
            bad = torch.nonzero(~torch.isfinite(u)).flatten().tolist()
            raise ValueError(f"chains {bad} start at a non-finite energy; start from valid configurations")
        log_q = torch.full_like(u, math.nan)
        log_q_valid = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        samples, energies = [], []
        start = time.perf_counter()
        for iteration in tqdm(range(n_iterations), desc="Metropolis", disable=not progress):
            for _ in range(self.random_walk_steps):
                moved = self._random_walk(x, u, generator, stats)
                log_q_valid &= ~moved
            for _ in range(self.n_proposals):
                self._independence(x, u, log_q, log_q_valid, generator, flow_generator, stats)
                log_q_valid[:] = True
            if (iteration + 1) % record_every == 0:
                samples.append(x.clone())
                energies.append(u.clone())
        wall = time.perf_counter() - start
        settings = {
            "n_chains": len(x), "n_iterations": n_iterations, "record_every": record_every,
            "n_proposals": self.n_proposals, "random_walk_steps": self.random_walk_steps, "step_size": self.step_size,
            "frame": self.frame, "recompute_proposal_log_q": self.recompute_proposal_log_q, "seed": self.seed,
            "proposal": self.proposal_path or (type(self.proposal).__name__ if self.proposal is not None else None),
            "energy": type(self.energy).__name__,
        }  # fmt: skip
        result = MetropolisResult(
            torch.stack(samples) if samples else x.new_empty((0, *x.shape)),
            torch.stack(energies) if energies else u.new_empty((0, len(x))),
            x.clone(), stats, wall, settings,
        )  # fmt: skip
        logger.info(
            "Metropolis: %d chains x %d iterations, acceptance flow %s, random walk %s, %.1f s",
            len(x), n_iterations, result.acceptance_flow, result.acceptance_random_walk, wall,
        )  # fmt: skip
        return result

    # ------------------------------------------------------------------ moves
    def _energy(self, x: Tensor, stats: dict[str, float]) -> Tensor:
        start = time.perf_counter()
        u = self.energy.evaluate(x, need_forces=False).u.to(device=x.device, dtype=x.dtype)
        stats["energy_seconds"] += time.perf_counter() - start
        stats["n_energy_evaluations"] += len(x)
        return torch.where(torch.isfinite(u), u, torch.full_like(u, math.inf))

    def _random_walk(self, x: Tensor, u: Tensor, generator: torch.Generator, stats: dict[str, float]) -> Tensor:
        """One random-walk step of every chain, in place; returns the mask of chains that moved."""
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if self.frame == "mean_free":
            noise = noise - noise.mean(1, keepdim=True)
        y = x + self.step_size * noise
        u_y = self._energy(y, stats)
        log_uniform = torch.rand(len(x), generator=generator, device=x.device, dtype=x.dtype).log()
        accept = torch.isfinite(u_y) & (log_uniform < -(u_y - u))
        stats["n_failed"] += int((~torch.isfinite(u_y)).sum())
        stats["n_proposed_random_walk"] += len(x)
        stats["n_accepted_random_walk"] += int(accept.sum())
        x[accept] = y[accept]
        u[accept] = u_y[accept]
        return accept

    def _independence(
        self,
        x: Tensor,
        u: Tensor,
        log_q: Tensor,
        log_q_valid: Tensor,
        generator: torch.Generator,
        flow_generator: torch.Generator | None,
        stats: dict[str, float],
    ) -> None:
        r"""One flow proposal for every chain, in place (``log_q`` of the chains is kept up to date).

        For an augmented flow ``log_q`` holds :math:`\log q(x, a) - \log \pi(a \mid x)` at a fresh Gibbs
        draw of ``a`` for every chain, whatever ``log_q_valid`` says.
        """
        if self.proposal is None:
            raise RuntimeError("no proposal flow")
        dtype, device = flow_dtype(self.proposal), flow_device(self.proposal)
        centre = x.mean(1, keepdim=True) if self.frame == "mean_free" else torch.zeros_like(x[:, :1])
        start = time.perf_counter()
        with torch.no_grad():
            if is_augmented_flow(self.proposal):
                current = (x - centre).to(device=device, dtype=dtype)
                log_q.copy_(refreshed_log_ratio(self.proposal, current, flow_generator))
                stats["n_flow_log_prob"] += len(x)
                y, log_q_y = sample_with_log_ratio(self.proposal, len(x), flow_generator)
            else:
                stale = torch.nonzero(~log_q_valid).flatten()
                if len(stale):
                    current = (x[stale] - centre[stale]).to(device=device, dtype=dtype)
                    log_q[stale] = self.proposal.log_prob(current).to(device=x.device, dtype=x.dtype)
                    stats["n_flow_log_prob"] += len(stale)
                y, log_q_y = self.proposal.sample(len(x), generator=flow_generator)
                if self.recompute_proposal_log_q:
                    log_q_y = self.proposal.log_prob(y)
                    stats["n_flow_log_prob"] += len(x)
        stats["n_flow_samples"] += len(x)
        stats["flow_seconds"] += time.perf_counter() - start
        y = y.detach().to(device=x.device, dtype=x.dtype)
        log_q_y = log_q_y.detach().to(device=x.device, dtype=x.dtype)
        if self.frame == "mean_free":
            y = y - y.mean(1, keepdim=True) + centre
        u_y = self._energy(y, stats)
        log_a = -(u_y - u) + log_q - log_q_y
        log_uniform = torch.rand(len(x), generator=generator, device=x.device, dtype=x.dtype).log()
        ok = torch.isfinite(u_y) & torch.isfinite(log_q_y)
        accept = ok & (log_uniform < log_a)
        stats["n_failed"] += int((~ok).sum())
        stats["n_proposed_flow"] += len(x)
        stats["n_accepted_flow"] += int(accept.sum())
        x[accept] = y[accept]
        u[accept] = u_y[accept]
        log_q[accept] = log_q_y[accept]
