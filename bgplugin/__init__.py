"""bgplugin: Boltzmann generators as a normal part of an OpenMM workflow."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bgplugin")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
