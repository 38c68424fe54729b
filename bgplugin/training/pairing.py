r"""Pairing prior and data samples for flow matching: none, OT, equivariant OT.

Flow matching regresses a vector field on straight paths from prior samples
:math:`x_0` to data samples :math:`x_1`. How the two batches are coupled decides
how straight (and how easy to learn) the marginal paths are:

``"none"``
    independent coupling, :math:`x_0` and :math:`x_1` as drawn;
``"ot"``
    minibatch optimal transport (Tong et al. 2024; Pooladian et al. 2023):
    the assignment that minimises :math:`\sum_j |x_0^{\sigma(j)} - x_1^j|^2`
    over permutations :math:`\sigma` of the batch, solved by POT's ``ot.emd``;
``"eqot"``
    equivariant OT (Klein, Krämer & Noé 2023; Song et al. 2023): the cost of a
    pair is first reduced over the symmetries that leave the prior invariant,

    .. math::
        c(x_0, x_1) = \big|P^\ast x_0 R^\ast - x_1\big|^2 ,

    where :math:`P^\ast` is the optimal permutation of interchangeable atoms
    (same atom type; Hungarian algorithm on :math:`|x_0^b - x_1^a|^2`) and
    :math:`R^\ast` the Kabsch rotation aligning :math:`P^\ast x_0` onto
    :math:`x_1` (proper unless reflections are allowed); the batch assignment is
    then OT on :math:`c`. The paired prior sample is :math:`P^\ast x_0 R^\ast`,
    which has the same (permutation-, rotation- and reflection-invariant)
    prior density as :math:`x_0`.

Cost of equivariant OT. The permutation step needs one assignment problem per
prior/target pair, :math:`B^2` in a batch of :math:`B`. This module keeps
everything else out of the way: the pair cost matrix of inner products is one
matrix product, type groups of up to five atoms are solved for all pairs at
once by scoring every permutation with one matrix product, larger groups call
:func:`scipy.optimize.linear_sum_assignment` in a tight loop, and the Kabsch
cost of all pairs is evaluated in closed form (no SVD; the optimal rotation
only enters through :math:`\max_R \operatorname{tr}(R^\top H)`). Only the
:math:`B` chosen pairs get an SVD. What remains is dominated by the
:math:`B^2` Hungarian calls for groups of more than five atoms (LJ13 at
``B = 256``: about 65 000 calls of a few microseconds). Run the pairing in
data-loader workers (:class:`bgplugin.training.Trainer`, ``num_workers``) so
that it overlaps with the network step, or pair within blocks of the batch
(``block_size``), which costs :math:`B \cdot b` instead of :math:`B^2` calls.

All pairing arithmetic runs on the CPU in float64; results come back on the
input's device and dtype.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

logger = logging.getLogger(__name__)

PairingMethod = Literal["none", "ot", "eqot"]

#: Type groups up to this size are solved by scoring all k! permutations at once.
_MAX_BRUTE_FORCE_GROUP = 5
#: Largest number of float64 entries of the (prior, target, atom, atom) block held at once.
_MAX_BLOCK_ENTRIES = 1 << 22
#: Iteration limit of the network simplex (POT's default of 1e5 is too small for B > ~200).
_EMD_MAX_ITER = 10_000_000


@dataclass(frozen=True)
class PairingResult:
    """Prior samples paired with a data batch.

    The paired prior sample of target ``j`` is
    ``x0_in[prior_index[j]][permutation[j]] @ rotation[j]``.

    Attributes
    ----------
    x0 : Tensor, shape (batch, n_particles, dim)
        Paired prior samples, in the order of ``x1`` (same units as ``x1``).
    prior_index : Tensor of int64, shape (batch,)
        Which input prior sample was assigned to each target.
    permutation : Tensor of int64, shape (batch, n_particles)
        Atom order applied to the assigned prior sample (identity unless
        ``method="eqot"``); atom ``a`` of the result is atom
        ``permutation[j, a]`` of the prior sample.
    rotation : Tensor, shape (batch, dim, dim)
        Orthogonal matrix applied from the right (identity unless
        ``method="eqot"``); det +1 unless reflections were allowed.
    cost : Tensor, shape (batch,)
        Squared distance :math:`|x_0 - x_1|^2` of each pair after pairing.
    seconds : float
        Wall-clock time of the pairing, in s.
    """

    x0: Tensor
    prior_index: Tensor
    permutation: Tensor
    rotation: Tensor
    cost: Tensor
    seconds: float


# --------------------------------------------------------------------- Kabsch
def kabsch_rotation(x: Tensor, y: Tensor, *, allow_reflections: bool = False) -> Tensor:
    r"""Orthogonal matrices that best rotate ``x`` onto ``y`` (Kabsch algorithm), batched.

    Minimises :math:`|x R - y|^2` over :math:`R \in SO(d)` (or :math:`O(d)` with
    ``allow_reflections``) for every batch element with one batched SVD of the
    :math:`d \times d` covariance :math:`H = x^\top y = U S V^\top`:
    :math:`R = U \operatorname{diag}(1, \dots, 1, s) V^\top`, with
    :math:`s = \operatorname{sign}\det(U V^\top)` for proper rotations and
    :math:`s = 1` otherwise.

    Parameters
    ----------
    x, y : Tensor, shape (..., n_particles, dim)
        Configurations, both centred at the origin (the rotation is about the
        origin; centre them first if they are not mean-free).
    allow_reflections : bool
        Also consider improper rotations (det -1).

    Returns
    -------
    Tensor, shape (..., dim, dim)
        :math:`R` with ``x @ R`` aligned to ``y``; ``det(R) = +1`` unless
        ``allow_reflections``.
    """
    _check_same_configurations(x, y, "x", "y")
    h = x.transpose(-1, -2) @ y
    u, _, vh = torch.linalg.svd(h)
    if allow_reflections:
        return u @ vh
    sign = torch.where(torch.linalg.det(u @ vh) < 0, -1.0, 1.0).to(h.dtype)
    u = torch.cat([u[..., :-1], u[..., -1:] * sign[..., None, None]], dim=-1)
    return u @ vh


def aligned_squared_distance(x: Tensor, y: Tensor, *, allow_reflections: bool = False) -> Tensor:
    r"""Squared distance after optimal rotation, :math:`\min_R |x R - y|^2`, in closed form.

    Uses :math:`\min_R |xR - y|^2 = |x|^2 + |y|^2 - 2 \max_R \operatorname{tr}(R^\top H)`
    with :math:`H = x^\top y`; the maximum is :math:`\sqrt{(H_{00}+H_{11})^2 + (H_{10}-H_{01})^2}`
    in 2D and :math:`\sigma_1 + \sigma_2 + \operatorname{sign}(\det H)\,\sigma_3` in 3D,
    with the singular values from the closed-form eigenvalues of :math:`H^\top H`
    (no SVD). Computed in float64.

    Parameters
    ----------
    x, y : Tensor, shape (..., n_particles, dim)
        Configurations centred at the origin.
    allow_reflections : bool
        Also minimise over improper rotations.

    Returns
    -------
    Tensor, shape (...)
        Squared distances (units of ``x`` squared), in ``x``'s dtype.
    """
    _check_same_configurations(x, y, "x", "y")
    xd, yd = x.detach().cpu().double().numpy(), y.detach().cpu().double().numpy()
    h = np.einsum("...ad,...ae->...de", xd, yd)
    sq = (xd**2).sum(axis=(-1, -2)) + (yd**2).sum(axis=(-1, -2))
    cost = np.maximum(sq - 2.0 * _max_rotation_trace(h, allow_reflections), 0.0)
    return torch.as_tensor(cost, dtype=x.dtype, device=x.device)


def _max_rotation_trace(h: np.ndarray, allow_reflections: bool) -> np.ndarray:
    r""":math:`\max_R \operatorname{tr}(R^\top H)` over SO(d) (or O(d)), H shape (..., d, d)."""
    d = h.shape[-1]
    if d == 1:
        return np.abs(h[..., 0, 0]) if allow_reflections else h[..., 0, 0]
    if d == 2:
        proper = np.hypot(h[..., 0, 0] + h[..., 1, 1], h[..., 1, 0] - h[..., 0, 1])
        if not allow_reflections:
            return proper
        return np.maximum(proper, np.hypot(h[..., 0, 0] - h[..., 1, 1], h[..., 0, 1] + h[..., 1, 0]))
    if d == 3:
        s1, s2, s3 = _singular_values_3x3(h)
        if allow_reflections:
            return s1 + s2 + s3
        return s1 + s2 + np.sign(_det_3x3(h)) * s3
    s = np.linalg.svd(h, compute_uv=False)
    if allow_reflections:
        return s.sum(axis=-1)
    return s[..., :-1].sum(axis=-1) + np.sign(np.linalg.det(h)) * s[..., -1]


def _det_3x3(h: np.ndarray) -> np.ndarray:
    return (
        h[..., 0, 0] * (h[..., 1, 1] * h[..., 2, 2] - h[..., 1, 2] * h[..., 2, 1])
        - h[..., 0, 1] * (h[..., 1, 0] * h[..., 2, 2] - h[..., 1, 2] * h[..., 2, 0])
        + h[..., 0, 2] * (h[..., 1, 0] * h[..., 2, 1] - h[..., 1, 1] * h[..., 2, 0])
    )


def _singular_values_3x3(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Singular values (descending) of 3x3 matrices from the trigonometric eigenvalue formula of H^T H."""
    m = np.einsum("...ki,...kj->...ij", h, h)
    a, b, c = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    d, e, f = m[..., 0, 1], m[..., 1, 2], m[..., 0, 2]
    q = (a + b + c) / 3.0
    off = d * d + e * e + f * f
    p = np.sqrt(((a - q) ** 2 + (b - q) ** 2 + (c - q) ** 2 + 2.0 * off) / 6.0)
    scale = np.where(p > 0, p, 1.0)
    a, b, c, d, e, f = (a - q) / scale, (b - q) / scale, (c - q) / scale, d / scale, e / scale, f / scale
    half_det = (a * (b * c - e * e) - d * (d * c - e * f) + f * (d * e - b * f)) / 2.0
    phi = np.arccos(np.clip(half_det, -1.0, 1.0)) / 3.0
    l1 = q + 2.0 * p * np.cos(phi)
    l3 = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    l2 = 3.0 * q - l1 - l3
    return (np.sqrt(np.maximum(l1, 0.0)), np.sqrt(np.maximum(l2, 0.0)), np.sqrt(np.maximum(l3, 0.0)))


