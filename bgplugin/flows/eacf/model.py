r"""SE(3)-equivariant augmented coupling flow (E-ACF; Midgley et al. 2023).

Variables and densities
-----------------------
The flow acts on the joint space of the coordinates :math:`x` (``n`` particles
in ``d`` dimensions, mean-free) and ``A`` augmented variables
:math:`a_1, \dots, a_A`, each shaped like :math:`x` and not mean-free. The
base density is

.. math::

    q_0(x, a) = \tilde{\mathcal N}(x; 0, \sigma^2 I)\,\prod_k \mathcal N(a_k; x, \eta_0^2 I),

with :math:`\tilde{\mathcal N}` the Gaussian on the :math:`(n-1)d`-dimensional
mean-free subspace (:class:`~bgplugin.flows.MeanFreeGaussian`), and the
augmented target is :math:`\pi(a \mid x) = \prod_k \mathcal N(a_k; x, \eta^2 I)`
(by default :math:`\eta_0 = \eta`). Joint densities are with respect to the
Lebesgue measure of :math:`\{\bar x = 0\} \times \mathbb R^{A n d}`, in nats.

Layers
------
A block is two coupling layers, each preceded by a centre-of-mass shift
(:func:`~bgplugin.flows.eacf.projections.centre_of_mass_shift`, unit Jacobian):
shift so that :math:`a_1` is mean-free, update every :math:`x_i` given
:math:`a` (a multi-channel EGNN on :math:`a` predicts origins, reference
vectors and invariant parameters; :func:`~bgplugin.flows.eacf.projections.project_transform`
moves the point); shift so that :math:`x` is mean-free, update every
:math:`a_{k,i}` given :math:`x`. The transformed variable is never
constrained, so each coupling's log-determinant is the sum of the per-point
:math:`d \times d` log-determinants, exactly. After every block :math:`x` is
mean-free again.

Marginal density (paper Eq. 21)
-------------------------------
:math:`q(x) = \mathbb E_{a \sim \pi(a|x)}[q(x, a) / \pi(a \mid x)]` is
estimated with ``M`` draws,

.. math::

    \log \hat q_M(x) = \log \frac1M \sum_{m=1}^M \frac{q(x, a_m)}{\pi(a_m \mid x)},
    \qquad a_m \sim \pi(a \mid x),

unbiased for :math:`q(x)` (so :math:`\log \hat q_M` is biased low by
:math:`O(1/M)`, and exact when :math:`q(a \mid x) = \pi(a \mid x)`). For
unbiased expectations use the joint importance weights
:math:`\log w = -u(x) + \log\pi(a \mid x) - \log q(x, a)` of joint samples:
their ESS is a lower bound of the marginal one.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bgplugin.fileio import atomic_write
from bgplugin.flows.cnf import DeviceSpec, resolve_device
from bgplugin.flows.compiled import compiled_coupling
from bgplugin.flows.eacf.egnn import MultiChannelEGNN
from bgplugin.flows.eacf.projections import (
    ProjectionKind,
    centre_of_mass_shift,
    collinearity_loss,
    n_projection_parameters,
    n_reference_vectors,
    project_transform,
)
from bgplugin.flows.field import as_atom_types
from bgplugin.flows.prior import CorrelatedMeanFreeGaussian, MeanFreeGaussian, PriorBackedFlow, make_prior

__all__ = ["EACF", "SAVE_FORMAT", "SAVE_VERSION", "build_eacf", "load_eacf"]

logger = logging.getLogger(__name__)

SAVE_FORMAT = "bgplugin.flows.eacf.EACF"
SAVE_VERSION = 1
_LOG_2PI = math.log(2.0 * math.pi)


class _Coupling(nn.Module):
    """Transforms ``T`` target points per particle given ``C`` conditioning points per particle."""

    def __init__(
        self,
        atom_types: Tensor,
        dim: int,
        projection: ProjectionKind,
        n_condition: int,
        n_target: int,
        n_transforms: int,
        hidden: int,
        n_layers: int,
        n_bins: int,
        radius_max: float,
        length_scale: float,
    ) -> None:
        super().__init__()
        self.projection: ProjectionKind = projection
        self.n_target = n_target
        self.n_transforms = n_transforms
        self.n_reference = n_reference_vectors(projection, dim)
        self.n_parameters = n_projection_parameters(projection, dim, n_bins)
        self.radius_max = radius_max
        self.conditioner = MultiChannelEGNN(
            atom_types,
            n_condition,
            n_vectors=n_target * n_transforms * (1 + self.n_reference),
            n_invariants=n_target * n_transforms * self.n_parameters,
            hidden=hidden,
            n_layers=n_layers,
            length_scale=length_scale,
        )

    def forward(
        self, target: Tensor, condition: Tensor, inverse: bool, compiled: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the new target (B, n, T, d), the log-determinant (B,) and the auxiliary loss (B,).

        ``compiled``: through :func:`bgplugin.flows.compiled.compiled_coupling` (same values).
        """
        if compiled:
            return compiled_coupling(self, target, condition, inverse)
        return self._transform(target, condition, inverse)

    def _transform(self, target: Tensor, condition: Tensor, inverse: bool) -> tuple[Tensor, Tensor, Tensor]:
        batch, n, _, dim = target.shape
        vectors, params = self.conditioner(condition)
        vectors = vectors.reshape(batch, n, self.n_target, self.n_transforms, 1 + self.n_reference, dim)
        params = params.reshape(batch, n, self.n_target, self.n_transforms, self.n_parameters)
        origins = condition[:, :, :1, None, :] + vectors[..., 0, :]
        references = vectors[..., 1:, :]
        log_det = target.new_zeros(batch)
        order = reversed(range(self.n_transforms)) if inverse else range(self.n_transforms)
        for index in order:
            target, log_det_points = project_transform(
                self.projection,
                target,
                origins[:, :, :, index],
                references[:, :, :, index],
                params[:, :, :, index],
                radius_max=self.radius_max,
                inverse=inverse,
            )
            log_det = log_det + log_det_points.sum((1, 2))
        aux = collinearity_loss(references).mean((1, 2, 3)) if self.n_reference else target.new_zeros(batch)
        return target, log_det, aux


