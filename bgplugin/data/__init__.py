"""Datasets on disk and in memory: positions, topology, log-weights and metadata in one object and one file."""

from bgplugin.data.dataset import FORMAT_VERSION, Dataset, DatasetFormatError, provenance

__all__ = ["FORMAT_VERSION", "Dataset", "DatasetFormatError", "provenance"]
