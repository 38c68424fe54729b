"""Test helpers shared by the test suite and by users who write their own fields.

:func:`assert_equivariant` checks a function of particle coordinates against the
symmetries every model of bgplugin must respect: rotations, reflections (when
the symmetry includes them), translations and permutations of interchangeable
atoms (equal atom type), with a tolerance that depends on the dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["OutputKind", "assert_equivariant", "random_rotation"]

logger = logging.getLogger(__name__)

OutputKind = Literal["vector", "position", "invariant"]
"""How an output transforms. ``"vector"``: rotated and permuted like the
particles, unchanged by translations (velocities, displacements, mean-free
coordinates). ``"position"``: rotated, permuted and translated.
``"invariant"``: unchanged (energies, log-densities), any shape (batch, ...)."""

_DEFAULT_TOLERANCE = {torch.float64: (1e-9, 1e-7), torch.float32: (1e-4, 1e-4)}


def random_rotation(
    dim: int,
    *,
    proper: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Haar-random orthogonal matrix.

    Parameters
    ----------
    dim : int
        Size of the matrix.
    proper : bool
        True: a rotation (det +1). False: an improper rotation (det -1), i.e.
        a rotation composed with a reflection.
    generator : torch.Generator, optional
    dtype : torch.dtype

    Returns
    -------
    Tensor, shape (dim, dim)
    """
    gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))
    if (torch.linalg.det(q) > 0) != proper:
        q[:, 0] = -q[:, 0]
    return q.to(dtype)


def _as_tuple(value: Tensor | tuple[Tensor, ...] | list[Tensor]) -> tuple[Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _transform_output(kind: OutputKind, y: Tensor, rotation: Tensor, shift: Tensor, perm: Tensor) -> Tensor:
    if kind == "invariant":
        return y
    out = (y @ rotation.T.to(y.dtype))[:, perm]
    if kind == "position":
        out = out + shift.to(y.dtype)
    return out


def assert_equivariant(
    fn: Callable[[Tensor], Tensor | tuple[Tensor, ...]],
    x: Tensor,
    atom_types: np.ndarray | Tensor | Sequence[int],
    reflections: bool = True,
    *,
    outputs: OutputKind | Sequence[OutputKind] = "vector",
    translations: bool = True,
    permutations: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """Assert that ``fn`` transforms correctly under the particle symmetries.

    Each transformation is checked on its own, then all together: a random
    rotation; an improper rotation (when ``reflections``); a random
    translation (when ``translations``); a random permutation within each
    group of equal atom types (when ``permutations`` and a group has two or
    more atoms). For each, ``fn(g x)`` is compared with ``g fn(x)``.

    Parameters
    ----------
    fn : callable
        Maps coordinates (batch, n_particles, dim) to a tensor or a tuple of
        tensors, whose kinds are given by ``outputs``.
    x : Tensor, shape (batch, n_particles, dim)
        Test configurations.
    atom_types : array-like of int, shape (n_particles,)
        Atoms of equal type are interchangeable.
    reflections : bool
        Whether the symmetry group includes reflections (E(n)) or not (SE(n)).
    outputs : OutputKind or sequence of OutputKind
        How each output transforms (see :data:`OutputKind`).
    translations, permutations : bool
        Whether to check these symmetries.
    atol, rtol : float, optional
        Tolerance ``atol + rtol * max|expected|``; defaults depend on the
        dtype of ``x`` (float64: 1e-9, 1e-7; float32: 1e-4, 1e-4).
    generator : torch.Generator, optional
        Source of the random group elements (drawn on the CPU, applied on the device of ``x``).

    Raises
    ------
    AssertionError
        Naming the transformation, the output and the largest deviation.
    ValueError
        If the inputs are inconsistent.
    """
    if x.ndim != 3:
        raise ValueError(f"x must have shape (batch, n_particles, dim), got {tuple(x.shape)}")
    types = torch.as_tensor(np.asarray(atom_types)).long()
    n, dim = x.shape[1], x.shape[2]
    if types.shape != (n,):
        raise ValueError(f"atom_types must have shape ({n},) to match x, got {tuple(types.shape)}")
    kinds: tuple[OutputKind, ...] = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    for kind in kinds:
        if kind not in ("vector", "position", "invariant"):
            raise ValueError(f"output kinds must be 'vector', 'position' or 'invariant', got {kind!r}")
    default_atol, default_rtol = _DEFAULT_TOLERANCE.get(x.dtype, (1e-3, 1e-3))
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol

    identity = torch.eye(dim, dtype=torch.float64)
    no_shift = torch.zeros(dim, dtype=torch.float64)
    no_perm = torch.arange(n)
    rotation = random_rotation(dim, generator=generator)
    shift = torch.randn(dim, generator=generator, dtype=torch.float64) * 3.0
    perm = no_perm.clone()
    for value in torch.unique(types):
        members = torch.nonzero(types == value).flatten()
        perm[members] = members[torch.randperm(members.numel(), generator=generator)]

    improper = random_rotation(dim, proper=False, generator=generator)
    checks: list[tuple[str, Tensor, Tensor, Tensor]] = [("rotation", rotation, no_shift, no_perm)]
    if reflections:
        checks.append(("reflection", improper, no_shift, no_perm))
    if translations:
        checks.append(("translation", identity, shift, no_perm))
    if permutations and not torch.equal(perm, no_perm):
        checks.append(("permutation", identity, no_shift, perm))
    checks.append(
        (
            "combined",
            improper if reflections else rotation,
            shift if translations else no_shift,
            perm if permutations else no_perm,
        )
    )

    reference = _as_tuple(fn(x))
    if len(reference) != len(kinds):
        raise ValueError(f"fn returned {len(reference)} outputs but outputs lists {len(kinds)} kinds")
    for name, rot, move, order in checks:
        # the transformations are drawn on the CPU; apply them where x lives (a model on the GPU is checked there)
        rot, move, order = rot.to(x.device), move.to(x.device), order.to(x.device)
        moved = ((x @ rot.T.to(x.dtype)) + move.to(x.dtype))[:, order]
        transformed = _as_tuple(fn(moved))
        for index, (kind, y, y_moved) in enumerate(zip(kinds, reference, transformed, strict=True)):
            expected = _transform_output(kind, y, rot, move, order)
            if expected.shape != y_moved.shape:
                raise ValueError(
                    f"output {index} has shape {tuple(y_moved.shape)} after {name} but {tuple(expected.shape)} "
                    f"before; check the output kinds {kinds}"
                )
            error = float((y_moved - expected).detach().abs().max())
            tolerance = atol + rtol * float(expected.detach().abs().max())
            if not error <= tolerance:
                raise AssertionError(
                    f"not equivariant under {name}: output {index} ({kind}) deviates by {error:.3e} "
                    f"> tolerance {tolerance:.3e} (dtype {x.dtype})"
                )
            logger.debug("%s: output %d (%s) deviates by %.3e", name, index, kind, error)
