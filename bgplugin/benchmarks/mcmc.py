r"""``bgplugin bench mcmc``: Langevin MD alone versus Langevin MD + flow proposals, at equal energy evaluations.

Both arms run :func:`bgplugin.mcmc.run_flow_mcmc` on alanine dipeptide (OBC
implicit solvent) from the same minimised and equilibrated start. The flow
arm applies ``langevin_steps`` Langevin steps and ``n_proposals`` flow
proposals per iteration; the MD arm applies only Langevin steps, as many per
iteration as the flow arm spent energy evaluations per iteration, so both
record the same number of frames for (at least) the same number of energy
evaluations. An energy evaluation is one Langevin step (one force
evaluation) or one reduced potential computed by the flow move (the current
state once per iteration, each proposal, and the refreshed state after an
acceptance). Flow time is not an energy evaluation; it is reported as wall
time separately.

Reported (keys of the JSON):

``acceptance``
    fraction of flow proposals accepted;
``transitions_per_1e6_evals_flow`` / ``_md``
    :math:`\phi`-basin transitions per :math:`10^6` energy evaluations:
    a transition is counted when the last visited core set changes between
    :math:`\phi \in (0°, 120°]` (:math:`\alpha_L`/C7ax) and :math:`\phi \in (-180°, 0°]`
    (recrossings inside the barrier region do not count);
``transitions_md_upper_95_per_1e6``
    when MD made no transition: the 95 % Poisson upper bound (3 events) on its rate;
``statistical_inefficiency_phi_pos_*`` / ``iat_phi_pos_evals_*``
    statistical inefficiency :math:`g = 1 + 2\tau` of the :math:`\phi > 0`
    indicator in frames (pymbar ``timeseries``), and :math:`g` times the
    energy evaluations per frame; None when the indicator never changed;
``population_phi_pos`` / ``population_phi_pos_error``
    fraction of flow-arm frames with :math:`\phi \in (0, \pi]`, standard
    error :math:`\sqrt{g\,p(1-p)/n}` (None when the indicator never changed);
``reference_population_phi_pos`` (``_error``)
    the bundled umbrella-sampling reference; ``population_z`` the difference
    in units of the combined error;
``energy_evaluations`` / ``energy_evaluations_md``
    energy evaluations of the two arms.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from typing import Any

import numpy as np

from bgplugin.benchmarks.common import machine_record
from bgplugin.mcmc import FlowMCMCResult, ProposalDensity, run_flow_mcmc
from bgplugin.simulation.chirality import chiral_centers, is_l_amino_acid
from bgplugin.simulation.profiles import PHI_POSITIVE, in_range
from bgplugin.systems import MolecularSystem, get_system

__all__ = [
    "CORE_A_DEGREES",
    "CORE_B_DEGREES",
    "NO_FLOW_MESSAGE",
    "add_arguments",
    "count_transitions",
    "format_mcmc",
    "main",
    "run_mcmc_benchmark",
    "statistical_inefficiency",
]

logger = logging.getLogger(__name__)

#: Core sets of the transition count, degrees ``(low, high]``: alpha_L / C7ax and the phi < 0 basins.
CORE_A_DEGREES = (0.0, 120.0)
CORE_B_DEGREES = (-180.0, 0.0)

NO_FLOW_MESSAGE = (
    "bench mcmc needs a trained flow for the system: pass --flow PATH (a file written by CNF.save). "
    "To make one for alanine dipeptide: sample training data with "
    "bgplugin.simulation.run_md(get_system('alanine_dipeptide'), n_frames=50_000, stride=100, output='ala2_md.h5'), "
    "train bgplugin.flows.build_flow(system, 'egnn') with bgplugin.training.Trainer and "
    "FlowMatching(flow.prior, pairing='eqot') on TrainingData(dataset.positions), then flow.save('ala2_flow.pt'). "
    "docs/mcmc.md has the full recipe. An untrained flow gives an acceptance of ~0 and says nothing."
)


def count_transitions(phi: np.ndarray, core_a: tuple[float, float], core_b: tuple[float, float]) -> int:
    """Changes of the last visited core set along a time series.

    Parameters
    ----------
    phi : ndarray, shape (n_frames,), radians
    core_a, core_b : (float, float)
        Core sets ``(low, high]`` in radians (disjoint).

    Returns
    -------
    int
        Number of frames that enter one core while the previous core visited was the other.
    """
    in_a, in_b = in_range(phi, core_a), in_range(phi, core_b)
    if np.any(in_a & in_b):
        raise ValueError(f"core sets {core_a} and {core_b} overlap; they must be disjoint")
    labels = np.where(in_a, 1, np.where(in_b, 2, 0))
    visited = labels[labels > 0]
    return int(np.count_nonzero(visited[1:] != visited[:-1]))


def statistical_inefficiency(indicator: np.ndarray) -> float | None:
    """pymbar's statistical inefficiency of a time series; None when it is constant."""
    from pymbar import timeseries  # imported here: pymbar prints a banner on import

    values = np.asarray(indicator, dtype=np.float64)
    if len(values) < 3 or np.ptp(values) == 0:
        return None
    return float(timeseries.statistical_inefficiency(values, mintime=3, fast=False))


