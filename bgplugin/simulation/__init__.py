"""Training data from the engines: OpenMM MD, parallel tempering, umbrella sampling, GFN2-xTB relaxation.

Every engine returns :class:`bgplugin.data.Dataset` objects (positions in nm,
topology, optional log-weights, metadata). Free-energy profiles and
differences along a CV, plots, training-set biasing and the amino-acid
chirality check live here too. The reference runs for alanine dipeptide are in
:mod:`bgplugin.simulation.reference`.
"""

from bgplugin.simulation.biasing import bias_training_set, von_mises_weight
from bgplugin.simulation.chirality import chiral_centers, chirality_volumes, is_l_amino_acid
from bgplugin.simulation.md import run_md
from bgplugin.simulation.profiles import (
    PHI_NEGATIVE,
    PHI_POSITIVE,
    FreeEnergyDifference,
    FreeEnergyProfile,
    delta_f,
    plot_profile,
)
from bgplugin.simulation.tempering import (
    ParallelTemperingResult,
    geometric_temperatures,
    read_parallel_tempering,
    run_parallel_tempering,
)
from bgplugin.simulation.umbrella import (
    UmbrellaOverlapWarning,
    UmbrellaResult,
    analyze_umbrella,
    dihedral_bias_force,
    run_umbrella,
)
from bgplugin.simulation.xtb_relax import RelaxationResult, relax_with_xtb

__all__ = [
    "PHI_NEGATIVE",
    "PHI_POSITIVE",
    "FreeEnergyDifference",
    "FreeEnergyProfile",
    "ParallelTemperingResult",
    "RelaxationResult",
    "UmbrellaOverlapWarning",
    "UmbrellaResult",
    "analyze_umbrella",
    "bias_training_set",
    "chiral_centers",
    "chirality_volumes",
    "delta_f",
    "dihedral_bias_force",
    "geometric_temperatures",
    "is_l_amino_acid",
    "plot_profile",
    "read_parallel_tempering",
    "relax_with_xtb",
    "run_md",
    "run_parallel_tempering",
    "run_umbrella",
    "von_mises_weight",
]
