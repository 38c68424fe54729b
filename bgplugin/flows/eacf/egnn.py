r"""Multi-channel EGNN: the conditioner of the E-ACF coupling layers.

Every particle :math:`i` carries :math:`C` positions :math:`p_{ic}` (the
conditioning variables of a coupling layer: ``x``, or the augmented variables
:math:`a_1, \dots, a_A`) and invariant features :math:`h_i` (initialised from
the atom type; for :math:`C > 1` plus the distances of each channel to the
particle's channel mean). With a length scale :math:`s`, :math:`r^c_{ij} = p_{ic} - p_{jc}`,
:math:`\hat r^c_{ij} = r^c_{ij} / (|r^c_{ij}| + s)` and :math:`\delta^c_{ij} = \log(1 + |r^c_{ij}|^2 / s^2)`,
one layer is

.. math::

    m_{ij} &= \phi_e\big(h_i, h_j, \delta^1_{ij}, \dots, \delta^C_{ij}\big) \\
    p_{ic} &\leftarrow p_{ic} + \frac{s}{n-1}\sum_{j\ne i}\sum_{c'} \tanh W_{cc'}(m_{ij})\, \hat r^{c'}_{ij}
              + \sum_{c'} \tanh U_{cc'}(h_i)\,(p_{ic'} - \bar p_i) \\
    h_i &\leftarrow h_i + \phi_h\Big(h_i, \frac{1}{n-1}\sum_{j\ne i} m_{ij}, \{|p_{ic} - \bar p_i|^2\}_c\Big)

(the :math:`U` term, which mixes the channels of one particle, exists for
:math:`C > 1`). After the last layer a head of the same form returns
:math:`V` output vectors per particle, linear combinations of the
:math:`\hat r^c_{ij}` and :math:`p_{ic} - \bar p_i` with invariant
coefficients (translation invariant, rotation-, reflection- and
permutation-equivariant) plus a second-order term
:math:`\frac{1}{n-1}\sum_j \beta_{ij} (\hat r_{ij} \cdot u_i / s)\, \hat r_{ij}` of each
first-order vector :math:`u_i` (angular information, which keeps the vectors
of one particle from being nearly collinear), and an MLP on :math:`h_i` returns the invariant
parameters (its last layer starts at zero, so a new coupling layer is the
identity). The vector head starts with random weights of unit scale so that
the reference vectors of a new layer are well defined.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from bgplugin.flows.field import as_atom_types

__all__ = ["MultiChannelEGNN"]

logger = logging.getLogger(__name__)


def _mlp(n_in: int, hidden: int, n_out: int, *, final_activation: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, n_out)]
    if final_activation:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def _channel_geometry(p: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""Geometry of positions p (B, n, C, d) with length scale ``s``.

    Returns normalised differences :math:`r / (|r| + s)` (B, n, n, C, d), the
    distance features :math:`\log(1 + |r|^2 / s^2)` (B, n, n, C) and offsets
    from the particle's channel mean (B, n, C, d).
    """
    r = p.unsqueeze(2) - p.unsqueeze(1)
    d2 = r.square().sum(-1)
    r_hat = r / (torch.sqrt(d2 + 1e-12 * scale**2) + scale).unsqueeze(-1)
    offsets = p - p.mean(2, keepdim=True)
    return r_hat, torch.log1p(d2 / scale**2), offsets


