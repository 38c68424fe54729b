r"""MCMC in the latent space of a flow (neural transport): MALA or HMC on the pulled-back density.

A flow :math:`T` maps latent points :math:`z` (the prior side) to
configurations :math:`x = T(z)`. If :math:`z` has the density

.. math::

    \log p_Z(z) = -u(T(z)) + \log\left|\det \frac{\partial T}{\partial z}\right| + \text{const},

then :math:`x = T(z)` has the Boltzmann density :math:`\propto e^{-u(x)}`
exactly (change of variables; the prior does not enter). Hamiltonian Monte
Carlo with a Metropolis correction samples :math:`p_Z` exactly; where the
flow is good, :math:`p_Z` is close to the prior, a round Gaussian on which
gradient-based MCMC mixes fast (Hoffman et al. 2019, "NeuTra-lizing bad
geometry in HMC"; the appendix of the equivariant SVGD paper applies it
to particle systems). MALA is HMC with one leapfrog step.

Cost, honestly: every leapfrog step needs :math:`\nabla_z \log p_Z`, i.e.
a forward ODE solve of the CNF **with the exact divergence** (for
:math:`\log|\det|`) and backpropagation through that solve and through the
divergence (second derivatives of the vector field), plus one energy and
force evaluation. On a CPU that is several times the cost of drawing an
exact-likelihood sample, which is itself seconds for a 22-atom EGNN; it is
practical for small particle systems and on a GPU.

Exactness is with respect to the map that is actually computed: for an ODE
flow that is the solver's discrete map, and :math:`\log|\det|` is the
solver's estimate of its log-determinant, so a coarse solver biases the
result by its log-determinant error (check it against ``solver="dopri5"``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from bgplugin.energies import Energy
from bgplugin.mcmc.metropolis import ChainSamples
from bgplugin.mcmc.moves import _FRAMES, Frame
from bgplugin.mcmc.registry import flow_device, flow_dtype, is_augmented_flow

__all__ = ["InvertibleFlow", "LatentMCMC", "LatentMCMCResult", "LatentMethod"]

logger = logging.getLogger(__name__)

LatentMethod = Literal["mala", "hmc"]
_DEFAULT_TARGET = {"mala": 0.574, "hmc": 0.65}


class InvertibleFlow(Protocol):
    """What latent MCMC needs from a flow (a :class:`bgplugin.flows.CNF` has all of it)."""

    n_particles: int
    dim: int

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``x = T(z)`` and ``log|det dT/dz|``, differentiable in ``z``."""
        ...

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``z = T^{-1}(x)`` and ``log|det dT^{-1}/dx|``."""
        ...


@dataclass(frozen=True)
class LatentMCMCResult(ChainSamples):
    """Chains of :meth:`LatentMCMC.run`: configurations ``x = T(z)`` and their energies.

    ``statistics`` holds ``n_proposed``, ``n_accepted``, ``n_gradient_evaluations``
    (forward solves with gradient, summed over chains), ``n_failed``
    (proposals with a non-finite density), ``step_size`` (the final one),
    ``flow_and_energy_seconds``.

    Attributes
    ----------
    final_latent : Tensor, shape (n_chains, n_particles, dim) or None
        Last latent state of every chain.
    """

    final_latent: Tensor | None = None

    @property
    def acceptance(self) -> float | None:
        """Fraction of proposals accepted after warm-up."""
        n = self.statistics["n_proposed"]
        return self.statistics["n_accepted"] / n if n else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no samples)."""
        return {"acceptance": self.acceptance, **self._summary()}


