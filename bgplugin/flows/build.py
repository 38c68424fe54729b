"""Building a flow for a system, and loading a saved one."""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch

from bgplugin.flows.cnf import (
    CNF,
    SAVE_FORMAT,
    SAVE_VERSION,
    DeviceSpec,
    Solver,
    resolve_device,
)
from bgplugin.flows.divergence import DivergenceMode
from bgplugin.flows.egnn import EGNNField
from bgplugin.flows.field import VectorField
from bgplugin.flows.kernel import KernelField
from bgplugin.flows.prior import CorrelatedMeanFreeGaussian, MeanFreeGaussian, make_prior

if TYPE_CHECKING:
    from bgplugin.flows.eacf import EACF

__all__ = ["FIELDS", "FieldKind", "FlowKind", "SystemLike", "build_flow", "load_flow"]

logger = logging.getLogger(__name__)

FieldKind = Literal["egnn", "kernel"]
FlowKind = Literal["cnf", "eacf"]
FIELDS: dict[str, type[VectorField]] = {"egnn": EGNNField, "kernel": KernelField}


class SystemLike(Protocol):
    """What :func:`build_flow` reads from a system (e.g. ``bgplugin.systems.System``)."""

    n_particles: int
    dim: int
    atom_types: np.ndarray


def build_flow(
    system: SystemLike,
    field: FieldKind = "egnn",
    *,
    kind: FlowKind = "cnf",
    prior_std: float = 1.0,
    prior_covariance: np.ndarray | torch.Tensor | list[list[float]] | None = None,
    solver: Solver = "rk4",
    steps: int = 20,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    divergence: DivergenceMode = "exact",
    n_probes: int = 1,
    adjoint: bool = False,
    compiled: bool = False,
    chunk_size: int | None = None,
    memory_budget_mb: float = 1024.0,
    device: DeviceSpec = "auto",
    dtype: torch.dtype = torch.float32,
    **hyperparameters: Any,
) -> CNF | EACF:
    """Build a flow for a system; the one entry point for users and protocols.

    Parameters
    ----------
    system : SystemLike
        Provides ``n_particles``, ``dim`` and ``atom_types`` (shape (n_particles,)).
    field : {"egnn", "kernel"}
        Velocity field: :class:`~bgplugin.flows.EGNNField` or
        :class:`~bgplugin.flows.KernelField`.
    kind : {"cnf", "eacf"}
        ``"cnf"``: a continuous normalizing flow (default). ``"eacf"``: an
        equivariant augmented coupling flow, :class:`bgplugin.flows.eacf.EACF`;
        ``prior_std``, ``prior_covariance``, ``compiled``, ``device``, ``dtype`` and ``**hyperparameters``
        go to :func:`bgplugin.flows.eacf.build_eacf`, the solver options do not apply.
    prior_std : float
        Standard deviation of the mean-free Gaussian prior (length units).
    prior_covariance : array-like, shape (n_particles, n_particles), optional
        A correlated base instead (:class:`~bgplugin.flows.CorrelatedMeanFreeGaussian`,
        covariance ``C ⊗ I_d``), e.g. ``fit_particle_covariance(frames, system.atom_types)``;
        must be invariant under permutations of equal atom types. For a CNF
        ``prior_std`` is then unused; an E-ACF still uses it as its length scale.
    solver, steps, atol, rtol, divergence, n_probes, adjoint, compiled, chunk_size, memory_budget_mb, device
        See :class:`~bgplugin.flows.CNF`.
    dtype : torch.dtype
        Parameter dtype (float32 or float64).
    **hyperparameters
        Field hyperparameters, e.g. ``hidden=64, n_layers=5, symmetry="SE(n)"``
        for EGNN or ``n_distance_kernels=32, max_distance=5.0`` for the kernel field.

    Returns
    -------
    CNF or EACF
    """
    if kind == "eacf":
        return _build_eacf(system, locals())
    if kind != "cnf":
        raise ValueError(f"kind must be 'cnf' or 'eacf', got {kind!r}")
    if field not in FIELDS:
        raise ValueError(f"field must be one of {sorted(FIELDS)}, got {field!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    atom_types = np.asarray(system.atom_types)
    if atom_types.shape != (system.n_particles,):
        raise ValueError(
            f"system {getattr(system, 'name', '?')!r} has atom_types of shape {atom_types.shape} "
            f"but n_particles={system.n_particles}; the system definition is inconsistent"
        )
    field_class = FIELDS[field]
    allowed = [name for name in inspect.signature(field_class).parameters if name not in ("atom_types", "dim")]
    unknown = sorted(set(hyperparameters) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {field} hyperparameters {unknown}; valid ones are {allowed}")
    vector_field = field_class(atom_types, system.dim, **hyperparameters)
    prior = make_prior(system.n_particles, system.dim, prior_std, prior_covariance, atom_types)
    flow = CNF(
        vector_field,
        prior,
        solver=solver,
        steps=steps,
        atol=atol,
        rtol=rtol,
        divergence=divergence,
        n_probes=n_probes,
        adjoint=adjoint,
        compiled=compiled,
        chunk_size=chunk_size,
        memory_budget_mb=memory_budget_mb,
        device=device,
    ).to(dtype)
    logger.info(
        "built %s flow for %s: %d particles in %d-d, %d parameters, %s",
        field,
        getattr(system, "name", "system"),
        system.n_particles,
        system.dim,
        sum(p.numel() for p in flow.parameters()),
        flow.device,
    )
    return flow


def _build_eacf(system: SystemLike, arguments: dict[str, Any]) -> EACF:
    """The ``kind="eacf"`` branch of :func:`build_flow` (CNF-only options must keep their defaults)."""
    from bgplugin.flows.eacf import build_eacf

    defaults = inspect.signature(build_flow).parameters
    cnf_only = ("field", "solver", "steps", "atol", "rtol", "divergence", "n_probes", "adjoint", "chunk_size",
                "memory_budget_mb")  # fmt: skip
    changed = [name for name in cnf_only if arguments[name] != defaults[name].default]
    if changed:
        raise ValueError(f"{changed} are CNF options and do not apply to kind='eacf'; leave them out")
    return build_eacf(
        system,
        prior_std=arguments["prior_std"],
        prior_covariance=arguments["prior_covariance"],
        device=arguments["device"],
        dtype=arguments["dtype"],
        compiled=arguments["compiled"],
        **arguments["hyperparameters"],
    )


def load_flow(
    path: str | os.PathLike[str], *, device: DeviceSpec = "auto", compiled: bool | None = None
) -> CNF | EACF:
    """Load a flow written by :meth:`CNF.save` or :meth:`bgplugin.flows.eacf.EACF.save`.

    Parameters
    ----------
    path : path-like
        File written by :meth:`CNF.save`.
    device : {"auto", "cpu", "cuda"} or torch.device
        Where to put the loaded flow.
    compiled : bool or None
        ``None`` (default): as saved. ``True`` / ``False`` overrides the saved
        ``compiled`` option, e.g. ``False`` for a short job in a fresh process
        that would otherwise spend a minute or more compiling a flow that was
        trained compiled (compilation happens once per process).

    Returns
    -------
    CNF or EACF
        Same hyperparameters, options, dtype and weights as the saved flow
        (``compiled`` as requested).
    """
    if compiled is not None and not isinstance(compiled, bool):
        raise ValueError(f"compiled must be True, False or None (as saved), got {compiled!r}")
    source = Path(path)
    if not source.is_file():
        raise ValueError(f"no saved flow at {str(source)!r}; check the path (CNF.save writes one file)")
    payload = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(payload, dict) and payload.get("kind") == "eacf":
        from bgplugin.flows.eacf import load_eacf

        return load_eacf(source, device=device, compiled=compiled)
    if not isinstance(payload, dict) or payload.get("format") != SAVE_FORMAT:
        raise ValueError(f"{str(source)!r} is not a file written by CNF.save (format key missing or different)")
    if payload.get("version") != SAVE_VERSION:
        raise ValueError(
            f"{str(source)!r} has save format version {payload.get('version')}, this bgplugin reads "
            f"version {SAVE_VERSION}; load it with the bgplugin version that wrote it"
        )
    kind = payload["field_kind"]
    if kind not in FIELDS:
        raise ValueError(f"{str(source)!r} holds an unknown field kind {kind!r}; known: {sorted(FIELDS)}")
    field = FIELDS[kind](**payload["field"])
    prior_class = CorrelatedMeanFreeGaussian if "covariance" in payload["prior"] else MeanFreeGaussian
    prior = prior_class(**payload["prior"])
    options = payload["options"] if compiled is None else {**payload["options"], "compiled": compiled}
    flow = CNF(field, prior, **options, device="cpu").to(getattr(torch, payload["dtype"]))
    flow.load_state_dict(payload["state_dict"])
    logger.info("loaded %s flow from %s", kind, source)
    return flow.to(resolve_device(device))