class _Layer(nn.Module):
    """One message-passing layer, or (``angular=True``, no feature update) the vector head."""

    def __init__(
        self, hidden: int, channels: int, out_channels: int, update_features: bool, angular: bool, scale: float
    ) -> None:
        super().__init__()
        self.scale = scale
        self.channels = channels
        self.out_channels = out_channels
        self.update_features = update_features
        self.edge = _mlp(2 * hidden + channels, hidden, hidden, final_activation=True)
        self.mix = _mlp(hidden, hidden, out_channels * channels)
        self.angular = _mlp(hidden, hidden, out_channels * channels) if angular else None
        self.cross = nn.Linear(hidden, out_channels * channels) if channels > 1 else None
        if update_features:
            self.node = _mlp(2 * hidden + (channels if channels > 1 else 0), hidden, hidden)

    def _edge_messages(self, h: Tensor, d2: Tensor) -> Tensor:
        """``edge(cat(h_i, h_j, d2_ij))`` without building the concatenation.

        The first linear layer splits into per-node products ``W_i h_i`` and
        ``W_j h_j`` (n rows instead of n² rows) broadcast over pairs, plus the
        distance term: the same function, 25-30 % less time per E-ACF step on
        a 22-atom molecule.
        """
        first = cast(nn.Linear, self.edge[0])
        width = h.shape[-1]
        weight = first.weight
        pre = (
            (h @ weight[:, :width].T).unsqueeze(2)
            + (h @ weight[:, width : 2 * width].T).unsqueeze(1)
            + d2 @ weight[:, 2 * width :].T
            + first.bias
        )
        return self.edge[1:](pre)

    def forward(self, h: Tensor, p: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Returns new features (B, n, H) and the vector update (B, n, out_channels, d)."""
        batch, n, _ = h.shape
        r_hat, d2, offsets = _channel_geometry(p, self.scale)
        m = self._edge_messages(h, d2)  # (B, n, n, H)
        weight = mask[:, :, None, None]  # zero on the diagonal, 1 / (n - 1) elsewhere
        coefficients = self.mix(m).reshape(batch, n, n, self.out_channels, self.channels)
        if self.update_features:
            # bounded position updates inside the network (keeps deep conditioners stable far from the data)
            coefficients = torch.tanh(coefficients)
        coefficients = self.scale * coefficients * weight
        update = torch.einsum("bijkc,bijcd->bikd", coefficients, r_hat)
        if self.angular is not None:
            # second order: sum_j beta_ij (r_ij . u_i) r_ij, angular information that distance-dependent
            # coefficients lack (first-order vectors of one particle tend to be nearly collinear)
            beta = self.angular(m).reshape(batch, n, n, self.out_channels, self.channels) * weight
            along = torch.einsum("bijcd,bikd->bijkc", r_hat, update) / self.scale
            update = update + torch.einsum("bijkc,bijcd->bikd", beta * along, r_hat)
        if self.cross is not None:
            mixing = torch.tanh(self.cross(h)).reshape(batch, n, self.out_channels, self.channels)
            update = update + torch.einsum("bikc,bicd->bikd", mixing, offsets)
        if self.update_features:
            inputs = [h, (m * mask.unsqueeze(-1)).sum(2)]
            if self.channels > 1:
                inputs.append(torch.log1p(offsets.square().sum(-1) / self.scale**2))
            h = h + self.node(torch.cat(inputs, dim=-1))
        return h, update


class MultiChannelEGNN(nn.Module):
    """E(n)-equivariant network from C positions per particle to V vectors and F invariants per particle.

    Parameters
    ----------
    atom_types : array-like of int, shape (n_particles,)
        Type per particle (equal types are interchangeable).
    n_channels : int
        Positions per particle ``C`` in the input.
    n_vectors : int
        Output vectors per particle ``V``.
    n_invariants : int
        Output invariants per particle ``F``.
    hidden : int
        Width of features and MLPs.
    n_layers : int
        Message-passing layers before the output heads.
    vector_init_scale : float
        Standard deviation of the last layer of the vector head at
        initialisation (relative to ``1/sqrt(hidden)``).
    length_scale : float
        Length ``s`` in the distance features and normalised differences, and
        the unit of the position updates (e.g. the base standard deviation).
    """

    mask: Tensor
    atom_types: Tensor

    def __init__(
        self,
        atom_types: np.ndarray | Tensor | Sequence[int],
        n_channels: int,
        n_vectors: int,
        n_invariants: int,
        *,
        hidden: int = 32,
        n_layers: int = 3,
        vector_init_scale: float = 1.0,
        length_scale: float = 1.0,
    ) -> None:
        super().__init__()
        types = as_atom_types(atom_types)
        for name, value, low in (
            ("n_channels", n_channels, 1), ("n_vectors", n_vectors, 0), ("n_invariants", n_invariants, 0),
            ("hidden", hidden, 1), ("n_layers", n_layers, 0),
        ):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (length_scale > 0 and math.isfinite(length_scale)):
            raise ValueError(f"length_scale must be a finite number > 0, got {length_scale}")
        n = types.numel()
        self.n_particles = n
        self.n_channels = n_channels
        self.n_vectors = n_vectors
        self.n_invariants = n_invariants
        self.length_scale = float(length_scale)
        self.register_buffer("atom_types", types, persistent=False)
        self.type_embedding = nn.Embedding(int(types.max()) + 1, hidden)
        self.channel_embedding = nn.Linear(n_channels, hidden, bias=False) if n_channels > 1 else None
        self.layers = nn.ModuleList(
            _Layer(hidden, n_channels, n_channels, True, False, length_scale) for _ in range(n_layers)
        )
        self.vector_head = _Layer(hidden, n_channels, n_vectors, False, True, length_scale) if n_vectors else None
        if self.vector_head is not None:
            final = cast(nn.Linear, self.vector_head.mix[-1])
            nn.init.normal_(final.weight, std=vector_init_scale / math.sqrt(hidden))
            nn.init.zeros_(final.bias)
        self.invariant_head = _mlp(hidden, hidden, n_invariants) if n_invariants else None
        if self.invariant_head is not None:
            final = cast(nn.Linear, self.invariant_head[-1])
            nn.init.zeros_(final.weight)
            nn.init.zeros_(final.bias)
        eye = torch.eye(n)
        self.register_buffer("mask", (1.0 - eye) / max(1, n - 1), persistent=False)

    def forward(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """Vectors and invariants of each particle.

        Parameters
        ----------
        p : Tensor, shape (batch, n_particles, n_channels, dim)
            Positions (length units).

        Returns
        -------
        vectors : Tensor, shape (batch, n_particles, n_vectors, dim)
            Translation-invariant, rotation-equivariant vectors (length units).
        invariants : Tensor, shape (batch, n_particles, n_invariants)
        """
        batch, n, channels, _ = p.shape
        if (n, channels) != (self.n_particles, self.n_channels):
            raise ValueError(
                f"positions must have shape (batch, {self.n_particles}, {self.n_channels}, dim), got {tuple(p.shape)}"
            )
        mask = self.mask.to(p.dtype)
        h = self.type_embedding(self.atom_types).to(p.dtype).unsqueeze(0).expand(batch, n, -1)
        if self.channel_embedding is not None:
            offsets = p - p.mean(2, keepdim=True)
            h = h + self.channel_embedding(torch.log1p(offsets.square().sum(-1) / self.length_scale**2))
        for layer in self.layers:
            h, update = layer(h, p, mask)
            p = p + update
        if self.vector_head is not None:
            _, vectors = self.vector_head(h, p, mask)
        else:
            vectors = p.new_zeros(batch, n, 0, p.shape[-1])
        invariants = self.invariant_head(h) if self.invariant_head is not None else p.new_zeros(batch, n, 0)
        return vectors, invariants
