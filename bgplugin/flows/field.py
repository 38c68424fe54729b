"""The vector-field contract shared by every CNF field in :mod:`bgplugin.flows`.

A field maps a time ``t`` and coordinates ``x`` of shape ``(batch, n_particles,
dim)`` to a velocity of the same shape. Fields are translation invariant and
return mean-free velocities, so the flow stays on the mean-free subspace and
the trace of the full ``(n*dim) x (n*dim)`` Jacobian equals the divergence on
that ``(n-1)*dim``-dimensional subspace.

Fields that can compute their divergence exactly without autograd set
:attr:`VectorField.has_closed_form_divergence` and implement
:meth:`VectorField._velocity_and_divergence`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from bgplugin.flows.divergence import autograd_trace, closed_form

__all__ = ["VectorField", "as_atom_types"]


def as_atom_types(atom_types: np.ndarray | Tensor | Sequence[int]) -> Tensor:
    """Validate atom types and return them as a ``long`` tensor.

    Parameters
    ----------
    atom_types : array-like of int, shape (n_particles,)
        Type index per particle; particles of equal type are interchangeable.
        Indices must be ``>= 0``; gaps are allowed.

    Returns
    -------
    Tensor of int64, shape (n_particles,)
    """
    types = torch.as_tensor(np.asarray(atom_types))
    if types.ndim != 1 or types.numel() < 2:
        raise ValueError(
            f"atom_types must be a 1-d sequence with one entry per particle (at least 2), "
            f"got shape {tuple(types.shape)}; pass e.g. system.atom_types"
        )
    if types.is_floating_point() or types.is_complex() or types.dtype == torch.bool:
        raise ValueError(f"atom_types must be integers, got dtype {types.dtype}; cast with .astype(int)")
    types = types.long()
    if int(types.min()) < 0:
        raise ValueError(f"atom_types must be >= 0, got minimum {int(types.min())}")
    return types


class VectorField(nn.Module, ABC):
    """Base class of a time-dependent, E(n)- or SE(n)-equivariant velocity field.

    Parameters
    ----------
    atom_types : array-like of int, shape (n_particles,)
        Type index per particle (interchangeable particles share a type).
    dim : int
        Spatial dimension (2 or 3 for the fields in this package).

    Notes
    -----
    Subclasses implement :meth:`_velocity` (and, when exact and cheaper than
    autograd, :meth:`_velocity_and_divergence`) on already validated inputs,
    and :meth:`config`, the keyword arguments that rebuild the field.
    """

    kind: ClassVar[str]
    has_closed_form_divergence: ClassVar[bool] = False

    atom_types: Tensor

    def __init__(self, atom_types: np.ndarray | Tensor | Sequence[int], dim: int) -> None:
        super().__init__()
        types = as_atom_types(atom_types)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.n_particles = int(types.numel())
        self.dim = int(dim)
        self.n_types = int(types.max()) + 1
        self.register_buffer("atom_types", types, persistent=False)

    # -- public API ---------------------------------------------------------------------------
    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        """Velocity at time ``t``.

        Parameters
        ----------
        t : Tensor of shape () or (batch,), or float
            Flow time in [0, 1] (0: prior, 1: data).
        x : Tensor, shape (batch, n_particles, dim)
            Coordinates (length units of the system).

        Returns
        -------
        Tensor, shape (batch, n_particles, dim)
            Mean-free velocity (length units per unit flow time).
        """
        t_batch = self._check(t, x)
        return self._velocity(t_batch, x)

    def velocity_and_divergence(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        """Velocity and its exact divergence.

        Uses the closed form when the field has one, else the exact trace of
        the autograd Jacobian.

        Parameters
        ----------
        t : Tensor of shape () or (batch,), or float
            Flow time in [0, 1].
        x : Tensor, shape (batch, n_particles, dim)
            Coordinates.

        Returns
        -------
        v : Tensor, shape (batch, n_particles, dim)
            Velocity.
        div : Tensor, shape (batch,)
            ``sum_k dv_k / dx_k`` over all ``n_particles * dim`` coordinates
            (equal to the divergence on the mean-free subspace).
        """
        t_batch = self._check(t, x)
        if self.has_closed_form_divergence:
            return closed_form(self, t_batch, x, create_graph=torch.is_grad_enabled())
        return autograd_trace(self, t_batch, x, create_graph=torch.is_grad_enabled())

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this field (plain Python values only)."""

    def memory_per_sample(self, divergence: str) -> int:
        """Rough peak memory in bytes per sample of one field call in a divergence mode.

        Used by :class:`~bgplugin.flows.CNF` to choose a chunk size. The
        default counts ``n_particles**2 * dim`` floats per tangent direction.
        """
        n, d = self.n_particles, self.dim
        per_direction = 8 * n * n * d
        if divergence in ("autograd", "exact"):
            return per_direction * n * d
        return per_direction * 4

    # -- hooks for subclasses -----------------------------------------------------------------
    @abstractmethod
    def _velocity(self, t: Tensor, x: Tensor) -> Tensor:
        """Velocity for validated ``t`` of shape (batch,) and ``x`` of shape (batch, n, dim)."""

    def _velocity_and_divergence(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Closed-form velocity and divergence; only called when the class declares one.

        :func:`~bgplugin.flows.divergence.closed_form` calls it on blocks of at
        most :meth:`_closed_form_block_size` samples.
        """
        raise NotImplementedError(f"{type(self).__name__} has no closed-form divergence")

    def _closed_form_block_size(self) -> int | None:
        """Samples per :meth:`_velocity_and_divergence` call (None: the whole batch)."""
        return None

    # -- helpers ------------------------------------------------------------------------------
    def _check(self, t: Tensor | float, x: Tensor) -> Tensor:
        """Validate ``x`` and broadcast ``t`` to shape (batch,) with ``x``'s dtype and device."""
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[1:] != (self.n_particles, self.dim):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"x must be a tensor of shape (batch, {self.n_particles}, {self.dim}), got {shape}; "
                "reshape flattened coordinates with x.reshape(batch, n_particles, dim)"
            )
        t_tensor = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t_tensor.ndim == 0:
            return t_tensor.expand(x.shape[0])
        if t_tensor.shape != (x.shape[0],):
            raise ValueError(
                f"t must be a scalar or have shape (batch,) = ({x.shape[0]},), got {tuple(t_tensor.shape)}"
            )
        return t_tensor
