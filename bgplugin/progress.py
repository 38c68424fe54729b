"""Refresh interval of the progress bars of long runs.

A bar redrawn ten times a second is right on a terminal but turns a log file
that stderr is redirected to (``bgplugin bench ... > run.log 2>&1``, a batch
job) into megabytes of carriage returns; such runs refresh every 30 s instead.
Notebook bars (``tqdm.auto`` picks the widget) keep tqdm's default.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm as auto_tqdm

__all__ = ["REDIRECTED_INTERVAL", "bar_mininterval"]

#: Seconds between redraws when stderr is not a terminal.
REDIRECTED_INTERVAL = 30.0


def bar_mininterval() -> float:
    """``mininterval`` for a long-run tqdm bar: 0.1 s (tqdm's default) on a terminal or in a notebook, else 30 s."""
    notebook = any(cls.__module__ == "tqdm.notebook" for cls in auto_tqdm.__mro__)
    terminal = sys.stderr is not None and bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not notebook and not terminal:
        return REDIRECTED_INTERVAL
    return 0.1
