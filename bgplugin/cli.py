"""The ``bgplugin`` command: a thin layer over the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch / xTB load their OpenMP runtime

#: A ValueError later than this into a command is reported with its traceback (bad input fails at once).
BAD_INPUT_SECONDS = 60.0


def _info(args: argparse.Namespace) -> int:
    from bgplugin.fileio import write_json
    from bgplugin.info import collect_info, finite_energies, format_info

    info = collect_info(evaluate=not args.no_eval)
    print(format_info(info))
    if args.out:
        print(f"\nwrote {write_json(args.out, info)}")
    if not args.no_eval and not finite_energies(info):
        print("error: a bundled system gave a non-finite energy", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    from bgplugin.protocols import load_protocol, run_protocol

    protocol = load_protocol(args.protocol)
    out = args.out or f"runs/{protocol.name}"
    print(f"running protocol {protocol.name!r} ({' -> '.join(protocol.steps)}) in {out}", flush=True)
    results = run_protocol(
        protocol, out, device=args.device, overwrite=args.overwrite, stop_after=args.stop_after,
        progress=not args.no_progress,
    )  # fmt: skip
    report = os.path.join(out, "report.md")
    if os.path.isfile(report):
        with open(report) as handle:
            print(handle.read())
    print(f"results: {os.path.join(out, 'results.json')}")
    del results
    return 0


def _bench_energies(args: argparse.Namespace) -> int:
    from bgplugin.benchmarks.energies import bench_energies, format_energies
    from bgplugin.fileio import write_json

    result = bench_energies(
        n_frames=args.frames,
        n_xtb_frames=args.xtb_frames,
        workers=tuple(args.workers),
        repeats=args.repeats,
        backends=tuple(args.backends),
    )
    print(format_energies(result))
    if args.out:
        print(f"wrote {write_json(args.out, result)}")
    return 0


def _bench_divergence(args: argparse.Namespace) -> int:
    from bgplugin.benchmarks.divergence import bench_divergence, format_divergence
    from bgplugin.fileio import write_json

    models = _system_paths(args.model, "--model")
    result = bench_divergence(tuple(args.systems), models, args.tolerance, args.seed, args.threads,
                              compiled=not args.no_compile)
    print(format_divergence(result))
    if args.out:
        print(f"wrote {write_json(args.out, result)}")
    return 0


_CNF_OBJECTIVES = ("eqot", "ot", "cfm", "nll")
_EACF_OBJECTIVES = {"nll": "ml", "fab": "fab", "kl": "kl"}


def _system_paths(items: list[str] | None, option: str) -> dict[str, str]:
    paths = {}
    for item in items or []:
        system, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"error: {option} takes SYSTEM=PATH, got {item!r}")
        paths[system] = path
    return paths


def _bench_sampling(args: argparse.Namespace) -> int:
    from bgplugin.benchmarks.sampling import bench_sampling, format_sampling
    from bgplugin.fileio import write_json

    result = bench_sampling(tuple(args.systems), _system_paths(args.eacf, "--eacf"), _system_paths(args.cnf, "--cnf"),
                            args.marginal_draws, args.seed, args.threads)  # fmt: skip
    print(format_sampling(result))
    if args.out:
        print(f"wrote {write_json(args.out, result)}")
    return 0


def _bench_training(args: argparse.Namespace) -> int:
    from bgplugin.benchmarks.training_step import bench_training_step, format_training_step
    from bgplugin.fileio import write_json

    result = bench_training_step(tuple(args.systems), tuple(args.models), compiled=not args.no_compile,
                                 n_steps=args.steps, seed=args.seed, n_threads=args.threads)  # fmt: skip
    print(format_training_step(result))
    if args.out:
        print(f"wrote {write_json(args.out, result)}")
    return 0


def _bench_particles(args: argparse.Namespace) -> int:
    from bgplugin.benchmarks.particles import bench_particles, format_particles
    from bgplugin.fileio import write_json

    if args.model == "eacf":
        return _bench_particles_eacf(args)
    objective = args.objective or "eqot"
    if objective not in _CNF_OBJECTIVES:
        raise SystemExit(
            f"bgplugin bench {args.benchmark}: --objective {objective} trains an E-ACF; add --model eacf, or use one "
            f"of {list(_CNF_OBJECTIVES)} for the CNF"
        )
    result = bench_particles(
        args.benchmark,
        objective,
        args.minutes,
        args.out_dir or f"runs/bench_{args.benchmark}_{objective}",
        seed=args.seed,
        n_eval_samples=args.eval_samples,
        n_eval_test=args.eval_test,
        device=args.device,
        lr=5e-4 if args.lr is None else args.lr,
        schedule_clock=args.schedule_clock,
        num_workers=args.num_workers,
        compiled=not args.no_compile,
        hidden=args.hidden,
        n_layers=args.layers,
        batch_size=args.batch_size,
        prior_std=1.0 if args.prior_std is None else args.prior_std,
    )
    print(format_particles(result))
    if args.out:
        print(f"wrote {write_json(args.out, result)}")
    return 0


def _bench_particles_eacf(args: argparse.Namespace) -> int:
    """``bench dw4|lj13 --model eacf``: :func:`bgplugin.benchmarks.eacf.bench_eacf` with its defaults."""
    from bgplugin.benchmarks.eacf import add_arguments, bench_eacf_from_args, format_eacf
    from bgplugin.fileio import write_json

    if args.benchmark not in ("dw4", "lj13"):
        raise SystemExit(
            f"bgplugin bench {args.benchmark} --model eacf: the E-ACF benchmark covers dw4 and lj13; "
            f"for {args.benchmark} use the CNF (--model cnf)"
        )
    objective = args.objective or "nll"
    if objective not in _EACF_OBJECTIVES:
        raise SystemExit(
            f"bgplugin bench {args.benchmark} --model eacf: --objective {objective} is flow matching, which trains "
            f"CNFs; an E-ACF trains by {list(_EACF_OBJECTIVES)} (nll: maximum likelihood; fab: FAB with alpha = 2 "
            "from the energy alone; kl: reverse KL)"
        )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = parser.parse_args([])
    options.system, options.objective, options.minutes = args.benchmark, _EACF_OBJECTIVES[objective], args.minutes
    options.out_dir = args.out_dir or f"runs/bench_eacf_{args.benchmark}_{options.objective}"
    options.eval_samples, options.seed, options.no_compile = args.eval_samples, args.seed, args.no_compile
    options.eval_test, options.device = args.eval_test, args.device
    if args.lr is not None:
        options.lr = args.lr
    options.hidden, options.layers, options.batch_size = args.hidden, args.layers, args.batch_size
    if args.prior_std is not None:
        options.prior_std = args.prior_std
    result = bench_eacf_from_args(options)
    print(format_eacf(result))
    if args.out:
        print(f"wrote {write_json(args.out, result)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bgplugin", description="Boltzmann generators for OpenMM workflows.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, engines, systems and a live energy of each bundled system")
    info.add_argument("--out", help="also write the report as JSON to this file")
    info.add_argument("--no-eval", action="store_true", help="skip the live energy evaluations")
    info.set_defaults(func=_info)

    run = sub.add_parser(
        "run", help="run a YAML protocol (default: the bundled quickstart) in a resumable run directory"
    )
    run.add_argument("protocol", nargs="?", default="quickstart",
                     help="protocol file, or the name of a bundled one (quickstart, ala2_classical, ala2_eacf, "
                          "ala2_xtb, dw4, lj13); default: quickstart")  # fmt: skip
    run.add_argument("--out", help="run directory (default runs/<protocol name>); rerunning resumes there")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                     help="where the flow trains and samples (default: the protocol's device)")  # fmt: skip
    run.add_argument("--overwrite", action="store_true", help="start over in an existing run directory")
    run.add_argument("--stop-after", help="stop after this step (simulate, train, sample, reweight, profile, ...)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=_run)

    bench = sub.add_parser("bench", help="benchmarks that print (and optionally save) numbers")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True)
    energies = bench_sub.add_parser("energies", help="frames/s: raw engine loops vs OpenMMEnergy / XTBEnergy")
    energies.add_argument("--frames", type=_positive_int, default=2000, help="OpenMM frames per pass (2000)")
    energies.add_argument("--xtb-frames", type=_positive_int, default=1000, help="xTB frames per pass (1000)")
    energies.add_argument("--workers", type=_positive_int, nargs="+", default=[1, 2], help="worker counts (1 2)")
    energies.add_argument("--repeats", type=_positive_int, default=3, help="interleaved passes; best counts (3)")
    energies.add_argument("--backends", nargs="*", choices=["xtb", "tblite"], default=["xtb", "tblite"],
                          help="xTB backends to time (none: OpenMM only)")
    energies.add_argument("--out", help="write the results as JSON to this file")
    energies.set_defaults(func=_bench_energies)
    divergence = bench_sub.add_parser("divergence", help="samples/s with exact log q: fast path vs autograd loop")
    divergence.add_argument("--systems", nargs="+", choices=["dw4", "lj13", "alanine_dipeptide"],
                            default=["dw4", "lj13", "alanine_dipeptide"])  # fmt: skip
    divergence.add_argument("--model", action="append", metavar="SYSTEM=PATH", help="a trained flow to use")
    divergence.add_argument("--tolerance", type=float, help="fewest RK4 steps for the fast path within this (nats)")
    divergence.add_argument("--no-compile", action="store_true",
                            help="time the fast path eagerly only (default: also through torch.compile)")
    divergence.add_argument("--threads", type=_positive_int, default=1)
    divergence.add_argument("--seed", type=int, default=0)
    divergence.add_argument("--out", help="write the results as JSON to this file")
    divergence.set_defaults(func=_bench_divergence)
    sampling = bench_sub.add_parser("sampling", help="samples/s with a density: E-ACF (joint, marginal) vs the CNF")
    sampling.add_argument("--systems", nargs="+", choices=["dw4", "lj13", "alanine_dipeptide"],
                          default=["dw4", "lj13", "alanine_dipeptide"])
    sampling.add_argument("--eacf", action="append", metavar="SYSTEM=PATH", help="a trained E-ACF to time")
    sampling.add_argument("--cnf", action="append", metavar="SYSTEM=PATH", help="a trained CNF to time")
    sampling.add_argument("--marginal-draws", type=_positive_int, default=20, help="M of the marginal estimate (20)")
    sampling.add_argument("--threads", type=_positive_int, default=1)
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--out", help="write the results as JSON to this file")
    sampling.set_defaults(func=_bench_sampling)
    training = bench_sub.add_parser("training", help="seconds per training step: eager vs torch.compile, one run")
    training.add_argument("--systems", nargs="+", choices=["dw4", "lj13", "alanine_dipeptide"],
                          default=["dw4", "lj13", "alanine_dipeptide"])
    training.add_argument("--models", nargs="+", choices=["eacf", "cnf"], default=["eacf", "cnf"])
    training.add_argument("--steps", type=_positive_int, default=20, help="timed steps per variant (20)")
    training.add_argument("--no-compile", action="store_true", help="time the eager step only")
    training.add_argument("--threads", type=_positive_int, default=1)
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--out", help="write the results as JSON to this file")
    training.set_defaults(func=_bench_training)
    for name in ("dw4", "lj13", "lj55"):
        model = "a CNF (or an E-ACF: --model eacf)" if name != "lj55" else "a CNF"
        particles = bench_sub.add_parser(name, help=f"train and score {model} on the published {name.upper()} splits")
        particles.add_argument("--model", choices=["cnf", "eacf"], default="cnf",
                               help="cnf (EGNN CNF) or eacf (augmented coupling flow; more options: bench eacf)")
        particles.add_argument("--objective", choices=[*_CNF_OBJECTIVES, "fab", "kl"],
                               help="cnf: eqot (default), ot, cfm, nll; eacf: nll (default), fab, kl")
        particles.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget (10)")
        particles.add_argument("--out", help="write the results as JSON to this file")
        particles.add_argument("--out-dir", help="run folder: checkpoints, plots (default runs/bench_<system>_<obj>)")
        particles.add_argument("--eval-samples", type=_positive_int, help="flow samples for ESS (system default)")
        particles.add_argument("--eval-test", type=_positive_int,
                               help="test configurations for the NLL, forward ESS and path length (system default; "
                                    "cnf DW4: the whole test split)")
        particles.add_argument("--lr", type=float, help="peak learning rate (cnf 5e-4, eacf 1e-3)")
        particles.add_argument("--schedule-clock", choices=["time", "steps"], default="time",
                               help="cnf: the cosine decay spans --minutes of training (time, default) or the "
                                    "step count estimated from a timing probe (steps)")
        particles.add_argument("--num-workers", type=_nonnegative_int, default=0,
                               help="cnf: processes that pair training batches beside the training process (0)")
        particles.add_argument("--no-compile", action="store_true",
                               help="train and evaluate eagerly (default: torch.compile the CNF's field, or the "
                                    "E-ACF's coupling layers)")
        particles.add_argument("--hidden", type=_positive_int, help="EGNN width (system default: 32, LJ55 64)")
        particles.add_argument("--layers", type=_positive_int,
                               help="EGNN layers (cnf default 3, LJ55 5; eacf: layers per conditioner, 1)")
        particles.add_argument("--batch-size", type=_positive_int, help="batch per step (system default)")
        particles.add_argument("--prior-std", type=_positive_float,
                               help="standard deviation of the mean-free Gaussian prior (1.0, the published "
                                    "setting; DW4 data: 2.1 per coordinate)")
        particles.add_argument("--seed", type=int, default=0)
        particles.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
        particles.set_defaults(func=_bench_particles)
    # The options live with the benchmark, whose imports are heavy: parse them only when it runs.
    mcmc = bench_sub.add_parser(
        "mcmc", add_help=False, help="Langevin MD alone vs Langevin + flow moves at equal energy evaluations"
    )
    mcmc.set_defaults(func=_bench_mcmc, passes_options=True)
    eacf = bench_sub.add_parser(
        "eacf", add_help=False, help="train and score an E-ACF coupling flow (dw4, lj13) against the CNF"
    )
    eacf.set_defaults(func=_bench_eacf, passes_options=True)
    return parser


def _bench_eacf(args: argparse.Namespace) -> int:
    from bgplugin.benchmarks.eacf import add_arguments, bench_eacf_from_args, format_eacf
    from bgplugin.fileio import write_json

    parser = argparse.ArgumentParser(
        prog="bgplugin bench eacf", description="Train an E-ACF on the published splits and compare it with the CNF."
    )
    add_arguments(parser)
    options = parser.parse_args(args.options)
    result = bench_eacf_from_args(options)
    print(format_eacf(result))
    if getattr(options, "out", None):
        print(f"wrote {write_json(options.out, result)}")
    return 0


def _bench_mcmc(args: argparse.Namespace) -> int:
    from bgplugin.benchmarks.mcmc import add_arguments, main

    parser = argparse.ArgumentParser(
        prog="bgplugin bench mcmc",
        description="Langevin MD alone vs Langevin + flow moves, at equal numbers of energy evaluations.",
    )
    add_arguments(parser)
    return int(main(parser.parse_args(args.options)))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passes_options", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.options = extra
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # pymbar warns about JAX and timeseries caveats on import; documented, not actionable
        logging.getLogger("pymbar").setLevel(logging.ERROR)
    if args.verbose:
        return int(args.func(args))
    from bgplugin.protocols import RunDirectoryError

    start = time.monotonic()
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, RunDirectoryError) as error:
        # bad input is refused before any work, with a message that names the value and the fix: a traceback
        # would bury it; the same error after a minute of work is more likely a bug, so then it comes too
        if time.monotonic() - start > BAD_INPUT_SECONDS:
            traceback.print_exc()
        command = " ".join(filter(None, (args.command, getattr(args, "benchmark", None))))
        print(f"bgplugin {command}: error: {error}", file=sys.stderr)
        print("(bgplugin --verbose ... shows where it was raised)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
