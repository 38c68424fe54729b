r"""Invariant projections of the E-ACF coupling transform, with exact log-determinants.

A coupling layer of the E-ACF (Midgley et al. 2023, Sec. 3.2) moves one point
:math:`y \in \mathbb R^d` per atom (a coordinate of ``x`` or of an augmented
variable ``a``) with parameters predicted from the other group of variables:
an origin :math:`o` (a point that moves with the system), reference vectors
(which rotate with it) and invariant parameters. The point is expressed in
coordinates that are invariant under rotations about the origin, transformed
there, and mapped back; the result is equivariant by construction.

``"vector"`` (Vector-proj)
    :math:`u = y - o`, :math:`r = |u|`; :math:`r' = S(r)` with a monotonic
    rational-quadratic radius spline; :math:`y' = o + u\, r'/r`. No reference
    vector is needed and every quantity is a true (polar) vector, so the map
    is equivariant under rotations *and reflections* (E(d)).
    :math:`\log|\det J| = \log S'(r) + (d-1)\log(r'/r)`.
``"cartesian"`` (Cartesian-proj)
    An orthonormal frame :math:`Q = [e_1, \dots, e_d]` by Gram–Schmidt from
    :math:`d-1` reference vectors (the last axis is :math:`e_1 \times e_2` in
    3-d and the 90-degree rotation of :math:`e_1` in 2-d), :math:`z = Q^\top(y - o)`,
    :math:`z' = z \odot e^{s} + t`, :math:`y' = o + Q z'`.
    :math:`\log|\det J| = \sum_k s_k`.
``"spherical"`` (Spherical-proj)
    The same frame; :math:`z` in spherical coordinates :math:`(r, \theta, \phi)`
    (3-d; polar angle from :math:`e_3`, azimuth from :math:`e_1`) or polar
    :math:`(r, \phi)` (2-d); :math:`r` through a radius spline, :math:`\theta`
    through a spline on :math:`[0, \pi]`, :math:`\phi` through a circular spline.
    :math:`\log|\det J| = \sum \log S' + (d-1)\log(r'/r) + [\log\sin\theta' - \log\sin\theta]_{d=3}`.

The last axis of a frame is a pseudovector (it does not flip under a
reflection), so the two frame-based projections are equivariant under
rotations only (SE(d)), as in the paper. Gram–Schmidt is ill-conditioned for
nearly collinear reference vectors; :func:`collinearity_loss` is the
auxiliary loss that keeps them apart in 3-d.
"""

from __future__ import annotations

import logging
import math
from typing import Literal, get_args

import torch
from torch import Tensor

from bgplugin.flows.eacf.splines import n_spline_parameters, spline

__all__ = [
    "ProjectionKind",
    "centre_of_mass_shift",
    "collinearity_loss",
    "frame",
    "n_projection_parameters",
    "n_reference_vectors",
    "project_transform",
]

logger = logging.getLogger(__name__)

ProjectionKind = Literal["vector", "cartesian", "spherical"]

#: Bound of the affine log-scale of Cartesian-proj per layer: ``s = B tanh(raw / B)``.
LOG_SCALE_BOUND = 2.0
# Norms below this are treated as this (only reached for degenerate reference vectors).
_TINY = 1e-20


def _check_kind(kind: str) -> None:
    if kind not in get_args(ProjectionKind):
        raise ValueError(f"projection must be one of {get_args(ProjectionKind)}, got {kind!r}")


def n_reference_vectors(kind: ProjectionKind, dim: int) -> int:
    """Reference vectors (besides the origin) a projection needs: 0 for ``"vector"``, ``dim - 1`` otherwise."""
    _check_kind(kind)
    if dim not in (2, 3):
        raise ValueError(f"E-ACF projections support dim 2 or 3, got {dim}")
    return 0 if kind == "vector" else dim - 1


def n_projection_parameters(kind: ProjectionKind, dim: int, n_bins: int) -> int:
    """Invariant parameters per transformed point.

    Parameters
    ----------
    kind : {"vector", "cartesian", "spherical"}
    dim : int
        2 or 3.
    n_bins : int
        Spline bins ``K``.

    Returns
    -------
    int
        vector: ``3K`` (radius spline); cartesian: ``2 d`` (log-scales, shifts);
        spherical: radius ``3K`` + azimuth ``3K`` (+ polar angle ``3K + 1`` in 3-d).
    """
    n_reference_vectors(kind, dim)
    if kind == "vector":
        return n_spline_parameters("radius", n_bins)
    if kind == "cartesian":
        return 2 * dim
    count = n_spline_parameters("radius", n_bins) + n_spline_parameters("circular", n_bins)
    return count + (n_spline_parameters("interval", n_bins) if dim == 3 else 0)


def _norm(v: Tensor) -> Tensor:
    return torch.sqrt(v.square().sum(-1, keepdim=True).clamp_min(_TINY))


