"""What is sampled: particles, their interchangeable types, temperature, topology and CVs."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import torch
from scipy.optimize import minimize

from bgplugin.energies import DoubleWellEnergy, Energy, LennardJonesEnergy, OpenMMEnergy, XTBEnergy

logger = logging.getLogger(__name__)

CVType = Literal["dihedral", "angle", "distance"]
_CV_ATOMS = {"dihedral": 4, "angle": 3, "distance": 2}

#: Short names for OpenMM's implicit-solvent force-field files.
IMPLICIT_SOLVENT_FILES = {
    "obc1": "implicit/obc1.xml",
    "obc2": "implicit/obc2.xml",
    "gbn": "implicit/gbn.xml",
    "gbn2": "implicit/gbn2.xml",
    "hct": "implicit/hct.xml",
}


@dataclass(frozen=True)
class CollectiveVariable:
    """A geometric collective variable of a molecule.

    Attributes
    ----------
    name : str
    type : {"dihedral", "angle", "distance"}
    atoms : tuple of int
        Zero-based atom indices (4 for a dihedral, 3 for an angle, 2 for a distance).
    """

    name: str
    type: CVType
    atoms: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.type not in _CV_ATOMS:
            raise ValueError(f"CV {self.name!r}: type must be one of {list(_CV_ATOMS)}, got {self.type!r}")
        if len(self.atoms) != _CV_ATOMS[self.type]:
            raise ValueError(
                f"CV {self.name!r}: a {self.type} needs {_CV_ATOMS[self.type]} atoms, got {list(self.atoms)}"
            )

    @property
    def units(self) -> str:
        return "nm" if self.type == "distance" else "rad"

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Evaluate the CV.

        Parameters
        ----------
        x : Tensor or ndarray, shape (batch, n_atoms, 3), nm

        Returns
        -------
        Same type as ``x``, shape (batch,)
            Radians in (-pi, pi] for dihedrals, [0, pi] for angles, nm for distances.
            Differentiable when ``x`` is a tensor.
        """
        as_numpy = not isinstance(x, torch.Tensor)
        xt = torch.as_tensor(np.asarray(x)) if as_numpy else x
        if xt.ndim != 3 or xt.shape[-1] != 3:
            raise ValueError(f"CV {self.name!r}: x must have shape (batch, n_atoms, 3), got {tuple(xt.shape)}")
        if max(self.atoms) >= xt.shape[1]:
            raise ValueError(f"CV {self.name!r}: atom {max(self.atoms)} out of range for {xt.shape[1]} atoms")
        p = [xt[:, i] for i in self.atoms]
        if self.type == "distance":
            value = (p[1] - p[0]).norm(dim=-1)
        elif self.type == "angle":
            a, b = p[0] - p[1], p[2] - p[1]
            value = torch.atan2(torch.linalg.cross(a, b).norm(dim=-1), (a * b).sum(-1))
        else:
            b0, b1, b2 = p[0] - p[1], p[2] - p[1], p[3] - p[2]
            b1n = b1 / b1.norm(dim=-1, keepdim=True)
            v = b0 - (b0 * b1n).sum(-1, keepdim=True) * b1n
            w = b2 - (b2 * b1n).sum(-1, keepdim=True) * b1n
            value = torch.atan2((torch.linalg.cross(b1n, v) * w).sum(-1), (v * w).sum(-1))
        return value.numpy() if as_numpy else value


