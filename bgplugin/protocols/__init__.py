"""YAML protocols: load them into frozen dataclasses, run them step by step in a resumable run directory.

>>> from bgplugin.protocols import load_protocol, run_protocol
>>> results = run_protocol("quickstart", "runs/quickstart")  # doctest: +SKIP

See ``docs/protocols.md`` for every key.
"""

from bgplugin.protocols.config import (
    MCMCConfig,
    MDConfig,
    ModelConfig,
    ParallelTemperingConfig,
    ProfileConfig,
    Protocol,
    ProtocolError,
    ReportConfig,
    ReweightConfig,
    SampleConfig,
    TrainConfig,
    UmbrellaConfig,
    XTBRelaxConfig,
    bundled_protocols,
    load_protocol,
    protocols_dir,
)
from bgplugin.protocols.run_dir import RunDirectory, RunDirectoryError
from bgplugin.protocols.runner import results_of, run_protocol

__all__ = [
    "MCMCConfig",
    "MDConfig",
    "ModelConfig",
    "ParallelTemperingConfig",
    "ProfileConfig",
    "Protocol",
    "ProtocolError",
    "ReportConfig",
    "ReweightConfig",
    "RunDirectory",
    "RunDirectoryError",
    "SampleConfig",
    "TrainConfig",
    "UmbrellaConfig",
    "XTBRelaxConfig",
    "bundled_protocols",
    "load_protocol",
    "protocols_dir",
    "results_of",
    "run_protocol",
]