def _unit(v: Tensor, fallback: Tensor) -> Tensor:
    """``v / |v|``, exactly normalised; ``fallback`` (unit vectors) where ``v`` is exactly zero."""
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    zero = norm == 0
    return torch.where(zero, fallback, v / torch.where(zero, torch.ones_like(norm), norm))


def frame(vectors: Tensor) -> Tensor:
    r"""Right-handed orthonormal frame from ``d - 1`` reference vectors (Gram–Schmidt).

    Parameters
    ----------
    vectors : Tensor, shape (..., d - 1, d)
        Reference vectors (d = 2 or 3).

    Returns
    -------
    Tensor, shape (..., d, d)
        Rotation matrix ``Q`` whose columns are the frame axes
        (``det Q = +1``): 2-d ``[e1, J e1]``; 3-d ``[e1, e2, e1 x e2]``.

    Notes
    -----
    The frame is always orthonormal, so the projections are bijections with
    the stated log-determinants for any reference vectors. It is
    ill-conditioned (and, where a vector or the Gram–Schmidt residual is
    exactly zero, replaced by a fixed axis and no longer equivariant) for
    (nearly) zero or, in 3-d, (nearly) collinear reference vectors; see
    :func:`collinearity_loss`.
    """
    dim = vectors.shape[-1]
    if vectors.shape[-2:] != (dim - 1, dim) or dim not in (2, 3):
        raise ValueError(f"vectors must have shape (..., d - 1, d) with d = 2 or 3, got {tuple(vectors.shape)}")
    axes = torch.eye(dim, dtype=vectors.dtype, device=vectors.device)
    e1 = _unit(vectors[..., 0, :], axes[0].expand_as(vectors[..., 0, :]))
    if dim == 2:
        e2 = torch.stack((-e1[..., 1], e1[..., 0]), dim=-1)
        return torch.stack((e1, e2), dim=-1)
    v2 = vectors[..., 1, :]
    v2 = v2 - (v2 * e1).sum(-1, keepdim=True) * e1
    # fallback for an exactly degenerate pair: the coordinate axis least aligned with e1, made orthogonal to it
    least = axes[e1.abs().argmin(-1)]
    fallback = _unit(least - (least * e1).sum(-1, keepdim=True) * e1, axes[1].expand_as(e1))
    e2 = _unit(v2, fallback)
    e2 = _unit(e2 - (e2 * e1).sum(-1, keepdim=True) * e1, fallback)  # second pass: orthogonal to round-off
    e3 = torch.linalg.cross(e1, e2, dim=-1)
    return torch.stack((e1, e2, e3), dim=-1)


def collinearity_loss(vectors: Tensor, epsilon: float = 1e-4) -> Tensor:
    r"""Auxiliary loss against (nearly) collinear reference vectors in 3-d.

    :math:`-\log\frac{1 - |\cos\angle(v_1, v_2)| + \epsilon}{1 + \epsilon}`: 0 for
    orthogonal vectors, growing as they align, with a gradient bounded by
    :math:`1/\epsilon` so that a degenerate pair still gets a finite push
    apart. 2-d frames use a single reference vector and get 0.

    Parameters
    ----------
    vectors : Tensor, shape (..., d - 1, d)
    epsilon : float
        Softening of the barrier.

    Returns
    -------
    Tensor, shape (...)
    """
    if vectors.shape[-1] == 2 or vectors.shape[-2] < 2:
        return vectors.new_zeros(vectors.shape[:-2])
    v1, v2 = vectors[..., 0, :], vectors[..., 1, :]
    cosine = (v1 * v2).sum(-1) / (_norm(v1) * _norm(v2)).squeeze(-1)
    return math.log1p(epsilon) - torch.log(1.0 - cosine.abs() + epsilon)


def centre_of_mass_shift(x: Tensor, a: Tensor, onto: Literal["x", "a"]) -> tuple[Tensor, Tensor]:
    r"""Translate ``x`` and ``a`` together so that ``x`` (``onto="x"``) or ``a[:, :, 0]`` (``onto="a"``) is mean-free.

    The map between the subspaces :math:`\{\bar a_1 = 0\}` and
    :math:`\{\bar x = 0\}` has unit Jacobian (in orthonormal coordinates the
    centre-of-mass coordinate only changes sign; the other augmented centres
    are shifted by it, a triangular map), and the shift onto ``a`` undoes the
    shift onto ``x`` and vice versa.

    Parameters
    ----------
    x : Tensor, shape (batch, n_particles, dim)
    a : Tensor, shape (batch, n_particles, n_aug, dim)
    onto : {"x", "a"}

    Returns
    -------
    x, a : Tensor
        Shifted copies.
    """
    if onto == "x":
        centre = x.mean(1, keepdim=True)
    elif onto == "a":
        centre = a[:, :, 0].mean(1, keepdim=True)
    else:
        raise ValueError(f"onto must be 'x' or 'a', got {onto!r}")
    return x - centre, a - centre.unsqueeze(2)