class System:
    """Base of everything bgplugin samples.

    Attributes
    ----------
    name : str
    n_particles, dim : int
    temperature : float
        K for molecules, reduced temperature for particle systems.
    units : {"nm", "reduced"}
        Length unit of the coordinates.
    atom_types : ndarray of int, shape (n_particles,)
        Atoms with equal type are interchangeable (permutation equivariance).
    type_names : list of str
        A name for each type code.
    positions : ndarray, shape (n_particles, dim)
        A valid starting configuration.
    cvs : dict of str to CollectiveVariable
    description : str
    """

    units: Literal["nm", "reduced"] = "reduced"

    def __init__(
        self,
        name: str,
        n_particles: int,
        dim: int,
        temperature: float,
        atom_types: np.ndarray,
        type_names: Sequence[str],
        positions: np.ndarray | None,
        cvs: Mapping[str, CollectiveVariable] | None = None,
        description: str = "",
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        atom_types = np.asarray(atom_types, dtype=np.int64)
        if atom_types.shape != (n_particles,):
            raise ValueError(f"atom_types must have shape ({n_particles},), got {atom_types.shape}")
        if positions is not None:
            positions = np.asarray(positions, dtype=np.float64)
            if positions.shape != (n_particles, dim):
                raise ValueError(f"positions must have shape ({n_particles}, {dim}), got {positions.shape}")
        self.name = name
        self.n_particles = int(n_particles)
        self.dim = int(dim)
        self.temperature = float(temperature)
        self.atom_types = atom_types
        self.type_names = list(type_names)
        self._positions = positions
        self.cvs: dict[str, CollectiveVariable] = dict(cvs or {})
        self.description = description

    @property
    def positions(self) -> np.ndarray:
        """A valid starting configuration, shape (n_particles, dim) (a copy)."""
        if self._positions is None:
            self._positions = self._initial_positions()
        return self._positions.copy()

    def _initial_positions(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def n_types(self) -> int:
        return int(self.atom_types.max()) + 1

    @property
    def is_molecule(self) -> bool:
        return False

    def energy(self, **kwargs: Any) -> Energy:
        """The system's reduced energy u(x) in kT (see subclasses for options)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, n_particles={self.n_particles}, dim={self.dim}, "
            f"temperature={self.temperature}, n_types={self.n_types}, cvs={list(self.cvs)})"
        )


class ParticleSystem(System):
    """A particle benchmark (DW, LJ) in reduced units with a torch energy."""

    units = "reduced"

    def __init__(
        self,
        name: str,
        kind: Literal["double_well", "lennard_jones"],
        n_particles: int,
        dim: int,
        temperature: float = 1.0,
        parameters: Mapping[str, float] | None = None,
        description: str = "",
    ) -> None:
        if kind not in _PARTICLE_ENERGIES:
            raise ValueError(f"kind must be one of {list(_PARTICLE_ENERGIES)}, got {kind!r}")
        self.kind = kind
        self.parameters = dict(parameters or {})
        super().__init__(
            name, n_particles, dim, temperature, np.zeros(n_particles, dtype=np.int64), ["particle"], None,
            description=description,
        )

    def _initial_positions(self) -> np.ndarray:
        spacing = self.parameters.get("d0", self.parameters.get("rm", 1.0))
        return _minimised_cluster(self.energy(), self.n_particles, self.dim, spacing)

    def energy(self, **kwargs: Any) -> Energy:
        """The torch energy; ``kwargs`` go to its constructor (e.g. ``failure_policy``)."""
        return _PARTICLE_ENERGIES[self.kind](
            n_particles=self.n_particles, dim=self.dim, temperature=self.temperature, **self.parameters, **kwargs
        )


_PARTICLE_ENERGIES: dict[str, type[DoubleWellEnergy] | type[LennardJonesEnergy]] = {
    "double_well": DoubleWellEnergy,
    "lennard_jones": LennardJonesEnergy,
}


def _minimised_cluster(energy: Energy, n: int, dim: int, spacing: float) -> np.ndarray:
    """A deterministic low-energy configuration: the n grid points nearest the origin, minimised."""
    r = int(np.ceil(n ** (1 / dim))) + 1
    axes = [np.arange(-r, r + 1)] * dim
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, dim).astype(np.float64)
    order = np.lexsort((*grid.T[::-1], (grid**2).sum(1)))
    x0 = grid[order[:n]] * spacing
    x0 -= x0.mean(0)

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        result = energy.evaluate(torch.as_tensor(flat.reshape(1, n, dim)))
        return float(result.u[0]), -result.forces[0].numpy().ravel()

    res = minimize(fun, x0.ravel(), jac=True, method="L-BFGS-B", options={"maxiter": 300})
    x = res.x.reshape(n, dim)
    return x - x.mean(0)


class MolecularSystem(System):
    """A molecule with an OpenMM force field (and optionally GFN2-xTB).

    Attributes (in addition to :class:`System`)
    -------------------------------------------
    topology : mdtraj.Topology
    openmm_system : openmm.System
        Built with NoCutoff and no constraints (flow samples and MCMC moves need
        free bond lengths; MD with it needs a 1 fs step).
    atomic_numbers : ndarray of int, shape (n_atoms,)
    forcefield : list of str
    atom_groups : dict of str to list of int
        Named atom sets, e.g. ``backbone``, usable as ``distinguishable``.
    """

    units = "nm"

    def __init__(
        self,
        name: str,
        topology: mdtraj.Topology,
        positions: np.ndarray,
        openmm_system: openmm.System,
        temperature: float,
        forcefield: Sequence[str],
        cvs: Mapping[str, CollectiveVariable] | None = None,
        atom_groups: Mapping[str, Sequence[int]] | None = None,
        distinguishable: Sequence[int | str] | str | None = None,
        description: str = "",
    ) -> None:
        self.topology = topology
        self.openmm_system = openmm_system
        self.forcefield = list(forcefield)
        self.atom_groups = {k: [int(i) for i in v] for k, v in (atom_groups or {}).items()}
        self.atomic_numbers = np.array([a.element.atomic_number for a in topology.atoms], dtype=np.int64)
        self.distinguishable = self._resolve_atoms(distinguishable, topology)
        atom_types, type_names = element_types(topology, self.distinguishable)
        super().__init__(
            name, topology.n_atoms, 3, temperature, atom_types, type_names, positions, cvs, description
        )
        if openmm_system.getNumConstraints() > 0:
            raise ValueError(
                f"{name}: the OpenMM system has {openmm_system.getNumConstraints()} constraints; bgplugin needs "
                "an unconstrained system (createSystem(..., constraints=None))"
            )

    @property
    def is_molecule(self) -> bool:
        return True

    def _resolve_atoms(
        self, atoms: Sequence[int | str] | str | None, topology: mdtraj.Topology
    ) -> tuple[int, ...]:
        if atoms is None:
            return ()
        if isinstance(atoms, str) and atoms == "all":
            return tuple(range(topology.n_atoms))
        if isinstance(atoms, str):
            if atoms not in self.atom_groups:
                raise ValueError(
                    f"distinguishable={atoms!r} is not an atom group of this system; "
                    f"known groups: {list(self.atom_groups)} and 'all', or pass atom indices"
                )
            atoms = self.atom_groups[atoms]
        indices = []
        for atom in atoms:
            if isinstance(atom, str):
                matches = [a.index for a in topology.atoms if str(a) == atom]
                if len(matches) != 1:
                    raise ValueError(f"atom name {atom!r} matches {len(matches)} atoms; use e.g. 'ALA2-CA' or an index")
                indices.append(matches[0])
            else:
                if not 0 <= int(atom) < topology.n_atoms:
                    raise ValueError(f"atom index {atom} out of range for {topology.n_atoms} atoms")
                indices.append(int(atom))
        return tuple(indices)

    def with_distinguishable(self, atoms: Sequence[int | str] | str | None) -> MolecularSystem:
        """A copy in which ``atoms`` (indices, names like ``'ALA2-CA'``, or a group name) get unique types."""
        return MolecularSystem(
            self.name, self.topology, self.positions, self.openmm_system, self.temperature, self.forcefield,
            self.cvs, self.atom_groups, atoms, self.description,
        )

    def energy(self, engine: Literal["openmm", "xtb"] = "openmm", **kwargs: Any) -> Energy:
        """Reduced energy of the molecule.

        Parameters
        ----------
        engine : {"openmm", "xtb"}
            The force field (``OpenMMEnergy``) or GFN2-xTB (``XTBEnergy``).
        **kwargs
            Passed to the energy's constructor (``n_workers``, ``platform``,
            ``backend``, ``solvent``, ``failure_policy``, ...).
        """
        if engine == "openmm":
            return OpenMMEnergy(self, **kwargs)
        if engine == "xtb":
            kwargs.setdefault("temperature", self.temperature)
            return XTBEnergy(self.atomic_numbers, **kwargs)
        raise ValueError(f"engine must be 'openmm' or 'xtb', got {engine!r}")

    def trajectory(self, x: torch.Tensor | np.ndarray) -> mdtraj.Trajectory:
        """Coordinates (batch, n_atoms, 3) in nm as an mdtraj trajectory."""
        xyz = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if xyz.ndim == 2:
            xyz = xyz[None]
        return mdtraj.Trajectory(xyz.astype(np.float32), self.topology)

    @classmethod
    def from_pdb(
        cls,
        pdb: str | Path,
        forcefield: Sequence[str] = ("amber99sbildn.xml",),
        temperature: float = 300.0,
        implicit_solvent: str | None = None,
        *,
        name: str | None = None,
        cvs: Mapping[str, CollectiveVariable] | None = None,
        atom_groups: Mapping[str, Sequence[int]] | None = None,
        distinguishable: Sequence[int | str] | str | None = None,
        description: str = "",
    ) -> MolecularSystem:
        """Build a system from a PDB file and OpenMM force-field files.

        Parameters
        ----------
        pdb : path
            A PDB with all hydrogens, in the atom order the flow will use.
        forcefield : sequence of str
            OpenMM force-field XML files, e.g. ``["amber99sbildn.xml", "amber99_obc.xml"]``.
        temperature : float
            K.
        implicit_solvent : str or None
            An implicit-solvent XML file, or one of ``obc1, obc2, gbn, gbn2, hct``
            (OpenMM's ``implicit/*.xml``); None for vacuum or when ``forcefield``
            already contains one (e.g. ``amber99_obc.xml``).
        cvs : mapping or None
            Named CVs; by default the backbone dihedrals found by mdtraj
            (``phi``/``psi`` for a dipeptide, ``phi_<resSeq>``... otherwise).
        distinguishable : atoms or group name or None
            Atoms that get unique types (not interchangeable with same-element atoms); ``"all"``
            makes every atom distinguishable (what a flow for one bonded molecule needs).
        """
        path = Path(pdb)
        if not path.is_file():
            raise FileNotFoundError(f"PDB file not found: {path}")
        files = list(forcefield)
        if implicit_solvent is not None:
            files.append(
                implicit_solvent if implicit_solvent.endswith(".xml") else _implicit_file(implicit_solvent)
            )
        pdbfile = app.PDBFile(str(path))
        try:
            ff = app.ForceField(*files)
        except (ValueError, OSError) as exc:
            raise ValueError(f"could not load force field files {files}: {exc}") from exc
        try:
            omm_system = ff.createSystem(pdbfile.topology, nonbondedMethod=app.NoCutoff, constraints=None)
        except ValueError as exc:
            raise ValueError(f"force field {files} does not match {path.name}: {exc}") from exc
        topology = mdtraj.Topology.from_openmm(pdbfile.topology)
        positions = np.asarray(pdbfile.getPositions(asNumpy=True).value_in_unit(openmm.unit.nanometer))
        if cvs is None:
            cvs = backbone_dihedrals(topology, positions)
        return cls(
            name or path.stem, topology, positions, omm_system, temperature, files, cvs, atom_groups,
            distinguishable, description,
        )


def _implicit_file(name: str) -> str:
    if name.lower() not in IMPLICIT_SOLVENT_FILES:
        raise ValueError(
            f"implicit_solvent must be an .xml file or one of {list(IMPLICIT_SOLVENT_FILES)}, got {name!r}"
        )
    return IMPLICIT_SOLVENT_FILES[name.lower()]


def element_types(topology: mdtraj.Topology, distinguishable: Sequence[int] = ()) -> tuple[np.ndarray, list[str]]:
    """Atom types by element, in order of first appearance; ``distinguishable`` atoms get their own types."""
    names: list[str] = []
    types = np.empty(topology.n_atoms, dtype=np.int64)
    for atom in topology.atoms:
        label = f"{atom.element.symbol}:{atom.index}" if atom.index in distinguishable else atom.element.symbol
        if label not in names:
            names.append(label)
        types[atom.index] = names.index(label)
    return types, names


def backbone_dihedrals(topology: mdtraj.Topology, positions: np.ndarray) -> dict[str, CollectiveVariable]:
    """Backbone phi/psi dihedrals found by mdtraj: ``phi``/``psi`` if there is one of each."""
    traj = mdtraj.Trajectory(positions[None].astype(np.float32), topology)
    cvs: dict[str, CollectiveVariable] = {}
    for kind, compute in (("phi", mdtraj.compute_phi), ("psi", mdtraj.compute_psi)):
        indices = compute(traj)[0]
        for quad in indices:
            residue = topology.atom(int(quad[2 if kind == "phi" else 1])).residue
            name = kind if len(indices) == 1 else f"{kind}_{residue.resSeq}"
            cvs[name] = CollectiveVariable(name, "dihedral", tuple(int(i) for i in quad))
    return cvs
