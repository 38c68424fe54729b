"""Langevin molecular dynamics with OpenMM: minimise, equilibrate, produce; checkpointed and resumable.

With an ``output`` path, :func:`run_md` keeps its resume state in the folder
``<output>.parts/``: frames are written in segments of ``checkpoint_every``
frames (each segment atomically), and after each segment ``progress.json``
records how many frames exist together with an OpenMM checkpoint of the
Context taken exactly at that frame (positions, velocities and the
integrator's random-number state). A segment on disk but not yet in
``progress.json`` is ignored, so a run killed at any instant resumes from
its last record without a duplicate or a missing frame, and, on the same
platform, continues the very trajectory the uninterrupted run would have
produced. When all frames exist they are assembled into ``output`` (an
mdtraj HDF5 :class:`~bgplugin.data.Dataset`); ``progress.json`` stays
behind, so asking later for more frames with the same output extends the run.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import openmm
from tqdm.auto import tqdm

from bgplugin.data import Dataset, provenance
from bgplugin.fileio import atomic_write_text
from bgplugin.simulation._openmm import (
    MAX_SEED,
    check_md_settings,
    langevin,
    minimize_and_equilibrate,
    platform_and_properties,
    positions_nm,
    require_molecular,
    resolve_seed,
    system_digest,
)
from bgplugin.simulation.chirality import chiral_centers, is_l_amino_acid

logger = logging.getLogger(__name__)

PROGRESS_FORMAT = "bgplugin.md-progress"
#: Settings that must be equal to resume a run (everything that shapes the trajectory).
_RESUME_KEYS = ("system_digest", "n_atoms", "stride", "timestep_fs", "friction_per_ps", "temperature", "seed")


def run_md(
    system: Any,
    n_frames: int,
    stride: int = 100,
    *,
    temperature: float | None = None,
    timestep: float = 1.0,
    friction: float = 1.0,
    seed: int | None = None,
    platform: str = "CPU",
    platform_properties: dict[str, str] | None = None,
    minimize: bool = True,
    equilibration_steps: int = 10_000,
    initial_positions: np.ndarray | None = None,
    output: str | Path | None = None,
    checkpoint_every: int = 1000,
    progress: bool = True,
) -> Dataset:
    """Langevin MD (OpenMM ``LangevinMiddleIntegrator``) of a molecular system.

    Parameters
    ----------
    system : MolecularSystem
        Its ``openmm_system`` (no constraints), ``topology``, ``positions`` and
        ``temperature``.
    n_frames : int
        Frames to produce (in total, counting frames of earlier sessions).
    stride : int
        Integration steps between frames.
    temperature : float or None
        K; default ``system.temperature``.
    timestep : float
        fs. bgplugin's systems are unconstrained: use 1 fs (the default).
    friction : float
        Collision rate, 1/ps.
    seed : int or None
        Seeds the integrator and the initial velocities (1..2**31-1); None
        draws one, recorded in the metadata. On resume the stored seed is used.
    platform : str
        OpenMM platform; ``"Reference"`` is fastest for ~20 atoms.
    platform_properties : dict or None
        Default ``{"Threads": "1"}`` on CPU.
    minimize : bool
        Minimise the energy before equilibration.
    equilibration_steps : int
        Steps between minimisation and the first frame.
    initial_positions : ndarray, shape (n_atoms, 3), nm, or None
        Start here instead of ``system.positions``.
    output : path or None
        Save the dataset here (mdtraj HDF5) and checkpoint in
        ``<output>.parts/``; a rerun with the same path resumes and appends.
    checkpoint_every : int
        Frames per segment/checkpoint.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    Dataset
        ``positions`` (n_frames, n_atoms, 3) nm, ``time`` in ps after
        equilibration, no log-weights (Boltzmann samples), and metadata.
    """
    require_molecular(system, "run_md")
    temperature = float(system.temperature if temperature is None else temperature)
    check_md_settings(temperature, timestep, friction, stride)
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1 frame, got {checkpoint_every}")
    if equilibration_steps < 0:
        raise ValueError(f"equilibration_steps must be >= 0, got {equilibration_steps}")
    omm_platform, properties = platform_and_properties(platform, platform_properties)
    run = _Run(system, temperature, stride, timestep, friction, output)
    state = run.read_progress()
    if state is not None:
        run.check_resume(state, seed)
        seed = int(state["settings"]["seed"])
    seed = resolve_seed(seed)
    run.settings.update(
        seed=seed, platform=platform, minimize=bool(minimize), equilibration_steps=int(equilibration_steps)
    )
    if state is not None and state["n_frames_done"] >= n_frames:
        logger.info("run_md: %s already holds %d frames (asked for %d)", output, state["n_frames_done"], n_frames)
        return run.assemble(state)[:n_frames]

    integrator = langevin(temperature, friction, timestep, seed)
    context = openmm.Context(system.openmm_system, integrator, omm_platform, properties)
    start = time.perf_counter()
    if state is None:
        x0 = system.positions if initial_positions is None else np.asarray(initial_positions, dtype=np.float64)
        if x0.shape != (system.topology.n_atoms, 3):
            raise ValueError(f"initial_positions must have shape ({system.topology.n_atoms}, 3), got {x0.shape}")
        minimize_and_equilibrate(context, integrator, x0, temperature, seed, minimize, equilibration_steps)
        state = run.new_progress()
        state["wall_time_s"] = time.perf_counter() - start
        run.write_progress(state, context, [])
    else:
        run.restore(state, context, integrator)
        logger.info("run_md: resuming %s at frame %d of %d", output, state["n_frames_done"], n_frames)
    state["n_sessions"] = int(state.get("n_sessions", 0)) + 1
    wall_before = float(state.get("wall_time_s", 0.0))
    start = time.perf_counter()

    frames: list[np.ndarray] = []
    bar = tqdm(total=n_frames, initial=state["n_frames_done"], unit="frame", desc="MD", disable=not progress)
    try:
        while state["n_frames_done"] + len(frames) < n_frames:
            integrator.step(stride)
            frames.append(positions_nm(context).astype(np.float32))
            bar.update(1)
            if len(frames) == checkpoint_every or state["n_frames_done"] + len(frames) == n_frames:
                state["wall_time_s"] = wall_before + time.perf_counter() - start
                run.commit(state, context, frames)
                frames = []
    except KeyboardInterrupt:
        # the Context may be a step block ahead of the last recorded frame: keep only the last checkpoint
        if run.parts is not None:
            logger.warning(
                "run_md interrupted: %d frames are checkpointed; rerun with output=%s to resume",
                state["n_frames_done"],
                output,
            )
        raise
    finally:
        bar.close()
    return run.assemble(state)


class _Run:
    """Bookkeeping of one MD run: settings, the in-memory or on-disk segments, the progress record."""

    def __init__(
        self, system: Any, temperature: float, stride: int, timestep: float, friction: float, output: str | Path | None
    ) -> None:
        self.system = system
        self.output = None if output is None else Path(output)
        self.parts = None if output is None else Path(f"{output}.parts")
        self.memory: list[np.ndarray] = []
        self.settings: dict[str, Any] = {
            "system_digest": system_digest(system.openmm_system),
            "n_atoms": int(system.topology.n_atoms),
            "stride": int(stride),
            "timestep_fs": float(timestep),
            "friction_per_ps": float(friction),
            "temperature": float(temperature),
        }

    # ------------------------------------------------------------- progress
    def read_progress(self) -> dict[str, Any] | None:
        if self.parts is None:
            return None
        path = self.parts / "progress.json"
        if not path.is_file():
            if self.output is not None and self.output.exists():
                raise FileExistsError(
                    f"{self.output} exists but has no resume record ({path}); run_md will not overwrite it. "
                    "Choose another output path, or delete the file to start over"
                )
            return None
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is damaged ({exc}); delete {self.parts} and {self.output} to start over") from exc
        if state.get("format") != PROGRESS_FORMAT:
            raise ValueError(f"{path} is not a run_md progress record; delete {self.parts} to start over")
        return state

    def check_resume(self, state: dict[str, Any], seed: int | None) -> None:
        stored = state["settings"]
        wanted = dict(self.settings, seed=stored["seed"] if seed is None else seed)
        diffs = [
            f"{k}: stored {stored.get(k)!r}, now {wanted[k]!r}" for k in _RESUME_KEYS if stored.get(k) != wanted[k]
        ]
        if diffs:
            raise ValueError(
                f"cannot resume {self.output} with different settings ({'; '.join(diffs)}); use the original "
                "settings, or another output path for a new run"
            )

    def new_progress(self) -> dict[str, Any]:
        return {
            "format": PROGRESS_FORMAT,
            "settings": dict(self.settings),
            "n_frames_done": 0,
            "assembled_frames": 0,
            "segments": [],
            "wall_time_s": 0.0,
            "n_sessions": 0,
        }

    def write_progress(self, state: dict[str, Any], context: openmm.Context, segments: list[dict[str, Any]]) -> None:
        if self.parts is None:
            return
        checkpoint = context.createCheckpoint()
        xml = openmm.XmlSerializer.serialize(
            context.getState(getPositions=True, getVelocities=True, getParameters=True)
        )
        state["segments"] = segments
        state["checkpoint"] = base64.b64encode(checkpoint).decode()
        state["state_xml"] = xml
        atomic_write_text(self.parts / "progress.json", json.dumps(state))

    def restore(self, state: dict[str, Any], context: openmm.Context, integrator: openmm.Integrator) -> None:
        try:
            context.loadCheckpoint(base64.b64decode(state["checkpoint"]))
        except openmm.OpenMMException as exc:
            # a checkpoint only loads on the platform (and version) that wrote it
            logger.warning(
                "could not load the OpenMM checkpoint (%s); continuing from the saved positions and velocities "
                "with a new random stream (statistically equivalent, not bitwise identical)",
                exc,
            )
            context.setState(openmm.XmlSerializer.deserialize(state["state_xml"]))
            integrator.setRandomNumberSeed(1 + (int(state["settings"]["seed"]) + state["n_frames_done"]) % MAX_SEED)

    # ------------------------------------------------------------- segments
    def commit(self, state: dict[str, Any], context: openmm.Context, frames: list[np.ndarray]) -> None:
        """Store ``frames`` and advance the progress record to include them."""
        block = np.stack(frames)
        start = state["n_frames_done"]
        if self.parts is None:
            self.memory.append(block)
            state["n_frames_done"] = start + len(block)
            return
        self.parts.mkdir(parents=True, exist_ok=True)
        name = f"segment_{start:010d}.npy"
        tmp = self.parts / f".{name}.tmp"
        with open(tmp, "wb") as handle:
            np.save(handle, block)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.parts / name)
        segments = [*state["segments"], {"file": name, "start": start, "n": len(block)}]
        state["n_frames_done"] = start + len(block)
        self.write_progress(state, context, segments)

    def assemble(self, state: dict[str, Any]) -> Dataset:
        """All frames so far as a Dataset; with an output path also written there (atomically)."""
        n = int(state["n_frames_done"])
        if self.parts is None:
            positions = np.concatenate(self.memory)
        else:
            blocks = []
            if state["assembled_frames"] > 0 and self.output is not None:
                previous = Dataset.load(self.output)
                if len(previous) != state["assembled_frames"]:
                    raise ValueError(
                        f"{self.output} holds {len(previous)} frames but {self.parts}/progress.json expects "
                        f"{state['assembled_frames']}; it was changed outside run_md. Delete both to start over"
                    )
                blocks.append(previous.positions.astype(np.float32))
            for segment in state["segments"]:
                blocks.append(np.load(self.parts / segment["file"]))
            positions = np.concatenate(blocks) if blocks else np.zeros((0, self.settings["n_atoms"], 3), np.float32)
        if len(positions) != n:
            raise ValueError(
                f"found {len(positions)} frames but the progress record says {n}; delete {self.parts} to start over"
            )
        settings = state["settings"]
        dataset = Dataset(
            positions,
            self.system.topology,
            metadata=self.metadata(state, positions),
            time=(np.arange(n) + 1) * settings["stride"] * settings["timestep_fs"] / 1000.0,
        )
        if self.parts is not None and self.output is not None and (state["segments"] or not self.output.exists()):
            dataset.save(self.output)
            old = [self.parts / s["file"] for s in state["segments"]]
            state["assembled_frames"], state["segments"] = n, []
            atomic_write_text(self.parts / "progress.json", json.dumps(state))
            for path in old:
                path.unlink(missing_ok=True)
            logger.info("run_md: wrote %d frames to %s", n, self.output)
        if self.parts is not None:
            referenced = {s["file"] for s in state["segments"]}
            for stray in self.parts.glob("*segment_*"):
                if stray.name not in referenced:
                    stray.unlink(missing_ok=True)
        return dataset

    def metadata(self, state: dict[str, Any], positions: np.ndarray) -> dict[str, Any]:
        settings = state["settings"]
        meta: dict[str, Any] = {
            "system": getattr(self.system, "name", None),
            "temperature": settings["temperature"],
            "units": "nm",
            "engine": "openmm",
            "method": "langevin_md",
            "integrator": "LangevinMiddleIntegrator",
            "settings": {k: v for k, v in settings.items() if k != "seed"},
            "seeds": {"integrator": settings["seed"], "velocities": settings["seed"]},
            "wall_time_s": float(state.get("wall_time_s", 0.0)),
            "n_sessions": int(state.get("n_sessions", 1)),
            "provenance": provenance(),
        }
        chirality = chirality_summary(positions, self.system.topology)
        if chirality is not None:
            meta["chirality"] = chirality
            if chirality["n_all_L"] != chirality["n_frames"]:
                logger.warning(
                    "run_md: %d of %d frames contain a D amino acid; MD cannot invert a chiral centre, so the "
                    "starting structure has one",
                    chirality["n_frames"] - chirality["n_all_L"],
                    chirality["n_frames"],
                )
        return meta


def chirality_summary(positions: np.ndarray, topology: Any) -> dict[str, int] | None:
    """Counts of all-L frames (None for molecules without amino-acid chiral centres)."""
    if not chiral_centers(topology):
        return None
    is_l = is_l_amino_acid(positions, topology)
    return {"n_frames": int(len(is_l)), "n_all_L": int(is_l.sum())}
