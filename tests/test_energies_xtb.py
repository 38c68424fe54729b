"""XTBEnergy against direct xtb-python and tblite calls, and its failure handling."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from bgplugin.energies import FrameStatus, XTBEnergy  # noqa: E402
from bgplugin.units import BOHR_PER_NM, KJ_PER_MOL_PER_HARTREE, kt_kj_per_mol  # noqa: E402


def direct(numbers: np.ndarray, frames: np.ndarray, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """Energies (kT at 300 K) and forces (kT/nm), one fresh calculator call per frame."""
    to_kt = KJ_PER_MOL_PER_HARTREE / kt_kj_per_mol(300.0)
    u, f = [], []
    for x in frames:
        if backend == "xtb":
            from xtb.interface import Calculator, Param
            from xtb.libxtb import VERBOSITY_MUTED

            calc = Calculator(Param.GFN2xTB, numbers, x * BOHR_PER_NM)
            calc.set_verbosity(VERBOSITY_MUTED)
            res = calc.singlepoint()
            e, g = res.get_energy(), res.get_gradient()
        else:
            from tblite.interface import Calculator

            calc = Calculator("GFN2-xTB", numbers, x * BOHR_PER_NM)
            calc.set("verbosity", 0)
            res = calc.singlepoint()
            e, g = res.get("energy"), res.get("gradient")
        u.append(e * to_kt)
        f.append(-np.asarray(g) * to_kt * BOHR_PER_NM)
    return np.array(u), np.array(f)


@pytest.mark.parametrize(("backend", "n_workers"), [("xtb", 0), ("xtb", 2), ("tblite", 0), ("tblite", 1)])
def test_matches_direct_calls(ala2, ala2_frames: np.ndarray, backend: str, n_workers: int) -> None:
    frames = ala2_frames[:6]
    u_ref, f_ref = direct(ala2.atomic_numbers, frames, backend)
    with ala2.energy("xtb", backend=backend, n_workers=n_workers, chunk_size=3) as energy:
        result = energy.evaluate(torch.as_tensor(frames))
    assert (result.status == FrameStatus.OK).all()
    # wavefunction restarts converge to the same SCF solution within its tolerance
    np.testing.assert_allclose(result.u.numpy(), u_ref, rtol=0, atol=1e-3)
    np.testing.assert_allclose(result.forces.numpy(), f_ref, rtol=1e-4, atol=0.1)


def test_backends_agree(ala2, ala2_frames: np.ndarray) -> None:
    frames = torch.as_tensor(ala2_frames[:4])
    u_xtb = XTBEnergy(ala2.atomic_numbers, backend="xtb", n_workers=0)(frames)
    u_tbl = XTBEnergy(ala2.atomic_numbers, backend="tblite", n_workers=0)(frames)
    assert torch.allclose(u_xtb, u_tbl, atol=1e-3)


def test_autograd_gradient_is_minus_force(ala2, ala2_frames: np.ndarray) -> None:
    energy = XTBEnergy(ala2.atomic_numbers, backend="tblite", n_workers=0)
    x = torch.as_tensor(ala2_frames[:2]).requires_grad_(True)
    energy(x).sum().backward()
    # equal to a fresh calculator's -F up to the SCF tolerance (the energy restarts wavefunctions)
    _, f_ref = direct(ala2.atomic_numbers, ala2_frames[:2], "tblite")
    np.testing.assert_allclose(x.grad.numpy(), -f_ref, rtol=1e-4, atol=0.2)


def test_gradient_matches_finite_differences(ala2) -> None:
    energy = XTBEnergy(ala2.atomic_numbers, backend="tblite", n_workers=0)
    x = torch.as_tensor(ala2.positions[None]).requires_grad_(True)
    energy(x).sum().backward()
    h = 1e-5
    for atom, axis in [(1, 0), (8, 2)]:
        xp, xm = x.detach().clone(), x.detach().clone()
        xp[0, atom, axis] += h
        xm[0, atom, axis] -= h
        fd = (energy(xp) - energy(xm)).item() / (2 * h)
        assert x.grad[0, atom, axis].item() == pytest.approx(fd, rel=1e-3, abs=0.5)


@pytest.mark.parametrize("backend", ["xtb", "tblite"])
def test_bad_frames_are_inf_and_others_intact(ala2, ala2_frames: np.ndarray, backend: str) -> None:
    x = ala2_frames[:4].copy()
    x[1, 2, 1] = np.nan
    x[2, 5] = x[2, 15] + 1e-4
    energy = XTBEnergy(ala2.atomic_numbers, backend=backend, n_workers=0)
    result = energy.evaluate(torch.as_tensor(x))
    assert list(result.status) == [0, FrameStatus.NAN_COORDINATES, FrameStatus.OVERLAP, 0]
    assert torch.isinf(result.u[1:3]).all() and (result.forces[1:3] == 0).all()
    u_ref, _ = direct(ala2.atomic_numbers, x[[0, 3]], backend)
    np.testing.assert_allclose(result.u.numpy()[[0, 3]], u_ref, atol=1e-3)


@pytest.mark.parametrize("backend", ["xtb", "tblite"])
def test_scf_failure_is_retried_then_inf(ala2, ala2_frames: np.ndarray, backend: str) -> None:
    """Two SCF iterations cannot converge: every retry fails and the frame is SCF_NOT_CONVERGED."""
    energy = XTBEnergy(ala2.atomic_numbers, backend=backend, n_workers=0, max_iterations=2)
    result = energy.evaluate(torch.as_tensor(ala2_frames[:2]))
    assert (result.status == FrameStatus.SCF_NOT_CONVERGED).all()
    assert torch.isinf(result.u).all()


def test_near_overlap_energy_threshold(ala2) -> None:
    """xTB returns a large positive energy for near-overlapping atoms instead of failing."""
    x = ala2.positions[None].copy()
    x[0, 5] = x[0, 15] + np.array([0.001, 0.0, 0.0])
    energy = XTBEnergy(ala2.atomic_numbers, backend="tblite", n_workers=0, overlap_distance=0.0)
    result = energy.evaluate(torch.as_tensor(x))
    assert result.status[0] in (FrameStatus.ENERGY_TOO_HIGH, FrameStatus.ENGINE_ERROR)
    assert torch.isinf(result.u[0])


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        XTBEnergy([1, 1], backend="dftb")
    with pytest.raises(ValueError, match="atomic numbers 1..86"):
        XTBEnergy([0, 1])
    with pytest.raises(ValueError, match="method must be"):
        XTBEnergy([1, 1], method="GFN0")
