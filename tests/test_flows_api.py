"""Prior normalisation, building and validating flows, chunking, and the divergence benchmark."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bgplugin.flows import (
    CNF,
    EGNNField,
    MeanFreeGaussian,
    benchmark_divergence,
    build_flow,
    load_flow,
    mean_free_basis,
    resolve_device,
    select_rk4_steps,
)
from bgplugin.systems import get_system


# -- prior -----------------------------------------------------------------------------------------
def test_prior_log_prob_is_the_gaussian_on_the_subspace() -> None:
    prior = MeanFreeGaussian(5, 3, std=0.7).double()
    basis = mean_free_basis(5, 3).reshape(15, 12)
    x = prior.sample(6, generator=torch.Generator().manual_seed(0))
    coordinates = x.reshape(6, 15) @ basis  # (6, 12) in an orthonormal basis of the subspace
    scale = torch.tensor(0.7, dtype=torch.float64)
    expected = torch.distributions.Normal(torch.zeros_like(scale), scale).log_prob(coordinates).sum(1)
    torch.testing.assert_close(prior.log_prob(x), expected, atol=1e-12, rtol=0)
    # Translating the input does not change the density (the centre of mass is removed).
    torch.testing.assert_close(prior.log_prob(x + torch.tensor([1.0, -2.0, 0.5])), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("n_particles", "std"), [(2, 1.0), (2, 0.3), (3, 1.7)])
def test_prior_integrates_to_one_on_the_subspace(n_particles: int, std: float) -> None:
    """Quadrature over the (n-1)-dimensional subspace of n particles in 1-d."""
    prior = MeanFreeGaussian(n_particles, 1, std=std).double()
    basis = mean_free_basis(n_particles, 1).reshape(n_particles, n_particles - 1)
    axis = torch.linspace(-10 * std, 10 * std, 801, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*[axis] * (n_particles - 1), indexing="ij"), dim=-1).reshape(-1, n_particles - 1)
    x = (grid @ basis.T).unsqueeze(-1)  # points on the subspace, unit Jacobian
    density = prior.log_prob(x).exp().reshape([axis.numel()] * (n_particles - 1))
    integral = density
    for _ in range(n_particles - 1):
        integral = torch.trapezoid(integral, axis, dim=0)
    assert abs(float(integral) - 1.0) < 1e-6


def test_prior_samples_are_mean_free_with_the_right_variance() -> None:
    n_samples, std = 20000, 0.8
    prior = MeanFreeGaussian(13, 3, std=std).double()
    x = prior.sample(n_samples, generator=torch.Generator().manual_seed(1))
    assert x.sum(1).abs().max() < 1e-12
    squared_norm = x.square().sum((1, 2))
    k = prior.subspace_dim
    expected, standard_error = k * std**2, math.sqrt(2 * k) * std**2 / math.sqrt(n_samples)
    assert abs(float(squared_norm.mean()) - expected) < 5 * standard_error  # chi-square mean, 5 sigma


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n_particles": 1, "dim": 3}, "n_particles"), ({"n_particles": 4, "dim": 0}, "dim"),
     ({"n_particles": 4, "dim": 2, "std": -1.0}, "std")],
)
def test_prior_rejects_bad_arguments(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MeanFreeGaussian(**kwargs)  # type: ignore[arg-type]


# -- building and validation -------------------------------------------------------------------------
@pytest.mark.parametrize(("system_name", "field"), [("dw4", "egnn"), ("lj13", "kernel"), ("lj13", "egnn")])
def test_build_flow_reads_the_system(system_name: str, field: str) -> None:
    system = get_system(system_name)
    flow = build_flow(system, field, device="cpu")  # type: ignore[arg-type]
    assert (flow.n_particles, flow.dim) == (system.n_particles, system.dim)
    assert np.array_equal(flow.field.atom_types.numpy(), system.atom_types)
    assert flow.device == torch.device("cpu") and flow.dtype == torch.float32
    assert flow.field.kind == field
    with torch.no_grad():
        x, log_q = flow.sample(3)
    assert x.shape == (3, system.n_particles, system.dim) and log_q.shape == (3,)
    assert torch.isfinite(log_q).all()


def test_build_flow_passes_hyperparameters_and_rejects_unknown_ones() -> None:
    system = get_system("dw4")
    flow = build_flow(system, "egnn", hidden=12, n_layers=2, symmetry="SE(n)", steps=7, device="cpu")
    assert isinstance(flow.field, EGNNField)
    assert (flow.field.hidden, flow.field.n_layers, flow.field.symmetry, flow.steps) == (12, 2, "SE(n)", 7)
    with pytest.raises(ValueError, match="hiddne"):
        build_flow(system, "egnn", hiddne=12)
    with pytest.raises(ValueError, match="got 'realnvp'"):
        build_flow(system, "realnvp")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "match"),
    [({"solver": "euler"}, "solver"), ({"steps": 0}, "steps"), ({"divergence": "trace"}, "divergence"),
     ({"chunk_size": 0}, "chunk_size"), ({"atol": 0.0}, "atol")],
)
def test_cnf_rejects_bad_options(options: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CNF(EGNNField([0, 0, 0], 2), MeanFreeGaussian(3, 2), device="cpu", **options)  # type: ignore[arg-type]


def test_cnf_rejects_mismatched_prior_and_bad_inputs() -> None:
    with pytest.raises(ValueError, match="same system"):
        CNF(EGNNField([0, 0, 0], 2), MeanFreeGaussian(4, 2), device="cpu")
    flow = build_flow(get_system("dw4"), "egnn", hidden=4, n_layers=1, device="cpu")
    with pytest.raises(ValueError, match=r"shape \(batch, 4, 2\), got \(3, 8\)"):
        flow.log_prob(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="divergence"):
        flow.log_prob(torch.zeros(3, 4, 2), divergence="hutchinsn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown options"):
        flow.with_options(step=3)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use device='auto' or 'cpu'"):
            resolve_device("cuda")


def test_chunking_does_not_change_results() -> None:
    torch.manual_seed(0)
    flow = build_flow(get_system("dw4"), "egnn", hidden=8, n_layers=2, steps=4, device="cpu", dtype=torch.float64)
    x = flow.prior.sample(7)
    whole = flow.log_prob(x)
    chunked = flow.with_options(chunk_size=3).log_prob(x)
    torch.testing.assert_close(chunked, whole, atol=1e-12, rtol=0)
    assert flow.chunk_for("exact") >= 1


# -- benchmark -------------------------------------------------------------------------------------------
def test_benchmark_divergence_reports_both_paths() -> None:
    torch.manual_seed(0)
    flow = build_flow(get_system("dw4"), "egnn", hidden=8, n_layers=2, steps=4, device="cpu", dtype=torch.float64)
    result = benchmark_divergence(flow, 6, batch_size=3, n_samples_loop=3)
    assert result["n_samples_fast"] == 6 and result["n_samples_loop"] == 3 and result["n_threads"] == 1
    assert result["samples_per_s_fast"] > 0 and result["samples_per_s_loop"] > 0
    assert result["speedup"] == pytest.approx(result["samples_per_s_fast"] / result["samples_per_s_loop"])
    assert result["logq_max_abs_difference_fast_vs_loop"] < 1e-10  # same model, same steps, both exact
    assert result["logq_max_abs_error_fast"] < 1e-3 and result["logq_max_abs_error_loop"] < 1e-3


def _transporting_dw4_flow(dtype: torch.dtype = torch.float32) -> CNF:
    """A small DW4 EGNN flow whose output weights are redrawn so that it moves points."""
    torch.manual_seed(0)
    flow = build_flow(get_system("dw4"), "egnn", hidden=8, n_layers=2, steps=4, device="cpu", dtype=dtype)
    with torch.no_grad():
        for layer in flow.field.layers:
            torch.nn.init.normal_(layer.coordinate_out.weight, std=0.3)
    return flow


def test_compiled_flow_matches_eager_and_training_stays_eager(tmp_path) -> None:
    from bgplugin.flows import compiled as compiled_module

    flow = _transporting_dw4_flow()
    fast = flow.with_options(compiled=True)
    assert fast.options()["compiled"] and not flow.options()["compiled"]
    x = flow.prior.sample(9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for n in (9, 5, 2, 1):  # one dynamic graph for every batch size
            torch.testing.assert_close(fast.log_prob(x[:n]), flow.log_prob(x[:n]), atol=1e-5, rtol=0)
        # The weights are inputs of the compiled graph, not constants: changing them changes its result.
        before = fast.log_prob(x)
        for layer in flow.field.layers:
            layer.coordinate_out.weight.mul_(1.5)
        after = fast.log_prob(x)
        torch.testing.assert_close(after, flow.log_prob(x), atol=1e-5, rtol=0)
        assert (after - before).abs().max() > 1e-3
    assert flow.field not in compiled_module._FIELD.failed  # it really compiled
    assert (flow.log_prob(x) - flow.prior.log_prob(x)).abs().max() > 1e-2  # the flow is not the identity

    # With autograd on (training), the compiled flow takes the eager path: same gradients.
    grads = []
    for model in (flow, fast):
        model.zero_grad()
        model.log_prob(x).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for eager_grad, fast_grad in zip(*grads, strict=True):
        torch.testing.assert_close(fast_grad, eager_grad)
    with pytest.raises(RuntimeError, match="inference"):
        compiled_module.compiled_velocity_and_divergence(flow.field, torch.zeros(2), x[:2])

    fast.save(tmp_path / "flow.pt")
    assert load_flow(tmp_path / "flow.pt").compiled
    assert not load_flow(tmp_path / "flow.pt", compiled=False).compiled  # the saved option overridden
    assert load_flow(tmp_path / "flow.pt", compiled=False).options() == {**fast.options(), "compiled": False}

    result = benchmark_divergence(flow, 4, batch_size=2, n_samples_loop=2, compiled=True)
    assert result["compiled"] and result["compile_seconds"] >= 0
    assert result["logq_max_abs_difference_compiled_vs_eager"] < 1e-4
    assert result["speedup_eager"] == pytest.approx(result["samples_per_s_eager"] / result["samples_per_s_loop"])


def test_compile_failure_falls_back_to_the_eager_path_with_one_warning(monkeypatch, caplog) -> None:
    from bgplugin.flows import compiled as compiled_module

    def broken(*_: object) -> None:
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(compiled_module._FIELD, "compiled", broken)
    monkeypatch.setattr(compiled_module._FIELD, "warned", False)
    flow = _transporting_dw4_flow(torch.float64)
    fast = flow.with_options(compiled=True)
    x = flow.prior.sample(4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), caplog.at_level("WARNING", logger="bgplugin.flows.compiled"):
        first = fast.log_prob(x)
        second = fast.log_prob(x)
        expected = flow.log_prob(x)
    torch.testing.assert_close(first, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(second, expected, atol=1e-12, rtol=0)
    warnings = [r for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 1 and "RuntimeError: no C++ compiler found" in warnings[0].getMessage()


def test_select_rk4_steps_meets_the_tolerance() -> None:
    torch.manual_seed(0)
    flow = build_flow(get_system("dw4"), "egnn", hidden=8, n_layers=2, device="cpu", dtype=torch.float64)
    with torch.no_grad():
        for layer in flow.field.layers:
            layer.coordinate_out.weight.mul_(500.0)
    tight = {"reference_rtol": 1e-10, "reference_atol": 1e-10}
    steps, errors = select_rk4_steps(flow, 1e-6, n_samples=4, candidates=(1, 2, 4, 8, 16), **tight)
    assert errors[steps] <= 1e-6
    assert all(error > 1e-6 for candidate, error in errors.items() if candidate < steps)
    with pytest.raises(ValueError, match="no candidate"):
        select_rk4_steps(flow, 1e-15, n_samples=2, candidates=(1,))