# -------------------------------------------------------- atom permutations
def type_groups(atom_types: np.ndarray | Tensor | None, n_particles: int) -> list[np.ndarray]:
    """Index arrays of the interchangeable atoms (same type), groups of two or more atoms only.

    Parameters
    ----------
    atom_types : array of int, shape (n_particles,), or None
        Type of each atom; ``None`` means all atoms are interchangeable.
    n_particles : int

    Returns
    -------
    list of ndarray of int64
        One sorted index array per type that occurs at least twice.
    """
    if atom_types is None:
        return [np.arange(n_particles)] if n_particles > 1 else []
    types = np.asarray(atom_types.detach().cpu() if isinstance(atom_types, Tensor) else atom_types)
    if types.shape != (n_particles,):
        raise ValueError(
            f"atom_types must have shape ({n_particles},), got {types.shape}; "
            "pass one integer type per particle"
        )
    if not np.issubdtype(types.dtype, np.integer):
        raise ValueError(f"atom_types must be integers, got dtype {types.dtype}; use e.g. np.asarray(types, dtype=int)")
    groups = [np.flatnonzero(types == t) for t in np.unique(types)]
    return [g for g in groups if len(g) > 1]


def optimal_permutation(
    x: Tensor, y: Tensor, atom_types: np.ndarray | Tensor | None = None
) -> Tensor:
    r"""Atom order of ``x`` that minimises :math:`|x_{\pi} - y|^2`, permuting only atoms of equal type.

    Parameters
    ----------
    x, y : Tensor, shape (..., n_particles, dim)
        Configurations (no alignment is applied).
    atom_types : array of int, shape (n_particles,), or None
        Only atoms of equal type are exchanged; ``None``: all atoms are interchangeable.

    Returns
    -------
    Tensor of int64, shape (..., n_particles)
        :math:`\pi` such that ``x[..., pi, :]`` (gathered per batch element)
        is closest to ``y``.
    """
    _check_same_configurations(x, y, "x", "y")
    n, d = x.shape[-2:]
    xd = x.detach().cpu().double().numpy().reshape(-1, n, d)
    yd = y.detach().cpu().double().numpy().reshape(-1, n, d)
    cost = -np.einsum("pad,pbd->pab", yd, xd)  # target atom a, source atom b; |x_b|^2 is a constant
    perm = _assign(cost, type_groups(atom_types, n))
    return torch.as_tensor(perm, device=x.device).reshape(*x.shape[:-1])


