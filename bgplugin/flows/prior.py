r"""Gaussian base densities on the mean-free subspace.

For ``n`` particles in ``d`` dimensions the centre of mass is removed, so the
densities live on the :math:`(n-1)d`-dimensional subspace
:math:`\{x : \sum_i x_i = 0\}` and are normalised there (with respect to the
Lebesgue measure of orthonormal coordinates of the subspace).

:class:`MeanFreeGaussian` is isotropic, the default base of every flow:

.. math::

    \log p(x) = -\frac{|x - \bar x|^2}{2\sigma^2} - \frac{(n-1)d}{2}\log(2\pi\sigma^2).

:class:`CorrelatedMeanFreeGaussian` correlates the particles, not the axes:
the covariance is :math:`C \otimes I_d` with an ``n x n`` particle covariance
:math:`C` (``C 1 = 0``, positive definite on the mean-free subspace), so its
density depends on the inner products :math:`x_i \cdot x_j` only and is
invariant under rotations, reflections and translations; it is invariant
under a permutation of particles when ``C`` is. :func:`fit_particle_covariance`
estimates ``C`` from training frames (``E[x_i \cdot x_j] / d`` of the centred
frames, averaged over interchangeable particles): for a molecule it puts
bonded atoms close together before any training (alanine dipeptide
umbrella frames score -145 nats under it against -22 under the best
isotropic Gaussian).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bgplugin.flows.field import as_atom_types

__all__ = [
    "CorrelatedMeanFreeGaussian",
    "MeanFreeGaussian",
    "PriorBackedFlow",
    "fit_particle_covariance",
    "make_prior",
    "symmetrised_covariance",
]

logger = logging.getLogger(__name__)


class _MeanFreeDensity(nn.Module):
    """What every base density shares: particles, dimension, and the device and dtype of its samples."""

    reference: Tensor

    def __init__(self, n_particles: int, dim: int) -> None:
        super().__init__()
        if n_particles < 2:
            raise ValueError(f"n_particles must be >= 2 for a mean-free density, got {n_particles}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.n_particles = int(n_particles)
        self.dim = int(dim)
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


class PriorBackedFlow(nn.Module):
    """A flow whose particles, dimension, device and dtype are those of its base density ``self.prior``."""

    prior: _MeanFreeDensity

    @property
    def n_particles(self) -> int:
        """Number of particles."""
        return self.prior.n_particles

    @property
    def dim(self) -> int:
        """Spatial dimension."""
        return self.prior.dim

    @property
    def device(self) -> torch.device:
        """Device of the flow's tensors."""
        return self.prior.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point dtype of the flow's tensors."""
        return self.prior.dtype


class MeanFreeGaussian(_MeanFreeDensity):
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

    def __init__(self, n_particles: int, dim: int, std: float = 1.0) -> None:
        super().__init__(n_particles, dim)
        if not std > 0.0 or not math.isfinite(std):
            raise ValueError(f"std must be a finite number > 0, got {std}")
        self.std = float(std)

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


def _float64_array(value: np.ndarray | Tensor | Any) -> np.ndarray:
    """``value`` (array-like or tensor, any device) as a float64 numpy array."""
    return np.asarray(value.detach().cpu().numpy() if isinstance(value, Tensor) else value, dtype=np.float64)


def _particle_helmert(n_particles: int) -> np.ndarray:
    """(n, n - 1) orthonormal columns that sum to zero: the mean-free subspace of one axis."""
    from bgplugin.flows.subspace import mean_free_basis

    return mean_free_basis(n_particles, 1)[:, 0, :].numpy()


