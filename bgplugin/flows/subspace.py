"""The mean-free subspace on which every flow of :mod:`bgplugin.flows` lives."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mean_free_basis"]


def mean_free_basis(
    n_particles: int, dim: int, dtype: torch.dtype = torch.float64, device: torch.device | None = None
) -> Tensor:
    """Orthonormal basis of the mean-free subspace (Helmert contrasts per axis).

    Parameters
    ----------
    n_particles, dim : int
        Number of particles and spatial dimension.
    dtype : torch.dtype
        dtype of the returned basis (built in float64, then cast).
    device : torch.device, optional
        Device of the returned basis.

    Returns
    -------
    Tensor, shape (n_particles, dim, (n_particles - 1) * dim)
        ``U[:, :, k]`` is the k-th basis vector as a configuration; the columns
        of ``U.reshape(n_particles * dim, -1)`` are orthonormal and sum to zero
        over particles.
    """
    row = torch.arange(n_particles, dtype=torch.float64).unsqueeze(1)
    column = torch.arange(1, n_particles, dtype=torch.float64).unsqueeze(0)
    entries = torch.where(row < column, 1.0, torch.where(row == column, -column, 0.0))
    helmert = entries / torch.sqrt(column * (column + 1.0))
    basis = torch.einsum("ip,ab->iapb", helmert, torch.eye(dim, dtype=torch.float64))
    return basis.reshape(n_particles, dim, (n_particles - 1) * dim).to(dtype=dtype, device=device)
