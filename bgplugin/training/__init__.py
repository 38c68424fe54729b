"""Training objectives and the training loop.

- :mod:`~bgplugin.training.pairing`: couplings of prior and data batches
  (none, OT, equivariant OT: Hungarian + Kabsch + POT), batched Kabsch.
- :mod:`~bgplugin.training.flow_matching`: conditional flow matching.
- :mod:`~bgplugin.training.likelihood`: maximum likelihood, reverse KL, ML+KL.
- :mod:`~bgplugin.training.trainer`: AdamW, schedules, EMA, clipping, exact
  resume, CSV/PNG logs, step and time budgets.
- :mod:`~bgplugin.training.guard`: skip/clip outlying gradient norms against
  the running median (the coupling-flow optimiser guard), and recognise a
  run-away loss (the trainer's roll-back).
"""

from bgplugin.training.flow_matching import (
    FlowMatching,
    FlowMatchingBatch,
    conditional_flow_matching_loss,
    sample_conditional_path,
)
from bgplugin.training.guard import GradientGuard, GuardDecision, RunawayLoss
from bgplugin.training.likelihood import (
    MLKL,
    DataBatch,
    KLMixture,
    LambdaSchedule,
    MaximumLikelihood,
    ReverseKL,
    linlog_cutoff,
    nll_loss,
    reverse_kl_loss,
)
from bgplugin.training.pairing import (
    Pairing,
    PairingMethod,
    PairingResult,
    aligned_squared_distance,
    equivariant_cost_matrix,
    kabsch_rotation,
    optimal_permutation,
    ot_assignment,
    squared_distance_matrix,
)
from bgplugin.training.trainer import (
    ExponentialMovingAverage,
    LossOutput,
    Objective,
    Trainer,
    TrainerConfig,
    TrainingData,
    TrainingSummary,
    probe_max_steps,
    weighted_mean,
)

__all__ = [
    "MLKL",
    "KLMixture",
    "DataBatch",
    "ExponentialMovingAverage",
    "FlowMatching",
    "FlowMatchingBatch",
    "GradientGuard",
    "GuardDecision",
    "LambdaSchedule",
    "LossOutput",
    "MaximumLikelihood",
    "Objective",
    "Pairing",
    "PairingMethod",
    "PairingResult",
    "ReverseKL",
    "RunawayLoss",
    "Trainer",
    "TrainerConfig",
    "TrainingData",
    "TrainingSummary",
    "aligned_squared_distance",
    "conditional_flow_matching_loss",
    "equivariant_cost_matrix",
    "kabsch_rotation",
    "linlog_cutoff",
    "nll_loss",
    "optimal_permutation",
    "ot_assignment",
    "reverse_kl_loss",
    "sample_conditional_path",
    "squared_distance_matrix",
    "probe_max_steps",
    "weighted_mean",
]
