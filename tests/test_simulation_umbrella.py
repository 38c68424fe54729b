"""Umbrella sampling + MBAR on a torsion with a known free-energy profile; delta F; overlap warning; reuse.

The test system is a four-atom chain with stiff bonds and angles and a
periodic torsion potential U(phi). The dihedral's volume element does not
depend on phi, so its exact distribution is p(phi) ~ exp(-U(phi)/kT).
"""

from __future__ import annotations

import math
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import pytest

from bgplugin.data import Dataset
from bgplugin.simulation import (
    FreeEnergyProfile,
    UmbrellaOverlapWarning,
    UmbrellaResult,
    analyze_umbrella,
    delta_f,
    dihedral_bias_force,
    plot_profile,
    run_umbrella,
)
from bgplugin.simulation.umbrella import reduced_bias
from bgplugin.systems import CollectiveVariable, MolecularSystem
from bgplugin.units import kt_kj_per_mol

N_SIGMA = 4.0
T = 300.0
#: U(phi)/kT = sum k (1 + cos(n phi - phase)): barriers of 5-7 kT, asymmetric between phi > 0 and phi < 0.
TERMS = ((1.5, 1, 0.0), (2.0, 2, 0.0), (1.0, 1, math.pi / 2))
N_BINS = 24


def u_exact(phi: np.ndarray) -> np.ndarray:
    return sum(k * (1 + np.cos(n * phi - phase)) for k, n, phase in TERMS)


def exact_bin_f(n_bins: int) -> np.ndarray:
    """-ln p_i of equal bins on [-pi, pi] (fine quadrature), up to a constant."""
    fine = 400
    edges = np.linspace(-np.pi, np.pi, n_bins * fine + 1)
    mids = 0.5 * (edges[1:] + edges[:-1])
    return -np.log(np.exp(-u_exact(mids)).reshape(n_bins, fine).mean(axis=1))


def exact_delta_f() -> float:
    phi = np.linspace(-np.pi, np.pi, 200_001)[:-1] + np.pi / 200_000
    w = np.exp(-u_exact(phi))
    return float(-np.log(w[phi > 0].sum() / w[phi < 0].sum()))


def torsion_system() -> MolecularSystem:
    kt = kt_kj_per_mol(T)
    top = mdtraj.Topology()
    residue = top.add_residue("TOR", top.add_chain())
    atoms = [top.add_atom(f"C{i}", mdtraj.element.carbon, residue) for i in range(4)]
    for a, b in zip(atoms[:-1], atoms[1:]):
        top.add_bond(a, b)
    system = openmm.System()
    bonds, angles, torsion = openmm.HarmonicBondForce(), openmm.HarmonicAngleForce(), openmm.PeriodicTorsionForce()
    for _ in range(4):
        system.addParticle(12.0)
    for i in range(3):
        bonds.addBond(i, i + 1, 0.15, 2e5)
    for i in range(2):
        angles.addAngle(i, i + 1, i + 2, math.radians(109.5), 500.0)
    for k, n, phase in TERMS:
        torsion.addTorsion(0, 1, 2, 3, n, phase, k * kt)
    for force in (bonds, angles, torsion):
        system.addForce(force)
    theta = math.radians(109.5)
    c, s = 0.15 * math.cos(theta), 0.15 * math.sin(theta)
    x = np.array([[0, 0, 0], [0.15, 0, 0], [0.15 - c, s, 0], [0.3 - c, s, 0]])  # phi = 180 deg
    cv = CollectiveVariable("phi", "dihedral", (0, 1, 2, 3))
    return MolecularSystem("torsion", top, x, system, T, [], cvs={"phi": cv})


@pytest.fixture(scope="module")
def torsion() -> MolecularSystem:
    return torsion_system()


@pytest.fixture(scope="module")
def umbrella_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("umbrella")


@pytest.fixture(scope="module")
def result(torsion: MolecularSystem, umbrella_dir: Path) -> UmbrellaResult:
    return run_umbrella(
        torsion, "phi", k=40.0, ns_per_window=0.1, n_windows=12, stride=50, friction=5.0, equilibration_ps=5.0,
        seed=1, platform="Reference", n_workers=2, n_bins=N_BINS, n_bootstraps=20, output_dir=umbrella_dir,
        progress=False,
    )  # fmt: skip


def test_profile_recovers_the_exact_profile_within_error_bars(result: UmbrellaResult) -> None:
    profile = result.profile
    assert np.isfinite(profile.f).all() and profile.f.min() == 0.0
    j = int(np.argmin(profile.f))
    exact = exact_bin_f(N_BINS)
    exact -= exact[j]  # both relative to the estimate's reference bin
    df = profile.df.copy()
    assert df[j] == 0 and np.all(np.delete(df, j) > 0)
    assert np.all(np.delete(df, j) < 0.3), "errors too large for the test to detect a wrong profile"
    z = np.delete((profile.f - exact) / np.where(df > 0, df, 1.0), j)
    assert np.all(np.abs(z) < N_SIGMA), f"z-scores {np.round(z, 2)}"
    assert profile.cv_name == "phi" and profile.cv_units == "rad" and len(profile.bin_centers) == N_BINS


