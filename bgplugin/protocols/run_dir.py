"""The run directory of a protocol: its copy of the protocol, step states, logs and results.

Layout::

    OUT/
      protocol.yaml     the protocol as run (compared on resume)
      state.json        finished steps with their wall time and summaries
      run.log           the log of every session
      results.json      every number so far (rewritten after each step)
      simulate/ train/ sample/ reweight/ profile/ mcmc/ plots/
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from bgplugin.fileio import atomic_write_text, write_json
from bgplugin.protocols.config import Protocol, load_protocol

__all__ = ["RunDirectory", "RunDirectoryError"]


class RunDirectoryError(RuntimeError):
    """The output folder holds something this run must not overwrite."""


class RunDirectory:
    """Bookkeeping of one protocol run in one folder; a rerun picks up where the last one stopped."""

    def __init__(self, path: str | Path, protocol: Protocol, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.protocol = protocol
        self.path.mkdir(parents=True, exist_ok=True)
        saved = self.path / "protocol.yaml"
        if saved.is_file() and not overwrite:
            previous = load_protocol(saved)
            if previous.to_dict() != protocol.to_dict():
                changed = _changed_keys(previous.to_dict(), protocol.to_dict())
                raise RunDirectoryError(
                    f"{self.path} holds a run of a different protocol (changed: {', '.join(changed[:5])}); "
                    "use another --out folder, or --overwrite to start this one over"
                )
        if overwrite and (self.path / "state.json").exists():
            (self.path / "state.json").unlink()
        atomic_write_text(saved, yaml.safe_dump(protocol.to_dict(), sort_keys=False))
        self._state = self._read_state()

    # ----------------------------------------------------------------- paths
    def step_dir(self, step: str) -> Path:
        """``OUT/<step>/``, created on first use."""
        folder = self.path / step
        folder.mkdir(exist_ok=True)
        return folder

    @property
    def plots_dir(self) -> Path:
        return self.step_dir("plots")

    # ----------------------------------------------------------------- state
    def finished(self, step: str) -> bool:
        return step in self._state["steps"] and self._state["steps"][step].get("finished", False)

    def summary(self, step: str) -> dict[str, Any]:
        """The summary a finished step recorded (empty if it has not run)."""
        return dict(self._state["steps"].get(step, {}).get("summary", {}))

    def mark_finished(self, step: str, summary: dict[str, Any], seconds: float) -> None:
        previous = self._state["steps"].get(step, {})
        self._state["steps"][step] = {
            "finished": True,
            "summary": summary,
            "wall_seconds": float(previous.get("wall_seconds_before", 0.0)) + seconds,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self._write_state()

    def add_partial_time(self, step: str, seconds: float) -> None:
        """Remember time spent on an interrupted step so the reported wall time covers every session."""
        entry = self._state["steps"].setdefault(step, {"finished": False})
        entry["wall_seconds_before"] = float(entry.get("wall_seconds_before", 0.0)) + seconds
        self._write_state()

    def wall_seconds(self) -> dict[str, float]:
        return {
            name: float(entry.get("wall_seconds", entry.get("wall_seconds_before", 0.0)))
            for name, entry in self._state["steps"].items()
        }

    def write_results(self, results: dict[str, Any]) -> Path:
        return write_json(self.path / "results.json", results)

    def _read_state(self) -> dict[str, Any]:
        path = self.path / "state.json"
        if not path.is_file():
            return {"steps": {}}
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RunDirectoryError(f"{path} is not valid JSON ({exc}); delete it to rerun every step") from exc
        if not isinstance(state, dict) or not isinstance(state.get("steps"), dict):
            raise RunDirectoryError(f"{path} is not a bgplugin run state; delete it to rerun every step")
        return state

    def _write_state(self) -> None:
        write_json(self.path / "state.json", self._state)

    def attach_log(self) -> logging.Handler:
        """Append the ``bgplugin`` log to ``run.log`` (remove the returned handler when done)."""
        handler = logging.FileHandler(self.path / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        logger = logging.getLogger("bgplugin")
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        return handler


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[str] = []
        for k in sorted(set(old) | set(new)):
            keys += _changed_keys(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return keys
    return [] if old == new else [prefix or "<root>"]
