r"""Monotonic rational-quadratic splines (Durkan et al. 2019) and their circular variant.

A spline with :math:`K` bins maps :math:`[x_0, x_K]` onto :math:`[y_0, y_K]`
through knots :math:`(x_k, y_k)` with positive derivatives :math:`\delta_k`.
Inside bin :math:`k`, with :math:`w_k = x_{k+1} - x_k`, :math:`h_k = y_{k+1} - y_k`,
:math:`s_k = h_k / w_k` and :math:`\xi = (x - x_k) / w_k`,

.. math::

    y = y_k + \frac{h_k\,[s_k \xi^2 + \delta_k \xi (1 - \xi)]}
                   {s_k + (\delta_{k+1} + \delta_k - 2 s_k)\,\xi (1 - \xi)},
    \qquad
    \frac{dy}{dx} = \frac{s_k^2\,[\delta_{k+1}\xi^2 + 2 s_k \xi(1-\xi) + \delta_k (1-\xi)^2]}
                         {[s_k + (\delta_{k+1} + \delta_k - 2 s_k)\,\xi(1-\xi)]^2} .

Three shapes are used by the spherical projection of the E-ACF
(:mod:`bgplugin.flows.eacf.projections`):

``"interval"``
    :math:`[0, B] \to [0, B]` with free end derivatives (polar angle, :math:`B = \pi`).
``"radius"``
    :math:`[0, \infty)`: a spline on :math:`[0, B]` with derivative 1 at :math:`B`
    and the identity beyond (radii; :math:`r = 0` stays at 0).
``"circular"``
    :math:`[-\pi, \pi] \to [-\pi, \pi]` with equal end derivatives, so the map
    is a smooth diffeomorphism of the circle (Rezende et al. 2020; azimuths).

Unconstrained parameters are laid out as ``[widths (K), heights (K),
derivatives (n_derivatives(K))]`` on the last axis; all zeros give the
identity map (equal bins, unit derivatives), which is how a new flow starts.

References
----------
Durkan, Bekasov, Murray & Papamakarios, *Neural spline flows*, NeurIPS 2019.
Rezende, Papamakarios, Racanière, Albergo, Kanwar, Shanahan & Cranmer,
*Normalizing flows on tori and spheres*, ICML 2020.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SplineKind", "n_spline_parameters", "rational_quadratic", "spline"]

SplineKind = Literal["interval", "radius", "circular"]

#: Smallest bin width and height as a fraction of the interval, and smallest knot derivative.
MIN_BIN = 1e-3
MIN_DERIVATIVE = 1e-3
# softplus(u + _SHIFT) + MIN_DERIVATIVE == 1 at u == 0: zero parameters give unit derivatives.
_SHIFT = math.log(math.expm1(1.0 - MIN_DERIVATIVE))


def n_spline_parameters(kind: SplineKind, n_bins: int) -> int:
    """Number of unconstrained parameters of one spline.

    Parameters
    ----------
    kind : {"interval", "radius", "circular"}
    n_bins : int
        Number of bins ``K`` (>= 1).

    Returns
    -------
    int
        ``3K + 1`` (interval: all K + 1 derivatives free), ``3K`` (radius: the
        end derivative is 1; circular: the two end derivatives are equal).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if kind == "interval":
        return 3 * n_bins + 1
    if kind in ("radius", "circular"):
        return 3 * n_bins
    raise ValueError(f"spline kind must be 'interval', 'radius' or 'circular', got {kind!r}")


def _knots(unnormalised: Tensor, lower: float, upper: float) -> tuple[Tensor, Tensor]:
    """Bin sizes (..., K) and knot positions (..., K + 1) spanning [lower, upper]."""
    n_bins = unnormalised.shape[-1]
    fraction = MIN_BIN + (1.0 - MIN_BIN * n_bins) * torch.softmax(unnormalised, dim=-1)
    cumulative = F.pad(torch.cumsum(fraction, dim=-1), (1, 0), value=0.0)
    knots = lower + (upper - lower) * cumulative
    # exact end points (cumsum can miss them by round-off)
    ends = torch.ones_like(knots[..., :1])
    knots = torch.cat((lower * ends, knots[..., 1:-1], upper * ends), dim=-1)
    return knots[..., 1:] - knots[..., :-1], knots


