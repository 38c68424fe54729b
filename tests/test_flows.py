"""Contract tests for every flow of bgplugin.flows (kernel and EGNN fields, every divergence mode).

All checks run in float64 on small models with randomised (non-trivial)
weights, on one thread.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from bgplugin.flows import (
    CNF,
    EGNNField,
    KernelField,
    MeanFreeGaussian,
    build_flow,
    load_flow,
    mean_free_basis,
)
from bgplugin.flows.divergence import (
    DivergenceMode,
    autograd_loop_trace,
    autograd_trace,
    hutchinson,
    sample_probes,
)
from bgplugin.systems import get_system
from bgplugin.testing import assert_equivariant

EXACT_MODES: list[DivergenceMode] = ["exact", "autograd", "autograd_loop"]
ALL_MODES: list[DivergenceMode] = [*EXACT_MODES, "hutchinson"]
FLOWS = ["kernel-dw4", "egnn-dw4", "egnn-se3-typed", "egnn-lj13"]


def randomise(module: nn.Module, std: float, seed: int = 0) -> None:
    """Overwrite every floating parameter with N(0, std^2) noise so that the field is far from zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * std)


def activate(field: EGNNField, scale: float = 0.5, seed: int = 0) -> None:
    """Give every coordinate MLP output a weight of order one (the default init is near the zero field)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in field.layers:
            out = layer.coordinate_out
            out.weight.copy_(torch.randn(out.weight.shape, generator=generator) * scale / math.sqrt(out.in_features))
            out.bias.copy_(torch.randn(out.bias.shape, generator=generator) * scale)


def make_flow(name: str, **options: object) -> CNF:
    """Small float64 flows with non-trivial weights; ``options`` override CNF options."""
    torch.manual_seed(0)
    settings: dict[str, object] = {"solver": "rk4", "steps": 8, "device": "cpu", "dtype": torch.float64}
    settings.update(options)
    if name == "kernel-dw4":
        flow = build_flow(
            get_system("dw4"),
            "kernel",
            n_distance_kernels=6,
            n_time_kernels=3,
            max_distance=4.0,
            trainable_kernels=True,
            **settings,
        )
        randomise(flow.field, 0.15)
        with torch.no_grad():
            flow.field.distance_means.copy_(torch.linspace(0.0, 4.0, 6, dtype=torch.float64))
            flow.field.log_distance_bandwidths.fill_(math.log(0.8))
            flow.field.time_means.copy_(torch.linspace(0.0, 1.0, 3, dtype=torch.float64))
            flow.field.log_time_bandwidth.fill_(math.log(0.5))
        return flow
    if name == "egnn-dw4":
        flow = build_flow(get_system("dw4"), "egnn", hidden=8, n_layers=3, **settings)
    elif name == "egnn-lj13":
        flow = build_flow(get_system("lj13"), "egnn", hidden=6, n_layers=2, **settings)
    elif name == "egnn-se3-typed":
        field = EGNNField([0, 1, 1, 2, 0], 3, hidden=8, n_layers=3, symmetry="SE(n)")
        cnf_options = {k: v for k, v in settings.items() if k != "dtype"}
        flow = CNF(field, MeanFreeGaussian(5, 3), **cnf_options).to(torch.float64)  # type: ignore[arg-type]
    else:
        raise ValueError(f"unknown test flow {name!r}")
    activate(flow.field)
    return flow


def symmetry_of(flow: CNF) -> tuple[np.ndarray, bool]:
    """Atom types and whether reflections belong to the symmetry group."""
    reflections = getattr(flow.field, "symmetry", "E(n)") == "E(n)"
    return flow.field.atom_types.numpy(), reflections


def data_like(flow: CNF, n: int, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return flow.prior.sample(n, generator=generator) * 1.3


def brute_force_trace(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Trace of the full autograd Jacobian of fn, per sample (float64)."""
    traces = []
    for sample in x:
        jacobian = torch.autograd.functional.jacobian(
            lambda flat, s=sample: fn(flat.reshape(1, *s.shape)).reshape(-1), sample.reshape(-1)
        )
        traces.append(torch.trace(jacobian))
    return torch.stack(traces)


