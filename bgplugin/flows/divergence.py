r"""Divergence estimators: closed form, exact autograd trace, the plain loop, Hutchinson.

Each function takes a :class:`~bgplugin.flows.field.VectorField`, times ``t``
of shape (batch,), coordinates ``x`` of shape (batch, n, d) and returns the
velocity (batch, n, d) and the divergence (batch,). ``create_graph`` keeps the
result differentiable (for training); without it the results are detached.

Fields are translation invariant with mean-free output, so the divergence
on the mean-free subspace is :math:`\sum_k u_k^\top J u_k` over an orthonormal
basis :math:`u_k` of that subspace, which needs :math:`(n-1)d` vector-Jacobian
products instead of :math:`nd`.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from bgplugin.flows.compiled import compiled_velocity_and_divergence
from bgplugin.flows.subspace import mean_free_basis

if TYPE_CHECKING:
    from bgplugin.flows.field import VectorField

__all__ = [
    "DivergenceMode",
    "ProbeDistribution",
    "autograd_loop_trace",
    "autograd_trace",
    "closed_form",
    "hutchinson",
    "sample_probes",
]

DivergenceMode = Literal["exact", "autograd", "autograd_loop", "hutchinson"]
"""``"exact"``: the field's closed form when it has one, else ``"autograd"``.
``"autograd"``: exact trace from one forward pass and batched vector-Jacobian
products along the mean-free basis. ``"autograd_loop"``: the plain reference,
one forward pass and one backward pass per coordinate (slow; for benchmarks
and tests). ``"hutchinson"``: unbiased stochastic estimate (training only)."""

ProbeDistribution = Literal["rademacher", "gaussian"]


def _tracked(x: Tensor) -> Tensor:
    """``x`` itself when autograd already tracks it, else a detached copy that requires grad."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def _finish(v: Tensor, div: Tensor, create_graph: bool) -> tuple[Tensor, Tensor]:
    return (v, div) if create_graph else (v.detach(), div.detach())


def closed_form(
    field: VectorField, t: Tensor, x: Tensor, *, create_graph: bool, compiled: bool = False
) -> tuple[Tensor, Tensor]:
    """Exact divergence from the field's own closed form (no autograd).

    Parameters
    ----------
    field : VectorField
        A field with ``has_closed_form_divergence``.
    t : Tensor, shape (batch,)
    x : Tensor, shape (batch, n_particles, dim)
    create_graph : bool
        Keep the result differentiable with respect to parameters and inputs.
    compiled : bool
        Evaluate through ``torch.compile`` (:mod:`bgplugin.flows.compiled`);
        only without ``create_graph``, otherwise ignored.

    Returns
    -------
    v : Tensor, shape (batch, n_particles, dim)
    div : Tensor, shape (batch,)
    """
    with torch.set_grad_enabled(create_graph):
        use_compiled = compiled and not create_graph
        evaluate = partial(compiled_velocity_and_divergence, field) if use_compiled else field._velocity_and_divergence
        block = field._closed_form_block_size()
        if block is None or x.shape[0] <= block:
            return evaluate(t, x)
        parts = [evaluate(t_part, x_part) for t_part, x_part in zip(t.split(block), x.split(block), strict=True)]
        return torch.cat([v for v, _ in parts]), torch.cat([div for _, div in parts])


