"""run_md: Boltzmann statistics on a harmonic oscillator, kill-and-resume without gaps, chirality, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mdtraj
import numpy as np
import openmm.unit as unit
import pytest
from openmmtools import testsystems

from bgplugin.data import Dataset
from bgplugin.simulation import chirality_volumes, is_l_amino_acid, run_md
from bgplugin.systems import MolecularSystem, get_system
from bgplugin.units import kt_kj_per_mol

N_SIGMA = 4.0


@pytest.fixture(scope="module")
def oscillator() -> tuple[MolecularSystem, float]:
    """openmmtools' 3D harmonic oscillator (one argon atom) and its spring constant in kJ/mol/nm^2."""
    ho = testsystems.HarmonicOscillator()
    system = MolecularSystem(
        "harmonic_oscillator",
        mdtraj.Topology.from_openmm(ho.topology),
        ho.positions.value_in_unit(unit.nanometer),
        ho.system,
        300.0,
        [],
    )
    return system, ho.K.value_in_unit(unit.kilojoule_per_mole / unit.nanometer**2)


def test_harmonic_oscillator_x2_within_n_sigma(oscillator: tuple[MolecularSystem, float]) -> None:
    from pymbar import timeseries

    system, k_spring = oscillator
    data = run_md(system, 10_000, 100, friction=10.0, seed=11, platform="Reference", progress=False)
    x2 = data.positions[:, 0, :].astype(np.float64) ** 2  # (n, 3): independent Cartesian components
    exact = kt_kj_per_mol(300.0) / k_spring  # <x^2> = kT/K per component
    means, variances = [], []
    for component in x2.T:
        g = timeseries.statistical_inefficiency(component)
        means.append(component.mean())
        variances.append(component.var(ddof=1) * g / len(component))
    estimate, error = float(np.mean(means)), float(np.sqrt(np.sum(variances)) / 3)
    assert error < 0.03 * exact, "too little sampling for the test to detect a 10% temperature error"
    assert abs(estimate - exact) < N_SIGMA * error, f"<x^2> = {estimate:.4g} +- {error:.2g}, exact {exact:.4g} nm^2"
    assert data.metadata["seeds"]["integrator"] == 11 and data.metadata["temperature"] == 300.0


_CHILD = """
import sys
from bgplugin.systems import get_system
from bgplugin.simulation import run_md
run_md(get_system("alanine_dipeptide"), {n}, {stride}, seed=7, platform="Reference", equilibration_steps=500,
       output=sys.argv[1], checkpoint_every={every}, progress=False)
"""


def test_killed_run_resumes_without_duplicate_or_missing_frames(ala2, tmp_path: Path) -> None:
    n, stride, every = 600, 50, 25
    output = tmp_path / "md.h5"
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(n=n, stride=stride, every=every))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, str(script), str(output)], env=env, stderr=subprocess.PIPE)
    progress = Path(f"{output}.parts") / "progress.json"
    done = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if progress.is_file():
            done = json.loads(progress.read_text())["n_frames_done"]
            if done >= 4 * every:
                break
        time.sleep(0.005)
    assert child.poll() is None, f"the child ended before it could be killed: {child.stderr.read().decode()[-2000:]}"
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()
    assert every <= done < n and not output.exists()

    resumed = run_md(ala2, n, stride, seed=7, platform="Reference", equilibration_steps=500, output=output,
                     checkpoint_every=every, progress=False)  # fmt: skip
    reference = run_md(ala2, n, stride, seed=7, platform="Reference", equilibration_steps=500, progress=False)
    assert len(resumed) == n
    # same platform + OpenMM checkpoint: the resumed run continues the very same trajectory
    np.testing.assert_array_equal(resumed.positions, reference.positions)
    np.testing.assert_allclose(np.diff(resumed.time), stride * 1e-3)
    assert resumed.metadata["n_sessions"] == 2
    on_disk = Dataset.load(output)
    np.testing.assert_array_equal(on_disk.positions, reference.positions)
    assert not list(Path(f"{output}.parts").glob("*segment*")), "segments are removed once assembled"

    # asking for more frames later extends the same trajectory
    longer = run_md(ala2, n + 40, stride, platform="Reference", output=output, checkpoint_every=every, progress=False)
    np.testing.assert_array_equal(longer.positions[:n], reference.positions)
    assert len(longer) == n + 40 and longer.metadata["seeds"]["integrator"] == 7


def test_resume_with_other_settings_is_refused(ala2, tmp_path: Path) -> None:
    output = tmp_path / "md.h5"
    run_md(ala2, 3, 10, seed=3, platform="Reference", equilibration_steps=0, output=output, progress=False)
    with pytest.raises(ValueError, match="stride: stored 10, now 20"):
        run_md(ala2, 6, 20, seed=3, platform="Reference", output=output, progress=False)
    with pytest.raises(ValueError, match="seed: stored 3, now 4"):
        run_md(ala2, 6, 10, seed=4, platform="Reference", output=output, progress=False)
    foreign = tmp_path / "foreign.h5"
    foreign.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="will not overwrite"):
        run_md(ala2, 3, 10, seed=3, platform="Reference", output=foreign, progress=False)


def test_md_frames_are_all_l_and_mirror_images_are_d(ala2) -> None:
    data = run_md(ala2, 20, 50, seed=5, platform="Reference", equilibration_steps=200, progress=False)
    assert is_l_amino_acid(data.positions, ala2.topology).all()
    assert data.metadata["chirality"] == {"n_frames": 20, "n_all_L": 20}
    mirrored = data.positions * np.array([-1.0, 1.0, 1.0])
    assert not is_l_amino_acid(mirrored, ala2.topology).any()
    np.testing.assert_allclose(
        chirality_volumes(mirrored, ala2.topology), -chirality_volumes(data.positions, ala2.topology)
    )


def test_bad_inputs_fail_fast(ala2) -> None:
    with pytest.raises(TypeError, match="molecular System"):
        run_md(get_system("dw4"), 10)
    with pytest.raises(ValueError, match="seed must be in 1"):
        run_md(ala2, 10, seed=0)
    with pytest.raises(ValueError, match="platform 'Nope' is not available"):
        run_md(ala2, 10, platform="Nope")
    with pytest.raises(ValueError, match="n_frames must be >= 1"):
        run_md(ala2, 0)
