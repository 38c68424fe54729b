"""The system registry, PDB import, atom types and collective variables."""

from __future__ import annotations

import mdtraj
import numpy as np
import pytest
import torch

from bgplugin.energies import DoubleWellEnergy, LennardJonesEnergy, OpenMMEnergy
from bgplugin.systems import CollectiveVariable, MolecularSystem, get_system, list_systems, systems_dir

EXPECTED = {
    "dw4": (4, 2, 1.0, DoubleWellEnergy),
    "lj13": (13, 3, 1.0, LennardJonesEnergy),
    "lj55": (55, 3, 1.0, LennardJonesEnergy),
    "alanine_dipeptide": (22, 3, 300.0, OpenMMEnergy),
    "alanine_dipeptide_vacuum": (22, 3, 300.0, OpenMMEnergy),
}


def test_registry_lists_the_bundled_systems() -> None:
    assert set(EXPECTED) <= set(list_systems())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_get_system(name: str) -> None:
    n, d, temperature, energy_type = EXPECTED[name]
    system = get_system(name)
    assert (system.n_particles, system.dim, system.temperature) == (n, d, temperature)
    assert system.atom_types.shape == (n,) and system.positions.shape == (n, d)
    kwargs = {"n_workers": 0} if system.is_molecule else {}
    energy = system.energy(**kwargs)
    assert isinstance(energy, energy_type)
    u = energy(torch.as_tensor(system.positions[None]))
    assert torch.isfinite(u).all()
    if system.is_molecule:
        assert system.units == "nm"
        assert system.topology.n_atoms == n
        assert system.openmm_system.getNumParticles() == n
        assert system.openmm_system.getNumConstraints() == 0
        assert set(system.cvs) == {"phi", "psi"}
    else:
        assert system.units == "reduced" and (system.atom_types == 0).all()
        assert abs(system.positions.mean(0)).max() < 1e-8


def test_alanine_dipeptide_force_field_and_atom_order(ala2) -> None:
    assert ala2.forcefield == ["amber99sbildn.xml", "amber99_obc.xml"]
    forces = {type(f).__name__ for f in ala2.openmm_system.getForces()}
    assert "GBSAOBCForce" in forces or "CustomGBForce" in forces
    names = [f"{a.residue.name}:{a.name}" for a in ala2.topology.atoms]
    assert names[4] == "ACE:C" and names[6] == "ALA:N" and names[8] == "ALA:CA" and names[16] == "NME:N"
    nb = next(f for f in ala2.openmm_system.getForces() if type(f).__name__ == "NonbondedForce")
    assert nb.getNonbondedMethod() == nb.NoCutoff


def test_implicit_and_vacuum_differ(ala2, ala2_vacuum) -> None:
    x = torch.as_tensor(ala2.positions[None])
    u_imp = ala2.energy(n_workers=0)(x)
    u_vac = ala2_vacuum.energy(n_workers=0)(x)
    assert abs((u_imp - u_vac).item()) > 1.0


def test_from_pdb_reproduces_registered_energies(ala2, ala2_frames: np.ndarray) -> None:
    built = MolecularSystem.from_pdb(
        systems_dir() / "alanine_dipeptide.pdb", forcefield=["amber99sbildn.xml", "amber99_obc.xml"], temperature=300
    )
    x = torch.as_tensor(ala2_frames[:16])
    u_reg = ala2.energy(n_workers=0, platform="Reference")(x)
    u_pdb = built.energy(n_workers=0, platform="Reference")(x)
    assert torch.allclose(u_reg, u_pdb, rtol=1e-10)
    assert built.cvs == ala2.cvs  # phi/psi found by mdtraj equal the registered ones


def test_from_pdb_implicit_solvent_short_name() -> None:
    pdb = systems_dir() / "alanine_dipeptide.pdb"
    obc2 = MolecularSystem.from_pdb(pdb, forcefield=["amber14-all.xml"], implicit_solvent="obc2")
    assert obc2.forcefield[-1] == "implicit/obc2.xml"
    with pytest.raises(ValueError, match="implicit_solvent must be an .xml file or one of"):
        MolecularSystem.from_pdb(pdb, implicit_solvent="water")
    with pytest.raises(FileNotFoundError, match="PDB file not found"):
        MolecularSystem.from_pdb("missing.pdb")


def test_atom_types_by_element_and_distinguishable(ala2) -> None:
    elements = [a.element.symbol for a in ala2.topology.atoms]
    for i in range(22):
        for j in range(22):
            assert (ala2.atom_types[i] == ala2.atom_types[j]) == (elements[i] == elements[j])
    backbone = get_system("alanine_dipeptide", distinguishable="backbone")
    for i in [4, 6, 8, 14, 16]:
        assert (backbone.atom_types == backbone.atom_types[i]).sum() == 1
    by_name = ala2.with_distinguishable(["ALA2-CA", 4])
    assert (by_name.atom_types == by_name.atom_types[8]).sum() == 1
    with pytest.raises(ValueError, match="not an atom group"):
        ala2.with_distinguishable("sidechain")
    with pytest.raises(ValueError, match="out of range"):
        ala2.with_distinguishable([40])


def test_dihedral_cvs_match_mdtraj(ala2, ala2_frames: np.ndarray) -> None:
    traj = mdtraj.Trajectory(ala2_frames.astype(np.float32), ala2.topology)
    np.testing.assert_allclose(ala2.cvs["phi"](ala2_frames), mdtraj.compute_phi(traj)[1][:, 0], atol=1e-5)
    np.testing.assert_allclose(ala2.cvs["psi"](ala2_frames), mdtraj.compute_psi(traj)[1][:, 0], atol=1e-5)
    x = torch.as_tensor(ala2_frames[:2]).requires_grad_(True)
    ala2.cvs["phi"](x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_angle_and_distance_cvs() -> None:
    x = np.array([[[1.0, 0, 0], [0, 0, 0], [0, 2.0, 0]]])
    assert CollectiveVariable("a", "angle", (0, 1, 2))(x)[0] == pytest.approx(np.pi / 2)
    assert CollectiveVariable("d", "distance", (1, 2))(x)[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="needs 4 atoms"):
        CollectiveVariable("bad", "dihedral", (0, 1, 2))


def test_unknown_names_and_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown system 'ala3'; choose one of"):
        get_system("ala3")
    with pytest.raises(ValueError, match="unknown options"):
        get_system("dw4", distinguishable=[0])
    with pytest.raises(ValueError, match="engine must be 'openmm' or 'xtb'"):
        get_system("alanine_dipeptide").energy("dftb")


def test_xtb_energy_from_system(ala2) -> None:
    energy = ala2.energy("xtb", backend="tblite", n_workers=0)
    u = energy(torch.as_tensor(ala2.positions[None]))
    assert torch.isfinite(u).all() and u.item() < -1e4  # bound molecule: large negative in kT
