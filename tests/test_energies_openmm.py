"""OpenMMEnergy against direct single-Context evaluation, and every failure mode."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import openmm
import openmm.unit as unit
import pytest
import torch
from faulty_engines import CRASH, HANG, FaultyOpenMMSpec

from bgplugin.energies import EnergyEvaluationError, FrameStatus, OpenMMEnergy
from bgplugin.energies.engine import EngineEnergy
from bgplugin.units import kt_kj_per_mol


def direct(system, frames: np.ndarray, platform: str = "Reference") -> tuple[np.ndarray, np.ndarray]:
    """Energies (kT) and forces (kT/nm) from one plain OpenMM Context."""
    properties = {"Threads": "1"} if platform == "CPU" else {}
    context = openmm.Context(
        system.openmm_system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform), properties
    )
    kt = kt_kj_per_mol(system.temperature)
    u, f = [], []
    for x in frames:
        context.setPositions(x)
        state = context.getState(getEnergy=True, getForces=True)
        u.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / kt)
        f.append(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer) / kt)
    return np.array(u), np.array(f)


@pytest.mark.parametrize("solvent", ["implicit", "vacuum"])
@pytest.mark.parametrize("n_workers", [1, 2])
def test_matches_direct_context(request, solvent: str, n_workers: int, ala2_frames: np.ndarray) -> None:
    system = request.getfixturevalue("ala2" if solvent == "implicit" else "ala2_vacuum")
    u_ref, f_ref = direct(system, ala2_frames)
    with OpenMMEnergy(system, platform="Reference", n_workers=n_workers, chunk_size=16) as energy:
        result = energy.evaluate(torch.as_tensor(ala2_frames))
    assert (result.status == FrameStatus.OK).all()
    np.testing.assert_allclose(result.u.numpy(), u_ref, rtol=1e-6)
    np.testing.assert_allclose(result.forces.numpy(), f_ref, rtol=1e-6, atol=1e-6 * np.abs(f_ref).max())


@pytest.mark.parametrize("n_workers", [0, 2])
def test_cpu_platform_matches_direct_cpu_context(ala2, ala2_frames: np.ndarray, n_workers: int) -> None:
    u_ref, f_ref = direct(ala2, ala2_frames, platform="CPU")
    with OpenMMEnergy(ala2, platform="CPU", n_workers=n_workers, chunk_size=16) as energy:
        result = energy.evaluate(torch.as_tensor(ala2_frames))
    np.testing.assert_allclose(result.u.numpy(), u_ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(result.forces.numpy(), f_ref, rtol=1e-6, atol=1e-6 * np.abs(f_ref).max())
    u_double, _ = direct(ala2, ala2_frames)  # CPU is mixed precision: agrees with Reference to ~1e-4 kT
    np.testing.assert_allclose(result.u.numpy(), u_double, atol=1e-3)


def test_autograd_gradient_is_minus_force(ala2, ala2_frames: np.ndarray) -> None:
    energy = OpenMMEnergy(ala2, platform="Reference", n_workers=0)
    x = torch.as_tensor(ala2_frames[:8]).requires_grad_(True)
    u = energy(x)
    weights = torch.arange(1.0, 9.0, dtype=torch.float64)
    (u * weights).sum().backward()
    _, f_ref = direct(ala2, ala2_frames[:8])
    np.testing.assert_allclose(x.grad.numpy(), -weights.numpy()[:, None, None] * f_ref, rtol=1e-6, atol=1e-8)


def test_gradient_matches_finite_differences(ala2_vacuum) -> None:
    energy = OpenMMEnergy(ala2_vacuum, platform="Reference", n_workers=0)
    x = torch.as_tensor(ala2_vacuum.positions[None]).requires_grad_(True)
    energy(x).sum().backward()
    h = 1e-5
    for atom, axis in [(0, 0), (8, 1), (15, 2)]:
        xp, xm = x.detach().clone(), x.detach().clone()
        xp[0, atom, axis] += h
        xm[0, atom, axis] -= h
        fd = (energy(xp) - energy(xm)).item() / (2 * h)
        assert x.grad[0, atom, axis].item() == pytest.approx(fd, rel=1e-4, abs=1e-3)


def test_bad_frames_are_inf_with_zero_force(ala2, ala2_frames: np.ndarray) -> None:
    x = ala2_frames[:6].copy()
    x[1, 3, 0] = np.nan
    x[2, 5] = x[2, 15]  # two oxygens on top of each other
    x[3] *= 1e-4  # everything collapsed
    with OpenMMEnergy(ala2, n_workers=1) as energy:
        result = energy.evaluate(torch.as_tensor(x))
    expected = [0, FrameStatus.NAN_COORDINATES, FrameStatus.OVERLAP, FrameStatus.OVERLAP, 0, 0]
    assert list(result.status) == expected
    assert torch.isinf(result.u[1:4]).all() and (result.u[1:4] > 0).all()
    assert (result.forces[1:4] == 0).all()
    u_ref, _ = direct(ala2, x[[0, 4, 5]])
    np.testing.assert_allclose(result.u.numpy()[[0, 4, 5]], u_ref, rtol=1e-5)


def test_non_finite_engine_result_is_caught(ala2) -> None:
    """Overlap screening off: coincident atoms reach OpenMM, whose NaN/inf result becomes +inf."""
    x = ala2.positions[None].copy()
    x[0, 5] = x[0, 15]
    energy = OpenMMEnergy(ala2, platform="Reference", n_workers=0, overlap_distance=0.0)
    result = energy.evaluate(torch.as_tensor(x))
    assert result.status[0] in (FrameStatus.NON_FINITE, FrameStatus.ENERGY_TOO_HIGH, FrameStatus.ENGINE_ERROR)
    assert torch.isinf(result.u[0])


def test_failure_policy_raise(ala2) -> None:
    x = ala2.positions[None].repeat(2, axis=0)
    x[1, 0, 0] = np.nan
    energy = OpenMMEnergy(ala2, n_workers=0, failure_policy="raise")
    with pytest.raises(EnergyEvaluationError, match="NAN_COORDINATES"):
        energy(torch.as_tensor(x))


def test_shape_and_type_errors(ala2) -> None:
    energy = OpenMMEnergy(ala2, n_workers=0)
    with pytest.raises(ValueError, match=r"\(batch, 22, 3\), got \(1, 21, 3\)"):
        energy(torch.zeros(1, 21, 3))
    with pytest.raises(ValueError, match="platform 'Nope' is not available"):
        OpenMMEnergy(ala2, platform="Nope")
    with pytest.raises(TypeError, match="openmm.System or a molecular bgplugin System"):
        OpenMMEnergy(object())


def _faulty(ala2, **kwargs) -> EngineEnergy:
    energy = OpenMMEnergy(ala2, platform="Reference", n_workers=0)
    spec = FaultyOpenMMSpec(**{f.name: getattr(energy.spec, f.name) for f in dataclasses.fields(energy.spec)})
    return EngineEnergy(spec, 22, ala2.temperature, **kwargs)


def test_frame_that_kills_its_worker_is_isolated(ala2, ala2_frames: np.ndarray) -> None:
    x = ala2_frames[:16].copy()
    x[5, 0, 0] = CRASH
    with _faulty(ala2, n_workers=2, chunk_size=8, timeout=120) as energy:
        result = energy.evaluate(torch.as_tensor(x))
        assert energy.executor.n_restarts >= 1
        assert list(np.flatnonzero(result.status)) == [5]
        assert result.status[5] == FrameStatus.WORKER_DIED and torch.isinf(result.u[5])
        u_ref, _ = direct(ala2, np.delete(x, 5, axis=0))
        np.testing.assert_allclose(np.delete(result.u.numpy(), 5), u_ref, rtol=1e-6)
        again = energy.evaluate(torch.as_tensor(ala2_frames[:4]))  # the pool still works
        assert (again.status == FrameStatus.OK).all()


def test_hung_worker_times_out_and_others_survive(ala2, ala2_frames: np.ndarray) -> None:
    x = ala2_frames[:16].copy()
    x[2, 0, 0] = HANG
    with _faulty(ala2, n_workers=2, chunk_size=4, timeout=10) as energy:
        energy.evaluate(torch.as_tensor(ala2_frames[:2]))  # workers are up
        start = time.monotonic()
        result = energy.evaluate(torch.as_tensor(x))
        elapsed = time.monotonic() - start
        assert elapsed < 10 + 5
        assert (result.status[:4] == FrameStatus.TIMEOUT).all()
        assert (result.status[4:] == FrameStatus.OK).all()
        assert torch.isinf(result.u[:4]).all() and torch.isfinite(result.u[4:]).all()
        again = energy.evaluate(torch.as_tensor(ala2_frames[:4]))
        assert (again.status == FrameStatus.OK).all()


def test_worker_killed_mid_batch_from_outside(ala2) -> None:
    """SIGKILL one worker while it works: the call returns with every frame evaluated."""
    rng = np.random.default_rng(3)
    x = ala2.positions[None] + 0.003 * rng.standard_normal((6000, 22, 3))
    with OpenMMEnergy(ala2, platform="Reference", n_workers=2, chunk_size=500, timeout=120) as energy:
        energy.evaluate(torch.as_tensor(x[:2]))
        pool = energy.executor
        killed, done = threading.Event(), threading.Event()

        def kill_when_busy() -> None:
            # Kill the first worker seen holding a task, however fast this machine is: on a loaded
            # many-core machine one worker may still be starting while the other takes every chunk.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not done.is_set():
                for worker in list(pool._workers):
                    if worker.task is not None:
                        os.kill(worker.process.pid, signal.SIGKILL)
                        killed.set()
                        return
                time.sleep(0.001)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        start = time.monotonic()
        result = energy.evaluate(torch.as_tensor(x))
        done.set()
        killer.join()
        assert killed.is_set()
        assert time.monotonic() - start < 120
        assert pool.n_restarts >= 1
        ok = result.status == FrameStatus.OK
        assert ok.sum() >= len(x) - 1
        u_ref, _ = direct(ala2, x[ok][:200])
        np.testing.assert_allclose(result.u.numpy()[ok][:200], u_ref, rtol=1e-6)


def test_any_executor_can_stand_in(ala2, ala2_frames: np.ndarray) -> None:
    u_ref, _ = direct(ala2, ala2_frames)
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as executor:
        energy = OpenMMEnergy(ala2, platform="Reference", executor=executor, chunk_size=16)
        result = energy.evaluate(torch.as_tensor(ala2_frames))
    np.testing.assert_allclose(result.u.numpy(), u_ref, rtol=1e-6)
