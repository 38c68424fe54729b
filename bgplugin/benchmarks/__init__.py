"""Benchmarks behind ``bgplugin bench``: each returns a JSON-serialisable dict of numbers."""

from bgplugin.benchmarks.common import machine_record

__all__ = ["machine_record"]