class LatentMCMC:
    r"""Exact MALA/HMC on :math:`\log p_Z(z) = -u(T(z)) + \log|\det \partial T/\partial z|`, pushed through the flow.

    Parameters
    ----------
    energy : Energy
        Reduced energy in kT, differentiable (torch energies, or OpenMM/xTB
        energies with injected forces).
    flow : InvertibleFlow
        ``forward(z) -> (x, logdet)`` differentiable in ``z``; ``inverse`` to
        start from configurations; ``prior.sample`` to start from the prior.
        Augmented flows (E-ACF) are refused: they are bijections of
        :math:`(x, a)`, not of :math:`x`.
    method : {"mala", "hmc"}
        MALA (one leapfrog step) or HMC with ``n_leapfrog`` steps; identity mass.
    step_size : float
        Initial leapfrog step in latent units.
    n_leapfrog : int or None
        Leapfrog steps per proposal (HMC; default 10). MALA uses 1.
    target_acceptance : float or None
        Warm-up adapts the step size towards this mean acceptance
        probability (default 0.574 for MALA, 0.65 for HMC).
    frame : {"mean_free", "absolute"}
        ``"mean_free"`` for bgplugin's CNFs (momenta live on the centroid-free subspace).
    seed : int or None
        Seeds momenta and acceptance draws.
    """

    def __init__(
        self,
        energy: Energy,
        flow: InvertibleFlow,
        *,
        method: LatentMethod = "mala",
        step_size: float = 0.1,
        n_leapfrog: int | None = None,
        target_acceptance: float | None = None,
        frame: Frame = "mean_free",
        seed: int | None = None,
    ) -> None:
        if not isinstance(energy, Energy):
            raise TypeError(f"energy must be a bgplugin Energy, got {type(energy).__name__}")
        if is_augmented_flow(flow):
            raise ValueError(
                f"latent MCMC needs a bijection of x alone, but {type(flow).__name__} is an augmented flow (a "
                "bijection of the joint (x, a)); use a CNF (bgplugin.flows.build_flow(system, kind='cnf')), or "
                "sample with the E-ACF through FlowIndependenceMove / MetropolisSampler"
            )
        missing = [name for name in ("forward", "inverse", "n_particles", "dim") if not hasattr(flow, name)]
        if missing:
            raise TypeError(f"latent MCMC needs a flow with forward, inverse, n_particles, dim; missing {missing}")
        if (flow.n_particles, flow.dim) != (energy.n_particles, energy.dim):
            raise ValueError(
                f"the flow models {(flow.n_particles, flow.dim)} but the energy {(energy.n_particles, energy.dim)}"
            )
        if method not in _DEFAULT_TARGET:
            raise ValueError(f"method must be 'mala' or 'hmc', got {method!r}")
        if not (step_size > 0 and math.isfinite(step_size)):
            raise ValueError(f"step_size must be a finite number > 0, got {step_size}")
        if method == "mala" and n_leapfrog not in (None, 1):
            raise ValueError(f"MALA takes exactly one leapfrog step, got n_leapfrog={n_leapfrog}; use method='hmc'")
        n_leapfrog = 1 if method == "mala" else (10 if n_leapfrog is None else n_leapfrog)
        if isinstance(n_leapfrog, bool) or not isinstance(n_leapfrog, int) or n_leapfrog < 1:
            raise ValueError(f"n_leapfrog must be an integer >= 1, got {n_leapfrog!r}")
        target = _DEFAULT_TARGET[method] if target_acceptance is None else float(target_acceptance)
        if not 0.0 < target < 1.0:
            raise ValueError(f"target_acceptance must be in (0, 1), got {target_acceptance}")
        if frame not in _FRAMES:
            raise ValueError(f"frame must be one of {list(_FRAMES)}, got {frame!r}")
        self.energy = energy
        self.flow = flow
        self.method: LatentMethod = method
        self.step_size = float(step_size)
        self.n_leapfrog = int(n_leapfrog)
        self.target_acceptance = target
        self.frame: Frame = frame
        self.seed = seed
        self._seed_sequence = np.random.SeedSequence(seed)

    # ------------------------------------------------------------------ density
    def log_density(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r"""Pulled-back log-density, its gradient, the configurations and their energies.

        Parameters
        ----------
        z : Tensor, shape (batch, n_particles, dim)
            Latent points (flow dtype and device).

        Returns
        -------
        log_p : Tensor, shape (batch,)
            :math:`-u(T(z)) + \log|\det \partial T/\partial z|`; ``-inf`` where the energy failed.
        grad : Tensor, shape (batch, n_particles, dim)
            :math:`\nabla_z \log p_Z` (0 where ``log_p`` is not finite).
        x : Tensor, shape (batch, n_particles, dim)
            :math:`T(z)`.
        u : Tensor, shape (batch,)
            Reduced energies of ``x``, kT.
        """
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            x, logdet = self.flow.forward(z)
            u = self.energy(x)
            log_p = -u + logdet
            finite = torch.isfinite(log_p)
            if finite.any():
                (grad,) = torch.autograd.grad(log_p[finite].sum(), z)
            else:
                grad = torch.zeros_like(z)
        grad = torch.where(finite[:, None, None], grad, torch.zeros_like(grad))
        if self.frame == "mean_free":
            grad = grad - grad.mean(1, keepdim=True)
        log_p = torch.where(finite, log_p, torch.full_like(log_p, -math.inf))
        return log_p.detach(), grad.detach(), x.detach(), u.detach()

    # ------------------------------------------------------------------ sampling
    def run(
        self,
        n_iterations: int,
        *,
        x0: Tensor | np.ndarray | None = None,
        z0: Tensor | None = None,
        n_chains: int | None = None,
        n_warmup: int = 0,
        record_every: int = 1,
        progress: bool = True,
    ) -> LatentMCMCResult:
        """Run ``n_warmup`` adapting iterations, then ``n_iterations`` recorded ones.

        Parameters
        ----------
        n_iterations : int
            Iterations after warm-up (one proposal per chain each).
        x0 : Tensor or ndarray, shape (n_chains, n_particles, dim), optional
            Start at ``z = T^{-1}(x0)``.
        z0 : Tensor, shape (n_chains, n_particles, dim), optional
            Start at these latent points.
        n_chains : int, optional
            Start at ``n_chains`` draws of ``flow.prior`` (give exactly one of ``x0``, ``z0``, ``n_chains``).
        n_warmup : int
            Iterations that adapt the step size (Robbins-Monro on the mean
            acceptance probability) and are not recorded; the step size is
            fixed afterwards, so the recorded chain is an exact MH chain.
        record_every : int
            Keep every ``record_every``-th state after warm-up.
        progress : bool
            Show a tqdm progress bar.

        Returns
        -------
        LatentMCMCResult
        """
        for name, value, low in (("n_iterations", n_iterations, 1), ("n_warmup", n_warmup, 0),
                                 ("record_every", record_every, 1)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        seeds = self._seed_sequence.spawn(2)
        device, dtype = flow_device(self.flow), flow_dtype(self.flow)
        generator = torch.Generator(device=device).manual_seed(int(seeds[0].generate_state(1, np.uint64)[0] >> 1))
        z = self._initial_latent(x0, z0, n_chains, device, dtype, seeds[1])
        stats: dict[str, float] = dict.fromkeys(("n_proposed", "n_accepted", "n_gradient_evaluations", "n_failed"), 0)
        stats["flow_and_energy_seconds"] = 0.0
        log_p, grad, x, u = self._evaluate(z, stats)
        if not torch.isfinite(log_p).all():
            bad = torch.nonzero(~torch.isfinite(log_p)).flatten().tolist()
            raise ValueError(f"chains {bad} start where the pulled-back density is not finite; start elsewhere")
        step = self.step_size
        samples, energies = [], []
        start = time.perf_counter()
        total = n_warmup + n_iterations
        for iteration in tqdm(range(total), desc=f"latent {self.method.upper()}", disable=not progress):
            warm = iteration < n_warmup
            z_new, log_p_new, grad_new, x_new, u_new, log_a = self._hmc_proposal(z, log_p, grad, step, generator, stats)
            log_uniform = torch.rand(len(z), generator=generator, device=device, dtype=dtype).log()
            accept = torch.isfinite(log_a) & (log_uniform < log_a)
            z, log_p, grad, x, u = (
                torch.where(accept.view(-1, *[1] * (old.ndim - 1)), new, old)
                for new, old in ((z_new, z), (log_p_new, log_p), (grad_new, grad), (x_new, x), (u_new, u))
            )
            if warm:
                mean_a = float(torch.clamp(log_a, max=0.0).exp().nan_to_num(0.0).mean())
                step *= math.exp((mean_a - self.target_acceptance) / math.sqrt(iteration + 1.0))
                continue
            stats["n_proposed"] += len(z)
            stats["n_accepted"] += int(accept.sum())
            if (iteration - n_warmup + 1) % record_every == 0:
                samples.append(x.clone())
                energies.append(u.clone())
        wall = time.perf_counter() - start
        stats["step_size"] = step
        settings = {
            "method": self.method, "n_leapfrog": self.n_leapfrog, "initial_step_size": self.step_size,
            "target_acceptance": self.target_acceptance, "n_warmup": n_warmup, "n_iterations": n_iterations,
            "record_every": record_every, "n_chains": len(z), "frame": self.frame, "seed": self.seed,
            "flow": type(self.flow).__name__, "energy": type(self.energy).__name__,
        }  # fmt: skip
        result = LatentMCMCResult(
            torch.stack(samples), torch.stack(energies), x.clone(), stats, wall, settings, final_latent=z.clone()
        )
        logger.info(
            "latent %s: %d chains x %d iterations, acceptance %.3f, step %.3g, %.1f s",
            self.method, len(z), n_iterations, result.acceptance or 0.0, step, wall,
        )  # fmt: skip
        return result

    def _initial_latent(
        self,
        x0: Tensor | np.ndarray | None,
        z0: Tensor | None,
        n_chains: int | None,
        device: torch.device,
        dtype: torch.dtype,
        seed: np.random.SeedSequence,
    ) -> Tensor:
        given = [name for name, value in (("x0", x0), ("z0", z0), ("n_chains", n_chains)) if value is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of x0, z0, n_chains; got {given or 'none'}")
        shape = (self.flow.n_particles, self.flow.dim)
        if n_chains is not None:
            prior = getattr(self.flow, "prior", None)
            if prior is None:
                raise ValueError(f"{type(self.flow).__name__} has no prior to draw from; pass x0 or z0")
            if isinstance(n_chains, bool) or not isinstance(n_chains, int) or n_chains < 1:
                raise ValueError(f"n_chains must be an integer >= 1, got {n_chains!r}")
            gen = torch.Generator(device=device).manual_seed(int(seed.generate_state(1, np.uint64)[0] >> 1))
            z = prior.sample(n_chains, generator=gen)
        elif z0 is not None:
            z = torch.as_tensor(z0).to(device=device, dtype=dtype)
        else:
            x = torch.as_tensor(x0).to(device=device, dtype=dtype)
            if x.ndim != 3 or tuple(x.shape[1:]) != shape:
                raise ValueError(f"x0 must have shape (n_chains, {shape[0]}, {shape[1]}), got {tuple(x.shape)}")
            with torch.no_grad():
                z = self.flow.inverse(x)[0]
        if z.ndim != 3 or tuple(z.shape[1:]) != shape:
            raise ValueError(f"latent states must have shape (n_chains, {shape[0]}, {shape[1]}), got {tuple(z.shape)}")
        z = z.detach().clone()
        return z - z.mean(1, keepdim=True) if self.frame == "mean_free" else z

    def _evaluate(self, z: Tensor, stats: dict[str, float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        start = time.perf_counter()
        out = self.log_density(z)
        stats["flow_and_energy_seconds"] += time.perf_counter() - start
        stats["n_gradient_evaluations"] += len(z)
        return out

    def _momentum(self, like: Tensor, generator: torch.Generator) -> Tensor:
        p = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return p - p.mean(1, keepdim=True) if self.frame == "mean_free" else p

    def _hmc_proposal(
        self, z: Tensor, log_p: Tensor, grad: Tensor, step: float, generator: torch.Generator,
        stats: dict[str, float],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """Leapfrog trajectory of every chain; returns the end point and log of the acceptance ratio."""
        p = self._momentum(z, generator)
        h0 = -log_p + 0.5 * p.square().sum((1, 2))
        z_new = z.clone()
        p = p + 0.5 * step * grad
        log_p_new, grad_new, x_new, u_new = log_p, grad, None, None
        for leap in range(self.n_leapfrog):
            z_new = z_new + step * p
            log_p_new, grad_new, x_new, u_new = self._evaluate(z_new, stats)
            p = p + (step if leap < self.n_leapfrog - 1 else 0.5 * step) * grad_new
        h1 = -log_p_new + 0.5 * p.square().sum((1, 2))
        log_a = h0 - h1
        failed = ~torch.isfinite(log_p_new)
        stats["n_failed"] += int(failed.sum())
        log_a = torch.where(failed | torch.isnan(log_a), torch.full_like(log_a, -math.inf), log_a)
        if x_new is None or u_new is None:
            raise RuntimeError("no leapfrog step was taken")
        return z_new, log_p_new, grad_new, x_new, u_new, log_a
