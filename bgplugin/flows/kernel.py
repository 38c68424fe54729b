r"""Kernel velocity field with a closed-form divergence (Köhler, Klein, Noé 2020).

The field is the gradient of a pair potential whose radial profile is a sum of
Gaussian radial basis functions in the distance, with weights that are
themselves Gaussian RBF expansions in the flow time:

.. math::

    v_i(x, t) &= \sum_{j \ne i} (x_i - x_j)\, \phi_{\tau_i \tau_j}(d_{ij}, t), \\
    \phi_p(d, t) &= \sum_{k, l} W_{p k l}\,
        \exp\!\Big(-\frac{(d - \mu_k)^2}{2 \gamma_k^2}\Big)\,
        \exp\!\Big(-\frac{(t - \nu_l)^2}{2 \eta^2}\Big),

where :math:`p` indexes the unordered pair of atom types. Because
:math:`\phi` is symmetric in :math:`i, j`, :math:`v` is a gradient field, it is
E(n)-equivariant, translation invariant and mean-free, and its divergence is

.. math::

    \nabla \cdot v = \sum_{i \ne j} \big[D\, \phi(d_{ij}) + d_{ij}\, \partial_d \phi(d_{ij})\big]

with :math:`D` the spatial dimension, evaluated in the same vectorised pass.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bgplugin.flows.field import VectorField

__all__ = ["KernelField"]

logger = logging.getLogger(__name__)


class KernelField(VectorField):
    """Pairwise RBF-in-distance x RBF-in-time gradient field.

    Parameters
    ----------
    atom_types : array-like of int, shape (n_particles,)
        Type index per particle; each unordered pair of types gets its own weights.
    dim : int
        Spatial dimension.
    n_distance_kernels : int
        Number of distance RBFs ``K``, centres evenly spaced on
        ``[min_distance, max_distance]``.
    n_time_kernels : int
        Number of time RBFs ``L``, centres evenly spaced on [0, 1].
    min_distance, max_distance : float
        Range of the distance centres (length units of the system).
    distance_bandwidth : float or None
        Width ``gamma`` of the distance RBFs; None uses the centre spacing.
    time_bandwidth : float or None
        Width ``eta`` of the time RBFs; None uses the centre spacing.
    trainable_kernels : bool
        If True, centres and (log-)bandwidths are parameters and trained;
        otherwise they are fixed buffers and only the weights ``W`` are trained.
    """

    kind = "kernel"
    has_closed_form_divergence = True

    pair_index: Tensor
    mask: Tensor
    eye: Tensor

    def __init__(
        self,
        atom_types: np.ndarray | Tensor | Sequence[int],
        dim: int,
        n_distance_kernels: int = 32,
        n_time_kernels: int = 8,
        min_distance: float = 0.0,
        max_distance: float = 5.0,
        distance_bandwidth: float | None = None,
        time_bandwidth: float | None = None,
        trainable_kernels: bool = False,
    ) -> None:
        super().__init__(atom_types, dim)
        if n_distance_kernels < 1 or n_time_kernels < 1:
            raise ValueError(
                f"n_distance_kernels and n_time_kernels must be >= 1, got "
                f"{n_distance_kernels} and {n_time_kernels}"
            )
        if not max_distance > min_distance >= 0.0:
            raise ValueError(
                f"need 0 <= min_distance < max_distance, got min_distance={min_distance}, "
                f"max_distance={max_distance}"
            )
        for name, value in (("distance_bandwidth", distance_bandwidth), ("time_bandwidth", time_bandwidth)):
            if value is not None and not value > 0.0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")
        self.n_distance_kernels = int(n_distance_kernels)
        self.n_time_kernels = int(n_time_kernels)
        self.min_distance = float(min_distance)
        self.max_distance = float(max_distance)
        self.distance_bandwidth = distance_bandwidth
        self.time_bandwidth = time_bandwidth
        self.trainable_kernels = bool(trainable_kernels)

        means = torch.linspace(min_distance, max_distance, n_distance_kernels)
        spacing = (max_distance - min_distance) / max(n_distance_kernels - 1, 1)
        log_gamma = torch.full((n_distance_kernels,), float(np.log(distance_bandwidth or spacing)))
        time_means = torch.linspace(0.0, 1.0, n_time_kernels)
        log_eta = torch.tensor(float(np.log(time_bandwidth or 1.0 / max(n_time_kernels - 1, 1))))
        for name, value in (
            ("distance_means", means),
            ("log_distance_bandwidths", log_gamma),
            ("time_means", time_means),
            ("log_time_bandwidth", log_eta),
        ):
            if trainable_kernels:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

        types = self.atom_types
        low = torch.minimum(types[:, None], types[None, :])
        high = torch.maximum(types[:, None], types[None, :])
        n_types = self.n_types
        # index of the unordered type pair (low, high) in row-major upper-triangular order
        pair = low * n_types - low * (low - 1) // 2 + (high - low)
        self.register_buffer("pair_index", pair, persistent=False)
        n_pairs = n_types * (n_types + 1) // 2
        self.weights = nn.Parameter(0.01 * torch.randn(n_pairs, n_distance_kernels, n_time_kernels))
        eye = torch.eye(self.n_particles)
        self.register_buffer("eye", eye, persistent=False)
        self.register_buffer("mask", 1.0 - eye, persistent=False)

    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this field."""
        return {
            "atom_types": self.atom_types.tolist(),
            "dim": self.dim,
            "n_distance_kernels": self.n_distance_kernels,
            "n_time_kernels": self.n_time_kernels,
            "min_distance": self.min_distance,
            "max_distance": self.max_distance,
            "distance_bandwidth": self.distance_bandwidth,
            "time_bandwidth": self.time_bandwidth,
            "trainable_kernels": self.trainable_kernels,
        }

    def memory_per_sample(self, divergence: str) -> int:
        """Rough peak bytes per sample of one call (see :meth:`VectorField.memory_per_sample`)."""
        n, k = self.n_particles, self.n_distance_kernels
        per_call = 4 * 6 * n * n * k
        if divergence == "autograd":
            return per_call * (n - 1) * self.dim
        return per_call

    def _profile(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Distances d (B, n, n), weighted distance RBFs (B, n, n, K) and ``(d - mu) / gamma^2``."""
        r = x.unsqueeze(2) - x.unsqueeze(1)
        dist = torch.sqrt(r.square().sum(-1) + self.eye)
        time_rbf = torch.exp(
            -0.5 * ((t[:, None] - self.time_means) / torch.exp(self.log_time_bandwidth)).square()
        )  # (B, L)
        coefficients = torch.einsum("pkl,bl->bpk", self.weights, time_rbf)  # (B, P, K)
        index = self.pair_index.reshape(1, -1, 1).expand(x.shape[0], -1, self.n_distance_kernels)
        edge_coefficients = torch.gather(coefficients, 1, index).reshape(*dist.shape, -1) * self.mask.unsqueeze(-1)
        gamma = torch.exp(self.log_distance_bandwidths)
        offset = (dist.unsqueeze(-1) - self.distance_means) / gamma
        rbf = torch.exp(-0.5 * offset.square()) * edge_coefficients
        return dist, rbf, offset / gamma

    def _velocity(self, t: Tensor, x: Tensor) -> Tensor:
        _, rbf, _ = self._profile(t, x)
        phi = rbf.sum(-1)
        return x * phi.sum(2, keepdim=True) - torch.matmul(phi, x)

    def _velocity_and_divergence(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        dist, rbf, scaled_offset = self._profile(t, x)
        phi = rbf.sum(-1)
        phi_prime = -(scaled_offset * rbf).sum(-1)
        v = x * phi.sum(2, keepdim=True) - torch.matmul(phi, x)
        div = (self.dim * phi + dist * phi_prime).sum((1, 2))
        return v, div