class CorrelatedMeanFreeGaussian(_MeanFreeDensity):
    r"""Mean-free Gaussian with covariance :math:`C \otimes I_d` (particles correlated, axes not).

    Parameters
    ----------
    covariance : array-like, shape (n_particles, n_particles)
        Particle covariance :math:`C` (length units squared): symmetric, finite
        and positive definite on the mean-free subspace. It is projected onto
        that subspace first (``P C P`` with ``P = I - 11^T/n``), so adding a
        constant to every entry changes nothing. Estimate it from frames with
        :func:`fit_particle_covariance`.
    dim : int
        Spatial dimension ``d``.

    Notes
    -----
    With ``C = V \Lambda V^T`` on the subspace (``V``: ``n - 1`` orthonormal
    columns orthogonal to ``1``), a sample is ``x = V \Lambda^{1/2} z`` with
    ``z ~ N(0, I)`` of shape ``(n - 1, d)``, and

    .. math::

        \log p(x) = -\tfrac12 \sum_k \frac{|v_k^T x|^2}{\lambda_k}
                    - \tfrac d2 \sum_k \log(2\pi\lambda_k),

    normalised on the subspace like :class:`MeanFreeGaussian` (which is the
    case ``C = \sigma^2 P``).
    """

    basis: Tensor
    scales: Tensor

    def __init__(self, covariance: np.ndarray | Tensor | list[list[float]], dim: int) -> None:
        matrix = _float64_array(covariance)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
            raise ValueError(
                f"covariance must be a square (n_particles, n_particles) matrix with n_particles >= 2, "
                f"got shape {matrix.shape}"
            )
        if not np.all(np.isfinite(matrix)):
            raise ValueError("covariance has non-finite entries; estimate it with fit_particle_covariance(frames)")
        if not np.allclose(matrix, matrix.T, rtol=1e-6, atol=1e-12 * max(1.0, float(np.abs(matrix).max()))):
            raise ValueError("covariance must be symmetric; pass (C + C.T) / 2 if it is only off by round-off")
        n = matrix.shape[0]
        super().__init__(n, dim)
        helmert = _particle_helmert(n)
        reduced = helmert.T @ (0.5 * (matrix + matrix.T)) @ helmert
        eigenvalues, vectors = np.linalg.eigh(reduced)
        if not eigenvalues[0] > 0.0:
            raise ValueError(
                f"covariance is not positive definite on the mean-free subspace (smallest eigenvalue "
                f"{eigenvalues[0]:.3g}); estimate it with fit_particle_covariance(frames, floor=...) to bound "
                "the eigenvalues away from zero"
            )
        self.covariance = helmert @ reduced @ helmert.T  # the projected C, as used
        # float64 originals; the buffers follow .to(device, dtype) and are rebuilt from these in _apply
        self._basis64 = torch.from_numpy(helmert @ vectors)
        self._scales64 = torch.from_numpy(np.sqrt(eigenvalues))
        self.register_buffer("basis", self._basis64.to(torch.float32), persistent=False)
        self.register_buffer("scales", self._scales64.to(torch.float32), persistent=False)
        self._log_norm = 0.5 * self.dim * float(np.sum(np.log(2.0 * math.pi * eigenvalues)))

    def _apply(self, fn: Any, recurse: bool = True) -> CorrelatedMeanFreeGaussian:
        # Rebuild the buffers from the float64 originals so that a float32 -> float64 cast loses nothing.
        super()._apply(fn, recurse)
        self.basis = self._basis64.to(device=self.basis.device, dtype=self.basis.dtype)
        self.scales = self._scales64.to(device=self.scales.device, dtype=self.scales.dtype)
        return self

    @property
    def std(self) -> float:
        """Root-mean-square standard deviation per subspace coordinate (the isotropic prior's ``std``)."""
        return float(np.sqrt(np.mean(self._scales64.numpy() ** 2)))

    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this prior (the covariance as nested lists)."""
        return {"covariance": self.covariance.tolist(), "dim": self.dim}

    def sample(self, n_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw mean-free samples, shape (n_samples, n_particles, dim)."""
        if n_samples < 0:
            raise ValueError(f"n_samples must be >= 0, got {n_samples}")
        z = torch.randn(
            n_samples, self.n_particles - 1, self.dim, generator=generator, device=self.device, dtype=self.dtype
        )
        return torch.einsum("ik,bkd->bid", self.basis, self.scales[:, None] * z)

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density on the mean-free subspace, shape (batch,), nats; the centre of mass is removed first."""
        if x.ndim != 3 or x.shape[1:] != (self.n_particles, self.dim):
            raise ValueError(
                f"x must have shape (batch, {self.n_particles}, {self.dim}), got {tuple(x.shape)}"
            )
        centred = x - x.mean(1, keepdim=True)
        basis, scales = self.basis.to(x.dtype), self.scales.to(x.dtype)
        z = torch.einsum("ik,bid->bkd", basis, centred) / scales[:, None]
        return -0.5 * z.square().sum((1, 2)) - self._log_norm


def fit_particle_covariance(
    frames: np.ndarray | Tensor,
    atom_types: np.ndarray | Tensor | list[int] | None = None,
    *,
    weights: np.ndarray | Tensor | None = None,
    floor: float = 1e-4,
) -> np.ndarray:
    r"""Particle covariance :math:`C_{ij} = E[x_i \cdot x_j] / d` of centred frames, for a correlated base.

    Parameters
    ----------
    frames : array, shape (n_frames, n_particles, dim)
        Training configurations (the centre of mass is removed here).
    atom_types : array-like of int, shape (n_particles,), optional
        Particles of equal type are interchangeable: ``C`` is averaged over
        their permutations (entries depend only on the two types and on
        ``i == j``), so a flow built on it keeps its permutation symmetry.
        None: every particle is distinct.
    weights : array, shape (n_frames,), optional
        Non-negative frame weights (e.g. MBAR weights); default uniform.
    floor : float
        Eigenvalues on the mean-free subspace are raised to at least
        ``floor`` times their mean, so no direction of the base is narrower
        than the data can pin down.

    Returns
    -------
    numpy.ndarray, shape (n_particles, n_particles)
        Symmetric, ``C 1 = 0``, positive definite on the mean-free subspace.
    """
    x = _float64_array(frames)
    if x.ndim != 3 or x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(
            f"frames must have shape (n_frames >= 2, n_particles >= 2, dim), got {x.shape}; "
            "reshape flattened coordinates with frames.reshape(n_frames, n_particles, dim)"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError("frames contain non-finite coordinates; drop those frames first")
    if not (math.isfinite(floor) and 0.0 < floor < 1.0):
        raise ValueError(f"floor must be a number in (0, 1), got {floor!r}")
    n_frames, n, dim = x.shape
    if weights is None:
        w = np.full(n_frames, 1.0 / n_frames)
    else:
        w = _float64_array(weights)
        if w.shape != (n_frames,) or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
            raise ValueError(
                f"weights must be {n_frames} finite non-negative numbers with a positive sum, got shape {w.shape}"
            )
        w = w / w.sum()
    types = None if atom_types is None else as_atom_types(atom_types).numpy()
    if types is not None and types.shape != (n,):
        raise ValueError(f"atom_types must have shape ({n},) to match the frames, got {types.shape}")
    x = x - x.mean(1, keepdims=True)
    covariance = np.einsum("b,bid,bjd->ij", w, x, x) / dim
    if types is not None:
        covariance = symmetrised_covariance(covariance, types)
    helmert = _particle_helmert(n)
    eigenvalues, vectors = np.linalg.eigh(helmert.T @ covariance @ helmert)
    eigenvalues = np.maximum(eigenvalues, floor * max(float(eigenvalues.mean()), np.finfo(float).tiny))
    basis = helmert @ vectors
    return (basis * eigenvalues) @ basis.T


def symmetrised_covariance(covariance: np.ndarray, atom_types: np.ndarray) -> np.ndarray:
    """``covariance`` averaged over the permutations of particles of equal type.

    Entries then depend only on the two types and on ``i == j``; a matrix that
    is already invariant comes back unchanged.
    """
    types = np.asarray(atom_types)
    result = np.empty_like(covariance)
    groups = [np.flatnonzero(types == t) for t in np.unique(types)]
    for rows in groups:
        for columns in groups:
            block = covariance[np.ix_(rows, columns)]
            if rows is columns:
                diagonal = np.mean(np.diag(block))
                off = (block.sum() - np.trace(block)) / max(1, block.size - len(rows))
                result[np.ix_(rows, columns)] = np.where(np.eye(len(rows), dtype=bool), diagonal, off)
            else:
                result[np.ix_(rows, columns)] = block.mean()
    return result


def make_prior(
    n_particles: int,
    dim: int,
    std: float = 1.0,
    covariance: np.ndarray | Tensor | list[list[float]] | None = None,
    atom_types: np.ndarray | Tensor | list[int] | None = None,
) -> MeanFreeGaussian | CorrelatedMeanFreeGaussian:
    """The base density of a flow: isotropic (``covariance=None``) or correlated.

    Parameters
    ----------
    n_particles, dim : int
    std : float
        ``std`` of the isotropic Gaussian (ignored with ``covariance``).
    covariance : array-like, shape (n_particles, n_particles), optional
        Particle covariance of a :class:`CorrelatedMeanFreeGaussian`.
    atom_types : array-like of int, optional
        With ``covariance``: it must be invariant under permutations of equal
        types (checked), so the flow stays permutation-equivariant.
    """
    if covariance is None:
        return MeanFreeGaussian(n_particles, dim, std)
    prior = CorrelatedMeanFreeGaussian(covariance, dim)
    if prior.n_particles != n_particles:
        raise ValueError(f"the prior covariance is for {prior.n_particles} particles, the flow has {n_particles}")
    if atom_types is not None:
        types = as_atom_types(atom_types).numpy()
        matrix = prior.covariance
        scale = float(np.abs(matrix).max())
        if not np.allclose(symmetrised_covariance(matrix, types), matrix, rtol=1e-5, atol=1e-8 * scale):
            raise ValueError(
                "the prior covariance is not invariant under permutations of particles of equal atom type, so the "
                "flow would not be permutation-equivariant; fit it with fit_particle_covariance(frames, atom_types) "
                "or give every particle its own type"
            )
    return prior