def _assign(cost: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """Minimise sum_a cost[p, a, perm[p, a]] over type-respecting permutations; cost shape (P, n, n)."""
    n_problems, n = cost.shape[:2]
    if len(groups) == 1 and len(groups[0]) == n:
        return _assign_group(cost)
    perm = np.broadcast_to(np.arange(n), (n_problems, n)).copy()
    for group in groups:
        perm[:, group] = group[_assign_group(cost[:, group[:, None], group[None, :]])]
    return perm


def _assign_group(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost assignment of every (P, k, k) block; returns (P, k) column indices."""
    n_problems, k = cost.shape[:2]
    if k <= _MAX_BRUTE_FORCE_GROUP:
        perms, scorer = _permutation_table(k)
        return perms[np.argmin(cost.reshape(n_problems, k * k) @ scorer, axis=1)]
    cost = np.ascontiguousarray(cost)
    out = np.empty((n_problems, k), dtype=np.int64)
    for p in range(n_problems):
        out[p] = linear_sum_assignment(cost[p])[1]
    return out


@functools.lru_cache(maxsize=_MAX_BRUTE_FORCE_GROUP)
def _permutation_table(k: int) -> tuple[np.ndarray, np.ndarray]:
    """All k! permutations (k!, k) and the (k*k, k!) 0/1 matrix that scores them on a flattened block (read-only)."""
    perms = np.array(list(itertools.permutations(range(k))), dtype=np.int64)
    scorer = np.zeros((k * k, len(perms)))
    scorer[np.arange(k)[None, :] * k + perms, np.arange(len(perms))[:, None]] = 1.0
    perms.setflags(write=False)
    scorer.setflags(write=False)
    return perms, scorer


# ---------------------------------------------------------------- OT pairing
def squared_distance_matrix(x0: Tensor, x1: Tensor) -> Tensor:
    r"""Batch cost matrix :math:`C_{ij} = |x_0^i - x_1^j|^2`, float64 on the CPU.

    Parameters
    ----------
    x0 : Tensor, shape (batch_0, n_particles, dim)
    x1 : Tensor, shape (batch_1, n_particles, dim)

    Returns
    -------
    Tensor of float64, shape (batch_0, batch_1)
    """
    a = x0.detach().cpu().double().flatten(1)
    b = x1.detach().cpu().double().flatten(1)
    return torch.cdist(a, b).square()


def equivariant_cost_matrix(
    x0: Tensor,
    x1: Tensor,
    atom_types: np.ndarray | Tensor | None = None,
    *,
    allow_reflections: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""Equivariant-OT cost of every prior/target pair: Hungarian permutation, then Kabsch.

    :math:`C_{ij} = \min_R |P_{ij} x_0^i R - x_1^j|^2` with :math:`P_{ij}` the
    optimal type-respecting atom permutation of :math:`x_0^i` onto :math:`x_1^j`
    before rotation (the order of Klein, Krämer & Noé 2023).

    Parameters
    ----------
    x0 : Tensor, shape (batch_0, n_particles, dim)
        Mean-free prior samples.
    x1 : Tensor, shape (batch_1, n_particles, dim)
        Mean-free data samples.
    atom_types : array of int, shape (n_particles,), or None
        Only atoms of equal type are permuted; ``None``: all atoms are interchangeable.
    allow_reflections : bool
        Minimise over improper rotations as well.

    Returns
    -------
    cost : Tensor of float64, shape (batch_0, batch_1)
        Squared distances after permutation and rotation (units of ``x`` squared).
    permutation : Tensor of int64, shape (batch_0, batch_1, n_particles)
        ``permutation[i, j]`` reorders the atoms of ``x0[i]`` onto ``x1[j]``.
    """
    _check_batches(x0, x1)
    n = x0.shape[1]
    a = x0.detach().cpu().double().numpy()
    b = x1.detach().cpu().double().numpy()
    groups = type_groups(atom_types, n)
    cost, perm = _equivariant_cost(a, b, groups, allow_reflections)
    return torch.from_numpy(cost), torch.from_numpy(perm)


def _equivariant_cost(
    a: np.ndarray, b: np.ndarray, groups: list[np.ndarray], allow_reflections: bool
) -> tuple[np.ndarray, np.ndarray]:
    n_a, n, d = a.shape
    n_b = len(b)
    cost = np.empty((n_a, n_b))
    perm = np.empty((n_a, n_b, n), dtype=np.int64)
    sq_a, sq_b = (a**2).sum(axis=(1, 2)), (b**2).sum(axis=(1, 2))
    minus_b = -b.reshape(1, n_b * n, d)
    rows = max(1, _MAX_BLOCK_ENTRIES // (n_b * n * n))
    for start in range(0, n_a, rows):
        chunk = a[start : start + rows]
        c = len(chunk)
        # assignment costs of all pairs in one product: -x1[j, a] . x0[i, b] at [i, j, a, b]
        # (|x0[i, b]|^2 + |x1[j, a]|^2 add the same constant to every permutation)
        g = (minus_b @ chunk.transpose(0, 2, 1)).reshape(c * n_b, n, n)
        p = _assign(g, groups).reshape(c, n_b, n)
        atom_index = p + (n * np.arange(c))[:, None, None]
        permuted = np.take(chunk.reshape(c * n, d), atom_index, axis=0)  # (c, n_b, n, d)
        trace = _max_rotation_trace(permuted.transpose(0, 1, 3, 2) @ b[None], allow_reflections)
        cost[start : start + c] = np.maximum(sq_a[start : start + c, None] + sq_b[None] - 2.0 * trace, 0.0)
        perm[start : start + c] = p
    return cost, perm


def ot_assignment(cost: Tensor | np.ndarray) -> Tensor:
    r"""Optimal assignment of a square batch cost matrix by exact OT (POT's ``ot.emd``).

    With uniform marginals the optimal plan of a square problem is a
    permutation matrix (a vertex of the Birkhoff polytope).

    Parameters
    ----------
    cost : Tensor or ndarray, shape (batch, batch)
        ``cost[i, j]``: cost of sending prior sample ``i`` to target ``j``.

    Returns
    -------
    Tensor of int64, shape (batch,)
        ``index[j]``: the prior sample assigned to target ``j``.
    """
    c = np.ascontiguousarray(np.asarray(cost.detach().cpu() if isinstance(cost, Tensor) else cost, dtype=np.float64))
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"cost must be a square matrix, got shape {c.shape}; pair batches of equal size")
    if not np.isfinite(c).all():
        raise ValueError("cost contains non-finite entries; check the samples for NaN or inf")
    size = c.shape[0]
    marginal = np.full(size, 1.0 / size)
    plan = ot.emd(marginal, marginal, c, numItermax=_EMD_MAX_ITER)
    index = plan.argmax(axis=0)
    if len(np.unique(index)) != size:
        # a degenerate plan (ties): round it to the permutation that carries the most mass
        index = np.empty(size, dtype=np.int64)
        rows, cols = linear_sum_assignment(-plan)
        index[cols] = rows
    return torch.as_tensor(index, dtype=torch.int64)


# ----------------------------------------------------------------- the pairer
class Pairing:
    r"""Couples a prior batch with a data batch: ``"none"``, ``"ot"`` or ``"eqot"``.

    Parameters
    ----------
    method : {"none", "ot", "eqot"}
        Independent coupling, minibatch OT, or equivariant minibatch OT (see the
        module docstring).
    atom_types : array of int, shape (n_particles,), or None
        For ``"eqot"``: only atoms of equal type are permuted. ``None``: all
        atoms are interchangeable (particle systems).
    allow_reflections : bool
        For ``"eqot"``: align with improper rotations too. Only valid when the
        prior *and* the flow are reflection-invariant (E(3) symmetry); keep
        ``False`` for chiral molecules.
    block_size : int or None
        Pair within consecutive blocks of this many samples instead of the
        whole batch (cost grows as ``batch * block_size`` instead of
        ``batch**2``); ``None``: the whole batch.

    Examples
    --------
    >>> pairing = Pairing("eqot")
    >>> result = pairing(x0, x1)  # doctest: +SKIP
    >>> xt = (1 - t) * result.x0 + t * x1  # doctest: +SKIP
    """

    def __init__(
        self,
        method: PairingMethod,
        atom_types: np.ndarray | Tensor | None = None,
        *,
        allow_reflections: bool = False,
        block_size: int | None = None,
    ) -> None:
        if method not in get_args(PairingMethod):
            raise ValueError(f"pairing method must be one of {get_args(PairingMethod)}, got {method!r}")
        valid_block = block_size is None or (
            isinstance(block_size, int) and not isinstance(block_size, bool) and block_size >= 1
        )
        if not valid_block:
            raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
        self.method: PairingMethod = method
        if isinstance(atom_types, Tensor):
            atom_types = atom_types.detach().cpu().numpy()
        self.atom_types: np.ndarray | None = None if atom_types is None else np.asarray(atom_types)
        if self.atom_types is not None:
            type_groups(self.atom_types, len(self.atom_types))  # validates dtype and shape
        self.allow_reflections = bool(allow_reflections)
        self.block_size = None if block_size is None else int(block_size)

    def __repr__(self) -> str:
        return (
            f"Pairing({self.method!r}, allow_reflections={self.allow_reflections}, "
            f"block_size={self.block_size}, typed={self.atom_types is not None})"
        )

    def __call__(self, x0: Tensor, x1: Tensor) -> PairingResult:
        r"""Pair prior samples with data samples.

        Parameters
        ----------
        x0 : Tensor, shape (batch, n_particles, dim)
            Mean-free prior samples.
        x1 : Tensor, shape (batch, n_particles, dim)
            Mean-free data samples (same units as ``x0``).

        Returns
        -------
        PairingResult
            ``result.x0[j]`` is the prior sample paired with ``x1[j]``.
        """
        _check_batches(x0, x1)
        if x0.shape[0] != x1.shape[0]:
            raise ValueError(f"x0 and x1 must have the same batch size, got {x0.shape[0]} and {x1.shape[0]}")
        start = time.perf_counter()
        batch, n, d = x0.shape
        if self.atom_types is not None and self.atom_types.shape != (n,):
            raise ValueError(
                f"this Pairing has atom_types for {len(self.atom_types)} particles, but x0 has {n}; "
                "build the Pairing from the same system as the data"
            )
        a = x0.detach().cpu().double().numpy()
        b = x1.detach().cpu().double().numpy()
        index = np.arange(batch)
        perm = np.broadcast_to(np.arange(n), (batch, n)).copy()
        if self.method != "none":
            block = batch if self.block_size is None else min(self.block_size, batch)
            for lo in range(0, batch, block):
                hi = min(lo + block, batch)
                index[lo:hi], perm[lo:hi] = self._pair_block(a[lo:hi], b[lo:hi])
                index[lo:hi] += lo
        paired = np.take_along_axis(a[index], perm[..., None], axis=1)
        rotation = np.broadcast_to(np.eye(d), (batch, d, d))
        if self.method == "eqot":
            rotation = kabsch_rotation(
                torch.from_numpy(paired), torch.from_numpy(b), allow_reflections=self.allow_reflections
            ).numpy()
            paired = paired @ rotation
        cost = ((paired - b) ** 2).sum(axis=(1, 2))
        seconds = time.perf_counter() - start
        logger.debug("%r: batch %d paired in %.1f ms", self, batch, 1e3 * seconds)
        return PairingResult(
            x0=torch.as_tensor(paired, dtype=x0.dtype, device=x0.device),
            prior_index=torch.as_tensor(index, device=x0.device),
            permutation=torch.as_tensor(perm, device=x0.device),
            rotation=torch.as_tensor(np.ascontiguousarray(rotation), dtype=x0.dtype, device=x0.device),
            cost=torch.as_tensor(cost, dtype=x0.dtype, device=x0.device),
            seconds=seconds,
        )

    def _pair_block(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Assignment (target -> prior index) and per-target atom permutations of one block."""
        n = a.shape[1]
        if self.method == "ot":
            cost = squared_distance_matrix(torch.from_numpy(a), torch.from_numpy(b))
            index = ot_assignment(cost).numpy()
            return index, np.broadcast_to(np.arange(n), (len(b), n))
        groups = type_groups(self.atom_types, n)
        cost, perm = _equivariant_cost(a, b, groups, self.allow_reflections)
        index = ot_assignment(cost).numpy()
        return index, perm[index, np.arange(len(b))]


# -------------------------------------------------------------------- checks
def _check_same_configurations(x: Tensor, y: Tensor, name_x: str, name_y: str) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            f"{name_x} and {name_y} must be torch tensors, got {type(x).__name__} and {type(y).__name__}; "
            "use torch.as_tensor"
        )
    if x.ndim < 2 or x.shape != y.shape:
        raise ValueError(
            f"{name_x} and {name_y} must have the same shape (..., n_particles, dim), "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def _check_batches(x0: Tensor, x1: Tensor) -> None:
    if not isinstance(x0, Tensor) or not isinstance(x1, Tensor):
        raise TypeError(
            f"x0 and x1 must be torch tensors, got {type(x0).__name__} and {type(x1).__name__}; use torch.as_tensor"
        )
    if x0.ndim != 3 or x1.ndim != 3 or x0.shape[1:] != x1.shape[1:]:
        raise ValueError(
            "x0 and x1 must have shape (batch, n_particles, dim) with equal n_particles and dim, "
            f"got {tuple(x0.shape)} and {tuple(x1.shape)}"
        )
