"""GFN2-xTB Langevin relaxation: lower energies, chirality kept, broken frames reported not fatal."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from bgplugin.data import Dataset  # noqa: E402
from bgplugin.simulation import is_l_amino_acid, relax_with_xtb  # noqa: E402
from bgplugin.units import kt_kj_per_mol  # noqa: E402


@pytest.fixture(scope="module")
def frames(ala2) -> np.ndarray:
    """Three strained frames, one with two coincident atoms, one compressed so that xTB's SCF fails."""
    rng = np.random.default_rng(0)
    strained = ala2.positions[None] + 0.01 * rng.standard_normal((3, 22, 3))
    overlap = ala2.positions.copy()
    overlap[5] = overlap[15]
    compressed = 0.45 * ala2.positions
    return np.concatenate([strained, overlap[None], compressed[None]])


def test_relaxation_lowers_energy_keeps_chirality_and_reports_broken_frames(ala2, frames: np.ndarray) -> None:
    data = Dataset(frames, ala2.topology, metadata={"system": "alanine_dipeptide"})
    result = relax_with_xtb(data, fs=30.0, backend="xtb", n_workers=2, seed=3, progress=False)
    assert result.kept.tolist() == [0, 1, 2]
    assert set(result.failures) == {3, 4}
    assert "closer than" in result.failures[3]
    assert "xTB failed" in result.failures[4] or "broken after relaxation" in result.failures[4]
    relaxed = result.dataset
    assert len(relaxed) == 3 and relaxed.metadata["settings"]["friction_per_ps"] == pytest.approx(49.1, abs=0.1)
    assert relaxed.metadata["source"]["failures"].keys() == {"3", "4"}
    with ala2.energy("xtb", n_workers=0) as energy:  # an independent evaluation of the GFN2 energies
        before = energy(torch.as_tensor(frames[:3])).numpy()
        after = energy(torch.as_tensor(relaxed.positions.astype(np.float64))).numpy()
    np.testing.assert_allclose(after * kt_kj_per_mol(300.0), result.energies, rtol=0, atol=0.05)
    # strain of ~0.01 nm noise is hundreds of kT; 30 fs of Langevin at 49/ps removes most of it
    assert after.mean() < before.mean() - 50.0
    assert is_l_amino_acid(relaxed.positions, ala2.topology).all()


def test_tblite_in_process(ala2, frames: np.ndarray) -> None:
    data = Dataset(frames[:1], ala2.topology)
    result = relax_with_xtb(data, fs=5.0, backend="tblite", n_workers=0, seed=1, progress=False)
    assert result.kept.tolist() == [0] and not result.failures
    assert np.isfinite(result.energies).all()


def test_bad_arguments(ala2, frames: np.ndarray) -> None:
    data = Dataset(frames[:1], ala2.topology)
    with pytest.raises(ValueError, match="backend must be"):
        relax_with_xtb(data, backend="dftb")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="friction must be > 0"):
        relax_with_xtb(data, friction=0.0)
    with pytest.raises(ValueError, match="molecular frames in nm"):
        relax_with_xtb(Dataset(np.zeros((1, 4, 2))))