def autograd_trace(
    field: VectorField, t: Tensor, x: Tensor, *, create_graph: bool, vectorize: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Exact trace of the Jacobian: one forward pass shared by all backward passes.

    ``sum_k u_k^T J u_k`` over the ``(n-1)*d`` directions ``u_k`` of the
    mean-free basis, each from a vector-Jacobian product on the same graph.

    Parameters
    ----------
    field, t, x, create_graph
        As in :func:`closed_form`.
    vectorize : bool, optional
        Evaluate all vector-Jacobian products in one batched backward pass
        (``is_grads_batched``) instead of a loop. None: batched on CUDA, loop
        on CPU, where the batched pass was measured 2x slower than the loop
        (it multiplies the working set by the number of directions).

    Returns
    -------
    v : Tensor, shape (batch, n_particles, dim)
    div : Tensor, shape (batch,)
    """
    batch, n, dim = x.shape
    basis = mean_free_basis(n, dim, x.dtype, x.device)  # (n, d, K)
    directions = basis.permute(2, 0, 1).unsqueeze(1).expand(-1, batch, n, dim)  # (K, B, n, d)
    batched = x.device.type == "cuda" if vectorize is None else vectorize
    with torch.enable_grad():
        x_in = _tracked(x)
        v = field._velocity(t, x_in)
        if batched:
            (rows,) = torch.autograd.grad(
                v, x_in, directions, retain_graph=True, create_graph=create_graph, is_grads_batched=True
            )
            div = (rows * directions).sum((0, 2, 3))
        else:
            div = torch.zeros(batch, dtype=x.dtype, device=x.device)
            for direction in directions:
                (row,) = torch.autograd.grad(v, x_in, direction, retain_graph=True, create_graph=create_graph)
                div = div + (row * direction).sum((1, 2))
    return _finish(v, div, create_graph)


def autograd_loop_trace(field: VectorField, t: Tensor, x: Tensor, *, create_graph: bool) -> tuple[Tensor, Tensor]:
    """Plain per-coordinate reference: one forward pass, then one backward pass per coordinate.

    ``div = sum_k d v_k / d x_k`` over all ``n * d`` coordinates, each from
    ``autograd.grad(v[:, k].sum(), x, retain_graph=True)``. This is the
    baseline the fast exact paths are benchmarked against.

    Parameters
    ----------
    field, t, x, create_graph
        As in :func:`closed_form`.

    Returns
    -------
    v : Tensor, shape (batch, n_particles, dim)
    div : Tensor, shape (batch,)
    """
    with torch.enable_grad():
        x_in = _tracked(x)
        v = field._velocity(t, x_in)
        v_flat = v.flatten(1)
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for k in range(v_flat.shape[1]):
            (row,) = torch.autograd.grad(v_flat[:, k].sum(), x_in, retain_graph=True, create_graph=create_graph)
            div = div + row.flatten(1)[:, k]
    return _finish(v, div, create_graph)


def sample_probes(
    n_probes: int,
    like: Tensor,
    distribution: ProbeDistribution = "rademacher",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Probe vectors for :func:`hutchinson`, projected onto the mean-free subspace.

    Parameters
    ----------
    n_probes : int
        Number of probes per sample.
    like : Tensor, shape (batch, n_particles, dim)
        Sets shape, dtype and device.
    distribution : {"rademacher", "gaussian"}
        Entries are +-1 or standard normal before the projection.
    generator : torch.Generator, optional

    Returns
    -------
    Tensor, shape (n_probes, batch, n_particles, dim)
        Probes ``eps`` with ``E[eps eps^T] = P`` (the mean-free projector), so
        ``E[eps^T J eps] = tr(J)`` for the fields of this package.
    """
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    shape = (n_probes, *like.shape)
    if distribution == "rademacher":
        bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
        eps = bits.to(like.dtype) * 2.0 - 1.0
    elif distribution == "gaussian":
        eps = torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)
    else:
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    return eps - eps.mean(2, keepdim=True)


def hutchinson(
    field: VectorField, t: Tensor, x: Tensor, probes: Tensor, *, create_graph: bool
) -> tuple[Tensor, Tensor]:
    """Hutchinson estimate ``mean_p eps_p^T J eps_p`` of the divergence (unbiased, not exact).

    Parameters
    ----------
    field, t, x, create_graph
        As in :func:`closed_form`.
    probes : Tensor, shape (n_probes, batch, n_particles, dim)
        From :func:`sample_probes`; keep them fixed during one ODE solve.

    Returns
    -------
    v : Tensor, shape (batch, n_particles, dim)
    div : Tensor, shape (batch,)
        Unbiased estimate of the divergence.
    """
    with torch.enable_grad():
        x_in = _tracked(x)
        v = field._velocity(t, x_in)
        if probes.shape[0] == 1:
            (row,) = torch.autograd.grad(v, x_in, probes[0], create_graph=create_graph)
            rows = row.unsqueeze(0)
        else:
            (rows,) = torch.autograd.grad(v, x_in, probes, create_graph=create_graph, is_grads_batched=True)
        div = (rows * probes).sum((2, 3)).mean(0)
    return _finish(v, div, create_graph)
