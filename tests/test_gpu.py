"""The GPU path: flows, energies, training, benchmarks, reweighting and MCMC on CUDA, checked against the CPU.

Every test here needs a CUDA device and is skipped without one (CI has none; run
``pytest tests/test_gpu.py`` on a machine with a GPU). The CPU suite pins
``device="cpu"`` almost everywhere, so these are the tests that exercise
``device="auto"`` / ``"cuda"``: the same weights give the same densities on both
devices (float64, to 1e-8 relative), random draws come from a generator on the
flow's device, training checkpoints move between devices, and the benchmarks
report where they ran.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import load_benchmark, randomise_parameters

from bgplugin.flows import CNF, build_flow, load_flow
from bgplugin.flows.eacf import EACF
from bgplugin.flows.eacf.training import FABAlpha2, JointMaximumLikelihood, JointReverseKL
from bgplugin.systems import get_system
from bgplugin.testing import assert_equivariant
from bgplugin.training import FlowMatching, Trainer, TrainerConfig, TrainingData

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def _on(flow: torch.nn.Module, device: torch.device, tmp_path, name: str) -> torch.nn.Module:
    """The flow saved and loaded onto ``device`` (the way a user moves a model between machines)."""
    path = tmp_path / f"{name}.pt"
    flow.save(path)
    return load_flow(path, device=device)


def test_auto_resolves_to_the_gpu_and_flows_are_built_there() -> None:
    flow = build_flow(get_system("dw4"), kind="eacf", n_blocks=1, hidden=8, n_layers=1)
    assert flow.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in flow.parameters())
    cnf = build_flow(get_system("dw4"), "egnn", hidden=8, n_layers=1)
    assert isinstance(cnf, CNF) and cnf.device.type == "cuda"


def test_particle_energies_on_the_gpu_equal_the_cpu() -> None:
    for name in ("dw4", "lj13"):
        energy = get_system(name).energy()
        x = torch.as_tensor(load_benchmark(name, "test")[:64])
        cpu = energy.evaluate(x, need_forces=True)
        gpu = energy.evaluate(x.to(CUDA), need_forces=True)
        np.testing.assert_allclose(np.asarray(torch.as_tensor(gpu.u).cpu()), np.asarray(torch.as_tensor(cpu.u)),
                                   rtol=1e-10, atol=1e-10)  # fmt: skip
        np.testing.assert_allclose(np.asarray(torch.as_tensor(gpu.forces).cpu()),
                                   np.asarray(torch.as_tensor(cpu.forces)), rtol=1e-8, atol=1e-8)  # fmt: skip


@pytest.mark.parametrize("kind", ["egnn", "kernel"])
def test_cnf_densities_on_the_gpu_equal_the_cpu(kind: str, tmp_path) -> None:
    system = get_system("dw4")
    torch.manual_seed(0)
    options = {"hidden": 16, "n_layers": 2} if kind == "egnn" else {}
    cpu = build_flow(system, kind, device="cpu", **options).double()
    randomise_parameters(cpu, 0.05)
    gpu = _on(cpu, CUDA, tmp_path, kind)
    assert isinstance(gpu, CNF) and gpu.device.type == "cuda" and gpu.dtype == torch.float64
    x = torch.as_tensor(load_benchmark("dw4", "test")[:32])
    with torch.no_grad():
        log_q_cpu = cpu.log_prob(x)
        log_q_gpu = gpu.log_prob(x.to(CUDA))
    assert log_q_gpu.device.type == "cuda"
    torch.testing.assert_close(log_q_gpu.cpu(), log_q_cpu, rtol=1e-8, atol=1e-8)
    with torch.no_grad():
        xs, log_q = gpu.sample(16, generator=torch.Generator(CUDA).manual_seed(1))
    assert xs.device.type == "cuda" and log_q.device.type == "cuda"
    torch.testing.assert_close(xs.mean(1), torch.zeros(16, 2, dtype=xs.dtype, device=CUDA), atol=1e-10, rtol=0)
    with torch.no_grad():  # the flow's own samples (far from the data) get the same density on both devices
        torch.testing.assert_close(gpu.log_prob(xs).cpu(), cpu.log_prob(xs.cpu()), rtol=1e-8, atol=1e-8)
    # sample's log q integrates the ODE the other way: equal to log_prob up to the solver's error
    torch.testing.assert_close(log_q.cpu(), cpu.log_prob(xs.cpu()), rtol=0, atol=1e-2)


def test_eacf_densities_on_the_gpu_equal_the_cpu_and_it_is_equivariant_there(tmp_path) -> None:
    system = get_system("lj13")
    torch.manual_seed(0)
    cpu = build_flow(system, kind="eacf", n_blocks=2, hidden=16, n_layers=1, n_transforms=2, device="cpu").double()
    randomise_parameters(cpu, 0.05)
    gpu = _on(cpu, CUDA, tmp_path, "eacf")
    assert isinstance(gpu, EACF) and gpu.device.type == "cuda"
    x, a, log_q = gpu.sample_joint(24, generator=torch.Generator(CUDA).manual_seed(0))
    assert {x.device.type, a.device.type, log_q.device.type} == {"cuda"}
    with torch.no_grad():
        torch.testing.assert_close(cpu.log_prob_joint(x.cpu(), a.cpu()), log_q.cpu(), rtol=1e-7, atol=1e-7)
        draws = gpu.sample_aug(x, 5, generator=torch.Generator(CUDA).manual_seed(2))
        torch.testing.assert_close(cpu.marginal_log_prob(x.cpu(), draws.cpu()), gpu.marginal_log_prob(x, draws).cpu(),
                                   rtol=1e-8, atol=1e-8)  # fmt: skip
        x0, a0, log_det = gpu.inverse(x, a)
        x1, a1, log_det_forward = gpu.forward(x0, a0)
    torch.testing.assert_close(x1, x, atol=1e-8, rtol=0)
    torch.testing.assert_close(a1, a, atol=1e-8, rtol=0)
    torch.testing.assert_close(log_det_forward, -log_det, atol=1e-8, rtol=0)
    # the joint density is invariant when x and a move together (a built equivariantly from x here):
    # rotations and permutations of the mean-free x, applied on the GPU (spherical projection: SE(3), no parity)

    def joint_log_q(y: torch.Tensor) -> torch.Tensor:
        return gpu.log_prob_joint(y, (y + 0.3 * (y - y.mean(1, keepdim=True))).unsqueeze(1))

    with torch.no_grad():
        assert_equivariant(joint_log_q, x[:6], np.asarray(system.atom_types), outputs="invariant", reflections=False,
                           translations=False, atol=1e-7, rtol=1e-7)  # fmt: skip


def test_compiled_eacf_on_the_gpu_equals_the_eager_flow() -> None:
    torch.manual_seed(0)
    flow = build_flow(get_system("dw4"), kind="eacf", n_blocks=2, hidden=16, n_layers=1, device=CUDA)
    randomise_parameters(flow, 0.05)
    fast = flow.with_options(compiled=True)
    assert fast.compiled and not flow.compiled
    x, a, log_q = flow.sample_joint(32, generator=torch.Generator(CUDA).manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fast.log_prob_joint(x, a), log_q, rtol=1e-4, atol=1e-4)


def test_flow_matching_trains_on_the_gpu_and_the_checkpoint_resumes_on_the_cpu(tmp_path) -> None:
    """OT flow matching (POT pairing on the host) on CUDA; the CUDA checkpoint continues bit-compatibly on the CPU."""
    system = get_system("dw4")
    data = TrainingData(load_benchmark("dw4", "train")[:512])
    torch.manual_seed(0)
    gpu = build_flow(system, "egnn", hidden=16, n_layers=1, device=CUDA)
    config = TrainerConfig(max_steps=6, batch_size=64, lr=1e-3, progress=False, seed=0, out_dir=tmp_path / "run",
                           checkpoint_every=3)  # fmt: skip
    summary = Trainer(gpu, FlowMatching(gpu.prior, pairing="eqot"), replace(config, max_steps=3), data).fit()
    assert summary.step == 3 and math.isfinite(summary.final_loss)
    torch.manual_seed(0)
    cpu = build_flow(system, "egnn", hidden=16, n_layers=1, device="cpu")
    resumed = Trainer(cpu, FlowMatching(cpu.prior, pairing="eqot"), config, data).fit(resume=True)
    assert resumed.step == 6 and math.isfinite(resumed.final_loss)
    assert all(p.device.type == "cpu" for p in cpu.parameters())


def test_eacf_objectives_train_on_the_gpu() -> None:
    system = get_system("dw4")
    energy = system.energy()
    torch.manual_seed(0)
    flow = build_flow(system, kind="eacf", n_blocks=1, hidden=8, n_layers=1, device=CUDA)
    data = TrainingData(load_benchmark("dw4", "train")[:512])
    config = TrainerConfig(max_steps=3, batch_size=32, lr=1e-3, progress=False, seed=0)
    objectives = {
        "ml": (JointMaximumLikelihood(flow), data),
        "kl": (JointReverseKL(flow, energy, n_samples=32), None),
        "fab": (FABAlpha2(flow, energy, batch_size=32, n_intermediate=2, n_leapfrog=3, buffer_size=256,
                          min_buffer=64, updates_per_ais=2), None),  # fmt: skip
    }
    for name, (objective, batches) in objectives.items():
        summary = Trainer(flow, objective, config, batches).fit()
        assert summary.step == 3 and math.isfinite(summary.final_loss), name
    assert all(p.device.type == "cuda" and torch.isfinite(p).all() for p in flow.parameters())


def test_bench_eacf_runs_on_the_gpu_and_resumes_on_the_cpu(tmp_path) -> None:
    from bgplugin.benchmarks.eacf import bench_eacf, format_eacf

    load_benchmark("dw4", "test")  # skips without the data
    options = {"minutes": 1.0, "max_steps": 3, "n_blocks": 1, "hidden": 8, "n_marginal": 2, "n_eval_samples": 64,
               "n_eval_test": 64, "n_speed_samples": 64, "n_cnf_speed_samples": 2, "progress": False,
               "compiled": False}  # fmt: skip
    result = bench_eacf("dw4", tmp_path / "run", device="auto", **options)
    assert result["device"].startswith("cuda") and result["speed"]["device"].startswith("cuda")
    assert result["machine"]["cuda"]
    for key in ("nll", "ess", "ess_joint", "forward_ess"):
        assert math.isfinite(result[key]), key
    assert "on cuda" in format_eacf(result)
    again = bench_eacf("dw4", tmp_path / "run", device="cpu", **options)  # device is not a training setting
    assert again["training"]["resumed"] is True and again["device"] == "cpu"
    assert again["nll"] == pytest.approx(result["nll"], abs=0.05)  # same weights, other draws of a


def test_reweighting_and_metropolis_with_a_gpu_flow() -> None:
    from bgplugin.mcmc import MetropolisSampler
    from bgplugin.reweighting import reweight

    system = get_system("dw4")
    energy = system.energy()
    torch.manual_seed(0)
    flow = build_flow(system, kind="eacf", n_blocks=1, hidden=8, n_layers=1, device=CUDA, prior_std=1.5)
    randomise_parameters(flow, 0.02)
    result = reweight(flow, energy, 256, batch_size=128, seed=1, sample_kwargs={"density": "joint"}, progress=False)
    assert np.isfinite(result.log_w).sum() >= 250 and result.positions.shape == (256, 4, 2)
    cnf = build_flow(system, "egnn", hidden=8, n_layers=1, device=CUDA)
    for proposal in (flow, cnf):
        x0 = torch.as_tensor(load_benchmark("dw4", "test")[:16])
        out = MetropolisSampler(energy, proposal, random_walk_steps=1, step_size=0.2, seed=0).run(x0, 5, progress=False)
        assert out.samples.shape[1:] == (16, 4, 2)
        assert torch.isfinite(torch.as_tensor(out.samples)).all()
        assert out.acceptance_random_walk > 0.0
