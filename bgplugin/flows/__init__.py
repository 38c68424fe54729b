"""Equivariant continuous normalizing flows with exact log-densities.

``build_flow(system, field="egnn" | "kernel", **hyperparameters)`` returns a
:class:`CNF` whose ``sample(n) -> (x, log_q)`` and ``log_prob(x)`` integrate
the divergence exactly (closed form for both fields). See ``docs/flows.md``.
``build_flow(system, kind="eacf", ...)`` returns an equivariant augmented
coupling flow with the same interface (:mod:`bgplugin.flows.eacf`, ``docs/eacf.md``).
"""

from bgplugin.flows.bench import benchmark_divergence, select_rk4_steps
from bgplugin.flows.build import FIELDS, FieldKind, FlowKind, SystemLike, build_flow, load_flow
from bgplugin.flows.cnf import CNF, DeviceSpec, Solver, resolve_device
from bgplugin.flows.divergence import DivergenceMode, ProbeDistribution
from bgplugin.flows.egnn import EGNNField, Symmetry
from bgplugin.flows.field import VectorField
from bgplugin.flows.kernel import KernelField
from bgplugin.flows.prior import (
    CorrelatedMeanFreeGaussian,
    MeanFreeGaussian,
    fit_particle_covariance,
    symmetrised_covariance,
)
from bgplugin.flows.subspace import mean_free_basis

__all__ = [
    "CNF",
    "CorrelatedMeanFreeGaussian",
    "FIELDS",
    "DeviceSpec",
    "DivergenceMode",
    "EGNNField",
    "FieldKind",
    "FlowKind",
    "KernelField",
    "MeanFreeGaussian",
    "ProbeDistribution",
    "Solver",
    "Symmetry",
    "SystemLike",
    "VectorField",
    "benchmark_divergence",
    "build_flow",
    "fit_particle_covariance",
    "load_flow",
    "mean_free_basis",
    "resolve_device",
    "select_rk4_steps",
    "symmetrised_covariance",
]
