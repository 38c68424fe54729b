"""Training data on disk and in memory: positions, topology, log-weights and metadata together.

A :class:`Dataset` is what every engine in :mod:`bgplugin.simulation` returns
and what training reads. On disk it is one HDF5 file:

* molecules (a topology, 3D, nm): an ordinary mdtraj HDF5 trajectory
  (PyTables; ``mdtraj.load`` reads it) with a ``bgplugin`` group added that
  holds the per-frame log-weights (with their definition) and the metadata
  as JSON;
* particle systems (no topology, reduced units, any dimension): the same
  ``bgplugin`` group with the positions inside it (float64).

Writes go to a temporary file in the same folder, which then replaces the
target (``os.replace``), so a crash never leaves a half-written dataset.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Literal

import h5py
import mdtraj
import numpy as np

logger = logging.getLogger(__name__)

#: Value of the ``format`` attribute of the ``bgplugin`` group.
FORMAT_NAME = "bgplugin.dataset"
#: Version of the on-disk layout; files with a higher version are refused.
FORMAT_VERSION = 1
_GROUP = "bgplugin"

Units = Literal["nm", "reduced"]

#: Distributions whose versions :func:`provenance` records.
_PROVENANCE_PACKAGES = (
    "bgplugin", "numpy", "openmm", "openmmtools", "pymbar", "mdtraj", "ase", "xtb", "tblite",
)  # fmt: skip


class DatasetFormatError(ValueError):
    """A file is not a readable bgplugin dataset (truncated, foreign or inconsistent)."""


def provenance() -> dict[str, Any]:
    """Where and with what a dataset was made: UTC time, host, Python and package versions.

    Returns
    -------
    dict
        JSON-serialisable; goes into ``Dataset.metadata["provenance"]``.
    """
    versions: dict[str, str | None] = {}
    for name in _PROVENANCE_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "packages": versions,
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(
        f"metadata value {value!r} of type {type(value).__name__} is not JSON-serialisable; "
        "store numbers, strings, lists, dicts, NumPy arrays or paths"
    )


@dataclass
class Dataset:
    """Frames with optional per-frame log-weights and metadata.

    Parameters
    ----------
    positions : ndarray, shape (n_frames, n_particles, dim)
        nm for molecules, reduced units for particle systems.
    topology : mdtraj.Topology or None
        Required for molecules (then ``dim`` must be 3); None for particle data.
    log_weights : ndarray, shape (n_frames,), or None
        Unnormalised log importance weights of the frames with respect to the
        target ensemble; ``-inf`` means weight 0. None means equal weights.
    log_weights_definition : str or None
        What the log-weights are (e.g. ``"-u(x) - log q(x)"`` or MBAR's
        unbiased weights); required whenever ``log_weights`` is given.
    metadata : dict
        JSON-serialisable: system, temperature, engine, settings, seeds,
        wall time, provenance.
    time : ndarray, shape (n_frames,), or None
        Simulation time of each frame in ps (molecules) or reduced units.
    units : {"nm", "reduced"} or None
        Length unit; default "nm" with a topology, "reduced" without.
    """

    positions: np.ndarray
    topology: mdtraj.Topology | None = None
    log_weights: np.ndarray | None = None
    log_weights_definition: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    time: np.ndarray | None = None
    units: Units | None = None

    def __post_init__(self) -> None:
        positions = np.asarray(self.positions)
        if positions.ndim != 3:
            raise ValueError(f"positions must have shape (n_frames, n_particles, dim), got {positions.shape}")
        if not np.issubdtype(positions.dtype, np.floating):
            positions = positions.astype(np.float64)
        self.positions = positions
        n = len(positions)
        if self.topology is not None:
            if positions.shape[1:] != (self.topology.n_atoms, 3):
                raise ValueError(
                    f"positions have shape {positions.shape[1:]} per frame but the topology has "
                    f"{self.topology.n_atoms} atoms in 3D; pass positions shaped (n_frames, {self.topology.n_atoms}, 3)"
                )
        if self.units is None:
            self.units = "nm" if self.topology is not None else "reduced"
        if self.units not in ("nm", "reduced"):
            raise ValueError(f"units must be 'nm' or 'reduced', got {self.units!r}")
        if self.log_weights is not None:
            log_w = np.asarray(self.log_weights, dtype=np.float64)
            if log_w.shape != (n,):
                raise ValueError(f"log_weights must have shape ({n},) (one per frame), got {log_w.shape}")
            if np.isnan(log_w).any() or np.isposinf(log_w).any():
                raise ValueError(
                    "log_weights contain NaN or +inf; give failed frames log-weight -inf (weight 0) or drop them"
                )
            if not self.log_weights_definition:
                raise ValueError(
                    "log_weights_definition is required with log_weights: say what they are, "
                    "e.g. '-u(x) - log q(x)' or 'MBAR unbiased weights'"
                )
            self.log_weights = log_w
        if self.time is not None:
            t = np.asarray(self.time, dtype=np.float64)
            if t.shape != (n,):
                raise ValueError(f"time must have shape ({n},), got {t.shape}")
            self.time = t
        self.metadata = dict(self.metadata)

    # ------------------------------------------------------------ properties
    @property
    def n_frames(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_particles(self) -> int:
        return int(self.positions.shape[1])

    @property
    def dim(self) -> int:
        return int(self.positions.shape[2])

    def __len__(self) -> int:
        return self.n_frames

    def __getitem__(self, index: int | slice | np.ndarray | Sequence[int]) -> Dataset:
        """Frames ``index`` (int, slice, index or boolean array), with their log-weights and times."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        idx = np.arange(self.n_frames)[index]
        return Dataset(
            self.positions[idx],
            self.topology,
            None if self.log_weights is None else self.log_weights[idx],
            self.log_weights_definition,
            copy.deepcopy(self.metadata),
            None if self.time is None else self.time[idx],
            self.units,
        )

    def __repr__(self) -> str:
        weights = "none" if self.log_weights is None else repr(self.log_weights_definition)
        return (
            f"Dataset(n_frames={self.n_frames}, n_particles={self.n_particles}, dim={self.dim}, "
            f"units={self.units!r}, log_weights={weights}, system={self.metadata.get('system')!r})"
        )

    # --------------------------------------------------------------- weights
    def weights(self) -> np.ndarray:
        """Normalised weights, shape (n_frames,), summing to 1 (equal without log-weights)."""
        if self.n_frames == 0:
            return np.zeros(0)
        if self.log_weights is None:
            return np.full(self.n_frames, 1.0 / self.n_frames)
        if not np.isfinite(self.log_weights).any():
            raise ValueError("every log-weight is -inf: no frame has positive weight")
        w = np.exp(self.log_weights - self.log_weights.max())
        return w / w.sum()

    def effective_sample_size(self) -> float:
        """Kish effective sample size ``1 / sum(w_i^2)`` of the normalised weights."""
        w = self.weights()
        return float(1.0 / np.sum(w**2)) if len(w) else 0.0

    # ------------------------------------------------------------ conversions
    def to_mdtraj(self) -> mdtraj.Trajectory:
        """The frames as an ``mdtraj.Trajectory`` (float32 nm; needs a topology).

        mdtraj trajectories cannot hold weights: use :attr:`log_weights` with it.
        """
        if self.topology is None:
            raise ValueError("this dataset has no topology (particle data); mdtraj needs one")
        return mdtraj.Trajectory(self.positions.astype(np.float32), self.topology, time=self.time)

    @classmethod
    def from_mdtraj(
        cls,
        traj: mdtraj.Trajectory,
        log_weights: np.ndarray | None = None,
        log_weights_definition: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Dataset:
        """A dataset from an mdtraj trajectory (positions in nm, its topology and times)."""
        return cls(
            np.asarray(traj.xyz),
            traj.topology,
            log_weights,
            log_weights_definition,
            dict(metadata or {}),
            np.asarray(traj.time, dtype=np.float64),
            "nm",
        )

    @classmethod
    def from_npy(
        cls,
        path: str | Path,
        n_particles: int | None = None,
        dim: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Dataset:
        """Particle data from a NumPy ``.npy`` file (reduced units, no topology).

        Parameters
        ----------
        path : path
            An array shaped (n_frames, n_particles, dim), or (n_frames,
            n_particles * dim) together with ``n_particles`` and ``dim``.
        n_particles, dim : int or None
            Needed to unflatten a 2D array; checked against a 3D one.
        metadata : dict or None
            Merged over ``{"source": path, "source_sha256": ...}``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no .npy file at {path}")
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise DatasetFormatError(f"{path} is not a NumPy .npy array file (or is truncated): {exc}") from exc
        if array.ndim == 2:
            if n_particles is None or dim is None:
                raise ValueError(f"{path} holds a flat array {array.shape}; pass n_particles and dim to unflatten it")
            if array.shape[1] != n_particles * dim:
                raise ValueError(
                    f"{path}: {array.shape[1]} values per frame do not match n_particles * dim = {n_particles * dim}"
                )
            array = array.reshape(len(array), n_particles, dim)
        elif array.ndim == 3:
            expected = (n_particles or array.shape[1], dim or array.shape[2])
            if array.shape[1:] != expected:
                raise ValueError(f"{path} holds frames of shape {array.shape[1:]}, not {expected}")
        else:
            raise ValueError(f"{path} holds an array of shape {array.shape}; expected (n_frames, n_particles, dim)")
        info: dict[str, Any] = {"source": str(path), "source_sha256": _sha256(path)}
        info.update(metadata or {})
        return cls(array.astype(np.float64), None, metadata=info, units="reduced")

    @classmethod
    def concatenate(cls, datasets: Sequence[Dataset], metadata: dict[str, Any] | None = None) -> Dataset:
        """Frames of several datasets in order (same topology/shape, same log-weight definition)."""
        if not datasets:
            raise ValueError("concatenate needs at least one dataset")
        first = datasets[0]
        for other in datasets[1:]:
            if other.positions.shape[1:] != first.positions.shape[1:]:
                raise ValueError(
                    f"cannot concatenate frames {other.positions.shape[1:]} and {first.positions.shape[1:]}"
                )
            if (other.log_weights is None) != (first.log_weights is None) or (
                other.log_weights_definition != first.log_weights_definition
            ):
                raise ValueError("cannot concatenate datasets whose log-weights differ in presence or definition")
        has_time = all(d.time is not None for d in datasets)
        return cls(
            np.concatenate([d.positions for d in datasets]),
            first.topology,
            None if first.log_weights is None else np.concatenate([d.log_weights for d in datasets]),  # type: ignore[misc]
            first.log_weights_definition,
            copy.deepcopy(first.metadata if metadata is None else metadata),
            np.concatenate([d.time for d in datasets]) if has_time else None,  # type: ignore[misc]
            first.units,
        )

    # -------------------------------------------------------------------- I/O
    def save(self, path: str | Path) -> Path:
        """Write the dataset to one HDF5 file, atomically.

        Molecules become an mdtraj HDF5 trajectory (float32 nm, readable by
        ``mdtraj.load``) plus a ``bgplugin`` group; particle data keep float64
        positions inside the ``bgplugin`` group.

        Returns
        -------
        Path
            ``path``.
        """
        path = Path(path)
        meta_json = json.dumps(self.metadata, default=_json_default)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.h5")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            tmp.unlink()
            if self.topology is not None:
                with mdtraj.formats.HDF5TrajectoryFile(str(tmp), mode="w") as handle:
                    handle.write(
                        coordinates=self.positions.astype(np.float32),
                        time=None if self.time is None else self.time.astype(np.float32),
                    )
                    handle.topology = self.topology
            with h5py.File(tmp, "a") as handle:
                group = handle.create_group(_GROUP)
                group.attrs["format"] = FORMAT_NAME
                group.attrs["format_version"] = FORMAT_VERSION
                group.attrs["units"] = str(self.units)
                group.attrs["n_frames"] = self.n_frames
                group.attrs["metadata"] = meta_json
                if self.topology is None:
                    group.create_dataset("positions", data=self.positions)
                if self.time is not None:
                    group.create_dataset("time", data=self.time)  # float64 (mdtraj keeps float32)
                if self.log_weights is not None:
                    dset = group.create_dataset("log_weights", data=self.log_weights)
                    dset.attrs["definition"] = str(self.log_weights_definition)
            with open(tmp, "rb+") as raw:
                os.fsync(raw.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Dataset:
        """Read a dataset written by :meth:`save`, or any mdtraj HDF5 trajectory.

        Raises
        ------
        FileNotFoundError
            No file at ``path``.
        DatasetFormatError
            The file is truncated, not HDF5, an HDF5 file of another kind, a
            newer format version, or internally inconsistent.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no dataset file at {path}")
        try:
            handle = h5py.File(path, "r")
        except OSError as exc:
            raise DatasetFormatError(
                f"{path} is not a readable HDF5 file ({_hdf5_reason(exc)}): it may be truncated (an interrupted "
                "write or copy) or in another format. Re-create it, or read other trajectory formats with "
                "mdtraj.load(...) and Dataset.from_mdtraj(...)"
            ) from exc
        with handle:
            keys = sorted(handle.keys())
            is_mdtraj = "coordinates" in handle and "topology" in handle
            group = handle.get(_GROUP)
            if group is None and not is_mdtraj:
                raise DatasetFormatError(
                    f"{path} is an HDF5 file but neither a bgplugin dataset nor an mdtraj trajectory "
                    f"(top-level entries: {keys}); write datasets with Dataset.save"
                )
            meta: dict[str, Any] = {}
            log_w = definition = positions = time = None
            units: Units | None = None
            expected_frames = None
            if group is not None:
                fmt = _attr_str(group.attrs.get("format"))
                if fmt != FORMAT_NAME:
                    raise DatasetFormatError(f"{path}: group '{_GROUP}' has format {fmt!r}, expected {FORMAT_NAME!r}")
                version = int(group.attrs.get("format_version", -1))
                if version > FORMAT_VERSION:
                    raise DatasetFormatError(
                        f"{path} uses dataset format version {version}; this bgplugin reads up to "
                        f"{FORMAT_VERSION}: upgrade bgplugin"
                    )
                try:
                    meta = json.loads(_attr_str(group.attrs.get("metadata", "{}")))
                except json.JSONDecodeError as exc:
                    raise DatasetFormatError(f"{path}: the metadata is not valid JSON ({exc})") from exc
                units = _attr_str(group.attrs.get("units")) or None  # type: ignore[assignment]
                expected_frames = int(group.attrs.get("n_frames", -1))
                if "log_weights" in group:
                    log_w = np.asarray(group["log_weights"][()], dtype=np.float64)
                    definition = _attr_str(group["log_weights"].attrs.get("definition"))
                time = np.asarray(group["time"][()], dtype=np.float64) if "time" in group else None
                if not is_mdtraj:
                    if "positions" not in group:
                        raise DatasetFormatError(f"{path}: a bgplugin dataset without topology must hold positions")
                    positions = np.asarray(group["positions"][()])
        topology = None
        if is_mdtraj:
            try:
                traj = mdtraj.load_hdf5(str(path))
            except Exception as exc:  # noqa: BLE001 - PyTables and mdtraj raise many types for broken files
                raise DatasetFormatError(f"{path}: mdtraj could not read the trajectory ({exc!r})") from exc
            positions, topology = traj.xyz, traj.topology
            if group is None:  # a plain mdtraj file: its own frame times
                time = np.asarray(traj.time, dtype=np.float64)
        if positions is None:
            raise DatasetFormatError(f"{path}: no positions found")
        if expected_frames is not None and expected_frames >= 0 and len(positions) != expected_frames:
            raise DatasetFormatError(
                f"{path} holds {len(positions)} frames but its header says {expected_frames}: the file is damaged"
            )
        if log_w is not None and len(log_w) != len(positions):
            raise DatasetFormatError(
                f"{path} holds {len(positions)} frames but {len(log_w)} log-weights: the file is damaged"
            )
        return cls(positions, topology, log_w, definition, meta, time, units)


def _attr_str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _hdf5_reason(exc: OSError) -> str:
    message = str(exc)
    if "(" in message and message.endswith(")"):
        return message[message.index("(") + 1 : -1]
    return message


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
