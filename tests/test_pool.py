"""WorkerPool: results, exceptions, dead and hung workers, broken start-up."""

from __future__ import annotations

import os
import time
from concurrent.futures import wait

import pytest

from bgplugin.energies.pool import PoolBrokenError, WorkerDiedError, WorkerPool


def _square(x: int) -> int:
    return x * x


def _fail(message: str) -> None:
    raise KeyError(message)


def _die() -> None:
    os._exit(7)


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _env(name: str) -> str | None:
    return os.environ.get(name)


@pytest.fixture(scope="module")
def pool():
    p = WorkerPool(2, task_timeout=5)
    yield p
    p.shutdown()


def test_results_and_exceptions(pool: WorkerPool) -> None:
    futures = [pool.submit(_square, i) for i in range(10)]
    assert [f.result(timeout=60) for f in futures] == [i * i for i in range(10)]
    with pytest.raises(KeyError, match="boom"):
        pool.submit(_fail, "boom").result(timeout=60)


def test_workers_are_single_threaded(pool: WorkerPool) -> None:
    assert pool.submit(_env, "OMP_NUM_THREADS").result(timeout=60) == "1"


def test_dead_worker_fails_only_its_task(pool: WorkerPool) -> None:
    restarts = pool.n_restarts
    dead = pool.submit(_die)
    alive = pool.submit(_square, 3)
    with pytest.raises(WorkerDiedError):
        dead.result(timeout=60)
    assert alive.result(timeout=60) == 9
    assert pool.n_restarts == restarts + 1
    assert pool.submit(_square, 4).result(timeout=60) == 16


def test_hung_worker_is_killed_at_the_timeout(pool: WorkerPool) -> None:
    start = time.monotonic()
    hung = pool.submit(_sleep, 600)
    quick = pool.submit(_sleep, 0.1)
    wait([hung, quick], timeout=60)
    with pytest.raises(TimeoutError):
        hung.result()
    assert quick.result() == 0.1
    assert time.monotonic() - start < 30
    assert pool.submit(_square, 5).result(timeout=60) == 25


def test_abandon_kills_a_running_task(pool: WorkerPool) -> None:
    hung = pool.submit(_sleep, 600)
    time.sleep(0.5)
    pool.abandon(hung)
    with pytest.raises(TimeoutError):
        hung.result(timeout=30)


def test_workers_that_die_at_startup_break_the_pool() -> None:
    broken = WorkerPool(1, initializer=_die)
    future = broken.submit(_square, 2)
    with pytest.raises(PoolBrokenError, match="died while starting"):
        future.result(timeout=120)
    with pytest.raises(PoolBrokenError):
        broken.submit(_square, 2)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_workers must be >= 1"):
        WorkerPool(0)
    with pytest.raises(ValueError, match="task_timeout must be > 0"):
        WorkerPool(1, task_timeout=-1)
