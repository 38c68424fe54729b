r"""From flow samples to unbiased estimates: importance weights, ESS, clipping, weighted trajectories.

``reweight(flow, energy, n)`` draws samples, evaluates the target energy
(OpenMM force field, GFN2-xTB, particle or biased energies alike) and returns
a :class:`ReweightingResult` with :math:`\log w = -u - \log q`, the ESS, the
chirality check and diagnostics; ``result.to_trajectory(topology)`` gives a
:class:`WeightedTrajectory` (mdtraj frames plus log-weights, one HDF5 file on
disk). See ``docs/reweighting.md``.
"""

from bgplugin.reweighting.sampling import (
    ReweightingResult,
    Sampler,
    proposal_is_reflection_symmetric,
    reweight,
    reweight_samples,
)
from bgplugin.reweighting.trajectory import EQUAL_WEIGHTS_DEFINITION, WeightedTrajectory
from bgplugin.reweighting.weights import (
    LOG_WEIGHTS_DEFINITION,
    TargetLikelihood,
    WeightDiagnostics,
    clip_log_weights,
    ess,
    forward_ess,
    log_weights,
    normalized_weights,
    target_likelihood,
    weight_diagnostics,
)

__all__ = [
    "EQUAL_WEIGHTS_DEFINITION",
    "LOG_WEIGHTS_DEFINITION",
    "ReweightingResult",
    "Sampler",
    "TargetLikelihood",
    "WeightDiagnostics",
    "WeightedTrajectory",
    "clip_log_weights",
    "ess",
    "forward_ess",
    "log_weights",
    "normalized_weights",
    "proposal_is_reflection_symmetric",
    "reweight",
    "reweight_samples",
    "target_likelihood",
    "weight_diagnostics",
]
