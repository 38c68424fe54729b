r"""L/D chirality of amino-acid residues from the improper around CA.

For a residue with backbone N, CA, C and side-chain CB, the signed volume

.. math:: V = (N - CA) \cdot [(C - CA) \times (CB - CA)]

is positive for the L (S) configuration and negative for D. Glycine (no CB)
is achiral and skipped. Molecular dynamics cannot invert a chiral centre;
flow samples can, so their L/D content is a quality check.
"""

from __future__ import annotations

import logging

import mdtraj
import numpy as np

logger = logging.getLogger(__name__)


def chiral_centers(topology: mdtraj.Topology) -> list[tuple[int, int, int, int]]:
    """Atom indices ``(N, CA, C, CB)`` of every residue that has all four (amino acids but glycine).

    Parameters
    ----------
    topology : mdtraj.Topology

    Returns
    -------
    list of tuple of int
        One entry per chiral residue, in residue order.
    """
    centers = []
    for residue in topology.residues:
        names = {atom.name: atom.index for atom in residue.atoms}
        if all(name in names for name in ("N", "CA", "C", "CB")):
            centers.append((names["N"], names["CA"], names["C"], names["CB"]))
    return centers


def chirality_volumes(positions: np.ndarray, topology: mdtraj.Topology) -> np.ndarray:
    """Signed volumes V of each chiral residue (V > 0: L).

    Parameters
    ----------
    positions : ndarray, shape (n_frames, n_atoms, 3) or (n_atoms, 3), nm
    topology : mdtraj.Topology

    Returns
    -------
    ndarray, shape (n_frames, n_chiral_residues), nm^3
    """
    x = np.asarray(positions, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[1:] != (topology.n_atoms, 3):
        raise ValueError(f"positions must have shape (n_frames, {topology.n_atoms}, 3), got {x.shape}")
    centers = chiral_centers(topology)
    if not centers:
        raise ValueError(
            "the topology has no residue with N, CA, C and CB atoms, so there is no amino-acid chiral centre to check"
        )
    idx = np.asarray(centers)
    n, ca, c, cb = (x[:, idx[:, k]] for k in range(4))
    a, b, d = n - ca, c - ca, cb - ca
    return np.einsum("fri,fri->fr", a, np.cross(b, d))


def is_l_amino_acid(positions: np.ndarray, topology: mdtraj.Topology) -> np.ndarray:
    """Whether every chiral residue of each frame is L.

    Parameters
    ----------
    positions : ndarray, shape (n_frames, n_atoms, 3) or (n_atoms, 3), nm
    topology : mdtraj.Topology

    Returns
    -------
    ndarray of bool, shape (n_frames,)
    """
    return np.all(chirality_volumes(positions, topology) > 0, axis=1)
