"""What ``bgplugin info`` reports: versions, engines, and a live energy of every bundled system."""

from __future__ import annotations

import logging
import platform
import time
from importlib import metadata
from typing import Any

import numpy as np
import torch

from bgplugin.energies import available_backends, available_platforms
from bgplugin.systems import get_system, list_systems

logger = logging.getLogger(__name__)

#: Distributions whose versions ``bgplugin info`` reports.
PACKAGES = (
    "bgplugin", "torch", "numpy", "scipy", "openmm", "openmmtools", "mdtraj", "pymbar",
    "ase", "xtb", "tblite", "POT", "torchdiffeq", "tables", "h5py",
)  # fmt: skip


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def collect_info(evaluate: bool = True) -> dict[str, Any]:
    """Everything ``bgplugin info`` prints, as a JSON-serialisable dict.

    Parameters
    ----------
    evaluate : bool
        Also evaluate each bundled system's energy at its starting
        configuration (OpenMM and GFN2-xTB for molecules), in-process.
    """
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.system()} {platform.release()}",
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_devices": ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())]),
        "openmm_platforms": available_platforms(),
        "xtb_backends": available_backends(),
        "systems": {},
    }
    for name in list_systems():
        system = get_system(name)
        entry: dict[str, Any] = {
            "description": system.description,
            "n_particles": system.n_particles,
            "dim": system.dim,
            "temperature": system.temperature,
            "n_atom_types": system.n_types,
            "cvs": list(system.cvs),
        }
        if evaluate:
            x = torch.as_tensor(system.positions[None])
            in_process = {"n_workers": 0}
            engines = [("openmm", in_process), ("xtb", in_process)] if system.is_molecule else [("torch", {})]
            for engine, kwargs in engines:
                if engine == "xtb":  # the first installed backend; none installed is reported, not an error
                    installed = [backend for backend, version in info["xtb_backends"].items() if version]
                    if not installed:
                        entry["u_xtb_kT"] = None
                        entry["u_xtb_missing"] = "no xTB backend installed (pip install xtb, or tblite)"
                        continue
                    kwargs = {**kwargs, "backend": installed[0]}
                start = time.perf_counter()
                if engine == "torch":
                    u = system.energy()(x)
                else:
                    energy = system.energy(engine, **kwargs)  # type: ignore[call-arg]
                    u = energy(x)
                    energy.close()  # type: ignore[attr-defined]
                entry[f"u_{engine}_kT"] = float(u[0])
                entry[f"u_{engine}_ms"] = round(1000 * (time.perf_counter() - start), 2)
        info["systems"][name] = entry
    return info


def format_info(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`collect_info`."""
    lines = [f"bgplugin {info['packages']['bgplugin']} on Python {info['python']} ({info['machine']})", ""]
    lines.append("packages:")
    lines += [f"  {k:<12} {v or 'not installed'}" for k, v in info["packages"].items()]
    lines.append(f"torch devices:     {', '.join(info['torch_devices'])}")
    lines.append(f"OpenMM platforms:  {', '.join(info['openmm_platforms'])}")
    backends = [f"{k} {v}" if v else f"{k} (missing)" for k, v in info["xtb_backends"].items()]
    lines.append(f"xTB backends:      {', '.join(backends)}")
    lines += ["", "systems (energy of the starting configuration, in kT):"]
    for name, s in info["systems"].items():
        lines.append(f"  {name}: {s['n_particles']} particles in {s['dim']}D at T={s['temperature']:g}, "
                     f"{s['n_atom_types']} atom types, CVs {s['cvs'] or '-'}")
        lines.append(f"      {s['description']}")
        for key, value in s.items():
            if key.startswith("u_") and key.endswith("_kT"):
                engine = key[2:-3]
                if value is None:
                    lines.append(f"      u[{engine}] not evaluated: {s.get(f'u_{engine}_missing', 'no engine')}")
                    continue
                lines.append(f"      u[{engine}] = {value:.4f} kT  ({s[f'u_{engine}_ms']:.1f} ms)")
    return "\n".join(lines)


def finite_energies(info: dict[str, Any]) -> bool:
    """True when every evaluated energy in ``info`` is finite."""
    values = [v for s in info["systems"].values() for k, v in s.items() if k.endswith("_kT") and v is not None]
    return bool(values) and bool(np.isfinite(values).all())
