"""Unit conversions, in one place.

Inside bgplugin, molecular coordinates are in nm and energies in kT at the
system temperature; particle systems use reduced units throughout. Engines
report kJ/mol (OpenMM) or Hartree/Bohr (xTB); the constants below convert at
the boundary and nowhere else.
"""

from __future__ import annotations

import ase.units as ase_units
import openmm.unit as omm_unit

#: Molar gas constant in kJ/(mol K), from OpenMM's unit system.
GAS_CONSTANT_KJ_PER_MOL_K: float = omm_unit.MOLAR_GAS_CONSTANT_R.value_in_unit(
    omm_unit.kilojoule_per_mole / omm_unit.kelvin
)
#: kJ/mol per Hartree (ASE's CODATA constants, the ones xTB's ASE calculators use).
KJ_PER_MOL_PER_HARTREE: float = ase_units.Hartree / (ase_units.kJ / ase_units.mol)
#: Bohr radii per nanometre.
BOHR_PER_NM: float = 10.0 / ase_units.Bohr


def kt_kj_per_mol(temperature: float) -> float:
    """Thermal energy kT in kJ/mol at ``temperature`` (K)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 K, got {temperature}")
    return GAS_CONSTANT_KJ_PER_MOL_K * float(temperature)
