"""What every benchmark records about where and how it ran, and how a training benchmark resumes."""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

import bgplugin

#: Where a training benchmark keeps the settings its checkpoint was written with.
SETTINGS_FILE = "bench_settings.json"


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


def resolve_training_settings(
    out: Path,
    requested: dict[str, Any],
    resume: bool,
    keys: Iterable[str],
    what: str,
    older_defaults: dict[str, Any] | None = None,
) -> tuple[dict[str, Any] | None, bool]:
    """Saved settings of a resumable training benchmark in ``out`` (checked against ``requested``), or None.

    Parameters
    ----------
    out : Path
        The benchmark's output folder (``checkpoint.pt`` and :data:`SETTINGS_FILE`).
    requested : dict
        This call's settings.
    resume : bool
        False: start over whatever ``out`` holds.
    keys : iterable of str
        Settings that must match to resume (``max_steps`` only when requested).
    what : str
        The benchmark's name, for the error messages.
    older_defaults : dict, optional
        Values of settings added after a run was written, as that run used them (one level of nested dicts is
        merged: ``{"flow": {"n_transforms": 1}}``); a saved file without them matches a request with them.
        ``schedule_clock`` is always ``"steps"`` for runs written before the time clock existed.

    Returns
    -------
    saved : dict or None
        The settings file of the run to resume, or None to start a new run.
    resumed : bool
    """
    saved_path = out / SETTINGS_FILE
    if not (resume and (out / "checkpoint.pt").is_file()):
        return None, False
    if not saved_path.is_file():
        raise ValueError(
            f"{out} has a checkpoint.pt but no {SETTINGS_FILE}, so it is not a {what} run that can be "
            "resumed; use another out_dir or pass resume=False to overwrite it"
        )
    saved = json.loads(saved_path.read_text())
    filled = dict(saved)
    for key, value in {"schedule_clock": "steps", **(older_defaults or {})}.items():
        if isinstance(value, dict) and isinstance(filled.get(key), dict):
            filled[key] = {**value, **filled[key]}
        else:
            filled.setdefault(key, value)
    compare = [k for k in keys if not (k == "max_steps" and requested[k] is None)]
    changed = [k for k in compare if filled.get(k) != requested[k]]
    if changed:
        detail = ", ".join(f"{k}: {filled.get(k)!r} -> {requested[k]!r}" for k in changed)
        raise ValueError(
            f"{out} holds a run with different training settings ({detail}); use another out_dir, "
            "pass resume=False to start over, or repeat the original settings to resume"
        )
    return filled, True


def auto_ema_decay(ema_decay: float | Literal["auto"] | None, max_steps: int) -> float | None:
    """The EMA decay a run uses: ``"auto"`` averages over about 5 % of the run, at most 1000 steps."""
    if ema_decay == "auto":
        return min(0.999, max(0.0, 1.0 - 20.0 / max_steps)) or None
    return ema_decay


@contextmanager
def nothing() -> Iterator[None]:
    """A context that does nothing (in place of EMA-averaged parameters when there is no EMA)."""
    yield
