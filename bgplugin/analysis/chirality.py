r"""Handedness of flow samples of L-amino-acid molecules: measure it, filter or mirror wrong frames.

MD never inverts a stereocentre, but a flow can: an E(3)-equivariant flow
gives a configuration and its mirror image the same density, so an
untrained or imperfect one produces D frames. Each frame is classified with
:func:`bgplugin.simulation.chirality.chirality_volumes` (signed volume of
N, CA, C, CB around every CA; positive for L):

* **all L**: the molecule as intended;
* **all D**: the mirror image of an L frame; reflecting the whole molecule
  (:math:`x \to -x`, :func:`mirror`) flips every centre and repairs it;
* **mixed** (only with two or more centres): a diastereomer, which no
  reflection repairs.

``fix_chirality(..., mode="filter")`` keeps the all-L frames;
``mode="mirror"`` reflects the all-D frames and keeps them too (mixed frames
are dropped in both modes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import mdtraj
import numpy as np

from bgplugin.simulation.chirality import chiral_centers, chirality_volumes

logger = logging.getLogger(__name__)

ChiralityMode = Literal["filter", "mirror", "ignore"]
CHIRALITY_MODES: tuple[str, ...] = ("filter", "mirror", "ignore")


@dataclass(frozen=True)
class ChiralityClasses:
    """Per-frame handedness of a batch of frames.

    Attributes
    ----------
    all_l, all_d, mixed : ndarray of bool, shape (n_frames,)
        Every centre L; every centre D; some of each (two or more centres).
    n_centers : int
        Stereocentres per frame.
    """

    all_l: np.ndarray
    all_d: np.ndarray
    mixed: np.ndarray
    n_centers: int

    @property
    def n_frames(self) -> int:
        return len(self.all_l)

    @property
    def fraction_wrong(self) -> float:
        """Fraction of frames that are not all L (0 for no frames)."""
        return float(np.mean(~self.all_l)) if self.n_frames else 0.0


def has_stereocenters(topology: mdtraj.Topology | None) -> bool:
    """Whether ``topology`` has an amino-acid stereocentre (a residue with N, CA, C and CB)."""
    return topology is not None and bool(chiral_centers(topology))


def classify_chirality(positions: np.ndarray, topology: mdtraj.Topology) -> ChiralityClasses:
    """Classify frames as all-L, all-D or mixed.

    Parameters
    ----------
    positions : ndarray, shape (n_frames, n_atoms, 3) or (n_atoms, 3), nm
    topology : mdtraj.Topology
        Must have at least one residue with N, CA, C and CB.

    Returns
    -------
    ChiralityClasses
    """
    volumes = chirality_volumes(positions, topology)  # validates shapes and that centres exist
    positive = volumes > 0
    all_l = positive.all(axis=1)
    all_d = (~positive).all(axis=1)
    return ChiralityClasses(all_l, all_d, ~(all_l | all_d), int(volumes.shape[1]))


def chirality_fraction(positions: np.ndarray, topology: mdtraj.Topology) -> float:
    """Fraction of frames with the wrong handedness (at least one D centre) for an L-amino-acid molecule.

    Parameters
    ----------
    positions : ndarray, shape (n_frames, n_atoms, 3), nm
    topology : mdtraj.Topology

    Returns
    -------
    float
        In ``[0, 1]``; ``1 - mean(is_l_amino_acid(positions, topology))``.
    """
    return classify_chirality(positions, topology).fraction_wrong


def mirror(positions: np.ndarray) -> np.ndarray:
    r"""Mirror images :math:`(x, y, z) \to (-x, y, z)` of frames (flips every stereocentre).

    Parameters
    ----------
    positions : ndarray, shape (..., n_atoms, 3)

    Returns
    -------
    ndarray, same shape
        A copy; mean-free frames stay mean-free, energies are unchanged.
    """
    out = np.array(positions, copy=True)
    out[..., 0] *= -1.0
    return out


def fix_chirality(
    positions: np.ndarray, topology: mdtraj.Topology, mode: Literal["filter", "mirror"] = "filter"
) -> tuple[np.ndarray, dict[str, Any]]:
    """Remove (``"filter"``) or reflect (``"mirror"``) frames of the wrong handedness.

    Parameters
    ----------
    positions : ndarray, shape (n_frames, n_atoms, 3), nm
    topology : mdtraj.Topology
        With at least one amino-acid stereocentre.
    mode : {"filter", "mirror"}
        ``"filter"`` keeps the all-L frames; ``"mirror"`` also keeps the all-D
        frames, reflected. Mixed frames (some centres D) are dropped in both.

    Returns
    -------
    positions : ndarray, shape (n_kept, n_atoms, 3), nm
        The kept frames, in their original order (mirrored where needed).
    info : dict
        ``keep`` (bool mask over the input frames), ``mirrored`` (bool mask of
        input frames that were reflected), and counts: ``n_frames``,
        ``n_centers``, ``n_wrong``, ``fraction_wrong``, ``n_all_d``,
        ``n_mixed``, ``n_mirrored``, ``n_removed``, ``mode``.

    Notes
    -----
    For importance weights after mirroring, the proposal density of a kept
    frame :math:`y` is :math:`q(y) + q(My)` (:math:`M` the reflection), not
    :math:`q(y)`; :func:`bgplugin.reweighting.reweight` accounts for that.
    """
    if mode not in ("filter", "mirror"):
        raise ValueError(f"mode must be 'filter' or 'mirror', got {mode!r}")
    x = np.asarray(positions)
    classes = classify_chirality(x, topology)
    mirrored = classes.all_d if mode == "mirror" else np.zeros(classes.n_frames, dtype=bool)
    keep = classes.all_l | mirrored
    out = x.copy()
    out[mirrored] = mirror(x[mirrored])
    info = chirality_info(classes, mode, keep, mirrored)
    if info["n_wrong"]:
        logger.info(
            "chirality: %d of %d frames had the wrong handedness (%s): %d mirrored, %d removed",
            info["n_wrong"], info["n_frames"], mode, info["n_mirrored"], info["n_removed"],
        )  # fmt: skip
    return out[keep], {"keep": keep, "mirrored": mirrored, **info}


def chirality_info(
    classes: ChiralityClasses, mode: ChiralityMode, keep: np.ndarray, mirrored: np.ndarray
) -> dict[str, Any]:
    """JSON-serialisable counts of a chirality check and the action taken (no per-frame masks)."""
    n_wrong = int((~classes.all_l).sum())
    return {
        "mode": mode,
        "n_frames": classes.n_frames,
        "n_centers": classes.n_centers,
        "n_wrong": n_wrong,
        "fraction_wrong": classes.fraction_wrong,
        "n_all_d": int(classes.all_d.sum()),
        "n_mixed": int(classes.mixed.sum()),
        "n_mirrored": int(mirrored.sum()),
        "n_removed": int((~keep).sum()),
    }
