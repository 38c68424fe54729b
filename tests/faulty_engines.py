"""Fault injection around the real OpenMM engine, for the failure-mode tests.

A frame whose first coordinate equals :data:`CRASH` kills the worker process;
one equal to :data:`HANG` makes it sleep. Every other frame is evaluated by the
real OpenMM engine. Lives in its own module so spawned workers can import it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from bgplugin.energies.engine import ChunkResult
from bgplugin.energies.openmm_energy import OpenMMEngine, OpenMMSpec

CRASH = 1234.5
HANG = 4321.5


@dataclass(frozen=True)
class FaultyOpenMMSpec(OpenMMSpec):
    def build(self) -> FaultyOpenMMEngine:
        engine = super().build()
        return FaultyOpenMMEngine(engine.context, self)


class FaultyOpenMMEngine(OpenMMEngine):
    def evaluate(self, x: np.ndarray, need_forces: bool) -> ChunkResult:
        if (x[:, 0, 0] == CRASH).any():
            os._exit(3)
        if (x[:, 0, 0] == HANG).any():
            time.sleep(3600)
        return super().evaluate(x, need_forces)
