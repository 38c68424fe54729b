"""Dataset: validation, slicing, round trips through HDF5 (molecules and particles), clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import h5py
import mdtraj
import numpy as np
import pytest

from bgplugin.data import Dataset, DatasetFormatError


@pytest.fixture
def molecule(ala2) -> Dataset:
    rng = np.random.default_rng(1)
    x = ala2.positions[None] + 0.01 * rng.standard_normal((7, 22, 3))
    return Dataset(
        x,
        ala2.topology,
        log_weights=np.array([0.0, -1.0, 2.5, -np.inf, 0.3, 1.0, -2.0]),
        log_weights_definition="-u(x) - log q(x)",
        metadata={"system": "alanine_dipeptide", "temperature": np.float32(300.0), "seeds": [1, 2], "k": np.arange(3)},
        time=np.arange(7) * 0.1,
    )


def test_molecule_round_trip(molecule: Dataset, tmp_path: Path) -> None:
    path = molecule.save(tmp_path / "sub" / "data.h5")
    back = Dataset.load(path)
    assert back.n_frames == 7 and back.units == "nm"
    # mdtraj stores float32 coordinates
    np.testing.assert_allclose(back.positions, molecule.positions, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(back.log_weights, molecule.log_weights)
    assert back.log_weights_definition == "-u(x) - log q(x)"
    assert back.metadata == {"system": "alanine_dipeptide", "temperature": 300.0, "seeds": [1, 2], "k": [0, 1, 2]}
    np.testing.assert_array_equal(back.time, molecule.time)  # float64 kept, not mdtraj's float32
    assert [a.name for a in back.topology.atoms] == [a.name for a in molecule.topology.atoms]
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary files left


def test_saved_file_is_an_mdtraj_trajectory(molecule: Dataset, tmp_path: Path) -> None:
    traj = mdtraj.load(str(molecule.save(tmp_path / "data.h5")))
    assert traj.n_frames == 7 and traj.n_atoms == 22
    np.testing.assert_allclose(traj.xyz, molecule.positions, atol=1e-6)


def test_plain_mdtraj_file_loads_without_metadata(molecule: Dataset, tmp_path: Path) -> None:
    molecule.to_mdtraj().save_hdf5(str(tmp_path / "plain.h5"))
    back = Dataset.load(tmp_path / "plain.h5")
    assert back.n_frames == 7 and back.log_weights is None and back.metadata == {}


def test_particle_round_trip_keeps_float64(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((5, 4, 2))
    data = Dataset(x, metadata={"system": "dw4"})
    assert data.units == "reduced"
    back = Dataset.load(data.save(tmp_path / "dw4.h5"))
    np.testing.assert_array_equal(back.positions, x)
    assert back.topology is None and back.log_weights is None and back.metadata == {"system": "dw4"}
    with pytest.raises(ValueError, match="no topology"):
        back.to_mdtraj()


def test_from_npy(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((6, 13, 3))
    np.save(tmp_path / "flat.npy", x.reshape(6, 39))
    data = Dataset.from_npy(tmp_path / "flat.npy", n_particles=13, dim=3, metadata={"system": "lj13"})
    np.testing.assert_array_equal(data.positions, x)
    assert data.metadata["system"] == "lj13" and len(data.metadata["source_sha256"]) == 64
    with pytest.raises(ValueError, match="pass n_particles and dim"):
        Dataset.from_npy(tmp_path / "flat.npy")
    with pytest.raises(ValueError, match="do not match"):
        Dataset.from_npy(tmp_path / "flat.npy", n_particles=4, dim=2)
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(DatasetFormatError, match="not a NumPy"):
        Dataset.from_npy(tmp_path / "bad.npy")


def test_garbage_file_raises_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.h5"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DatasetFormatError, match="not a readable HDF5 file.*truncated"):
        Dataset.load(path)


def test_truncated_file_raises_clear_error(molecule: Dataset, tmp_path: Path) -> None:
    data = molecule.save(tmp_path / "full.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetFormatError, match="truncated"):
        Dataset.load(tmp_path / "cut.h5")


def test_foreign_hdf5_raises_clear_error(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle["images"] = np.zeros((2, 3))
    with pytest.raises(DatasetFormatError, match=r"neither a bgplugin dataset nor an mdtraj trajectory.*images"):
        Dataset.load(tmp_path / "other.h5")


def test_inconsistent_file_raises(molecule: Dataset, tmp_path: Path) -> None:
    path = molecule.save(tmp_path / "data.h5")
    with h5py.File(path, "a") as handle:
        del handle["bgplugin/log_weights"]
        handle["bgplugin"].create_dataset("log_weights", data=np.zeros(3))
    with pytest.raises(DatasetFormatError, match="7 frames but 3 log-weights"):
        Dataset.load(path)


def test_newer_format_version_is_refused(molecule: Dataset, tmp_path: Path) -> None:
    path = molecule.save(tmp_path / "data.h5")
    with h5py.File(path, "a") as handle:
        handle["bgplugin"].attrs["format_version"] = 99
    with pytest.raises(DatasetFormatError, match="upgrade bgplugin"):
        Dataset.load(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Dataset.load(tmp_path / "nope.h5")


def test_failed_save_keeps_the_old_file(molecule: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = molecule.save(tmp_path / "data.h5")
    before = path.read_bytes()
    broken = molecule[:2]
    broken.metadata["bad"] = object()
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        broken.save(path)

    def crash(src: str, dst: str) -> None:  # the write is complete, the rename fails (disk full, Ctrl-C...)
        raise OSError("simulated failure")

    monkeypatch.setattr("bgplugin.data.dataset.os.replace", crash)
    with pytest.raises(OSError, match="simulated"):
        molecule[:2].save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]


def test_validation_errors(ala2) -> None:
    x = np.zeros((3, 22, 3))
    with pytest.raises(ValueError, match="log_weights_definition is required"):
        Dataset(x, ala2.topology, log_weights=np.zeros(3))
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        Dataset(x, ala2.topology, log_weights=np.array([0.0, np.nan, 0.0]), log_weights_definition="d")
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        Dataset(x, ala2.topology, log_weights=np.zeros(4), log_weights_definition="d")
    with pytest.raises(ValueError, match="topology has 22 atoms"):
        Dataset(np.zeros((3, 21, 3)), ala2.topology)
    with pytest.raises(ValueError, match="n_frames, n_particles, dim"):
        Dataset(np.zeros((22, 3)))


def test_slicing_weights_and_concatenation(molecule: Dataset) -> None:
    sub = molecule[np.array([0, 2, 3])]
    np.testing.assert_array_equal(sub.log_weights, [0.0, 2.5, -np.inf])
    np.testing.assert_allclose(sub.time, [0.0, 0.2, 0.3])
    w = sub.weights()
    np.testing.assert_allclose(w, np.array([1.0, np.exp(2.5), 0.0]) / (1.0 + np.exp(2.5)))
    assert 1.0 <= sub.effective_sample_size() <= 2.0
    both = Dataset.concatenate([molecule[:3], molecule[3:]])
    np.testing.assert_array_equal(both.positions, molecule.positions)
    np.testing.assert_array_equal(both.log_weights, molecule.log_weights)
    with pytest.raises(ValueError, match="log-weights differ"):
        Dataset.concatenate([molecule, Dataset(molecule.positions, molecule.topology)])
