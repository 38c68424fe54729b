r"""Isotropic Gaussian on the mean-free subspace, the base density of every CNF.

For ``n`` particles in ``d`` dimensions the centre of mass is removed, so the
density lives on the :math:`(n-1)d`-dimensional subspace
:math:`\{x : \sum_i x_i = 0\}` and is normalised there:

.. math::

    \log p(x) = -\frac{|x - \bar x|^2}{2\sigma^2} - \frac{(n-1)d}{2}\log(2\pi\sigma^2).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MeanFreeGaussian"]

logger = logging.getLogger(__name__)


class MeanFreeGaussian(nn.Module):
    """Mean-free isotropic Gaussian.

    Parameters
    ----------
    n_particles : int
        Number of particles ``n`` (>= 2).
    dim : int
        Spatial dimension ``d``.
    std : float
        Standard deviation per coordinate of the subspace (length units).
    """

    reference: Tensor

    def __init__(self, n_particles: int, dim: int, std: float = 1.0) -> None:
        super().__init__()
        if n_particles < 2:
            raise ValueError(f"n_particles must be >= 2 for a mean-free density, got {n_particles}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not std > 0.0 or not math.isfinite(std):
            raise ValueError(f"std must be a finite number > 0, got {std}")
        self.n_particles = int(n_particles)
        self.dim = int(dim)
        self.std = float(std)
        # Empty buffer that follows .to(device, dtype): the dtype and device of samples.
        self.register_buffer("reference", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        """Device of the samples."""
        return self.reference.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point dtype of the samples."""
        return self.reference.dtype

    @property
    def subspace_dim(self) -> int:
        """Dimension ``(n - 1) * d`` of the mean-free subspace."""
        return (self.n_particles - 1) * self.dim

    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this prior."""
        return {"n_particles": self.n_particles, "dim": self.dim, "std": self.std}

    def sample(self, n_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw mean-free samples.

        Parameters
        ----------
        n_samples : int
            Number of samples.
        generator : torch.Generator, optional
            Random generator on the prior's device.

        Returns
        -------
        Tensor, shape (n_samples, n_particles, dim)
        """
        if n_samples < 0:
            raise ValueError(f"n_samples must be >= 0, got {n_samples}")
        x = torch.randn(
            n_samples,
            self.n_particles,
            self.dim,
            generator=generator,
            device=self.device,
            dtype=self.dtype,
        )
        return self.std * (x - x.mean(1, keepdim=True))

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density on the mean-free subspace.

        Parameters
        ----------
        x : Tensor, shape (batch, n_particles, dim)
            Coordinates; the centre of mass is removed first.

        Returns
        -------
        Tensor, shape (batch,)
            Log-density in nats (per unit subspace volume).
        """
        if x.ndim != 3 or x.shape[1:] != (self.n_particles, self.dim):
            raise ValueError(
                f"x must have shape (batch, {self.n_particles}, {self.dim}), got {tuple(x.shape)}"
            )
        centred = x - x.mean(1, keepdim=True)
        variance = self.std**2
        norm = 0.5 * self.subspace_dim * math.log(2.0 * math.pi * variance)
        return -0.5 * centred.square().sum((1, 2)) / variance - norm
