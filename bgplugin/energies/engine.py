"""External engines behind the energy contract: specs, worker-local engines, chunked dispatch.

An :class:`EngineSpec` is a small picklable description of an engine (an
OpenMM system as XML, or an xTB method and atomic numbers). Each worker
process builds the engine from the spec once and keeps it in a worker-local
table keyed by the spec's digest (never by tensor contents), so the same code
runs in bgplugin's own :class:`~bgplugin.energies.pool.WorkerPool`, in any
other :class:`concurrent.futures.Executor` (e.g. a ``dask.distributed``
client's), or in-process when ``n_workers=0``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, Executor, Future, wait
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bgplugin.energies.base import Energy, EnergyResult, FailurePolicy, FrameStatus
from bgplugin.energies.pool import PoolBrokenError, WorkerDiedError, WorkerPool

logger = logging.getLogger(__name__)

#: What one chunk evaluation returns: u (m,) kT, forces (m, n, 3) kT/nm, status (m,) int8.
ChunkResult = tuple[np.ndarray, np.ndarray, np.ndarray]


class Engine:
    """One engine instance living in one worker: evaluates a chunk of frames."""

    def evaluate(self, x: np.ndarray, need_forces: bool) -> ChunkResult:
        """Evaluate frames ``x`` (m, n, 3) in nm; never raises for a bad frame."""
        raise NotImplementedError


@dataclass(frozen=True)
class EngineSpec:
    """Picklable recipe for an :class:`Engine`; subclasses add their fields."""

    def build(self) -> Engine:
        raise NotImplementedError

    @functools.cached_property
    def digest(self) -> str:
        """Content digest: the key of the worker-local engine table."""
        return hashlib.sha256(repr(self).encode()).hexdigest()


_ENGINES: dict[tuple[str, int], Engine] = {}


def evaluate_chunk(spec: EngineSpec, x: np.ndarray, need_forces: bool) -> ChunkResult:
    """Worker entry point: build (once per worker and thread) and run the engine."""
    key = (spec.digest, threading.get_ident())
    engine = _ENGINES.get(key)
    if engine is None:
        engine = _ENGINES[key] = spec.build()
    return engine.evaluate(x, need_forces)


def screen_frames(x: np.ndarray, overlap_distance: float) -> np.ndarray:
    """Status codes for frames that must not reach an engine.

    Parameters
    ----------
    x : ndarray, shape (m, n, 3), nm
    overlap_distance : float
        Frames with two atoms closer than this (nm) are ``OVERLAP``; 0 disables.

    Returns
    -------
    ndarray of int8, shape (m,)
    """
    status = np.zeros(len(x), dtype=np.int8)
    nan = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
    status[nan] = FrameStatus.NAN_COORDINATES
    if overlap_distance > 0 and x.shape[1] > 1:
        i, j = np.triu_indices(x.shape[1], k=1)
        frames = np.flatnonzero(~nan)
        per_block = max(1, 10_000_000 // len(i))  # bound the (frames, pairs) temporary
        for start in range(0, len(frames), per_block):
            block = frames[start : start + per_block]
            d2_min = ((x[block][:, i] - x[block][:, j]) ** 2).sum(axis=-1).min(axis=1)
            status[block[d2_min < overlap_distance**2]] = FrameStatus.OVERLAP
    return status


class EngineEnergy(Energy):
    """An :class:`Energy` computed by an external engine in worker processes.

    Parameters
    ----------
    spec : EngineSpec
        What each worker builds.
    n_particles, temperature, failure_policy
        See :class:`~bgplugin.energies.base.Energy`.
    n_workers : int
        Worker processes; 0 evaluates in the calling process (no timeout then).
    executor : Executor or None
        Use this executor instead of starting a :class:`WorkerPool`.
    chunk_size : int
        Frames per task; batches are split into at least ``n_workers`` chunks.
    timeout : float
        Wall-clock limit of one call in seconds; frames not done by then are
        ``TIMEOUT``. A chunk whose worker dies is split and retried while time
        is left, so only the frame that kills a worker is lost.
    """

    def __init__(
        self,
        spec: EngineSpec,
        n_particles: int,
        temperature: float,
        *,
        n_workers: int = 1,
        executor: Executor | None = None,
        chunk_size: int = 256,
        timeout: float = 600.0,
        failure_policy: FailurePolicy | str = FailurePolicy.INF,
    ) -> None:
        super().__init__(n_particles, 3, temperature, failure_policy)
        if n_workers < 0:
            raise ValueError(f"n_workers must be >= 0 (0 = in-process), got {n_workers}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.spec = spec
        self.n_workers = int(n_workers)
        self.chunk_size = int(chunk_size)
        self.timeout = float(timeout)
        self._own_pool: WorkerPool | None = None
        self._executor = executor
        if executor is None and n_workers > 0:
            self._own_pool = WorkerPool(n_workers, task_timeout=timeout)
            self._executor = self._own_pool

    @property
    def executor(self) -> Executor | None:
        """The executor frames are sent to (None when evaluating in-process)."""
        return self._executor

    def close(self) -> None:
        """Stop the worker processes this energy started (not a caller's executor)."""
        if self._own_pool is not None:
            self._own_pool.shutdown(wait=False, cancel_futures=True)
            self._own_pool = None
            self._executor = None

    def __enter__(self) -> EngineEnergy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001,S110 - interpreter shutdown: nothing left to report to
            pass

    def __getstate__(self) -> dict[str, object]:
        raise TypeError(
            f"{type(self).__name__} holds worker processes and cannot be pickled; "
            "pickle its System (or spec) and build the energy again"
        )

    # --------------------------------------------------------------- internals
    def _evaluate(self, x: Tensor, need_forces: bool) -> EnergyResult:
        xn = x.detach().cpu().numpy().astype(np.float64, copy=False)
        u, f, status = self._dispatch(xn, need_forces)
        return EnergyResult(
            torch.as_tensor(u, dtype=x.dtype, device=x.device),
            torch.as_tensor(f, dtype=x.dtype, device=x.device),
            status,
        )

    def _dispatch(self, x: np.ndarray, need_forces: bool) -> ChunkResult:
        n = len(x)
        u = np.full(n, np.inf)
        f = np.zeros_like(x)
        status = np.zeros(n, dtype=np.int8)
        if n == 0:
            return u, f, status
        executor = self._executor
        if executor is None:
            return evaluate_chunk(self.spec, x, need_forces)
        n_chunks = max(min(self.n_workers or 1, n), -(-n // self.chunk_size))
        deadline = time.monotonic() + self.timeout
        futures: dict[Future[ChunkResult], np.ndarray] = {}

        def submit(idx: np.ndarray) -> None:
            try:
                futures[executor.submit(evaluate_chunk, self.spec, x[idx], need_forces)] = idx
            except PoolBrokenError:
                raise
            except (BrokenExecutor, RuntimeError) as exc:
                logger.warning("executor refused a chunk of %d frames: %s", len(idx), exc)
                status[idx] = FrameStatus.WORKER_DIED

        for idx in np.array_split(np.arange(n), n_chunks):
            submit(idx)
        while futures:
            done, _ = wait(futures, timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_COMPLETED)
            if not done:
                for future, idx in futures.items():
                    status[idx] = FrameStatus.TIMEOUT
                    if isinstance(executor, WorkerPool):
                        executor.abandon(future)
                    else:
                        future.cancel()
                break
            for future in done:
                idx = futures.pop(future)
                try:
                    cu, cf, cs = future.result()
                except PoolBrokenError:
                    raise
                except (WorkerDiedError, BrokenExecutor) as exc:
                    if len(idx) > 1 and time.monotonic() < deadline:
                        logger.warning("worker died on a chunk of %d frames (%s); retrying in halves", len(idx), exc)
                        for half in np.array_split(idx, 2):
                            submit(half)
                    else:
                        status[idx] = FrameStatus.WORKER_DIED
                except TimeoutError:
                    status[idx] = FrameStatus.TIMEOUT
                except Exception as exc:  # noqa: BLE001 - an engine bug must not lose the other chunks
                    logger.error("engine raised on a chunk of %d frames: %r", len(idx), exc)
                    status[idx] = FrameStatus.ENGINE_ERROR
                else:
                    u[idx], status[idx] = cu, cs
                    if need_forces:
                        f[idx] = cf
        return u, f, status
