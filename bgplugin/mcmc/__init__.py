"""Flows inside MCMC: exact Metropolis-Hastings with flow proposals.

- :class:`FlowIndependenceMove`: an openmmtools ``MCMCMove`` that proposes
  from a flow; mixes with ``LangevinDynamicsMove`` in a ``SequenceMove`` and
  runs in ``MCMCSampler``, ``ReplicaExchangeSampler`` and
  ``ParallelTemperingSampler``. :func:`run_flow_mcmc` runs Langevin MD with
  flow moves for a molecular system.
- :class:`MetropolisSampler`: batched torch Metropolis-Hastings (random walk
  and flow proposals) for energies without OpenMM (DW4, LJ13).
- :class:`LatentMCMC`: MALA/HMC in the flow's latent space (neural transport).

See ``docs/mcmc.md``.
"""

from bgplugin.mcmc.latent import InvertibleFlow, LatentMCMC, LatentMCMCResult, LatentMethod
from bgplugin.mcmc.metropolis import ChainSamples, MetropolisResult, MetropolisSampler
from bgplugin.mcmc.moves import (
    FlowIndependenceMove,
    FlowMCMCResult,
    Frame,
    SeededLangevinDynamicsMove,
    chirality_signs,
    run_flow_mcmc,
)
from bgplugin.mcmc.registry import (
    ProposalDensity,
    get_registered_flow,
    register_flow,
    registered_flows,
    resolve_flow,
    unregister_flow,
)

__all__ = [
    "ChainSamples",
    "FlowIndependenceMove",
    "FlowMCMCResult",
    "Frame",
    "InvertibleFlow",
    "LatentMCMC",
    "LatentMCMCResult",
    "LatentMethod",
    "MetropolisResult",
    "MetropolisSampler",
    "ProposalDensity",
    "SeededLangevinDynamicsMove",
    "chirality_signs",
    "get_registered_flow",
    "register_flow",
    "registered_flows",
    "resolve_flow",
    "run_flow_mcmc",
    "unregister_flow",
]
