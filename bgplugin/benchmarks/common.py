"""What every benchmark records about where and how it ran."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import torch

import bgplugin


def machine_record() -> dict[str, Any]:
    """Machine, software and time stamp for a benchmark's JSON."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "bgplugin": bgplugin.__version__,
    }