# -- contract: inverse(forward(x)) == x ----------------------------------------------------------
@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("name", FLOWS)
def test_inverse_of_forward_is_identity(name: str, mode: DivergenceMode) -> None:
    flow = make_flow(name, solver="dopri5", atol=1e-7, rtol=1e-7)
    x0 = data_like(flow, 3)
    x1, logdet_forward = flow.forward(x0, divergence=mode)
    back, logdet_inverse = flow.inverse(x1, divergence=mode)
    assert (x1 - x0).abs().max() > 0.05, "test flow is too close to the identity to be informative"
    torch.testing.assert_close(back, x0, atol=1e-5, rtol=0)
    assert torch.isfinite(logdet_forward).all() and torch.isfinite(logdet_inverse).all()
    if mode != "hutchinson":
        zeros = torch.zeros(3, dtype=torch.float64)
        torch.testing.assert_close(logdet_forward + logdet_inverse, zeros, atol=1e-5, rtol=0)


# -- contract: log_prob equals the brute-force change of variables ----------------------------------
@functools.cache
def change_of_variables(name: str) -> tuple[Tensor, Tensor]:
    """A data point x1 = T(x0) and log p(x0) - log|det dT/dx0| from the full Jacobian (float64).

    T is RK4 with 24 steps; the determinant is taken on the mean-free subspace.
    """
    flow = make_flow(name, steps=24)
    n, dim = flow.n_particles, flow.dim
    basis = mean_free_basis(n, dim).reshape(n * dim, -1)
    x0 = data_like(flow, 1, seed=3)
    with torch.no_grad():
        x1, _ = flow.forward(x0)
    jacobian = torch.autograd.functional.jacobian(
        lambda flat: flow.forward(flat.reshape(1, n, dim))[0].reshape(-1), x0.reshape(-1), vectorize=True
    )
    _, logdet = torch.linalg.slogdet(basis.T @ jacobian @ basis)
    assert abs(float(logdet)) > 0.5, "test flow changes volume too little to be informative"
    return x1, (flow.prior.log_prob(x0)[0] - logdet).detach()


@pytest.mark.parametrize("mode", EXACT_MODES)
@pytest.mark.parametrize("name", ["kernel-dw4", "egnn-dw4", "egnn-se3-typed"])
def test_log_prob_equals_change_of_variables(name: str, mode: DivergenceMode) -> None:
    x1, expected = change_of_variables(name)
    flow = make_flow(name, solver="dopri5", atol=1e-8, rtol=1e-8)
    with torch.no_grad():
        got = flow.log_prob(x1, divergence=mode)[0]
    assert abs(float(got - expected)) < 1e-5, f"log_prob {float(got)} vs change of variables {float(expected)}"