class _Block(nn.Module):
    def __init__(self, x_update: _Coupling, a_update: _Coupling) -> None:
        super().__init__()
        self.x_update = x_update
        self.a_update = a_update


class EACF(PriorBackedFlow):
    r"""Equivariant augmented coupling flow with the interface of :class:`~bgplugin.flows.CNF`.

    Parameters
    ----------
    atom_types : array-like of int, shape (n_particles,)
        Type per particle (equal types are interchangeable).
    dim : int
        Spatial dimension, 2 or 3.
    n_aug : int
        Number ``A`` of augmented variables.
    n_blocks : int
        Blocks of two coupling layers (x given a, then a given x).
    projection : {"spherical", "cartesian", "vector"}
        Spherical-proj (splines on radius and angles), Cartesian-proj (affine
        in a Gram–Schmidt frame) or Vector-proj (spline on the radius only;
        the only one that is also reflection-equivariant). See
        :mod:`bgplugin.flows.eacf.projections`.
    n_transforms : int
        Projection transforms applied in sequence inside each coupling layer.
    hidden, n_layers : int
        Width and depth of each coupling layer's EGNN conditioner. The defaults
        (4 blocks, width 32, 1 layer) are the CPU-sized DW4 benchmark model;
        the paper uses 12 blocks and 3 EGNN layers.
    n_bins : int
        Spline bins.
    radius_max : float
        Upper end of the radius splines (length units; radii beyond it are not
        transformed). Default ``2 * prior_std``: the radii about the origins are
        of the order of the augmented noise, and on DW4 a bound of 2 learned
        faster than the paper's 10 (test NLL after 750 steps 11.4 vs 12.0).
    aug_scale : float
        :math:`\eta` of the augmented target :math:`\pi(a|x) = \mathcal N(x, \eta^2 I)` (length units).
    base_aug_scale : float, optional
        :math:`\eta_0` of the base :math:`q_0(a|x)`; default ``aug_scale``.
    prior_std : float
        :math:`\sigma` of the mean-free Gaussian base of ``x`` (length units);
        with ``prior_covariance`` only the length scale of the conditioners
        and of ``radius_max``.
    prior_covariance : array-like, shape (n_particles, n_particles), optional
        Particle covariance ``C`` of a correlated base
        :class:`~bgplugin.flows.CorrelatedMeanFreeGaussian` (covariance
        ``C ⊗ I_d``) instead of the isotropic one, e.g.
        ``fit_particle_covariance(training_frames, atom_types)``; it must be
        invariant under permutations of equal atom types. For molecules it
        starts the flow with bonded atoms close together.
    n_marginal : int
        Default number ``M`` of augmented draws in :meth:`log_prob` and :meth:`sample`.
    chunk_size : int
        Largest number of joint configurations pushed through the flow at once
        (marginal estimates use ``batch * M`` of them).
    compiled : bool
        Run the coupling layers through ``torch.compile`` (training included;
        same densities up to round-off). A training step measured 1.3x (22
        atoms) to 1.6x (DW4, LJ13) faster on a CPU, after about a minute of compilation
        per direction; see :mod:`bgplugin.flows.compiled`.
    device : {"auto", "cpu", "cuda"} or torch.device

    Notes
    -----
    Coordinates are ``(batch, n_particles, dim)`` in the system's length
    unit; augmented variables are ``(batch, n_aug, n_particles, dim)``.
    Every method that takes coordinates removes the centre of mass of ``x``
    first (and shifts ``a`` with it): the densities are translation invariant.
    """

    kind = "eacf"

    def __init__(
        self,
        atom_types: np.ndarray | Tensor | Sequence[int],
        dim: int,
        *,
        n_aug: int = 1,
        n_blocks: int = 4,
        projection: ProjectionKind = "spherical",
        n_transforms: int = 1,
        hidden: int = 32,
        n_layers: int = 1,
        n_bins: int = 8,
        radius_max: float | None = None,
        aug_scale: float = 0.1,
        base_aug_scale: float | None = None,
        prior_std: float = 1.0,
        prior_covariance: np.ndarray | Tensor | Sequence[Sequence[float]] | None = None,
        n_marginal: int = 20,
        chunk_size: int = 8192,
        compiled: bool = False,
        device: DeviceSpec = "auto",
    ) -> None:
        super().__init__()
        types = as_atom_types(atom_types)
        if dim not in (2, 3):
            raise ValueError(f"E-ACF supports dim 2 or 3, got {dim}; embed other systems in 3-d")
        if projection not in get_args(ProjectionKind):
            raise ValueError(f"projection must be one of {get_args(ProjectionKind)}, got {projection!r}")
        for name, value in (
            ("n_aug", n_aug), ("n_blocks", n_blocks), ("n_transforms", n_transforms), ("hidden", hidden),
            ("n_bins", n_bins), ("n_marginal", n_marginal), ("chunk_size", chunk_size),
        ):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(compiled, bool):
            raise ValueError(f"compiled must be True or False, got {compiled!r}")
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 0:
            raise ValueError(f"n_layers must be an integer >= 0, got {n_layers!r}")
        if n_bins < 2 and projection != "cartesian":
            raise ValueError(f"n_bins must be >= 2 for spline projections, got {n_bins}")
        if dim == 3 and types.numel() < 3 and projection != "vector":
            raise ValueError(
                f"projection={projection!r} needs a frame from >= 3 particles in 3-d, got {types.numel()}; "
                "two particles only define an axis: use projection='vector'"
            )
        base_aug_scale = aug_scale if base_aug_scale is None else base_aug_scale
        radius_max = 2.0 * prior_std if radius_max is None else radius_max
        for name, scale in (("aug_scale", aug_scale), ("base_aug_scale", base_aug_scale),
                            ("prior_std", prior_std), ("radius_max", radius_max)):  # fmt: skip
            if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
                raise ValueError(f"{name} must be a finite number > 0, got {scale!r}")
        self.register_buffer("atom_types", types, persistent=False)
        self.n_aug = int(n_aug)
        self.n_blocks = int(n_blocks)
        self.projection: ProjectionKind = projection
        self.n_transforms = int(n_transforms)
        self.hidden = int(hidden)
        self.n_layers = int(n_layers)
        self.n_bins = int(n_bins)
        self.radius_max = float(radius_max)
        self.aug_scale = float(aug_scale)
        self.base_aug_scale = float(base_aug_scale)
        self.n_marginal = int(n_marginal)
        self.chunk_size = int(chunk_size)
        self.compiled = compiled
        self.prior_std = float(prior_std)
        self.prior: MeanFreeGaussian | CorrelatedMeanFreeGaussian = make_prior(
            types.numel(), dim, prior_std, prior_covariance, types.numpy()
        )
        common: dict[str, Any] = {
            "atom_types": types, "dim": dim, "projection": projection, "n_transforms": n_transforms,
            "hidden": hidden, "n_layers": n_layers, "n_bins": n_bins, "radius_max": self.radius_max,
            "length_scale": float(prior_std),
        }  # fmt: skip
        self.blocks = nn.ModuleList(
            _Block(
                _Coupling(n_condition=n_aug, n_target=1, **common),
                _Coupling(n_condition=1, n_target=n_aug, **common),
            )
            for _ in range(n_blocks)
        )
        self.to(resolve_device(device))

    # -- properties and configuration ---------------------------------------------------------
    @property
    def reflection_equivariant(self) -> bool:
        """Whether the flow is also equivariant under reflections (only Vector-proj is)."""
        return self.projection == "vector"

    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this flow (without the device)."""
        return {
            "atom_types": self.atom_types.tolist(),
            "dim": self.dim,
            "n_aug": self.n_aug,
            "n_blocks": self.n_blocks,
            "projection": self.projection,
            "n_transforms": self.n_transforms,
            "hidden": self.hidden,
            "n_layers": self.n_layers,
            "n_bins": self.n_bins,
            "radius_max": self.radius_max,
            "aug_scale": self.aug_scale,
            "base_aug_scale": self.base_aug_scale,
            "prior_std": self.prior_std,
            "prior_covariance": (
                self.prior.covariance.tolist() if isinstance(self.prior, CorrelatedMeanFreeGaussian) else None
            ),
            "n_marginal": self.n_marginal,
            "chunk_size": self.chunk_size,
            "compiled": self.compiled,
        }

    def with_options(self, **changes: Any) -> EACF:
        """An E-ACF sharing this flow's parameters, with run-time options changed.

        Parameters
        ----------
        **changes
            ``compiled``, ``n_marginal`` or ``chunk_size``.

        Returns
        -------
        EACF
            Shares parameters with ``self`` (no copy).
        """
        options = ("compiled", "n_marginal", "chunk_size")
        unknown = sorted(set(changes) - set(options))
        if unknown:
            raise ValueError(f"unknown options {unknown}; valid options are {list(options)}")
        flow = EACF(**{**self.config(), **changes}, device=self.device).to(self.dtype)  # validates the values
        flow.blocks, flow.prior = self.blocks, self.prior
        return flow

    # -- densities of the augmented variables ----------------------------------------------------
    def _gaussian_aug_log_prob(self, a: Tensor, x: Tensor, scale: float) -> Tensor:
        """``sum_k log N(a_k; x, scale^2 I)`` for a (..., A, n, d) and x (..., n, d); shape (...)."""
        size = self.n_aug * self.n_particles * self.dim
        squared = (a - x.unsqueeze(-3)).square().sum((-3, -2, -1))
        return -0.5 * squared / scale**2 - 0.5 * size * (_LOG_2PI + 2.0 * math.log(scale))

    def log_prob_aug(self, a: Tensor, x: Tensor) -> Tensor:
        r"""Log-density of the augmented target :math:`\pi(a \mid x) = \prod_k \mathcal N(a_k; x, \eta^2 I)`.

        Parameters
        ----------
        a : Tensor, shape (..., n_aug, n_particles, dim)
        x : Tensor, shape (..., n_particles, dim)

        Returns
        -------
        Tensor, shape (...)
            Nats (over all ``A n d`` coordinates of ``a``).
        """
        return self._gaussian_aug_log_prob(a, x, self.aug_scale)

    def sample_aug(self, x: Tensor, n_draws: int | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        r"""Draws from the augmented target :math:`\pi(a \mid x)`.

        Parameters
        ----------
        x : Tensor, shape (batch, n_particles, dim)
        n_draws : int, optional
            ``M``: draw ``M`` per configuration (leading axis); None: one, no extra axis.
        generator : torch.Generator, optional

        Returns
        -------
        Tensor, shape (M, batch, n_aug, n_particles, dim) or (batch, n_aug, n_particles, dim)
        """
        shape = (1 if n_draws is None else n_draws, x.shape[0], self.n_aug, *x.shape[1:])
        noise = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
        a = x.unsqueeze(1) + self.aug_scale * noise
        return a[0] if n_draws is None else a

    def base_log_prob(self, x: Tensor, a: Tensor) -> Tensor:
        """Log-density of the base :math:`q_0(x, a)` (x mean-free), shape (batch,), nats."""
        return self.prior.log_prob(x) + self._gaussian_aug_log_prob(a, x, self.base_aug_scale)

    def base_sample(self, n_samples: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draws ``(x, a)`` from the base; x (n, n_particles, dim) mean-free, a (n, n_aug, n_particles, dim)."""
        x = self.prior.sample(n_samples, generator=generator)
        noise = torch.randn(
            n_samples, self.n_aug, self.n_particles, self.dim, generator=generator, device=x.device, dtype=x.dtype
        )
        return x, x.unsqueeze(1) + self.base_aug_scale * noise

    # -- the bijection -------------------------------------------------------------------------
    def _transform(self, x: Tensor, a: Tensor, inverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Push (x, a) through the blocks; x mean-free, a in (B, A, n, d). Returns x, a, log-det, aux loss."""
        a = a.transpose(1, 2)  # (B, n, A, d): per-particle channels for the EGNN
        log_det = x.new_zeros(x.shape[0])
        aux = x.new_zeros(x.shape[0])
        blocks = list(self.blocks)
        if not inverse:
            for block in blocks:
                x, a = centre_of_mass_shift(x, a, "a")
                x_new, ld, aux_x = block.x_update(x.unsqueeze(2), a, False, self.compiled)
                x, a = centre_of_mass_shift(x_new.squeeze(2), a, "x")
                a, ld_a, aux_a = block.a_update(a, x.unsqueeze(2), False, self.compiled)
                log_det = log_det + ld + ld_a
                aux = aux + aux_x + aux_a
        else:
            for block in reversed(blocks):
                a, ld_a, aux_a = block.a_update(a, x.unsqueeze(2), True, self.compiled)
                x, a = centre_of_mass_shift(x, a, "a")
                x_new, ld, aux_x = block.x_update(x.unsqueeze(2), a, True, self.compiled)
                x, a = centre_of_mass_shift(x_new.squeeze(2), a, "x")
                log_det = log_det + ld + ld_a
                aux = aux + aux_x + aux_a
        return x, a.transpose(1, 2), log_det, aux / (2 * max(1, self.n_blocks))

    def _validated(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` on the flow's device and dtype, centred, and the centre (batch, 1, dim) that was removed."""
        shape = (self.n_particles, self.dim)
        if not isinstance(x, Tensor) or x.ndim != 3 or tuple(x.shape[1:]) != shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"x must be a tensor of shape (batch, {shape[0]}, {shape[1]}), got {got}; "
                "reshape flattened coordinates with x.reshape(-1, n_particles, dim)"
            )
        if not x.is_floating_point():
            raise ValueError(f"x must be floating point, got dtype {x.dtype}; use x.to(flow.dtype)")
        x = x.to(device=self.device, dtype=self.dtype)
        centre = x.mean(1, keepdim=True)
        return x - centre, centre

    def _validated_joint(self, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, a)`` on the flow's device and dtype, translated together so that ``x`` is mean-free."""
        x, centre = self._validated(x)
        expected = (x.shape[0], self.n_aug, self.n_particles, self.dim)
        if not isinstance(a, Tensor) or tuple(a.shape) != expected:
            got = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise ValueError(f"a must be a tensor of shape {expected} (batch, n_aug, n_particles, dim), got {got}")
        a = a.to(device=self.device, dtype=self.dtype)
        return x, a - centre.unsqueeze(1)

    def forward(self, x0: Tensor, a0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Map base points to data space.

        Parameters
        ----------
        x0 : Tensor, shape (batch, n_particles, dim)
            Base coordinates (centre of mass removed here).
        a0 : Tensor, shape (batch, n_aug, n_particles, dim)
            Base augmented variables (shifted with ``x0``).

        Returns
        -------
        x : Tensor, shape (batch, n_particles, dim)
            Mean-free coordinates.
        a : Tensor, shape (batch, n_aug, n_particles, dim)
        log_det : Tensor, shape (batch,)
            ``log |det d(x, a) / d(x0, a0)|`` on the joint space (nats).
        """
        x0, a0 = self._validated_joint(x0, a0)
        x, a, log_det, _ = self._transform(x0, a0, inverse=False)
        return x, a, log_det

    def inverse(self, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Map data points to the base; same shapes as :meth:`forward`, log-det of the inverse map."""
        x, a = self._validated_joint(x, a)
        x0, a0, log_det, _ = self._transform(x, a, inverse=True)
        return x0, a0, log_det

    # -- joint densities ------------------------------------------------------------------------
    def log_prob_joint_and_aux(self, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`log_prob_joint` and the auxiliary collinearity loss (batch,) of the frames used."""
        x, a = self._validated_joint(x, a)
        return self._log_prob_joint_centred(x, a)

    def _log_prob_joint_centred(self, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        x0, a0, log_det, aux = self._transform(x, a, inverse=True)
        return self.base_log_prob(x0, a0) + log_det, aux

    def log_prob_joint(self, x: Tensor, a: Tensor) -> Tensor:
        """Exact joint log-density :math:`\\log q(x, a)` in one pass.

        Parameters
        ----------
        x : Tensor, shape (batch, n_particles, dim)
        a : Tensor, shape (batch, n_aug, n_particles, dim)

        Returns
        -------
        Tensor, shape (batch,)
            Nats, on :math:`\\{\\bar x = 0\\} \\times \\mathbb R^{A n d}`.
        """
        return self.log_prob_joint_and_aux(x, a)[0]

    def sample_joint_and_aux(
        self, n_samples: int, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`sample_joint` and the auxiliary collinearity loss (n_samples,)."""
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        x0, a0 = self.base_sample(n_samples, generator=generator)
        log_q0 = self.base_log_prob(x0, a0)
        x, a, log_det, aux = self._transform(x0, a0, inverse=False)
        return x, a, log_q0 - log_det, aux

    def sample_joint(
        self, n_samples: int, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Joint samples with their exact joint log-density (one pass).

        Parameters
        ----------
        n_samples : int
        generator : torch.Generator, optional
            On the flow's device.

        Returns
        -------
        x : Tensor, shape (n_samples, n_particles, dim)
            Mean-free.
        a : Tensor, shape (n_samples, n_aug, n_particles, dim)
        log_q : Tensor, shape (n_samples,)
            :math:`\\log q(x, a)` (nats). Joint importance weights are
            ``-u(x) + log_prob_aug(a, x) - log_q``.
        """
        x, a, log_q, _ = self.sample_joint_and_aux(n_samples, generator=generator)
        return x, a, log_q

    # -- marginal densities (Eq. 21) -------------------------------------------------------------
    def marginal_log_prob(self, x: Tensor, a: Tensor, *, progress: bool = False) -> Tensor:
        r"""The estimate :math:`\log \hat q_M(x)` from given draws :math:`a_m \sim \pi(a \mid x)`.

        Parameters
        ----------
        x : Tensor, shape (batch, n_particles, dim)
        a : Tensor, shape (M, batch, n_aug, n_particles, dim)
            Draws from :meth:`sample_aug` (or any equivariant set of draws, for tests).
        progress : bool
            Progress bar over chunks.

        Returns
        -------
        Tensor, shape (batch,)
            Nats on the mean-free subspace.
        """
        log_ratio = self.augmented_log_ratios(x, a, progress=progress)
        return torch.logsumexp(log_ratio, 0) - math.log(log_ratio.shape[0])

    def augmented_log_ratios(self, x: Tensor, a: Tensor, *, progress: bool = False) -> Tensor:
        r"""Per-draw terms :math:`\log q(x, a_m) - \log \pi(a_m \mid x)` of the marginal estimate.

        :meth:`marginal_log_prob` is their ``logsumexp`` over draws minus ``log M``; the estimate from
        the first ``m`` draws (``logsumexp(r[:m], 0) - log m``) shows how far ``M`` is from converged
        (the estimate of ``log q`` is biased low by O(1/M)).

        Parameters
        ----------
        x : Tensor, shape (batch, n_particles, dim)
        a : Tensor, shape (M, batch, n_aug, n_particles, dim)
            Draws from :meth:`sample_aug`.
        progress : bool
            Progress bar over chunks.

        Returns
        -------
        Tensor, shape (M, batch)
            Nats; each row is one unbiased importance weight (in log) of ``q(x)``.
        """
        x, centre = self._validated(x)
        if not isinstance(a, Tensor) or a.ndim != 5 or tuple(a.shape[1:]) != (x.shape[0], self.n_aug, *x.shape[1:]):
            got = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise ValueError(
                f"a must have shape (M, {x.shape[0]}, {self.n_aug}, {self.n_particles}, {self.dim}) "
                f"(M draws per configuration), got {got}"
            )
        n_draws, batch = a.shape[:2]
        a = a.to(device=self.device, dtype=self.dtype) - centre.unsqueeze(1)
        flat_x = x.unsqueeze(0).expand(n_draws, *x.shape).reshape(-1, *x.shape[1:])
        flat_a = a.reshape(-1, *a.shape[2:])
        values: list[Tensor] = []
        starts = range(0, flat_x.shape[0], self.chunk_size)
        for start in tqdm(starts, desc="E-ACF log q", disable=not progress or len(starts) < 2):
            xs, as_ = flat_x[start : start + self.chunk_size], flat_a[start : start + self.chunk_size]
            values.append(self._log_prob_joint_centred(xs, as_)[0] - self.log_prob_aug(as_, xs))
        return torch.cat(values).reshape(n_draws, batch)

    def log_prob(
        self,
        x: Tensor,
        *,
        n_marginal: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Marginal log-density of ``x``, estimated with ``M`` augmented draws (Eq. 21).

        Parameters
        ----------
        x : Tensor, shape (batch, n_particles, dim)
            Coordinates (length unit of the system); the centre of mass is removed.
        n_marginal : int, optional
            ``M``; default :attr:`n_marginal`.
        generator : torch.Generator, optional
            For the augmented draws.
        progress : bool
            Progress bar over chunks.

        Returns
        -------
        Tensor, shape (batch,)
            :math:`\\log \\hat q_M(x)` in nats on the mean-free subspace.
        """
        n_draws = self._n_draws(n_marginal)
        x, _ = self._validated(x)
        return self.marginal_log_prob(x, self.sample_aug(x, n_draws, generator=generator), progress=progress)

    def sample(
        self,
        n_samples: int,
        *,
        generator: torch.Generator | None = None,
        n_marginal: int | None = None,
        density: Literal["marginal", "joint"] = "marginal",
        progress: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Draw samples with the log-densities that importance weights need.

        Parameters
        ----------
        n_samples : int
        generator : torch.Generator, optional
            For the base and augmented draws (on the flow's device).
        n_marginal : int, optional
            ``M`` fresh augmented draws for :math:`\\log \\hat q_M(x)`; default :attr:`n_marginal`.
        density : {"marginal", "joint"}
            ``"marginal"``: :math:`\\log \\hat q_M(x)` (Eq. 21, ``M + 1`` passes;
            a random estimate, biased low by O(1/M)). ``"joint"``: one pass,
            :math:`\\log q(x, a) - \\log \\pi(a \\mid x)` with the ``a`` the flow drew
            with ``x``; then ``exp(-u(x) - log_q)`` are the exact joint
            importance weights (self-normalised estimates are consistent; their
            ESS is a lower bound of the marginal one). Not a density of ``x``:
            use it for weights only, never compare it with :meth:`log_prob`.
        progress : bool
            Progress bar over chunks.

        Returns
        -------
        x : Tensor, shape (n_samples, n_particles, dim)
            Mean-free samples.
        log_q : Tensor, shape (n_samples,)
            Marginal log-density estimates or joint log-ratios (nats, mean-free subspace).
        """
        if density not in ("marginal", "joint"):
            raise ValueError(f"density must be 'marginal' or 'joint', got {density!r}")
        if density == "joint":
            x, a, log_q_joint = self.sample_joint(n_samples, generator=generator)
            return x, log_q_joint - self.log_prob_aug(a, x)
        n_draws = self._n_draws(n_marginal)
        x, _, _ = self.sample_joint(n_samples, generator=generator)
        return x, self.marginal_log_prob(x, self.sample_aug(x, n_draws, generator=generator), progress=progress)

    def _n_draws(self, n_marginal: int | None) -> int:
        n_draws = self.n_marginal if n_marginal is None else n_marginal
        if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 1:
            raise ValueError(f"n_marginal must be an integer >= 1, got {n_draws!r}")
        return n_draws

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write hyperparameters and weights to ``path`` atomically; load with :func:`bgplugin.flows.load_flow`."""
        target = Path(path)
        if not target.parent.is_dir():
            raise ValueError(
                f"directory {str(target.parent)!r} does not exist; create it before saving {target.name!r}"
            )
        payload = {
            "format": SAVE_FORMAT,
            "kind": self.kind,
            "version": SAVE_VERSION,
            "config": self.config(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "state_dict": {key: value.detach().cpu() for key, value in self.state_dict().items()},
        }
        atomic_write(target, lambda stream: torch.save(payload, stream))
        logger.info("saved E-ACF flow (%d parameters) to %s", sum(p.numel() for p in self.parameters()), target)


def build_eacf(
    system: Any,
    *,
    prior_std: float = 1.0,
    device: DeviceSpec = "auto",
    dtype: torch.dtype = torch.float32,
    **hyperparameters: Any,
) -> EACF:
    """Build an E-ACF for a system (``n_particles``, ``dim``, ``atom_types``).

    Parameters
    ----------
    system : SystemLike
        E.g. ``bgplugin.systems.get_system("dw4")``.
    prior_std : float
        Standard deviation of the mean-free Gaussian base (length units).
    device : {"auto", "cpu", "cuda"} or torch.device
    dtype : torch.dtype
        float32 or float64.
    **hyperparameters
        Keyword arguments of :class:`EACF` (``n_aug``, ``n_blocks``,
        ``projection``, ``hidden``, ``aug_scale``, ...).

    Returns
    -------
    EACF
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    parameters = inspect.signature(EACF).parameters
    allowed = [name for name in parameters if name not in ("atom_types", "dim", "prior_std", "device")]
    unknown = sorted(set(hyperparameters) - set(allowed))
    if unknown:
        raise ValueError(f"unknown E-ACF hyperparameters {unknown}; valid ones are {allowed}")
    atom_types = np.asarray(system.atom_types)
    if atom_types.shape != (system.n_particles,):
        raise ValueError(
            f"system {getattr(system, 'name', '?')!r} has atom_types of shape {atom_types.shape} "
            f"but n_particles={system.n_particles}; the system definition is inconsistent"
        )
    flow = EACF(atom_types, system.dim, prior_std=prior_std, device=device, **hyperparameters).to(dtype)
    logger.info(
        "built E-ACF (%s, %d blocks, %d augmented) for %s: %d particles in %d-d, %d parameters, %s",
        flow.projection, flow.n_blocks, flow.n_aug, getattr(system, "name", "system"), system.n_particles,
        system.dim, sum(p.numel() for p in flow.parameters()), flow.device,
    )  # fmt: skip
    return flow


def load_eacf(path: str | os.PathLike[str], *, device: DeviceSpec = "auto", compiled: bool | None = None) -> EACF:
    """Load a flow written by :meth:`EACF.save`.

    Parameters
    ----------
    path : path-like
    device : {"auto", "cpu", "cuda"} or torch.device
    compiled : bool or None
        ``None``: as saved; ``True`` / ``False`` overrides the saved option.

    Returns
    -------
    EACF
        Same hyperparameters, dtype and weights as the saved flow.
    """
    source = Path(path)
    if not source.is_file():
        raise ValueError(f"no saved flow at {str(source)!r}; check the path (EACF.save writes one file)")
    payload = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != SAVE_FORMAT:
        raise ValueError(f"{str(source)!r} is not a file written by EACF.save (format key missing or different)")
    if payload.get("version") != SAVE_VERSION:
        raise ValueError(
            f"{str(source)!r} has E-ACF save format version {payload.get('version')}, this bgplugin reads "
            f"version {SAVE_VERSION}; load it with the bgplugin version that wrote it"
        )
    config = payload["config"] if compiled is None else {**payload["config"], "compiled": compiled}
    flow = EACF(**config, device="cpu").to(getattr(torch, payload["dtype"]))
    flow.load_state_dict(payload["state_dict"])
    logger.info("loaded E-ACF flow from %s", source)
    return flow.to(resolve_device(device))
