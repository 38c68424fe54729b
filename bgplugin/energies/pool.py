"""A process pool that survives its workers: a :class:`concurrent.futures.Executor`.

:class:`concurrent.futures.ProcessPoolExecutor` breaks as a whole when one
worker dies, and cannot stop a worker that hangs. Engine workers (an OpenMM
Context or an xTB calculator in each) must do both: :class:`WorkerPool` runs
one process per worker, talks to each through its own pipe, and when a worker
dies or overruns ``task_timeout`` it fails only that worker's task (with
:class:`WorkerDiedError` or :class:`TimeoutError`), kills the process if
needed and starts a fresh one. Workers ignore SIGINT, so Ctrl-C interrupts
the caller, not the engines.

Because it is an ``Executor``, any other executor (a ``ProcessPoolExecutor``,
or a ``dask.distributed`` client's executor) can stand in for it.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Executor, Future
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: One OpenMP / BLAS thread per worker: parallelism comes from processes.
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def single_threaded(env: dict[str, str] | None = None) -> None:
    """Make this (worker) process use one OpenMP / BLAS thread and one torch thread.

    The ``initializer`` of a :class:`concurrent.futures.ProcessPoolExecutor` whose workers run torch.
    """
    import torch

    os.environ.update(SINGLE_THREAD_ENV if env is None else env)
    torch.set_num_threads(1)

_ENV_LOCK = threading.Lock()


class WorkerDiedError(RuntimeError):
    """The worker process running a task exited before returning its result."""


class PoolBrokenError(BrokenExecutor):
    """Workers die while starting up, so no task can ever run."""


#: Consecutive start-up deaths after which the pool gives up.
MAX_STARTUP_FAILURES = 3
#: Seconds a new worker may take to import its modules and report ready.
STARTUP_TIMEOUT = 300.0


@dataclass
class _Task:
    future: Future[Any]
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    task: _Task | None = None
    deadline: float | None = None
    abandoned: bool = field(default=False)
    ready: bool = field(default=False)
    started_at: float = field(default_factory=time.monotonic)


def _worker_main(
    conn: multiprocessing.connection.Connection,
    initializer: Callable[..., None] | None,
    initargs: tuple[Any, ...],
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        fn, args, kwargs = message
        try:
            reply: tuple[str, Any] = ("ok", fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - every exception goes back to the caller
            reply = ("error", exc)
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001 - the result itself could not be pickled
            conn.send(("error", RuntimeError(f"worker result could not be sent back: {exc!r}")))


class WorkerPool(Executor):
    """Process pool whose workers are replaced when they die or hang.

    Parameters
    ----------
    n_workers : int
        Number of worker processes (>= 1).
    task_timeout : float or None
        Seconds one task may run; a worker that overruns is killed and
        replaced, and the task's future raises :class:`TimeoutError`.
    initializer, initargs
        Called once in each (re)started worker.
    mp_context : str
        ``"spawn"`` (default; safe with threads, OpenMM and OpenMP) or ``"forkserver"``.
    env : dict or None
        Environment variables set in the workers from their first instruction
        on (before torch, OpenMM or xTB load their thread pools). Default:
        one OpenMP/BLAS thread per worker (:data:`SINGLE_THREAD_ENV`).
    """

    def __init__(
        self,
        n_workers: int,
        task_timeout: float | None = None,
        initializer: Callable[..., None] | None = None,
        initargs: tuple[Any, ...] = (),
        mp_context: str = "spawn",
        env: dict[str, str] | None = None,
    ) -> None:
        if n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {n_workers}")
        if task_timeout is not None and not task_timeout > 0:
            raise ValueError(f"task_timeout must be > 0 seconds or None, got {task_timeout}")
        self.n_workers = int(n_workers)
        self.task_timeout = task_timeout
        self.n_restarts = 0
        self._initializer = initializer
        self._initargs = initargs
        self._env = dict(SINGLE_THREAD_ENV if env is None else env)
        self._ctx = multiprocessing.get_context(mp_context)
        self._lock = threading.Lock()
        self._pending: deque[_Task] = deque()
        self._shutdown = False
        self._broken: PoolBrokenError | None = None
        self._startup_failures = 0
        self._wake_recv, self._wake_send = self._ctx.Pipe(duplex=False)
        self._workers = [self._start_worker() for _ in range(self.n_workers)]
        self._thread = threading.Thread(target=self._dispatch, name="bgplugin-pool", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- Executor
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._broken is not None:
                raise self._broken
            if self._shutdown:
                raise RuntimeError("cannot submit to a WorkerPool after shutdown(); create a new pool")
            self._pending.append(_Task(future, fn, args, kwargs))
        self._wake()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._pending:
                    self._pending.popleft().future.cancel()
        self._wake()
        if wait:
            self._thread.join()

    def abandon(self, future: Future[Any]) -> None:
        """Give up on a running task: kill its worker and start a fresh one.

        Used by callers whose own deadline passed before the pool's
        ``task_timeout``. A task that is still queued is cancelled instead.
        """
        if future.cancel():
            return
        with self._lock:
            for worker in self._workers:
                if worker.task is not None and worker.task.future is future:
                    worker.abandoned = True
        self._wake()

    @property
    def pids(self) -> list[int | None]:
        """Process ids of the current workers."""
        return [w.process.pid for w in self._workers]

    # --------------------------------------------------------------- internals
    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main, args=(child, self._initializer, self._initargs), daemon=True
        )
        # A spawned child inherits the environment at exec time, so set it around start():
        # OpenMP reads OMP_NUM_THREADS when the child first imports torch/xtb, which may be
        # before any initializer runs (spawn re-imports the parent's __main__ module).
        with _ENV_LOCK:
            saved = {k: os.environ.get(k) for k in self._env}
            os.environ.update(self._env)
            try:
                process.start()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        child.close()
        return _Worker(process, parent)

    def _wake(self) -> None:
        try:
            self._wake_send.send(None)
        except OSError:
            pass

    def _replace(self, index: int, error: BaseException) -> None:
        worker = self._workers[index]
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()
        if worker.task is not None and not worker.task.future.done():
            worker.task.future.set_exception(error)
        worker.task = None
        self._startup_failures = 0 if worker.ready else self._startup_failures + 1
        if self._startup_failures >= MAX_STARTUP_FAILURES:
            self._break()
            return
        self.n_restarts += 1
        logger.warning("worker %s replaced: %s", worker.process.pid, error)
        self._workers[index] = self._start_worker()

    def _break(self) -> None:
        self._broken = PoolBrokenError(
            f"{MAX_STARTUP_FAILURES} worker processes in a row died while starting. If this runs from a "
            "script, guard its entry point with `if __name__ == '__main__':` (spawned workers re-import "
            "the main module); otherwise check that the worker can import bgplugin and its engines."
        )
        logger.error("%s", self._broken)
        for worker in self._workers:
            if worker.task is not None and not worker.task.future.done():
                worker.task.future.set_exception(self._broken)
            worker.task = None
        while self._pending:
            task = self._pending.popleft()
            if not task.future.done():
                task.future.set_exception(self._broken)
        self._shutdown = True

    def _assign(self) -> None:
        now = time.monotonic()
        for worker in self._workers:
            while worker.ready and worker.task is None and self._pending:
                task = self._pending.popleft()
                if not task.future.set_running_or_notify_cancel():
                    continue
                try:
                    worker.conn.send((task.fn, task.args, task.kwargs))
                except Exception as exc:  # noqa: BLE001 - unpicklable task: fail it, keep the worker
                    task.future.set_exception(exc)
                    continue
                worker.task = task
                worker.deadline = None if self.task_timeout is None else now + self.task_timeout

    def _dispatch(self) -> None:
        while True:
            with self._lock:
                if self._broken is None:
                    self._assign()
                busy = [w.task is not None for w in self._workers]
                if self._shutdown and not any(busy) and not self._pending:
                    break
                deadlines = [w.deadline for w in self._workers if w.deadline is not None]
                deadlines += [w.started_at + STARTUP_TIMEOUT for w in self._workers if not w.ready]
                waitables: list[Any] = [self._wake_recv]
                for worker in self._workers:
                    waitables += [worker.conn, worker.process.sentinel]
            timeout = None if not deadlines else max(0.0, min(deadlines) - time.monotonic())
            ready = multiprocessing.connection.wait(waitables, timeout)
            if self._wake_recv in ready:
                while self._wake_recv.poll():
                    self._wake_recv.recv()
            with self._lock:
                now = time.monotonic()
                for index in range(len(self._workers)):
                    if self._broken is None:
                        self._collect(index, ready, now)
        WorkerPool._terminate(self._workers)

    def _collect(self, index: int, ready: list[Any], now: float) -> None:
        worker = self._workers[index]
        task = worker.task
        if worker.conn in ready:
            try:
                kind, payload = worker.conn.recv()
            except (EOFError, OSError):
                self._replace(index, WorkerDiedError(f"worker {worker.process.pid} exited mid-task"))
                return
            if kind == "ready":
                worker.ready = True
                self._startup_failures = 0
                self._assign()
                return
            worker.task, worker.deadline, worker.abandoned = None, None, False
            if task is None:
                return
            if kind == "ok":
                task.future.set_result(payload)
            else:
                task.future.set_exception(payload)
        elif worker.process.sentinel in ready or not worker.process.is_alive():
            code = worker.process.exitcode
            self._replace(index, WorkerDiedError(f"worker {worker.process.pid} died (exit code {code})"))
        elif worker.abandoned:
            self._replace(index, TimeoutError("task abandoned by the caller after its deadline"))
        elif worker.deadline is not None and now >= worker.deadline:
            self._replace(index, TimeoutError(f"task exceeded task_timeout={self.task_timeout} s"))
        elif not worker.ready and now >= worker.started_at + STARTUP_TIMEOUT:
            self._replace(index, WorkerDiedError(f"worker {worker.process.pid} not ready after {STARTUP_TIMEOUT} s"))

    @staticmethod
    def _terminate(workers: list[_Worker]) -> None:
        for worker in workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in workers:
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=2)
