"""What a proposal density must offer, and a process-wide registry of flows for serialised moves.

MCMC moves are copied and serialised by openmmtools' multistate samplers
(``copy.deepcopy`` per thermodynamic state, YAML in the netCDF checkpoint), so
a move cannot carry its flow by value. It carries either the path of a file
written by :meth:`bgplugin.flows.CNF.save` or
:meth:`bgplugin.flows.eacf.EACF.save` (restorable anywhere) or a key of this
registry (restorable in the process that registered the flow).

Augmented flows (:class:`bgplugin.flows.eacf.EACF`) model a joint density
:math:`q(x, a)`; their ``log_prob`` is a random estimate of the marginal, so
the moves use the joint quantities instead (:func:`is_augmented_flow`,
:func:`refreshed_log_ratio`, :func:`sample_with_log_ratio`).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Literal, Protocol, TypeGuard, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "AugmentedProposalDensity",
    "ProposalDensity",
    "flow_device",
    "flow_dtype",
    "get_registered_flow",
    "is_augmented_flow",
    "refreshed_log_ratio",
    "register_flow",
    "registered_flows",
    "resolve_flow",
    "sample_with_log_ratio",
    "unregister_flow",
]

logger = logging.getLogger(__name__)

_FLOWS: dict[str, ProposalDensity] = {}


@runtime_checkable
class ProposalDensity(Protocol):
    """A normalised density that can be sampled: a :class:`bgplugin.flows.CNF` or anything shaped like it.

    Attributes
    ----------
    n_particles, dim : int
        Shape of one configuration.
    """

    n_particles: int
    dim: int

    def sample(self, n_samples: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``x`` (n_samples, n_particles, dim) and ``log q(x)`` (n_samples,) in nats."""
        ...

    def log_prob(self, x: Tensor) -> Tensor:
        """``log q(x)``, shape (batch,), nats, for ``x`` of shape (batch, n_particles, dim)."""
        ...