def test_sample_log_q_matches_log_prob() -> None:
    flow = make_flow("egnn-dw4", solver="dopri5", atol=1e-9, rtol=1e-9)
    x, log_q = flow.sample(4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(flow.log_prob(x), log_q, atol=1e-6, rtol=0)
    assert x.sum(1).abs().max() < 1e-10, "samples must be mean-free"


# -- contract: gradients reach every parameter -----------------------------------------------------
@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("name", FLOWS)
def test_gradients_reach_every_parameter(name: str, mode: DivergenceMode) -> None:
    flow = make_flow(name, steps=3)
    loss = flow.log_prob(data_like(flow, 2), divergence=mode).sum()
    loss.backward()
    for parameter_name, parameter in flow.named_parameters():
        assert parameter.grad is not None, f"{parameter_name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{parameter_name} has a non-finite gradient"
        assert parameter.grad.abs().max() > 0, f"{parameter_name} has an all-zero gradient"


@pytest.mark.parametrize("name", ["kernel-dw4", "egnn-dw4", "egnn-se3-typed"])
def test_closed_form_parameter_gradients_equal_autograd(name: str) -> None:
    """The closed-form divergence is differentiable and gives the autograd trace's gradients."""
    flow = make_flow(name, steps=3)
    x = data_like(flow, 2)
    gradients = {}
    for mode in ("exact", "autograd"):
        flow.zero_grad()
        flow.log_prob(x, divergence=mode).sum().backward()
        gradients[mode] = [p.grad.clone() for p in flow.parameters()]
    for exact, reference in zip(gradients["exact"], gradients["autograd"], strict=True):
        torch.testing.assert_close(exact, reference, atol=1e-9, rtol=1e-7)


def test_adjoint_gradient_matches_backprop() -> None:
    x = data_like(make_flow("egnn-dw4"), 2)
    gradients = []
    for adjoint in (False, True):
        flow = make_flow("egnn-dw4", solver="dopri5", atol=1e-9, rtol=1e-9, adjoint=adjoint)
        flow.log_prob(x).sum().backward()
        gradients.append(torch.cat([p.grad.flatten() for p in flow.parameters()]))
    torch.testing.assert_close(gradients[1], gradients[0], atol=1e-5, rtol=1e-4)


# -- contract: save / load ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", FLOWS)
def test_save_load_round_trip(name: str, tmp_path: Path) -> None:
    flow = make_flow(name, chunk_size=5)
    path = tmp_path / "flow.pt"
    flow.save(path)
    loaded = load_flow(path, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flow.pt"], "temporary file left behind"
    assert loaded.field.config() == flow.field.config()
    assert loaded.options() == flow.options()
    assert loaded.dtype == torch.float64
    for key, value in flow.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=0, rtol=0)
    x = data_like(flow, 3)
    torch.testing.assert_close(loaded.log_prob(x), flow.log_prob(x), atol=0, rtol=0)


def test_load_rejects_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a file written by CNF.save"):
        load_flow(path)
    with pytest.raises(ValueError, match="no saved flow"):
        load_flow(tmp_path / "missing.pt")


# -- symmetry ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FLOWS)
def test_field_is_equivariant(name: str) -> None:
    flow = make_flow(name)
    types, reflections = symmetry_of(flow)
    x = data_like(flow, 3)
    t = torch.tensor(0.3, dtype=torch.float64)
    assert_equivariant(lambda y: flow.field(t, y), x, types, reflections)
    assert_equivariant(
        lambda y: flow.field.velocity_and_divergence(t, y), x, types, reflections, outputs=("vector", "invariant")
    )


@pytest.mark.parametrize("name", FLOWS)
def test_log_prob_and_transport_are_equivariant(name: str) -> None:
    flow = make_flow(name, steps=4)
    types, reflections = symmetry_of(flow)
    x = data_like(flow, 3)
    assert_equivariant(flow.log_prob, x, types, reflections, outputs="invariant")
    assert_equivariant(flow.forward, x, types, reflections, outputs=("vector", "invariant"))


def test_se3_field_breaks_reflection_symmetry() -> None:
    flow = make_flow("egnn-se3-typed", steps=4)
    types, _ = symmetry_of(flow)
    x = data_like(flow, 3)
    t = torch.tensor(0.3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="reflection"):
        assert_equivariant(lambda y: flow.field(t, y), x, types, reflections=True)
    with pytest.raises(AssertionError, match="reflection"):
        assert_equivariant(flow.log_prob, x, types, reflections=True, outputs="invariant")


def test_assert_equivariant_detects_a_broken_permutation() -> None:
    flow = make_flow("egnn-dw4")
    x = data_like(flow, 2)
    t = torch.tensor(0.3, dtype=torch.float64)
    # Claiming all four atoms are distinct types never fails; an index-dependent field must fail.
    weights = torch.arange(1.0, 5.0, dtype=torch.float64)[None, :, None]
    with pytest.raises(AssertionError, match="permutation"):
        assert_equivariant(lambda y: flow.field(t, y) * weights, x, [0, 0, 0, 0], translations=False)


# -- divergence -----------------------------------------------------------------------------------------
FIELDS: dict[str, Callable[[], nn.Module]] = {
    "egnn-2d": lambda: EGNNField([0, 0, 0, 0], 2, hidden=8, n_layers=3),
    "egnn-3d-typed": lambda: EGNNField([0, 1, 1, 2, 0], 3, hidden=8, n_layers=3),
    "egnn-se3": lambda: EGNNField([0, 1, 1, 2, 0], 3, hidden=8, n_layers=3, symmetry="SE(n)"),
    "egnn-se2": lambda: EGNNField([0, 0, 1, 1], 2, hidden=8, n_layers=2, symmetry="SE(n)"),
    "egnn-se3-scaled": lambda: EGNNField([0, 1, 1, 2, 0], 3, hidden=8, n_layers=3, symmetry="SE(n)", length_scale=0.1),
    "kernel-3d-typed": lambda: KernelField(
        [0, 1, 1, 0, 2], 3, n_distance_kernels=5, n_time_kernels=3, max_distance=3.0
    ),
}


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_fields_are_equivariant_and_se_fields_are_chiral(name: str) -> None:
    field = FIELDS[name]().double()
    randomise(field, 0.5, seed=2)
    x = torch.randn(3, field.n_particles, field.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = torch.tensor(0.6, dtype=torch.float64)
    types = field.atom_types.numpy()
    chiral = getattr(field, "symmetry", "E(n)") == "SE(n)"
    both = ("vector", "invariant")
    assert_equivariant(lambda y: field.velocity_and_divergence(t, y), x, types, not chiral, outputs=both)
    if chiral:
        with pytest.raises(AssertionError, match="reflection"):
            assert_equivariant(lambda y: field(t, y), x, types, reflections=True)


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_exact_divergence_equals_brute_force_trace(name: str) -> None:
    field = FIELDS[name]().double()
    randomise(field, 0.5, seed=2)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, field.n_particles, field.dim, generator=generator, dtype=torch.float64) * 1.5
    t = torch.rand(3, generator=generator, dtype=torch.float64)
    expected = brute_force_trace(lambda y: field(t[:1].expand(y.shape[0]), y), x[:1])
    expected = torch.cat([expected, brute_force_trace(lambda y: field(t[1:2], y), x[1:2])])
    expected = torch.cat([expected, brute_force_trace(lambda y: field(t[2:], y), x[2:])])
    assert expected.abs().min() > 1e-3, "test field has a vanishing divergence"
    v, div = field.velocity_and_divergence(t, x)
    torch.testing.assert_close(v, field(t, x), atol=1e-12, rtol=0)
    torch.testing.assert_close(div, expected, atol=1e-10, rtol=1e-10)
    for trace in (autograd_trace, autograd_loop_trace):
        _, div_autograd = trace(field, t, x, create_graph=False)
        torch.testing.assert_close(div_autograd, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(distribution: str) -> None:
    """Mean of N independent one-probe estimates lies within 5 standard errors of the exact divergence."""
    field = FIELDS["egnn-3d-typed"]().double()
    randomise(field, 0.5, seed=5)
    n_estimates = 4000
    x = torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    t = torch.full((n_estimates,), 0.4, dtype=torch.float64)
    with torch.no_grad():
        _, exact = field.velocity_and_divergence(t[:1], x)
    copies = x.expand(n_estimates, -1, -1)
    probes = sample_probes(1, copies, distribution, torch.Generator().manual_seed(7))  # type: ignore[arg-type]
    _, estimates = hutchinson(field, t, copies, probes, create_graph=False)  # detached
    standard_error = float(estimates.std()) / math.sqrt(n_estimates)
    assert standard_error > 0
    assert abs(float(estimates.mean() - exact[0])) < 5.0 * standard_error
    # The bound is tight enough to catch a 10 % bias.
    assert abs(float(1.1 * estimates.mean() - exact[0])) > 5.0 * standard_error