def test_delta_f_matches_exact_value(result: UmbrellaResult) -> None:
    d = result.delta_f()
    assert 0 < d.error < 0.3
    assert abs(d.value - exact_delta_f()) < N_SIGMA * d.error, str(d)
    assert d.value_kj_per_mol == pytest.approx(d.value * kt_kj_per_mol(T))
    # the population of phi > 0 follows from dF
    p = 1 / (1 + np.exp(exact_delta_f()))
    assert abs(d.population_a - p) < N_SIGMA * d.population_a_error


def test_unbiased_frame_weights_reproduce_the_distribution(result: UmbrellaResult, torsion: MolecularSystem) -> None:
    data = result.dataset
    assert len(data) == len(result.cv_values) and "MBAR" in data.log_weights_definition
    assert np.isfinite(data.log_weights).all()
    from_profile = result.delta_f()
    d = delta_f(data, cv=torsion.cvs["phi"])  # weighted samples; its own error ignores the MBAR weights' error
    assert abs(d.value - exact_delta_f()) < N_SIGMA * from_profile.error, str(d)
    assert abs(d.value - from_profile.value) < from_profile.error
    assert data.metadata["segment_lengths"] == [int((result.window_index == k).sum()) for k in range(12)]
    w = data.weights()
    mean_cos = float(np.sum(w * np.cos(result.cv_values)))
    phi = np.linspace(-np.pi, np.pi, 100_001)[:-1]
    p = np.exp(-u_exact(phi))
    assert mean_cos == pytest.approx(np.sum(p * np.cos(phi)) / p.sum(), abs=0.05)


def test_overlap_diagnostics_and_warning(result: UmbrellaResult, umbrella_dir: Path, torsion: MolecularSystem) -> None:
    assert result.overlap.shape == (12, 12)
    np.testing.assert_allclose(result.overlap.sum(axis=1), 1.0, atol=1e-6)
    assert len(result.neighbour_overlap) == 12 and result.neighbour_overlap.min() > 0.03  # wraps around the circle
    sparse = [Dataset.load(umbrella_dir / f"window_{i:03d}.h5") for i in (0, 4, 8)]  # 120 degrees apart
    with pytest.warns(UmbrellaOverlapWarning, match="overlap poorly"):
        analyze_umbrella(sparse, torsion.cvs["phi"], n_bins=N_BINS, n_bootstraps=0, progress=False)


def test_rerun_reuses_finished_windows(result: UmbrellaResult, torsion: MolecularSystem, umbrella_dir: Path) -> None:
    window = umbrella_dir / "window_003.h5"
    stamp = window.stat().st_mtime_ns
    again = run_umbrella(
        torsion, "phi", k=40.0, ns_per_window=0.1, n_windows=12, stride=50, friction=5.0, equilibration_ps=5.0,
        seed=1, platform="Reference", n_bins=N_BINS, n_bootstraps=20, output_dir=umbrella_dir, progress=False,
    )  # fmt: skip
    assert window.stat().st_mtime_ns == stamp
    np.testing.assert_allclose(again.profile.f, result.profile.f, atol=1e-8)
    np.testing.assert_allclose(again.profile.df, result.profile.df, atol=1e-8)  # seeded bootstrap
    with pytest.raises(ValueError, match="other settings"):
        run_umbrella(torsion, "phi", k=50.0, ns_per_window=0.1, n_windows=12, stride=50, seed=1,
                     platform="Reference", output_dir=umbrella_dir, progress=False)  # fmt: skip


def test_outputs_and_profile_round_trip(result: UmbrellaResult, umbrella_dir: Path, tmp_path: Path) -> None:
    for name in ("profile.json", "profile.png", "umbrella.h5", "summary.json"):
        assert (umbrella_dir / name).stat().st_size > 0
    back = FreeEnergyProfile.load(umbrella_dir / "profile.json")
    np.testing.assert_allclose(back.f, result.profile.f)
    np.testing.assert_allclose(back.df, result.profile.df)
    assert delta_f(back).error == pytest.approx(result.delta_f().error)
    png = plot_profile([back, result.profile], tmp_path / "two.png", labels=["a", "b"], units="kT")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    weighted = Dataset.load(umbrella_dir / "umbrella.h5")
    np.testing.assert_allclose(weighted.log_weights, result.dataset.log_weights)


def test_bias_force_matches_the_analysis_convention(torsion: MolecularSystem) -> None:
    system = openmm.System()
    for _ in range(4):
        system.addParticle(12.0)
    force = dihedral_bias_force((0, 1, 2, 3), 40.0, 2.8)
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    rng = np.random.default_rng(0)
    cv = torsion.cvs["phi"]
    for x in torsion.positions[None] + 0.05 * rng.standard_normal((20, 4, 3)):
        context.setPositions(x)
        energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
        phi = cv(x[None])
        assert energy / kt_kj_per_mol(T) == pytest.approx(reduced_bias(phi, np.array([2.8]), 40.0, T)[0, 0], abs=1e-6)


def test_delta_f_from_plain_samples_is_statistically_right() -> None:
    rng = np.random.default_rng(3)
    p_a = 0.2
    values = np.where(rng.random(20_000) < p_a, 1.0, -1.0)
    d = delta_f(values)
    exact = -np.log(p_a / (1 - p_a))
    expected_error = np.sqrt(1 / (p_a * (1 - p_a) * len(values)))
    assert d.error == pytest.approx(expected_error, rel=0.1)
    assert abs(d.value - exact) < N_SIGMA * d.error
    with pytest.raises(ValueError, match="no sample"):
        delta_f(np.full(10, -1.0))