def _arm_summary(
    result: FlowMCMCResult, system: MolecularSystem, core_a: tuple[float, float], core_b: tuple[float, float]
) -> dict[str, Any]:
    phi = np.asarray(system.cvs["phi"](result.dataset.positions.astype(np.float64)))
    indicator = in_range(phi, PHI_POSITIVE).astype(np.float64)
    n = len(indicator)
    g = statistical_inefficiency(indicator)
    p = float(indicator.mean())
    error = None if g is None else math.sqrt(g * p * (1.0 - p) / n)
    transitions = count_transitions(phi, core_a, core_b)
    evals = result.n_energy_evaluations
    out = {
        **result.to_dict(),
        "transitions": transitions,
        "transitions_per_1e6_evals": transitions / evals * 1e6,
        "population_phi_pos": p,
        "population_phi_pos_error": error,
        "population_error_note": None if g is not None else "the phi > 0 indicator never changed: no error estimate",
        "statistical_inefficiency_phi_pos": g,
        "iat_phi_pos_evals": None if g is None else g * evals / n,
    }
    if chiral_centers(system.topology):
        out["fraction_l"] = float(np.mean(is_l_amino_acid(result.dataset.positions, system.topology)))
    return out


def run_mcmc_benchmark(
    flow: ProposalDensity | str | os.PathLike[str] | None,
    *,
    system: str = "alanine_dipeptide",
    n_iterations: int = 50,
    langevin_steps: int = 200,
    n_proposals: int = 4,
    timestep: float = 1.0,
    friction: float = 1.0,
    equilibration_steps: int = 1000,
    platform: str = "CPU",
    seed: int = 1,
    device: str = "auto",
    recompute_proposal_log_q: bool = False,
    core_a_degrees: tuple[float, float] = CORE_A_DEGREES,
    core_b_degrees: tuple[float, float] = CORE_B_DEGREES,
    progress: bool = True,
) -> dict[str, Any]:
    """Langevin MD versus Langevin MD + flow moves at equal numbers of energy evaluations.

    Parameters
    ----------
    flow : ProposalDensity, path-like or None
        A trained flow (nm) for the system or the path of a saved one; None
        raises with instructions (:data:`NO_FLOW_MESSAGE`).
    system : str
        A bundled molecular system with a ``phi`` CV.
    n_iterations : int
        Frames per arm.
    langevin_steps, n_proposals : int
        Per iteration of the flow arm.
    timestep, friction : float
        fs and 1/ps.
    equilibration_steps : int
        Langevin steps after minimisation, before either arm (not counted).
    platform : str
        OpenMM platform (``CPU`` runs with one thread).
    seed : int
        Flow arm seed; the MD arm uses ``seed + 1``.
    device : str
        Where a flow given by path is loaded.
    recompute_proposal_log_q : bool
        See :class:`bgplugin.mcmc.FlowIndependenceMove`.
    core_a_degrees, core_b_degrees : (float, float)
        Core sets of the transition count.
    progress : bool
        Progress bars.

    Returns
    -------
    dict
        The keys listed in the module docstring, plus ``flow`` and ``md``
        (per-arm summaries), ``settings``, ``machine``, ``wall_time_s``.
    """
    if flow is None:
        raise ValueError(NO_FLOW_MESSAGE)
    start = time.perf_counter()
    mol = get_system(system)
    if not isinstance(mol, MolecularSystem) or "phi" not in mol.cvs:
        raise ValueError(f"bench mcmc needs a molecular system with a 'phi' CV, got {system!r}")
    core_a = (math.radians(core_a_degrees[0]), math.radians(core_a_degrees[1]))
    core_b = (math.radians(core_b_degrees[0]), math.radians(core_b_degrees[1]))

    def arm(proposal: Any, steps: int, arm_proposals: int, arm_seed: int) -> FlowMCMCResult:
        return run_flow_mcmc(
            mol, proposal, n_iterations=n_iterations, langevin_steps=steps, n_proposals=arm_proposals,
            timestep=timestep, friction=friction, platform=platform, equilibration_steps=equilibration_steps,
            recompute_proposal_log_q=recompute_proposal_log_q, seed=arm_seed, device=device, progress=progress,
        )  # fmt: skip

    flow_run = arm(flow, langevin_steps, n_proposals, seed)
    md_steps = math.ceil(flow_run.n_energy_evaluations / n_iterations)
    md_run = arm(None, md_steps, 0, seed + 1)
    flow_summary = _arm_summary(flow_run, mol, core_a, core_b)
    md_summary = _arm_summary(md_run, mol, core_a, core_b)

    out: dict[str, Any] = {
        "acceptance": flow_run.acceptance,
        "transitions_per_1e6_evals_flow": flow_summary["transitions_per_1e6_evals"],
        "transitions_per_1e6_evals_md": md_summary["transitions_per_1e6_evals"],
        "transitions_flow": flow_summary["transitions"],
        "transitions_md": md_summary["transitions"],
        "population_phi_pos": flow_summary["population_phi_pos"],
        "population_phi_pos_error": flow_summary["population_phi_pos_error"],
        "population_phi_pos_md": md_summary["population_phi_pos"],
        "population_phi_pos_md_error": md_summary["population_phi_pos_error"],
        "statistical_inefficiency_phi_pos_flow": flow_summary["statistical_inefficiency_phi_pos"],
        "statistical_inefficiency_phi_pos_md": md_summary["statistical_inefficiency_phi_pos"],
        "iat_phi_pos_evals_flow": flow_summary["iat_phi_pos_evals"],
        "iat_phi_pos_evals_md": md_summary["iat_phi_pos_evals"],
        "energy_evaluations": flow_run.n_energy_evaluations,
        "energy_evaluations_md": md_run.n_energy_evaluations,
    }
    if md_summary["transitions"] == 0:
        out["transitions_md_upper_95_per_1e6"] = 3.0 / md_run.n_energy_evaluations * 1e6
        out["transition_speedup_lower_95"] = (
            out["transitions_per_1e6_evals_flow"] / out["transitions_md_upper_95_per_1e6"]
        )
    else:
        out["transition_speedup"] = out["transitions_per_1e6_evals_flow"] / out["transitions_per_1e6_evals_md"]
    out.update(_reference(system, out["population_phi_pos"], out["population_phi_pos_error"]))
    out.update(
        flow=flow_summary,
        md=md_summary,
        settings={
            "system": system,
            "n_iterations": n_iterations,
            "langevin_steps": langevin_steps,
            "n_proposals": n_proposals,
            "md_langevin_steps_per_frame": md_steps,
            "timestep_fs": timestep,
            "friction_per_ps": friction,
            "equilibration_steps": equilibration_steps,
            "platform": platform,
            "seed_flow": seed,
            "seed_md": seed + 1,
            "recompute_proposal_log_q": recompute_proposal_log_q,
            "core_a_degrees": list(core_a_degrees),
            "core_b_degrees": list(core_b_degrees),
            "flow": flow_run.settings["flow"],
            "energy_evaluation": "one Langevin step, or one reduced potential computed by the flow move",
        },  # fmt: skip
        machine=machine_record(),
        wall_time_s=time.perf_counter() - start,
    )
    return out