class AugmentedProposalDensity(ProposalDensity, Protocol):
    r"""A density :math:`q(x, a)` on coordinates and augmented variables (:class:`bgplugin.flows.eacf.EACF`).

    Its ``sample``/``log_prob`` give a random estimate of the marginal
    :math:`\log q(x)` by default; MCMC uses the exact joint quantities below.
    """

    def sample(
        self, n_samples: int, *, generator: torch.Generator | None = None, density: Literal["marginal", "joint"] = ...
    ) -> tuple[Tensor, Tensor]:
        r"""``x`` and, for ``density="joint"``, :math:`\log q(x, a) - \log \pi(a \mid x)` of the drawn ``a``."""
        ...

    def sample_joint(
        self, n_samples: int, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Draw ``x`` (n_samples, n_particles, dim), ``a`` (n_samples, n_aug, n_particles, dim) and ``log q(x, a)``."""
        ...

    def log_prob_joint(self, x: Tensor, a: Tensor) -> Tensor:
        """``log q(x, a)``, shape (batch,), nats."""
        ...

    def log_prob_aug(self, a: Tensor, x: Tensor) -> Tensor:
        r"""``log pi(a | x)`` of the augmented target, shape (batch,), nats."""
        ...

    def sample_aug(self, x: Tensor, n_draws: int | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        r"""Draw ``a ~ pi(a | x)``, shape (batch, n_aug, n_particles, dim) for ``n_draws=None``."""
        ...


_AUGMENTED_METHODS = ("sample_joint", "log_prob_joint", "log_prob_aug", "sample_aug")


def is_augmented_flow(flow: object) -> TypeGuard[AugmentedProposalDensity]:
    """Whether ``flow`` models a joint density of coordinates and augmented variables (an E-ACF).

    True when it has ``sample_joint``, ``log_prob_joint``, ``log_prob_aug`` and ``sample_aug``.
    """
    return all(callable(getattr(flow, name, None)) for name in _AUGMENTED_METHODS)


def refreshed_log_ratio(flow: AugmentedProposalDensity, x: Tensor, generator: torch.Generator | None) -> Tensor:
    r"""A Gibbs draw :math:`a \sim \pi(a \mid x)` for current states, and :math:`\log q(x, a) - \log \pi(a \mid x)`.

    Parameters
    ----------
    x : Tensor, shape (batch, n_particles, dim)
        Current states, centroid removed, on the flow's device and dtype.
    generator : torch.Generator or None
        For the draws of ``a`` (on the flow's device).

    Returns
    -------
    Tensor, shape (batch,)
        Nats; one joint pass of the flow.
    """
    a = flow.sample_aug(x, generator=generator)
    return flow.log_prob_joint(x, a) - flow.log_prob_aug(a, x)


def sample_with_log_ratio(
    flow: AugmentedProposalDensity, n_samples: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    r"""Joint proposals :math:`(y, b) \sim q` and :math:`\log q(y, b) - \log \pi(b \mid y)`.

    Returns
    -------
    y : Tensor, shape (n_samples, n_particles, dim)
        Mean-free coordinates (``b`` is needed only through the log-ratio).
    log_ratio : Tensor, shape (n_samples,)
        Nats; one joint sampling pass of the flow.
    """
    return flow.sample(n_samples, generator=generator, density="joint")


def flow_dtype(flow: ProposalDensity) -> torch.dtype:
    """The floating-point dtype of a flow's tensors (its ``dtype`` attribute, else its first parameter/buffer)."""
    dtype = getattr(flow, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    tensor = _first_tensor(flow)
    return tensor.dtype if tensor is not None and tensor.is_floating_point() else torch.float64


def flow_device(flow: ProposalDensity) -> torch.device:
    """The device of a flow's tensors (its ``device`` attribute, else its first parameter/buffer, else CPU)."""
    device = getattr(flow, "device", None)
    if isinstance(device, torch.device):
        return device
    tensor = _first_tensor(flow)
    return tensor.device if tensor is not None else torch.device("cpu")


def _first_tensor(flow: object) -> Tensor | None:
    if isinstance(flow, torch.nn.Module):
        for tensor in (*flow.parameters(), *flow.buffers()):
            return tensor
    return None


def register_flow(flow: ProposalDensity, key: str | None = None) -> str:
    """Make ``flow`` findable by a key, so that moves holding the key can be copied and serialised.

    Parameters
    ----------
    flow : ProposalDensity
    key : str or None
        The key; None makes a unique one from the class name.

    Returns
    -------
    str
        The key. Registering a different flow under an existing key is an error.
    """
    _check_proposal(flow)
    if key is None:
        key = f"{type(flow).__name__}-{uuid.uuid4().hex[:12]}"
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string or None, got {key!r}")
    if key in _FLOWS and _FLOWS[key] is not flow:
        raise ValueError(f"a different flow is already registered as {key!r}; unregister_flow({key!r}) first")
    _FLOWS[key] = flow
    return key


def get_registered_flow(key: str) -> ProposalDensity:
    """The flow registered under ``key`` in this process."""
    try:
        return _FLOWS[key]
    except KeyError:
        raise KeyError(
            f"no flow is registered as {key!r} in this process (registered: {sorted(_FLOWS)}). A move restored in "
            "another process (e.g. from a sampler's storage) needs its flow on disk: save it with flow.save(path) "
            "and build the move from the path, or call register_flow(flow, key) before restoring"
        ) from None


def unregister_flow(key: str) -> None:
    """Forget the flow registered under ``key`` (moves holding the key can no longer be restored)."""
    if key not in _FLOWS:
        raise KeyError(f"no flow is registered as {key!r}; registered: {sorted(_FLOWS)}")
    del _FLOWS[key]


def registered_flows() -> list[str]:
    """Keys of the flows registered in this process."""
    return sorted(_FLOWS)


def resolve_flow(
    flow: ProposalDensity | str | os.PathLike[str], device: str | torch.device = "auto"
) -> tuple[ProposalDensity, str | None]:
    """A proposal density from a flow object or the path of a saved flow.

    Parameters
    ----------
    flow : ProposalDensity or path-like
        A flow, or a file written by :meth:`bgplugin.flows.CNF.save` or
        :meth:`bgplugin.flows.eacf.EACF.save` (read by :func:`bgplugin.flows.load_flow`).
    device : {"auto", "cpu", "cuda"} or torch.device
        Where to load a flow given by path.

    Returns
    -------
    flow : ProposalDensity
    path : str or None
        The absolute path the flow was loaded from (None for an object).
    """
    if isinstance(flow, str | os.PathLike):
        from bgplugin.flows import load_flow

        path = Path(flow).expanduser().resolve()
        loaded = load_flow(path, device=device)  # type: ignore[arg-type]
        loaded.eval()
        return loaded, str(path)
    _check_proposal(flow)
    return flow, None


def _check_proposal(flow: object) -> None:
    missing = [name for name in ("sample", "log_prob", "n_particles", "dim") if not hasattr(flow, name)]
    if missing:
        raise TypeError(
            f"a proposal density needs sample(n) -> (x, log_q), log_prob(x), n_particles and dim; "
            f"{type(flow).__name__} lacks {missing}. Pass a bgplugin.flows.CNF or the path of a saved one"
        )