def _split_spherical(params: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """(radius, azimuth, polar or None) parameter blocks of Spherical-proj."""
    n_params = params.shape[-1]
    n_bins = (n_params - 1) // 9 if dim == 3 else n_params // 6
    sizes = [3 * n_bins, 3 * n_bins] + ([3 * n_bins + 1] if dim == 3 else [])
    parts = params.split(sizes, dim=-1)
    return parts[0], parts[1], (parts[2] if dim == 3 else None)


def _radial(u: Tensor, params: Tensor, radius_max: float, inverse: bool) -> tuple[Tensor, Tensor]:
    """Vector-proj on displacements ``u`` (..., d): new displacement and log-determinant (...)."""
    dim = u.shape[-1]
    r = _norm(u).squeeze(-1)
    r_new, log_det = spline(r, params, "radius", radius_max, inverse=inverse)
    ratio = r_new / r
    return u * ratio.unsqueeze(-1), log_det + (dim - 1) * torch.log(ratio)


def _to_spherical(z: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """(r, phi, theta or None) of frame coordinates ``z`` (..., d)."""
    if z.shape[-1] == 2:
        return _norm(z).squeeze(-1), torch.atan2(z[..., 1], z[..., 0]), None
    r = _norm(z).squeeze(-1)
    rho = torch.sqrt(z[..., 0].square() + z[..., 1].square() + _TINY)
    return r, torch.atan2(z[..., 1], z[..., 0]), torch.atan2(rho, z[..., 2])


def _from_spherical(r: Tensor, phi: Tensor, theta: Tensor | None) -> Tensor:
    if theta is None:
        return torch.stack((r * torch.cos(phi), r * torch.sin(phi)), dim=-1)
    rho = r * torch.sin(theta)
    return torch.stack((rho * torch.cos(phi), rho * torch.sin(phi), r * torch.cos(theta)), dim=-1)


def project_transform(
    kind: ProjectionKind,
    y: Tensor,
    origin: Tensor,
    vectors: Tensor,
    params: Tensor,
    *,
    radius_max: float,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Transform points through a projection; see the module docstring for the maps.

    Parameters
    ----------
    kind : {"vector", "cartesian", "spherical"}
    y : Tensor, shape (..., d)
        Points (length units).
    origin : Tensor, shape (..., d)
        Origins (length units).
    vectors : Tensor, shape (..., n_reference_vectors(kind, d), d)
        Reference vectors of the frame (ignored by ``"vector"``).
    params : Tensor, shape (..., n_projection_parameters(kind, d, K))
        Invariant parameters (all zeros: the identity map).
    radius_max : float
        Upper end of the radius splines (length units); radii beyond it are
        left unchanged.
    inverse : bool
        Apply the inverse map.

    Returns
    -------
    y_new : Tensor, shape (..., d)
    log_det : Tensor, shape (...)
        ``log |det dy_new / dy|`` of the map that was applied.
    """
    _check_kind(kind)
    u = y - origin
    if kind == "vector":
        u_new, log_det = _radial(u, params, radius_max, inverse)
        return origin + u_new, log_det
    rotation = frame(vectors)
    z = (u.unsqueeze(-2) @ rotation).squeeze(-2)  # Q^T u
    dim = y.shape[-1]
    if kind == "cartesian":
        log_scale, shift = params.split((dim, dim), dim=-1)
        log_scale = LOG_SCALE_BOUND * torch.tanh(log_scale / LOG_SCALE_BOUND)
        if inverse:
            z_new = (z - shift) * torch.exp(-log_scale)
            log_det = -log_scale.sum(-1)
        else:
            z_new = z * torch.exp(log_scale) + shift
            log_det = log_scale.sum(-1)
    else:
        radius_params, azimuth_params, polar_params = _split_spherical(params, dim)
        r, phi, theta = _to_spherical(z)
        r_new, log_det = spline(r, radius_params, "radius", radius_max, inverse=inverse)
        phi_new, log_det_phi = spline(phi, azimuth_params, "circular", math.pi, inverse=inverse)
        log_det = log_det + log_det_phi + (dim - 1) * (torch.log(r_new) - torch.log(r))
        theta_new = None
        if theta is not None and polar_params is not None:
            theta_new, log_det_theta = spline(theta, polar_params, "interval", math.pi, inverse=inverse)
            log_det = log_det + log_det_theta + torch.log(torch.sin(theta_new)) - torch.log(torch.sin(theta))
        z_new = _from_spherical(r_new, phi_new, theta_new)
    y_new = origin + (rotation @ z_new.unsqueeze(-1)).squeeze(-1)
    return y_new, log_det