def rational_quadratic(
    inputs: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    lower: float,
    upper: float,
    *,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Monotonic rational-quadratic spline on ``[lower, upper]`` (inputs must lie inside).

    Parameters
    ----------
    inputs : Tensor, shape (...)
        Points in ``[lower, upper]`` (values outside are clamped).
    widths, heights : Tensor, shape (..., K)
        Unconstrained bin widths and heights (softmax-normalised here).
    derivatives : Tensor, shape (..., K + 1)
        Positive knot derivatives.
    lower, upper : float
        The interval, mapped onto itself.
    inverse : bool
        Evaluate the inverse map instead.

    Returns
    -------
    outputs : Tensor, shape (...)
    log_abs_det : Tensor, shape (...)
        ``log |d outputs / d inputs|`` of the map that was evaluated.
    """
    bin_widths, x_knots = _knots(widths, lower, upper)
    bin_heights, y_knots = _knots(heights, lower, upper)
    inputs = inputs.clamp(lower, upper)
    search = y_knots if inverse else x_knots
    # the bin of each input: how many inner knots lie at or below it (searchsorted(..., right=True) of a few knots,
    # as one comparison that torch.compile fuses; searchsorted warned about the strides of compiled knots)
    edges = search[..., 1:-1]
    index = (inputs.unsqueeze(-1) >= edges).sum(dim=-1, keepdim=True)

    def take(values: Tensor) -> Tensor:
        return torch.gather(values, -1, index).squeeze(-1)

    x_k, w_k = take(x_knots), take(bin_widths)
    y_k, h_k = take(y_knots), take(bin_heights)
    d_k, d_k1 = take(derivatives), take(derivatives[..., 1:])
    s_k = h_k / w_k
    curvature = d_k1 + d_k - 2.0 * s_k
    if inverse:
        dy = inputs - y_k
        a = h_k * (s_k - d_k) + dy * curvature
        b = h_k * d_k - dy * curvature
        c = -s_k * dy
        discriminant = (b.square() - 4.0 * a * c).clamp_min(0.0)
        xi = (2.0 * c) / (-b - torch.sqrt(discriminant))
        xi = xi.clamp(0.0, 1.0)
        outputs = x_k + xi * w_k
    else:
        xi = ((inputs - x_k) / w_k).clamp(0.0, 1.0)
        outputs = y_k + h_k * (s_k * xi.square() + d_k * xi * (1.0 - xi)) / (s_k + curvature * xi * (1.0 - xi))
    one_minus = 1.0 - xi
    denominator = s_k + curvature * xi * one_minus
    numerator = s_k.square() * (d_k1 * xi.square() + 2.0 * s_k * xi * one_minus + d_k * one_minus.square())
    log_derivative = torch.log(numerator) - 2.0 * torch.log(denominator)
    return outputs, (-log_derivative if inverse else log_derivative)


def _positive(unconstrained: Tensor) -> Tensor:
    return MIN_DERIVATIVE + F.softplus(unconstrained + _SHIFT)


def spline(
    inputs: Tensor,
    parameters: Tensor,
    kind: SplineKind,
    bound: float,
    *,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""Evaluate one of the spline shapes of this module elementwise.

    Parameters
    ----------
    inputs : Tensor, shape (...)
        ``"interval"``: in ``[0, bound]``; ``"radius"``: ``>= 0``;
        ``"circular"``: angles in ``[-pi, pi]`` (``bound`` is ignored).
    parameters : Tensor, shape (..., n_spline_parameters(kind, K))
        Unconstrained parameters (zeros: the identity).
    kind : {"interval", "radius", "circular"}
    bound : float
        Upper end ``B`` of the interval (``"interval"``, ``"radius"``).
    inverse : bool
        Evaluate the inverse map.

    Returns
    -------
    outputs : Tensor, shape (...)
    log_abs_det : Tensor, shape (...)
        Log-derivative of the evaluated map (0 on the identity tail of ``"radius"``).
    """
    n_params = parameters.shape[-1]
    if kind == "interval":
        n_bins = (n_params - 1) // 3
        widths, heights, raw = parameters.split((n_bins, n_bins, n_bins + 1), dim=-1)
        return rational_quadratic(inputs, widths, heights, _positive(raw), 0.0, bound, inverse=inverse)
    if kind == "circular":
        n_bins = n_params // 3
        widths, heights, raw = parameters.split((n_bins, n_bins, n_bins), dim=-1)
        derivatives = _positive(torch.cat((raw, raw[..., :1]), dim=-1))
        return rational_quadratic(inputs, widths, heights, derivatives, -math.pi, math.pi, inverse=inverse)
    if kind == "radius":
        n_bins = n_params // 3
        widths, heights, raw = parameters.split((n_bins, n_bins, n_bins), dim=-1)
        derivatives = torch.cat((_positive(raw), torch.ones_like(raw[..., :1])), dim=-1)
        inside = inputs < bound
        outputs, log_det = rational_quadratic(
            torch.where(inside, inputs, torch.zeros_like(inputs)),
            widths,
            heights,
            derivatives,
            0.0,
            bound,
            inverse=inverse,
        )
        return torch.where(inside, outputs, inputs), torch.where(inside, log_det, torch.zeros_like(log_det))
    raise ValueError(f"spline kind must be 'interval', 'radius' or 'circular', got {kind!r}")
