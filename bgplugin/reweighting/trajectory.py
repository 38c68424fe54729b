"""An mdtraj trajectory and its per-frame log-weights, kept together in memory and on disk.

On disk a :class:`WeightedTrajectory` uses the layout of
:class:`bgplugin.data.Dataset`: an ordinary mdtraj HDF5 trajectory (so
``mdtraj.load(path)`` reads the frames) with a ``bgplugin`` group holding the
log-weights, their definition and the metadata. A file written by one loads
as the other.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mdtraj
import numpy as np
from scipy.special import logsumexp

from bgplugin.data import Dataset
from bgplugin.reweighting.weights import LOG_WEIGHTS_DEFINITION, ess

logger = logging.getLogger(__name__)

#: Definition stored with trajectories that carry no weights of their own.
EQUAL_WEIGHTS_DEFINITION = "equal weights (unweighted frames)"


class WeightedTrajectory:
    """Frames (``mdtraj.Trajectory``, nm) with unnormalised log importance weights.

    Parameters
    ----------
    trajectory : mdtraj.Trajectory
        The frames (float32 nm, as mdtraj keeps them).
    log_weights : array-like, shape (n_frames,), or None
        Log-weights towards the target ensemble; ``-inf`` is weight 0. None
        gives equal weights.
    log_weights_definition : str or None
        What the log-weights are; default ``"-u(x) - log q(x)"`` with weights
        and ``"equal weights (unweighted frames)"`` without.
    metadata : dict or None
        JSON-serialisable information saved with the file.

    Examples
    --------
    >>> wt = result.to_trajectory(system.topology)      # doctest: +SKIP
    >>> wt[wt.log_weights > -np.inf].save("samples.h5")  # doctest: +SKIP
    >>> traj = mdtraj.load("samples.h5")                # doctest: +SKIP
    """

    def __init__(
        self,
        trajectory: mdtraj.Trajectory,
        log_weights: Any | None = None,
        log_weights_definition: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(trajectory, mdtraj.Trajectory):
            raise TypeError(
                f"trajectory must be an mdtraj.Trajectory, got {type(trajectory).__name__}; "
                "build one with mdtraj.Trajectory(xyz_nm, topology)"
            )
        n = trajectory.n_frames
        if log_weights is None:
            log_w = np.zeros(n)
            definition = log_weights_definition or EQUAL_WEIGHTS_DEFINITION
        else:
            log_w = np.asarray(log_weights, dtype=np.float64)
            definition = log_weights_definition or LOG_WEIGHTS_DEFINITION
        if log_w.shape != (n,):
            raise ValueError(f"log_weights must have shape ({n},) (one per frame), got {log_w.shape}")
        if np.isnan(log_w).any() or np.isposinf(log_w).any():
            raise ValueError("log_weights contain NaN or +inf; give frames that failed log-weight -inf (weight 0)")
        self._trajectory = trajectory
        self._log_weights = log_w
        self.log_weights_definition = definition
        self.metadata: dict[str, Any] = dict(metadata or {})

    # ------------------------------------------------------------ properties
    @property
    def trajectory(self) -> mdtraj.Trajectory:
        """The frames."""
        return self._trajectory

    @property
    def log_weights(self) -> np.ndarray:
        """Unnormalised log-weights, shape (n_frames,), float64 (a read-only view)."""
        view = self._log_weights.view()
        view.flags.writeable = False
        return view

    @property
    def topology(self) -> mdtraj.Topology:
        return self._trajectory.topology

    @property
    def xyz(self) -> np.ndarray:
        """Positions, shape (n_frames, n_atoms, 3), float32 nm."""
        return self._trajectory.xyz

    @property
    def n_frames(self) -> int:
        return int(self._trajectory.n_frames)

    @property
    def weights(self) -> np.ndarray:
        """Normalised weights, shape (n_frames,), summing to 1 (0 for ``-inf`` log-weights)."""
        if self.n_frames == 0:
            return np.zeros(0)
        if not np.isfinite(self._log_weights).any():
            raise ValueError("every log-weight is -inf: no frame has positive weight")
        return np.exp(self._log_weights - logsumexp(self._log_weights))

    @property
    def ess(self) -> float:
        """Kish effective sample size as a fraction of ``n_frames`` (see :func:`bgplugin.reweighting.ess`)."""
        return ess(self._log_weights)

    @property
    def n_effective(self) -> float:
        """Kish effective sample size in frames."""
        return self.ess * self.n_frames

    # -------------------------------------------------------------- sequence
    def __len__(self) -> int:
        return self.n_frames

    def __getitem__(self, index: int | slice | np.ndarray | Sequence[int]) -> WeightedTrajectory:
        """Frames ``index`` (int, slice, boolean mask or index array) with their log-weights."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        idx = np.arange(self.n_frames)[index]
        return WeightedTrajectory(
            self._trajectory[idx],
            self._log_weights[idx],
            self.log_weights_definition,
            copy.deepcopy(self.metadata),
        )

    def __repr__(self) -> str:
        ess_text = f"{self.ess:.3g}" if self.n_frames else "n/a"
        return (
            f"WeightedTrajectory(n_frames={self.n_frames}, n_atoms={self._trajectory.n_atoms}, ess={ess_text}, "
            f"log_weights={self.log_weights_definition!r})"
        )

    # ------------------------------------------------------------ conversions
    def to_dataset(self) -> Dataset:
        """The frames as a :class:`~bgplugin.data.Dataset` (float32 nm positions, log-weights, metadata, times)."""
        return Dataset(
            self._trajectory.xyz,
            self._trajectory.topology,
            self._log_weights.copy(),
            self.log_weights_definition,
            copy.deepcopy(self.metadata),
            np.asarray(self._trajectory.time, dtype=np.float64),
            "nm",
        )

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> WeightedTrajectory:
        """A weighted trajectory from a molecular :class:`~bgplugin.data.Dataset` (equal weights if it has none)."""
        if dataset.topology is None:
            raise ValueError(
                "this dataset has no topology (particle data); a WeightedTrajectory needs one. "
                "Use the dataset's positions and log_weights directly"
            )
        traj = dataset.to_mdtraj()
        return cls(traj, dataset.log_weights, dataset.log_weights_definition, copy.deepcopy(dataset.metadata))

    # -------------------------------------------------------------------- I/O
    def save(self, path: str | Path) -> Path:
        """Write an mdtraj HDF5 file (atomically) with the log-weights inside.

        ``mdtraj.load(path)`` reads the frames; :meth:`load` (or
        :meth:`bgplugin.data.Dataset.load`) also reads the log-weights, their
        definition and the metadata. Unit cells are not stored (bgplugin's
        molecules have no periodic box).

        Returns
        -------
        Path
        """
        if self._trajectory.unitcell_vectors is not None:
            logger.warning("WeightedTrajectory.save: the trajectory's unit cell is not stored")
        return self.to_dataset().save(path)

    @classmethod
    def load(cls, path: str | Path) -> WeightedTrajectory:
        """Read a file written by :meth:`save` or :meth:`Dataset.save`, or a plain mdtraj HDF5 file.

        A plain mdtraj file (no ``bgplugin`` group) gives equal weights.
        Raises ``FileNotFoundError`` or :class:`~bgplugin.data.DatasetFormatError`.
        """
        return cls.from_dataset(Dataset.load(path))