def _reference(system: str, population: float, error: float | None) -> dict[str, Any]:
    from bgplugin.simulation.reference import bundled_reference

    try:
        reference = bundled_reference(system).delta_f
    except FileNotFoundError as exc:
        logger.warning("no bundled reference for %s: %s", system, exc)
        return {"reference_population_phi_pos": None, "reference_population_phi_pos_error": None,
                "population_z": None}  # fmt: skip
    ref, ref_error = reference.population_a, reference.population_a_error
    combined = None if error is None else math.hypot(error, ref_error)
    return {
        "reference_population_phi_pos": ref,
        "reference_population_phi_pos_error": ref_error,
        "population_z": (population - ref) / combined if combined else None,
    }


def format_mcmc(result: dict[str, Any]) -> str:
    """A short table of :func:`run_mcmc_benchmark` results."""

    def fmt(value: Any, spec: str = ".3g") -> str:
        return "n/a" if value is None else format(value, spec)

    settings = result["settings"]
    lines = [
        f"flow MCMC vs Langevin MD, {settings['system']}: {settings['n_iterations']} frames per arm, "
        f"{settings['langevin_steps']} steps + {settings['n_proposals']} proposals per iteration "
        f"(MD: {settings['md_langevin_steps_per_frame']} steps per frame)",
        f"{'':<34}{'flow + MD':>14}{'MD':>14}",
        f"{'energy evaluations':<34}{result['energy_evaluations']:>14d}{result['energy_evaluations_md']:>14d}",
        f"{'acceptance':<34}{fmt(result['acceptance']):>14}{'':>14}",
        f"{'phi transitions':<34}{result['transitions_flow']:>14d}{result['transitions_md']:>14d}",
        f"{'transitions per 1e6 evaluations':<34}{fmt(result['transitions_per_1e6_evals_flow']):>14}"
        f"{fmt(result['transitions_per_1e6_evals_md']):>14}",
        f"{'g(phi > 0 indicator), frames':<34}{fmt(result['statistical_inefficiency_phi_pos_flow']):>14}"
        f"{fmt(result['statistical_inefficiency_phi_pos_md']):>14}",
        f"{'P(phi > 0)':<34}{fmt(result['population_phi_pos'], '.4f'):>14}"
        f"{fmt(result['population_phi_pos_md'], '.4f'):>14}",
        f"{'  +-':<34}{fmt(result['population_phi_pos_error'], '.4f'):>14}"
        f"{fmt(result['population_phi_pos_md_error'], '.4f'):>14}",
        f"reference P(phi > 0) = {fmt(result['reference_population_phi_pos'], '.4f')} +- "
        f"{fmt(result['reference_population_phi_pos_error'], '.4f')}; z(flow) = {fmt(result['population_z'], '.2f')}",
    ]
    if "transition_speedup_lower_95" in result:
        lines.append(
            f"MD made no transition: rate < {result['transitions_md_upper_95_per_1e6']:.3g} per 1e6 (95 %), "
            f"speed-up > {result['transition_speedup_lower_95']:.3g}"
        )
    else:
        lines.append(f"speed-up in transitions per evaluation: {result['transition_speedup']:.3g}")
    lines.append(
        f"wall time {result['wall_time_s']:.0f} s (flow arm {result['flow']['wall_time_s']:.0f} s, of which flow "
        f"{result['flow']['flow_time_s']:.0f} s; MD arm {result['md']['wall_time_s']:.0f} s)"
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bgplugin bench mcmc``."""

    def positive(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
        return value

    parser.add_argument("--flow", help="a trained flow for the system (a file written by CNF.save); required")
    parser.add_argument("--system", default="alanine_dipeptide", help="bundled molecular system (alanine_dipeptide)")
    parser.add_argument("--iterations", type=positive, default=50, help="frames per arm (50)")
    parser.add_argument("--langevin-steps", type=positive, default=200, help="Langevin steps per iteration (200)")
    parser.add_argument("--proposals", type=positive, default=4, help="flow proposals per iteration (4)")
    parser.add_argument("--timestep", type=float, default=1.0, help="fs (1.0; the system has no constraints)")
    parser.add_argument("--friction", type=float, default=1.0, help="1/ps (1.0)")
    parser.add_argument("--equilibration-steps", type=int, default=1000, help="steps before both arms (1000)")
    parser.add_argument("--platform", default="CPU", help="OpenMM platform (CPU)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the flow runs")
    parser.add_argument("--recompute-log-q", action="store_true", help="log q of proposals from log_prob (2x cost)")
    parser.add_argument("--seed", type=positive, default=1)
    parser.add_argument("--out", help="write the results as JSON to this file")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed :func:`add_arguments` options; print the table, write ``--out``."""
    from bgplugin.fileio import write_json

    if not args.flow:
        print(f"error: {NO_FLOW_MESSAGE}", file=sys.stderr)
        return 2
    result = run_mcmc_benchmark(
        args.flow, system=args.system, n_iterations=args.iterations, langevin_steps=args.langevin_steps,
        n_proposals=args.proposals, timestep=args.timestep, friction=args.friction,
        equilibration_steps=args.equilibration_steps, platform=args.platform, seed=args.seed, device=args.device,
        recompute_proposal_log_q=args.recompute_log_q,
    )  # fmt: skip
    print(format_mcmc(result))
    if args.out:
        print(f"wrote {write_json(args.out, result)}")
    return 0
