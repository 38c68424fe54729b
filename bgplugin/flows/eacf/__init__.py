"""SE(3)-equivariant augmented coupling flows (E-ACF; Midgley et al. 2023).

``build_flow(system, kind="eacf", **hyperparameters)`` returns an :class:`EACF`
with the interface of the CNF (``sample(n) -> (x, log_q)``, ``log_prob(x)``,
``save``) plus the joint quantities of the augmented space
(``sample_joint``, ``log_prob_joint``, ``log_prob_aug``). See ``docs/eacf.md``.
"""

from bgplugin.flows.eacf.egnn import MultiChannelEGNN
from bgplugin.flows.eacf.model import EACF, build_eacf, load_eacf
from bgplugin.flows.eacf.projections import (
    ProjectionKind,
    centre_of_mass_shift,
    collinearity_loss,
    frame,
    n_projection_parameters,
    n_reference_vectors,
    project_transform,
)
from bgplugin.flows.eacf.splines import SplineKind, n_spline_parameters, rational_quadratic, spline

__all__ = [
    "EACF",
    "MultiChannelEGNN",
    "ProjectionKind",
    "SplineKind",
    "build_eacf",
    "centre_of_mass_shift",
    "collinearity_loss",
    "frame",
    "load_eacf",
    "n_projection_parameters",
    "n_reference_vectors",
    "n_spline_parameters",
    "project_transform",
    "rational_quadratic",
    "spline",
]
