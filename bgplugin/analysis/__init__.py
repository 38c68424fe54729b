"""Observables from (weighted) samples: free-energy profiles and differences, chirality, plots.

``free_energy_profile(traj_or_samples, "phi")`` and
``free_energy_profile_2d(traj_or_samples, ("phi", "psi"))`` take weighted
trajectories, reweighting results, datasets, mdtraj trajectories or CV
values; ``compare_profiles`` measures a profile against a reference. The
profile and free-energy-difference types and ``delta_f`` are those of
:mod:`bgplugin.simulation`, re-exported here. See ``docs/reweighting.md``.
"""

from bgplugin.analysis.chirality import (
    CHIRALITY_MODES,
    ChiralityClasses,
    ChiralityMode,
    chirality_fraction,
    classify_chirality,
    fix_chirality,
    has_stereocenters,
    mirror,
)
from bgplugin.analysis.plots import (
    plot_energy_histograms,
    plot_profiles_with_reference,
    plot_ramachandran,
    plot_weight_distribution,
)
from bgplugin.analysis.profiles import (
    CVSamples,
    FreeEnergyProfile2D,
    align_to_reference,
    compare_profiles,
    cv_values,
    free_energy_profile,
    free_energy_profile_2d,
)
from bgplugin.simulation.profiles import (
    PHI_NEGATIVE,
    PHI_POSITIVE,
    FreeEnergyDifference,
    FreeEnergyProfile,
    delta_f,
    in_range,
    plot_profile,
)

__all__ = [
    "CHIRALITY_MODES",
    "PHI_NEGATIVE",
    "PHI_POSITIVE",
    "CVSamples",
    "ChiralityClasses",
    "ChiralityMode",
    "FreeEnergyDifference",
    "FreeEnergyProfile",
    "FreeEnergyProfile2D",
    "align_to_reference",
    "chirality_fraction",
    "classify_chirality",
    "compare_profiles",
    "cv_values",
    "delta_f",
    "fix_chirality",
    "free_energy_profile",
    "free_energy_profile_2d",
    "has_stereocenters",
    "in_range",
    "mirror",
    "plot_energy_histograms",
    "plot_profile",
    "plot_profiles_with_reference",
    "plot_ramachandran",
    "plot_weight_distribution",
]
