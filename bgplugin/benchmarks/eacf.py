r"""``bgplugin bench eacf``: train an E-ACF on the published particle data, score it, and time it against the CNF.

:func:`bench_eacf` trains an equivariant augmented coupling flow
(:mod:`bgplugin.flows.eacf`) on DW4 or LJ13 (the splits of
``shared/data``, see :mod:`bgplugin.benchmarks.particles`) by joint maximum
likelihood (``objective="ml"``) or from the energy alone (``"fab"``: FAB
with the :math:`\alpha = 2` divergence; ``"kl"``: joint reverse KL) for a
wall-clock budget, then reports

``nll`` / ``nll_with_prior_constant``
    test NLL of the marginal estimate :math:`\log\hat q_M(x)` (Eq. 21 of the
    paper, ``M = n_marginal`` draws), without / with the prior constant
    :math:`\frac{(N-1)D}{2}\ln 2\pi` (the EFM tables exclude it);
``nll_by_marginal_draws``
    the same NLL from the first ``m`` of the ``M`` draws (m = 1, 5, 20, 100, ...,
    M), with standard errors: how converged the estimate is;
``joint_nll``
    :math:`-\log q(x, a) + \log\pi(a|x)` on test data with one draw of ``a``
    (an upper bound of the NLL, exact in one pass);
``ess`` / ``ess_joint``
    reverse Kish ESS / n of flow samples with marginal-estimate weights
    :math:`-u(x) - \log\hat q_M(x)`, and with the joint weights
    :math:`-u(x) + \log\pi(a|x) - \log q(x, a)` (a lower bound of the marginal ESS);
``forward_ess``
    on test configurations with marginal-estimate weights;
``target_density``
    the NLL of the exact target density on the same test configurations,
    with :math:`\log Z` from the joint importance weights of the flow
    samples, and the paired KL (flow NLL of the marginal estimate minus the
    target's), as in :func:`bgplugin.benchmarks.particles.bench_particles`;
``speed``
    samples/s on this machine for E-ACF joint samples with exact joint log q
    (one pass), E-ACF samples with the M-draw marginal log q, and the CNF of
    this package with its exact log q (closed-form divergence, RK4), and the
    ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from tqdm.auto import tqdm

from bgplugin.benchmarks.common import (
    SETTINGS_FILE,
    auto_ema_decay,
    machine_record,
    nothing,
    resolve_training_settings,
)
from bgplugin.benchmarks.particles import (
    evaluation_subset,
    forward_ess,
    kish_ess,
    load_split,
    prior_constant,
    target_density,
)
from bgplugin.energies.pool import single_threaded
from bgplugin.fileio import atomic_write, write_json
from bgplugin.flows import CNF, build_flow, load_flow
from bgplugin.flows.bench import torch_threads
from bgplugin.flows.cnf import DeviceSpec, resolve_device
from bgplugin.flows.eacf import EACF
from bgplugin.flows.eacf.training import (
    FABAlpha2,
    JointMaximumLikelihood,
    JointReverseKL,
    MarginalMaximumLikelihood,
)
from bgplugin.systems import System, get_system
from bgplugin.training import Trainer, TrainerConfig, TrainingData

__all__ = [
    "EACFObjective",
    "EvaluationWorkers",
    "add_arguments",
    "bench_eacf",
    "bench_eacf_from_args",
    "evaluation_log_ratios",
    "format_eacf",
]

logger = logging.getLogger(__name__)

EACFObjective = Literal["ml", "fab", "kl"]
EACFBenchmark = Literal["dw4", "lj13"]

#: Per-system defaults sized for a CPU: flow size, batch, evaluation counts (DW4: the whole test split, as
#: ``bench dw4`` scores the CNF); the CNF the speed is compared with is the EGNN of ``bench dw4|lj13`` (3 layers,
#: width 32, RK4-20, closed-form divergence).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "dw4": {"prior_std": 1.0, "n_blocks": 4, "hidden": 32, "n_layers": 1, "batch_size": 128, "n_eval_samples": 5000,
            "n_eval_test": 10_000, "cnf": {"hidden": 32, "n_layers": 3}},
    "lj13": {"prior_std": 1.0, "n_blocks": 4, "hidden": 32, "n_layers": 1, "batch_size": 64, "n_eval_samples": 2000,
             "n_eval_test": 1000, "cnf": {"hidden": 32, "n_layers": 3}},
}  # fmt: skip
#: The step-count probe: at most this many steps or seconds (a few steps alone overstate the per-step time:
#: a 5-step probe estimated half the steps a compiled DW4 run then made).
_PROBE_STEPS = 30
_PROBE_SECONDS = 5.0
#: Settings that must match for a run in an existing ``out_dir`` to resume it.
_TRAINING_KEYS = (
    "system", "objective", "flow", "batch_size", "lr", "ema_decay", "schedule_clock", "seed", "max_steps", "n_train",
    "train_draws", "init",
)  # fmt: skip


def _energies(system: System, x: torch.Tensor) -> torch.Tensor:
    """Reduced energies in float64 on the CPU (+inf for failed frames)."""
    return system.energy().evaluate(x.detach().to("cpu", torch.float64), need_forces=False).u


def _timed(fn: Any, repeats: int = 3, device: torch.device | None = None) -> float:
    """Best wall time of ``repeats`` calls (seconds); on a GPU each call ends when its kernels have finished."""

    def synchronise() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    best = math.inf
    for _ in range(repeats):
        synchronise()
        start = time.perf_counter()
        fn()
        synchronise()
        best = min(best, time.perf_counter() - start)
    return best


def _speed(flow: EACF, cnf: CNF, n_eacf: int, n_cnf: int, n_marginal: int) -> dict[str, Any]:
    """Samples/s with log q: E-ACF joint (exact), E-ACF marginal (M draws), CNF (exact).

    The marginal rate is timed on ``n_eacf * 20 / M`` samples (at least 16, at most ``n_eacf``), so each call
    does the work of ``n_eacf`` samples at M = 20: with M = 500 timing all ``n_eacf`` took about 10 minutes.
    """
    n_marginal_samples = max(16, min(n_eacf, n_eacf * 20 // n_marginal))
    with torch.no_grad():
        flow.sample_joint(16)  # warm-up
        joint = _timed(lambda: flow.sample_joint(n_eacf), device=flow.device)
        marginal = _timed(lambda: flow.sample(n_marginal_samples, n_marginal=n_marginal), device=flow.device)
        cnf.sample(4)
        cnf_seconds = _timed(lambda: cnf.sample(n_cnf), repeats=1, device=cnf.device)
    rates = {
        "eacf_joint_samples_per_s": n_eacf / joint,
        "eacf_marginal_samples_per_s": n_marginal_samples / marginal,
        "cnf_samples_per_s": n_cnf / cnf_seconds,
    }
    return {
        **rates,
        "ratio_joint_vs_cnf": rates["eacf_joint_samples_per_s"] / rates["cnf_samples_per_s"],
        "ratio_marginal_vs_cnf": rates["eacf_marginal_samples_per_s"] / rates["cnf_samples_per_s"],
        "n_eacf": n_eacf,
        "n_eacf_marginal": n_marginal_samples,
        "n_cnf": n_cnf,
        "n_marginal": n_marginal,
        "cnf": f"{cnf.field.kind}, {cnf.solver}-{cnf.steps}, divergence {cnf.divergence}",
        "threads": torch.get_num_threads(),
        "device": str(flow.device),
        "method": "best of 3 calls of sample_joint(n_eacf) / sample(n_eacf_marginal, n_marginal=M) for E-ACF, one "
        f"call of CNF.sample(n); no autograd; float32 on {flow.device} (both flows)",
    }


def _nll_by_draws(log_ratios: torch.Tensor, constant: float) -> dict[str, dict[str, float]]:
    """Test NLL (prior constant excluded) of the estimate from the first m of M draws (m = 1, 5, 20, 100, ..., M).

    The M-draw estimate of log q is biased low by O(1/M); the sequence shows how converged the reported NLL is.
    """
    n_draws = log_ratios.shape[0]
    counts = sorted({m for m in (1, 5, 20, 100, 500, 2000) if m < n_draws} | {n_draws})
    table: dict[str, dict[str, float]] = {}
    for m in counts:
        nll = -(torch.logsumexp(log_ratios[:m], 0) - math.log(m))
        ok = torch.isfinite(nll)
        table[str(m)] = {
            "nll": float(nll[ok].mean()) - constant,
            "nll_stderr": float(nll[ok].std() / math.sqrt(max(1, int(ok.sum())))),
        }
    return table


#: Test configurations per block of the resumable test-set estimate (each block: its own seeded draws).
EVAL_BLOCK = 50
#: The saved test-set log-ratios of an unfinished evaluation, in the run folder.
EVAL_CACHE = "eval_log_ratios.npz"
#: The same for the flow samples' marginal estimate (the reverse ESS).
EVAL_SAMPLES_CACHE = "eval_sample_log_ratios.npz"


def _weights_digest(flow: EACF) -> str:
    """SHA-256 of the flow's parameters and buffers (names and bytes): which weights a set of workers holds."""
    digest = hashlib.sha256(str(flow.dtype).encode())
    _update_with_weights(digest, flow)
    return digest.hexdigest()


