r"""Particle potentials in pure torch: the double well (DW4) and Lennard-Jones (LJ13, LJ55).

The conventions are those that the published benchmark data follow (see
``shared/data/README.md``):

- double well, summed over unordered pairs,
  :math:`u = \frac{1}{\tau}\sum_{i<j} a\,d_{ij} + b\,(d_{ij}-d_0)^2 + c\,(d_{ij}-d_0)^4`;
- Lennard-Jones, summed over *ordered* pairs plus a harmonic term about the
  centroid, :math:`u = \frac{1}{\tau}\big(\sum_{i\neq j} \epsilon[(r_m/d_{ij})^{12}
  - 2 (r_m/d_{ij})^6] + c_\mathrm{osc} \sum_i |x_i - \bar x|^2\big)`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from bgplugin.energies.base import Energy, EnergyResult, FrameStatus


def pairwise_distances(x: Tensor) -> Tensor:
    """Distances of all unordered pairs ``i < j``.

    Parameters
    ----------
    x : Tensor, shape (batch, n, dim)

    Returns
    -------
    Tensor, shape (batch, n * (n - 1) / 2)
    """
    n = x.shape[1]
    i, j = torch.triu_indices(n, n, offset=1, device=x.device)
    return (x[:, i] - x[:, j]).norm(dim=-1)


class ParticleEnergy(Energy):
    """Base of the torch particle potentials: failure handling and forces by autograd.

    Subclasses implement :meth:`_energy` for finite, well-formed input. Frames
    with NaN coordinates or a non-finite energy get ``+inf`` and no gradient
    (they are re-evaluated without the bad frames so that no NaN reaches the
    gradient of the good ones).
    """

    differentiable_in_torch = True

    def _energy(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _evaluate(self, x: Tensor, need_forces: bool) -> EnergyResult:
        status = np.zeros(len(x), dtype=np.int8)
        nan = torch.isnan(x).flatten(1).any(dim=1)
        x_safe = torch.where(nan[:, None, None], torch.zeros((), dtype=x.dtype, device=x.device), x)
        u = self._energy(x_safe)
        bad = nan | ~torch.isfinite(u.detach())
        status[nan.cpu().numpy()] = FrameStatus.NAN_COORDINATES
        status[(bad & ~nan).cpu().numpy()] = FrameStatus.NON_FINITE
        if bad.any():  # re-evaluate without the bad frames so no NaN reaches the good frames' gradient
            good = torch.nonzero(~bad).flatten()
            u = torch.full((len(x),), torch.inf, dtype=x.dtype, device=x.device)
            u = u.index_put((good,), self._energy(x.index_select(0, good)))
        if not need_forces:
            return EnergyResult(u, torch.empty(0), status)
        (grad,) = torch.autograd.grad(u[~bad].sum(), x, create_graph=False) if (~bad).any() else (torch.zeros_like(x),)
        return EnergyResult(u, -grad, status)


class DoubleWellEnergy(ParticleEnergy):
    r"""Multi-particle double well, summed over unordered pairs.

    :math:`u(x) = \frac{1}{\tau}\sum_{i<j} a d_{ij} + b (d_{ij}-d_0)^2 + c (d_{ij}-d_0)^4`.
    The DW4 benchmark uses ``a=0, b=-4, c=0.9, d0=4, tau=1``.
    """

    def __init__(
        self,
        n_particles: int = 4,
        dim: int = 2,
        a: float = 0.0,
        b: float = -4.0,
        c: float = 0.9,
        d0: float = 4.0,
        temperature: float = 1.0,
        **kwargs: object,
    ) -> None:
        super().__init__(n_particles, dim, temperature, **kwargs)  # type: ignore[arg-type]
        self.a, self.b, self.c, self.d0 = float(a), float(b), float(c), float(d0)

    def _energy(self, x: Tensor) -> Tensor:
        d = pairwise_distances(x)
        s = d - self.d0
        return (self.a * d + self.b * s**2 + self.c * s**4).sum(dim=-1) / self.temperature


class LennardJonesEnergy(ParticleEnergy):
    r"""Lennard-Jones cluster with a harmonic term about the centroid.

    :math:`u(x) = \frac{1}{\tau}\Big(\sum_{i\neq j}\epsilon\big[(r_m/d_{ij})^{12}
    - 2(r_m/d_{ij})^6\big] + c_{\mathrm{osc}}\sum_i |x_i-\bar x|^2\Big)`,
    i.e. the sum runs over **ordered** pairs (twice the unordered sum): the
    convention of the LJ13 benchmark data (``shared/data/README.md``).
    """

    def __init__(
        self,
        n_particles: int = 13,
        dim: int = 3,
        epsilon: float = 1.0,
        rm: float = 1.0,
        oscillator_scale: float = 0.5,
        temperature: float = 1.0,
        **kwargs: object,
    ) -> None:
        super().__init__(n_particles, dim, temperature, **kwargs)  # type: ignore[arg-type]
        self.epsilon, self.rm, self.oscillator_scale = float(epsilon), float(rm), float(oscillator_scale)

    def _energy(self, x: Tensor) -> Tensor:
        r6 = (self.rm / pairwise_distances(x)) ** 6
        lj = 2.0 * self.epsilon * (r6**2 - 2.0 * r6).sum(dim=-1)
        centred = x - x.mean(dim=1, keepdim=True)
        osc = self.oscillator_scale * centred.pow(2).sum(dim=(1, 2))
        return (lj + osc) / self.temperature