def _update_with_weights(digest: Any, flow: EACF) -> None:
    for name, value in sorted(flow.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())


def _evaluation_key(flow: EACF, x_test: torch.Tensor, n_marginal: int, seed: int) -> str:
    """Hash of everything the test-set log-ratios depend on: the flow's weights, the configurations, M, the seed."""
    digest = hashlib.sha256(f"{n_marginal} {seed} {EVAL_BLOCK} {flow.dtype}".encode())
    _update_with_weights(digest, flow)
    digest.update(x_test.detach().cpu().double().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _block_log_ratios(flow: EACF, block: torch.Tensor, n_marginal: int, seed: int, start: int) -> np.ndarray:
    """The log-ratios of one evaluation block: M draws from the block's own generator (``seed``, ``start``)."""
    generator = torch.Generator(flow.device).manual_seed(seed * 1_000_003 + start)
    with torch.no_grad():
        draws = flow.sample_aug(block, n_marginal, generator=generator)
        return flow.augmented_log_ratios(block, draws).double().cpu().numpy()


#: The flow of an evaluation worker process (set by :func:`_init_evaluation_worker`).
_WORKER_FLOW: EACF | None = None


def _init_evaluation_worker(flow_path: str) -> None:
    global _WORKER_FLOW
    single_threaded()
    flow = load_flow(flow_path, device="cpu")
    if not isinstance(flow, EACF):  # pragma: no cover - the parent saved an EACF
        raise TypeError(f"{flow_path} is not an E-ACF")
    _WORKER_FLOW = flow.eval()


def _worker_block_log_ratios(block: torch.Tensor, n_marginal: int, seed: int, start: int) -> np.ndarray:
    if _WORKER_FLOW is None:  # pragma: no cover - the initializer always runs first
        raise RuntimeError("evaluation worker started without its flow")
    return _block_log_ratios(_WORKER_FLOW, block, n_marginal, seed, start)


def _check_worker_count(n_workers: Any, name: str = "n_workers") -> int:
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {n_workers!r}; use 1 for no worker processes")
    return n_workers


class EvaluationWorkers:
    """CPU worker processes for :func:`evaluation_log_ratios`, shared by several estimates of one flow.

    Each worker is a spawned process with one torch thread that loads the flow once (from a temporary file written
    by :meth:`EACF.save`) and compiles it once, however many estimates use it: ``bench eacf`` scores the test set and
    the flow's samples with the same workers. The processes start at the first block that needs them (an estimate
    read whole from its cache starts none) and stop when the ``with`` block ends (or at :meth:`close`). The flow's
    weights are fingerprinted on entry; an estimate of a flow with other weights is refused.

    Parameters
    ----------
    flow : EACF
        The flow the workers compute; its weights as they are now.
    n_workers : int
        Processes (>= 1). With one, or for a flow on a GPU, the blocks are computed in the calling process.

    Examples
    --------
    >>> with EvaluationWorkers(flow, 2) as workers:  # doctest: +SKIP
    ...     test = evaluation_log_ratios(flow, x_test, 2000, seed=0, n_workers=workers)
    ...     samples = evaluation_log_ratios(flow, x, 2000, seed=1, n_workers=workers)
    """

    def __init__(self, flow: EACF, n_workers: int) -> None:
        self.n_workers = _check_worker_count(n_workers)
        self.flow = flow
        self.in_process = n_workers == 1 or flow.device.type != "cpu"
        self._weights = _weights_digest(flow)
        self._folder: Any = None
        self._pool: Any = None

    def __enter__(self) -> EvaluationWorkers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "in process" if self.in_process else ("running" if self._pool is not None else "not started")
        return f"EvaluationWorkers(n_workers={self.n_workers}, {state})"

    def check_flow(self, flow: EACF) -> None:
        """Refuse a flow other than the one the workers were made for (another object or changed weights)."""
        if flow is not self.flow or _weights_digest(flow) != self._weights:
            raise ValueError(
                "these EvaluationWorkers were made for another flow or for other weights of this one; "
                "make new ones (EvaluationWorkers(flow, n_workers)) after changing the flow"
            )

    def _started(self) -> Any:
        if self._pool is None:
            import multiprocessing
            import tempfile
            from concurrent.futures import ProcessPoolExecutor

            self._folder = tempfile.TemporaryDirectory(prefix="bgplugin_eval_")
            flow_path = str(Path(self._folder.name) / "flow.pt")
            self.flow.save(flow_path)
            self._pool = ProcessPoolExecutor(self.n_workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_evaluation_worker, initargs=(flow_path,))  # fmt: skip
        return self._pool

    def _run_blocks(self, blocks: dict[int, torch.Tensor], n_marginal: int, seed: int,
                    record: Callable[[int, np.ndarray], None]) -> None:  # fmt: skip
        """:func:`_block_log_ratios` of every block, ``record(start, values)`` as each finishes (any order)."""
        if self.in_process or len(blocks) <= 1:
            for start, block in blocks.items():
                record(start, _block_log_ratios(self.flow, block, n_marginal, seed, start))
            return
        from concurrent.futures import as_completed

        pool = self._started()
        futures = {pool.submit(_worker_block_log_ratios, block.cpu(), n_marginal, seed, start): start
                   for start, block in blocks.items()}  # fmt: skip
        try:
            for future in as_completed(futures):
                record(futures[future], future.result())
        except BaseException:  # do not wait for the queued blocks; the workers cannot be trusted after a failure
            self.close()
            raise

    def close(self) -> None:
        """Stop the processes (after their current block) and delete the temporary flow file."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def evaluation_log_ratios(
    flow: EACF,
    x_test: torch.Tensor,
    n_marginal: int,
    seed: int,
    cache: str | os.PathLike[str] | None = None,
    *,
    n_workers: int | EvaluationWorkers = 1,
    save_every_seconds: float = 120.0,
    progress: bool = True,
) -> torch.Tensor:
    """:meth:`EACF.augmented_log_ratios` of M fresh draws for every configuration (test data, flow samples), resumable.

    The configurations are taken in blocks of :data:`EVAL_BLOCK`, each with draws from its own generator (seeded
    from ``seed`` and the block's first index), so the result does not depend on where a run was interrupted
    nor on how many processes computed it.
    With ``cache``, the finished blocks are written there (atomically, at most every ``save_every_seconds``,
    after the last block and on the way out of an interrupt or a failure) under a hash of the flow's weights,
    the configurations, M and the seed; a rerun with the same four continues after the last saved block,
    anything else starts over. At M = 2000 an LJ13 evaluation of 1000 configurations is an hour of one CPU
    core.

    Parameters
    ----------
    n_workers : int or EvaluationWorkers
        Worker processes for a flow on the CPU (one torch thread each; the flow goes to them through a temporary
        file written by :meth:`EACF.save`), started for this call and stopped at its end; or
        :class:`EvaluationWorkers` of this flow to share between calls (each worker then loads and compiles the
        flow once for all of them). With one torch thread in the calling process as well, the log-ratios are
        bit-for-bit those of ``n_workers=1``. Ignored for a flow on a GPU.

    Returns
    -------
    Tensor, shape (M, n_test), float64
    """
    if isinstance(n_workers, EvaluationWorkers):
        n_workers.check_flow(flow)
        workers = n_workers
    else:
        workers = EvaluationWorkers(flow, n_workers)
    n_test = x_test.shape[0]
    key = _evaluation_key(flow, x_test, n_marginal, seed)
    ratios = np.full((n_marginal, n_test), np.nan, dtype=np.float64)
    n_done = 0
    path = None if cache is None else Path(cache)
    if path is not None and path.is_file():
        try:
            with np.load(path) as saved:
                if str(saved["key"]) == key:
                    n_done = int(saved["n_done"])
                    ratios[:, :n_done] = saved["log_ratios"][:, :n_done]
                    logger.info("evaluation: %d of %d test configurations from %s", n_done, n_test, path)
                else:
                    logger.info("evaluation: %s belongs to another flow, data, M or seed; starting over", path)
        except (OSError, KeyError, ValueError) as error:  # unreadable: recompute rather than fail the benchmark
            logger.warning("evaluation: could not read %s (%s); starting over", path, error)
            n_done = 0

    def save(upto: int) -> None:
        if path is not None:
            atomic_write(path, lambda handle: np.savez(handle, key=key, n_done=upto, log_ratios=ratios[:, :upto]))

    starts = list(range(n_done, n_test, EVAL_BLOCK))
    blocks = {start: x_test[start : min(start + EVAL_BLOCK, n_test)] for start in starts}
    finished: set[int] = set()
    last_save = time.perf_counter()
    bar = tqdm(total=n_test, initial=n_done, desc="E-ACF log q (M draws)", unit="config", disable=not progress)

    def record(start: int, values: np.ndarray) -> None:
        """Keep a finished block; save the leading run of finished blocks now and then, and at the end."""
        nonlocal n_done, last_save
        ratios[:, start : start + values.shape[1]] = values
        finished.add(start)
        bar.update(values.shape[1])
        while n_done in finished:
            n_done = min(n_done + EVAL_BLOCK, n_test)
        if n_done == n_test or time.perf_counter() - last_save > save_every_seconds:
            save(n_done)
            last_save = time.perf_counter()

    with bar:
        try:
            workers._run_blocks(blocks, n_marginal, seed, record)
        except BaseException:  # an interrupt or a failed block: keep what is finished, then stop
            if n_done > 0:
                save(n_done)
            raise
        finally:
            if workers is not n_workers:  # started here: stopped here
                workers.close()
    return torch.from_numpy(ratios)


def _initial_flow(path: str | os.PathLike[str], system: System) -> EACF:
    """The saved E-ACF a fine-tune starts from, checked against the system."""
    if not Path(path).is_file():
        raise ValueError(f"init_flow {str(path)!r} is not a file; pass the flow.pt of a finished E-ACF run")
    flow = load_flow(path, device="cpu")
    if not isinstance(flow, EACF):
        raise ValueError(
            f"init_flow {str(path)!r} holds a {type(flow).__name__}, not an E-ACF; pass an E-ACF's flow.pt"
        )
    if (flow.n_particles, flow.dim) != (system.n_particles, system.dim) or not np.array_equal(
        flow.atom_types.cpu().numpy(), np.asarray(system.atom_types)
    ):
        raise ValueError(
            f"init_flow {str(path)!r} is an E-ACF of {flow.n_particles} particles in {flow.dim} D, not of "
            f"{system.name} ({system.n_particles} in {system.dim} D); pass a flow trained on {system.name}"
        )
    return flow


def _evaluate(flow: EACF, system: System, x_test: torch.Tensor, n_samples: int, n_marginal: int,
              seed: int, cache: Path | None, workers: EvaluationWorkers) -> dict[str, Any]:  # fmt: skip
    constant = prior_constant(system.n_particles, system.dim)
    x_test = x_test.to(flow.device)
    generator = torch.Generator(flow.device).manual_seed(seed)
    out: dict[str, Any] = {"prior_constant": constant}
    with torch.no_grad():
        log_ratios = evaluation_log_ratios(flow, x_test, n_marginal, seed, cache, n_workers=workers)
        log_ratios = log_ratios.to(flow.device)
        log_q_test = torch.logsumexp(log_ratios, 0) - math.log(n_marginal)
        # the reported NLL is the table's last row: the estimate from all M draws
        table = _nll_by_draws(log_ratios, constant)
        out["nll_by_marginal_draws"] = table
        out["nll"], out["nll_stderr"] = table[str(n_marginal)]["nll"], table[str(n_marginal)]["nll_stderr"]
        out["nll_with_prior_constant"] = out["nll"] + constant
        a_test = flow.sample_aug(x_test, generator=generator)
        log_q_joint = flow.log_prob_joint(x_test, a_test).double()
        joint_nll = -(log_q_joint - flow.log_prob_aug(a_test, x_test).double())
        out["joint_nll_with_prior_constant"] = float(joint_nll[torch.isfinite(joint_nll)].mean())
        u_test = _energies(system, x_test)
        lw_test = -u_test - log_q_test.cpu()
        out["forward_ess"] = forward_ess(lw_test[torch.isfinite(lw_test)])
        out["failed_test_frames"] = int((~torch.isfinite(lw_test)).sum())

        x, a, log_q_joint_samples = flow.sample_joint(n_samples, generator=generator)
        # the samples' marginal estimate, resumable like the test set's (the samples are the same on a rerun: the
        # generator is seeded and the weights are those of the saved flow)
        sample_cache = None if cache is None else cache.with_name(EVAL_SAMPLES_CACHE)
        sample_ratios = evaluation_log_ratios(flow, x, n_marginal, seed + 1, sample_cache, n_workers=workers)
        sample_ratios = sample_ratios.to(flow.device)
        log_q_samples = torch.logsumexp(sample_ratios, 0) - math.log(n_marginal)
        u = _energies(system, x)
        lw = -u - log_q_samples.double().cpu()
        lw_joint = -u + (flow.log_prob_aug(a, x).double() - log_q_joint_samples.double()).cpu()
        ok_w, ok_joint = torch.isfinite(lw), torch.isfinite(lw_joint)
        out["ess"] = kish_ess(lw[ok_w], n_total=n_samples)
        out["ess_joint"] = kish_ess(lw_joint[ok_joint], n_total=n_samples)
        out["failed_frames"] = int((~ok_w).sum())
        # Z from the joint weights (unbiased for any number of draws), log p - log q_M on the test frames
        lw_joint_or_zero = torch.where(ok_joint, lw_joint, torch.full_like(lw_joint, -math.inf))
        out["target_density"] = target_density(lw_joint_or_zero, u_test, log_q_test.cpu(), constant)
        out["mean_energy_flow"] = float(u[torch.isfinite(u)].mean())
        out["mean_energy_test"] = float(u_test[torch.isfinite(u_test)].mean())
        # float32 round trip of the flow on its own samples
        x0, a0, _ = flow.inverse(x, a)
        x_back, a_back, _ = flow.forward(x0, a0)
        out["round_trip_max_abs"] = float(torch.maximum((x_back - x).abs().max(), (a_back - a).abs().max()))
    return out


def bench_eacf(
    system: EACFBenchmark = "dw4",
    out_dir: str | os.PathLike[str] = "runs/bench_eacf_dw4",
    *,
    objective: EACFObjective = "ml",
    train_draws: int = 1,
    init_flow: str | os.PathLike[str] | None = None,
    minutes: float = 10.0,
    max_steps: int | None = None,
    schedule_clock: Literal["time", "steps"] = "time",
    projection: Literal["spherical", "cartesian", "vector"] = "spherical",
    n_blocks: int | None = None,
    hidden: int | None = None,
    n_layers: int | None = None,
    n_transforms: int = 1,
    n_aug: int = 1,
    aug_scale: float = 0.1,
    prior_std: float | None = None,
    compiled: bool = True,
    device: DeviceSpec = "auto",
    batch_size: int | None = None,
    lr: float = 1e-3,
    ema_decay: float | Literal["auto"] | None = "auto",
    resume: bool = True,
    n_marginal: int = 20,
    n_eval_samples: int | None = None,
    n_eval_test: int | None = None,
    n_eval_workers: int = 1,
    n_speed_samples: int = 2000,
    n_cnf_speed_samples: int = 200,
    cnf_model: str | os.PathLike[str] | None = None,
    seed: int = 0,
    n_threads: int | None = 1,
    progress: bool = True,
    data_directory: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    r"""Train and evaluate an E-ACF on DW4 or LJ13 and time it against the CNF.

    Parameters
    ----------
    system : {"dw4", "lj13"}
    out_dir : path
        Where ``flow.pt`` and ``result.json`` go.
    objective : {"ml", "fab", "kl"}
        Joint maximum likelihood on the training split, FAB (alpha = 2, AIS
        with HMC and a replay buffer) or joint reverse KL from the energy.
    train_draws : int
        K draws of the augmented variables per training configuration (``objective="ml"``): 1 trains the joint
        likelihood (the paper), K > 1 the importance-weighted K-draw bound of the marginal likelihood
        (:class:`~bgplugin.flows.eacf.training.MarginalMaximumLikelihood`; a step then costs K joint
        evaluations per configuration, so ``batch_size / K`` keeps the cost of a joint step).
    init_flow : path, optional
        Start from the weights of a saved E-ACF of this system (:meth:`EACF.save`, e.g. another run's
        ``flow.pt``) instead of a fresh flow: a fine-tune. Its hyperparameters replace ``projection``,
        ``n_blocks``, ``hidden``, ``n_layers``, ``n_transforms``, ``n_aug``, ``aug_scale`` and ``prior_std``;
        a run in ``out_dir`` resumes only with the same weights to start from.
    minutes : float
        Training wall-clock budget.
    max_steps : int, optional
        Step cap, and with ``schedule_clock="steps"`` the length of the
        cosine schedule; default: the steps that fit in ``minutes`` (from a
        short timing probe; with the time clock this estimate only sets the
        warm-up, and there is no cap).
    schedule_clock : {"time", "steps"}
        The cosine decay spans the ``minutes`` of training (``"time"``, the
        default: it ends when the budget is spent, however loaded the machine)
        or the step count (``"steps"``: reproducible bit for bit).
    projection, n_blocks, hidden, n_layers, n_transforms, n_aug
        Flow hyperparameters (defaults per system: 4 blocks, width 32, 1 EGNN layer; 1 transform per
        coupling layer, 1 augmented variable).
    aug_scale : float
        :math:`\eta` of the augmented target :math:`\pi(a|x) = N(x, \eta^2 I)` and of the base's
        :math:`q_0(a|x)` (length units; 0.1).
    prior_std : float, optional
        Standard deviation of the mean-free Gaussian base of x (and the
        radius-spline range, ``2 * prior_std``); default per system (1.0).
    compiled : bool
        Train and evaluate through ``torch.compile`` (``EACF(compiled=True)``;
        the CNF it is timed against then too). Compilation happens in an
        untimed warm-up before the training budget starts; its wall time is
        reported as ``compile_seconds``.
    device : {"auto", "cpu", "cuda"} or torch.device
        Where the E-ACF trains and is evaluated and where the CNF it is timed
        against runs (``"auto"``: the GPU when there is one). Not a training
        setting: a run started on one device resumes on another.
    batch_size, lr
        Per-step batch and peak learning rate (AdamW, linear warm-up, cosine
        decay, the paper's gradient guard: skip above 20x, clip above 5x the
        running median of the gradient norm).
    ema_decay : float, "auto" or None
        Exponential moving average of the weights, evaluated and saved
        instead of the last weights; ``"auto"`` averages over about 5 % of
        the scheduled steps (at most 1000); ``None``: no EMA.
    resume : bool
        Continue the run in ``out_dir`` from its checkpoint (written every
        5 % of the steps, with FAB's replay buffer) if one exists with the
        same settings; False starts over. A finished run is evaluated again.
    n_marginal : int
        ``M`` of the marginal estimate in the evaluation and the timing.
    n_eval_samples, n_eval_test : int, optional
        Flow samples for the reverse ESS and test configurations for the NLL.
    n_eval_workers : int
        Processes for the marginal estimates of the evaluation on a CPU (see :func:`evaluation_log_ratios`;
        with ``n_threads=1`` the numbers do not depend on it). The training uses ``n_threads``.
    n_speed_samples, n_cnf_speed_samples : int
        Samples per timing call for the E-ACF and the CNF.
    cnf_model : path, optional
        A saved CNF to time (default: an untrained EGNN CNF of ``bench dw4|lj13``
        size; RK4 cost does not depend on the weights).
    seed : int
    n_threads : int or None
        ``torch.set_num_threads`` during the benchmark.
    progress : bool
    data_directory : path, optional
        Folder with the splits (default :func:`bgplugin.benchmarks.particles.data_dir`).

    Returns
    -------
    dict
        Metrics (see the module docstring), ``training``, ``speed``, ``settings``,
        ``machine``; also written to ``out_dir/result.json``. ``out_dir`` also
        holds ``flow.pt``, ``checkpoint.pt``, ``loss.csv`` and ``loss.png``.
    """
    wall_start = time.perf_counter()
    if system not in _DEFAULTS:
        raise ValueError(f"system must be one of {sorted(_DEFAULTS)}, got {system!r}")
    if objective not in get_args(EACFObjective):
        raise ValueError(f"objective must be one of {get_args(EACFObjective)}, got {objective!r}")
    if not (isinstance(minutes, (int, float)) and minutes > 0 and math.isfinite(minutes)):
        raise ValueError(f"minutes must be a finite number > 0, got {minutes!r}")
    for name, value in (("n_eval_samples", n_eval_samples), ("n_eval_test", n_eval_test)):
        # checked before training: evaluation comes after the whole budget
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1 or None (the system default), got {value!r}")
    _check_worker_count(n_eval_workers, "n_eval_workers")
    if isinstance(train_draws, bool) or not isinstance(train_draws, int) or train_draws < 1:
        raise ValueError(f"train_draws must be an integer >= 1, got {train_draws!r}")
    if train_draws > 1 and objective != "ml":
        raise ValueError(f"train_draws={train_draws} needs objective='ml' (the {objective!r} objective draws its "
                         "own augmented variables); leave train_draws at 1")  # fmt: skip
    defaults = _DEFAULTS[system]
    sys_ = get_system(system)
    x_train = load_split(sys_, "train", data_directory)
    x_test_all = load_split(sys_, "test", data_directory)
    n_samples = defaults["n_eval_samples"] if n_eval_samples is None else n_eval_samples
    n_test = min(defaults["n_eval_test"] if n_eval_test is None else n_eval_test, len(x_test_all))
    hyper = {
        "projection": projection,
        "n_blocks": defaults["n_blocks"] if n_blocks is None else n_blocks,
        "hidden": defaults["hidden"] if hidden is None else hidden,
        "n_layers": defaults["n_layers"] if n_layers is None else n_layers,
        "n_transforms": n_transforms,
        "n_aug": n_aug,
        "aug_scale": aug_scale,
        "prior_std": defaults["prior_std"] if prior_std is None else prior_std,
        "n_marginal": n_marginal,
        "compiled": compiled,
    }
    init = None if init_flow is None else _initial_flow(init_flow, sys_)
    if init is not None:
        skip = ("atom_types", "dim", "n_marginal", "compiled", "chunk_size")  # run-time options stay this run's
        hyper.update({k: v for k, v in init.config().items() if k not in skip})
    batch = defaults["batch_size"] if batch_size is None else batch_size
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be an integer >= 1 or None, got {max_steps!r}")
    if schedule_clock not in ("time", "steps"):
        raise ValueError(f"schedule_clock must be 'time' or 'steps', got {schedule_clock!r}")
    if not (ema_decay in ("auto", None) or (isinstance(ema_decay, float) and 0.0 <= ema_decay < 1.0)):
        raise ValueError(f"ema_decay must be 'auto', None or a float in [0, 1), got {ema_decay!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    requested: dict[str, Any] = {
        "system": system,
        "objective": objective,
        "flow": {k: v for k, v in hyper.items() if k not in ("compiled", "n_marginal")},
        "train_draws": train_draws,
        "init": None if init is None else {"path": str(init_flow), "weights": _weights_digest(init)},
        "batch_size": batch,
        "lr": lr,
        "ema_decay": ema_decay,
        "schedule_clock": schedule_clock,
        "seed": seed,
        "max_steps": max_steps,
        "n_train": len(x_train),
    }

    with torch_threads(n_threads):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            flow = build_flow(sys_, kind="eacf", device=resolve_device(device), **hyper)
            if not isinstance(flow, EACF):
                raise TypeError(f"build_flow(kind='eacf') returned {type(flow).__name__}")
            if init is not None:
                flow.load_state_dict(init.state_dict())
            energy = sys_.energy()
            data = TrainingData(x_train) if objective == "ml" else None

            def make_objective(warm_up: bool = False) -> Any:
                if objective == "ml":
                    return JointMaximumLikelihood(flow) if train_draws == 1 else MarginalMaximumLikelihood(
                        flow, n_draws=train_draws)  # fmt: skip
                if objective == "kl":
                    return JointReverseKL(flow, energy, n_samples=batch)
                # The warm-up's replay buffer is thrown away: fill only one batch there, so that FAB's buffer
                # fill (AIS) counts in the timed training, not in the untimed compilation/probe.
                return FABAlpha2(flow, energy, batch_size=batch, buffer_size=200 * batch,
                                 min_buffer=batch if warm_up else 20 * batch)  # fmt: skip

            saved, resumed = resolve_training_settings(
                out, requested, resume, _TRAINING_KEYS, "bench_eacf",
                older_defaults={"flow": {"n_transforms": 1, "aug_scale": 0.1}, "train_draws": 1, "init": None},
            )
            settings = dict(saved) if saved is not None else dict(requested)
            compile_seconds = 0.0
            if compiled or (saved is None and max_steps is None):
                # Untimed warm-up and timing probe on the flow itself at lr ~ 0 (a resumed run reloads the
                # checkpoint's weights afterwards); the first step compiles the training graph of a compiled flow.
                probe = replace(_trainer_config(settings, minutes, 1, None, progress=False, out_dir=None), lr=1e-12)
                probe_objective = make_objective(warm_up=True)
                warm_start = time.perf_counter()
                Trainer(flow, probe_objective, replace(probe, max_steps=1), data).fit()
                warm_seconds = time.perf_counter() - warm_start
                compile_seconds = warm_seconds if compiled else 0.0
                if saved is None and max_steps is None:
                    timed = Trainer(flow, probe_objective, replace(probe, max_steps=_PROBE_STEPS,
                                                                   max_minutes=_PROBE_SECONDS / 60.0), data).fit()
                    per_step = timed.elapsed_seconds / max(1, timed.steps_this_session)
                    settings["max_steps"] = max(20, int(60.0 * minutes / max(per_step, 1e-3)))
                    compile_seconds = max(0.0, warm_seconds - per_step) if compiled else 0.0
                    logger.info("timing probe: %.0f ms per step -> %d steps in %.1f min (compilation %.0f s)",
                                1e3 * per_step, settings["max_steps"], minutes, compile_seconds)  # fmt: skip
            if saved is None:
                settings["warmup_steps"] = min(100, settings["max_steps"] // 10)
                settings["ema_decay_used"] = auto_ema_decay(ema_decay, settings["max_steps"])
                write_json(out / SETTINGS_FILE, settings)
            trainer = Trainer(
                flow, make_objective(), _trainer_config(settings, minutes, max_steps, settings["ema_decay_used"],
                                                       progress=progress, out_dir=out), data,
            )  # fmt: skip
            summary = trainer.fit(resume=resume)
            train_seconds = summary.elapsed_seconds
            averaged = trainer.ema.average_parameters() if trainer.ema is not None else nothing()
            with averaged:
                flow.eval()
                flow.save(out / "flow.pt")
                x_test = torch.as_tensor(x_test_all[evaluation_subset(len(x_test_all), n_test, seed)])
                eval_start = time.perf_counter()
                with EvaluationWorkers(flow, n_eval_workers) as workers:  # one set of processes for both estimates
                    metrics = _evaluate(flow, sys_, x_test, n_samples, n_marginal, seed, out / EVAL_CACHE, workers)
            eval_seconds = time.perf_counter() - eval_start
            cnf = load_flow(cnf_model, device=flow.device) if cnf_model is not None else build_flow(
                sys_, "egnn", device=flow.device, **defaults["cnf"])  # fmt: skip
            if not isinstance(cnf, CNF):
                raise ValueError(f"cnf_model {cnf_model!s} is not a CNF (got {type(cnf).__name__})")
            cnf = cnf.with_options(compiled=compiled)
            speed = _speed(flow, cnf, n_speed_samples, n_cnf_speed_samples, n_marginal)
        threads = torch.get_num_threads()

    result: dict[str, Any] = {
        "system": system,
        "model": "eacf",
        "objective": objective,
        **metrics,
        "speed": speed,
        "train_seconds": train_seconds,
        "compile_seconds": compile_seconds,
        "eval_seconds": eval_seconds,
        "device": str(flow.device),
        "n_parameters": sum(p.numel() for p in flow.parameters()),
        "training": {
            "steps": summary.step,
            "scheduled_steps": settings["max_steps"],
            "final_loss": summary.final_loss,
            "skipped_steps": 0 if trainer.guard is None else trainer.guard.n_skipped,
            "clipped_steps": 0 if trainer.guard is None else trainer.guard.n_clipped,
            "rollbacks": trainer.rollbacks,
            "lr_scale": summary.lr_scale,
            "stopped_by": summary.stopped_by,
            "resumed": resumed,
            "ema_decay": settings["ema_decay_used"],
        },
        "settings": {
            "flow": flow.config() | {"atom_types": None},
            "train_draws": train_draws,
            "init": requested["init"],
            "batch_size": batch,
            "lr": lr,
            "ema_decay": ema_decay,
            "minutes": minutes,
            "schedule_clock": schedule_clock,
            "seed": seed,
            "n_eval_samples": n_samples,
            "n_eval_test": n_test,
            "n_eval_workers": n_eval_workers,
            "n_train": len(x_train),
            "cnf_model": None if cnf_model is None else str(cnf_model),
            "nll_convention": "nll excludes the prior constant ((N-1)*D/2)*ln(2*pi) (the EFM tables); "
            "nll_with_prior_constant is -log q_M(x) on the mean-free subspace (marginal estimate, M draws)",
        },
        "machine": machine_record() | {"torch_threads": threads},
        "out_dir": str(out),
    }
    result["wall_seconds"] = time.perf_counter() - wall_start
    write_json(out / "result.json", result)
    logger.info(
        "%s E-ACF (%s): NLL %.3f (with constant %.3f), ESS %.1f %% (joint %.1f %%), %.0f joint samples/s, "
        "%.1fx the CNF",
        system, objective, result["nll"], result["nll_with_prior_constant"], 100 * result["ess"],
        100 * result["ess_joint"], speed["eacf_joint_samples_per_s"], speed["ratio_joint_vs_cnf"],
    )  # fmt: skip
    return result


def _trainer_config(
    settings: dict[str, Any], minutes: float, max_steps: int | None, ema_decay: float | None, *,
    progress: bool, out_dir: Path | None,
) -> TrainerConfig:  # fmt: skip
    """The :class:`TrainerConfig` of a bench_eacf run (AdamW, warm-up + cosine, the paper's gradient guard)."""
    by_time = settings["schedule_clock"] == "time"
    scheduled = settings.get("max_steps") or 1
    return TrainerConfig(
        max_steps=(max_steps or 10**9) if by_time else scheduled,
        max_minutes=minutes,
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        schedule="cosine",
        schedule_clock=settings["schedule_clock"],
        warmup_steps=settings.get("warmup_steps") or 0,
        grad_guard=True,
        max_rollbacks=3,
        ema_decay=ema_decay,
        seed=settings["seed"],
        checkpoint_every=max(50, scheduled // 20),
        out_dir=out_dir,
        progress=progress,
    )


def _draws_line(table: dict[str, dict[str, float]] | None) -> list[str]:
    if not table:
        return []
    return ["NLL from the first m draws (convergence in M): " + ", ".join(
        f"m={m} {row['nll']:.3f}" for m, row in table.items())]  # fmt: skip


def _target_lines(target: dict[str, Any] | None) -> list[str]:
    if not target:
        return []
    return [f"NLL of the exact target density on the same test frames: {target['nll']:.3f} +- "
            f"{target['nll_stderr']:.3f}; flow - target (KL(p||q)) {target['kl']:.3f} +- {target['kl_stderr']:.3f}; "
            f"log Z {target['log_z']:.3f} +- {target['log_z_stderr']:.3f} (samples), "
            f"{target.get('log_z_forward', float('nan')):.3f} +- {target.get('log_z_forward_stderr', float('nan')):.3f}"
            " (test data)"]  # fmt: skip


def format_eacf(result: dict[str, Any]) -> str:
    """A readable table of one :func:`bench_eacf` result."""
    s, t, v = result["settings"], result["training"], result["speed"]
    flow = s["flow"]
    lines = [
        f"{result['system'].upper()} E-ACF ({flow['projection']}, {flow['n_blocks']} blocks, width {flow['hidden']}, "
        f"{flow['n_layers']} EGNN layers, {flow['n_aug']} augmented), {result['n_parameters']} parameters, "
        f"objective {result['objective']}"
        + (f" (K = {s['train_draws']}-draw bound of the marginal likelihood)" if s.get("train_draws", 1) > 1 else "")
        + (f", fine-tuned from {s['init']['path']}" if s.get("init") else "")
        + f", on {result.get('device', 'cpu')}",
        f"training: {t['steps']} steps in {result['train_seconds']:.0f} s (batch {s['batch_size']}, lr {s['lr']:g}; "
        f"{t['skipped_steps']} skipped, {t['clipped_steps']} clipped; "
        + (f"{t['rollbacks']} roll-back(s) after a run-away loss, lr x {t['lr_scale']:g}; "
           if t.get("rollbacks") else "")
        + (f"EMA {t['ema_decay']:g}; " if t.get("ema_decay") else "no EMA; ")
        + ("resumed; " if t.get("resumed") else "")
        + (f"compiled, {result.get('compile_seconds', 0.0):.0f} s of compilation before the budget)"
           if flow.get("compiled") else "eager)"),
        f"NLL (M={v['n_marginal']}), prior constant excluded: {result['nll']:.3f} +- {result['nll_stderr']:.3f}",
        f"NLL with prior constant (+{result['prior_constant']:.3f}): {result['nll_with_prior_constant']:.3f}; "
        f"joint bound {result['joint_nll_with_prior_constant']:.3f}",
        *_draws_line(result.get("nll_by_marginal_draws")),
        f"reverse ESS: {100 * result['ess']:.1f} % (marginal estimate), {100 * result['ess_joint']:.1f} % (joint); "
        f"forward ESS {100 * result['forward_ess']:.1f} %",
        *_target_lines(result.get("target_density")),
        f"samples/s with log q: E-ACF joint (exact) {v['eacf_joint_samples_per_s']:.0f}, E-ACF marginal "
        f"(M={v['n_marginal']}) {v['eacf_marginal_samples_per_s']:.0f}, CNF {v['cnf_samples_per_s']:.1f} "
        f"-> {v['ratio_joint_vs_cnf']:.0f}x / {v['ratio_marginal_vs_cnf']:.1f}x",
        f"float32 round trip on flow samples: max |dx| {result['round_trip_max_abs']:.1e}",
        f"evaluation {s['n_eval_samples']} samples / {s['n_eval_test']} test configurations in "
        f"{result['eval_seconds']:.0f} s ({_processes(s.get('n_eval_workers', 1))}); "
        f"wall {result['wall_seconds']:.0f} s",
    ]
    return "\n".join(lines)


def _processes(count: int) -> str:
    return "1 process" if count == 1 else f"{count} processes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bgplugin bench eacf``; run them with :func:`bench_eacf_from_args`, print :func:`format_eacf`."""
    parser.add_argument("--system", choices=sorted(_DEFAULTS), default="dw4")
    parser.add_argument("--objective", choices=list(get_args(EACFObjective)), default="ml")
    parser.add_argument("--train-draws", type=int, default=1,
                        help="augmented draws per training configuration for --objective ml: 1 the joint "
                        "likelihood (the paper), K > 1 the K-draw bound of the marginal likelihood (K joint "
                        "evaluations per configuration; --batch-size B/K keeps the cost)")
    parser.add_argument("--init", help="start from this saved E-ACF's weights and hyperparameters (a run's "
                        "flow.pt): fine-tune it")
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget (10)")
    parser.add_argument("--max-steps", type=int, help="step cap; with --schedule-clock steps the schedule length "
                        "(default: what fits in --minutes, from a timing probe)")
    parser.add_argument("--schedule-clock", choices=["time", "steps"], default="time",
                        help="the cosine decay spans --minutes (time, default) or the step count (steps)")
    parser.add_argument("--projection", choices=["spherical", "cartesian", "vector"], default="spherical")
    parser.add_argument("--blocks", type=int, help="coupling blocks (system default)")
    parser.add_argument("--hidden", type=int, help="EGNN width (system default)")
    parser.add_argument("--layers", type=int, help="EGNN layers per conditioner (system default)")
    parser.add_argument("--transforms", type=int, default=1,
                        help="projection transforms in sequence per coupling layer, each with its own origin, "
                             "reference vectors and spline parameters from the layer's one EGNN (1; the reference "
                             "implementation's LJ13 setting is 3)")
    parser.add_argument("--n-aug", type=int, default=1, help="augmented variables (1)")
    parser.add_argument("--aug-scale", type=float, default=0.1,
                        help="eta of the augmented target N(x, eta^2) and of the base's a|x (0.1)")
    parser.add_argument("--prior-std", type=float,
                        help="standard deviation of the Gaussian base of x (system default)")
    parser.add_argument("--no-compile", action="store_true",
                        help="train and sample eagerly (default: torch.compile the coupling layers and the CNF)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where to train, evaluate and time (auto: the GPU when there is one)")
    parser.add_argument("--batch-size", type=int, help="batch per step (system default)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=_ema_argument, default="auto",
                        help="EMA of the weights, evaluated and saved: auto (about 5 %% of the steps), none, or a "
                             "decay such as 0.999")
    parser.add_argument("--fresh", action="store_true",
                        help="start over even if --out-dir holds a checkpoint of the same run (default: resume)")
    parser.add_argument("--marginal-draws", type=int, default=20, help="M of the marginal log q estimate (20)")
    parser.add_argument("--eval-samples", type=int, help="flow samples for the ESS (system default)")
    parser.add_argument("--eval-test", type=int, help="test configurations for the NLL (system default)")
    parser.add_argument("--eval-workers", type=int, default=1,
                        help="processes for the evaluation's marginal estimates on a CPU, one thread each (1); "
                             "the same numbers as one process when --threads is 1")
    parser.add_argument("--cnf-model", help="a saved CNF to time against (default: untrained EGNN CNF)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training and evaluation (1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the flow's weights, batches and draws (0)")
    parser.add_argument("--out", help="also write the result as JSON to this file")
    parser.add_argument("--out-dir", help="run folder (default runs/bench_eacf_<system>_<objective>)")


def _ema_argument(text: str) -> float | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or a decay in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"the EMA decay must be in [0, 1), got {value}")
    return value


def bench_eacf_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`bench_eacf` with the options of :func:`add_arguments` (the CLI prints :func:`format_eacf`)."""
    return bench_eacf(
        args.system,
        args.out_dir or f"runs/bench_eacf_{args.system}_{args.objective}",
        objective=args.objective,
        train_draws=args.train_draws,
        init_flow=args.init,
        minutes=args.minutes,
        max_steps=args.max_steps,
        schedule_clock=args.schedule_clock,
        projection=args.projection,
        n_blocks=args.blocks,
        hidden=args.hidden,
        n_layers=args.layers,
        n_transforms=args.transforms,
        n_aug=args.n_aug,
        aug_scale=args.aug_scale,
        prior_std=args.prior_std,
        compiled=not args.no_compile,
        device=args.device,
        batch_size=args.batch_size,
        lr=args.lr,
        ema_decay=args.ema_decay,
        resume=not args.fresh,
        n_marginal=args.marginal_draws,
        n_eval_samples=args.eval_samples,
        n_eval_test=args.eval_test,
        n_eval_workers=args.eval_workers,
        cnf_model=args.cnf_model,
        seed=args.seed,
        n_threads=args.threads,
    )
