"""Pairings for flow matching: Kabsch, type-respecting Hungarian, OT and equivariant OT."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bgplugin.training.pairing import (
    Pairing,
    aligned_squared_distance,
    equivariant_cost_matrix,
    kabsch_rotation,
    optimal_permutation,
    ot_assignment,
    squared_distance_matrix,
)

torch.set_num_threads(1)


def _mean_free(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=-2, keepdim=True)


def _random_rotations(n: int, dim: int, generator: torch.Generator, proper: bool = True) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, dim, dim, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    det = torch.linalg.det(q)
    flip = torch.where(det < 0, -1.0, 1.0) if proper else torch.where(det > 0, -1.0, 1.0)
    return torch.cat([q[..., :-1], q[..., -1:] * flip[:, None, None]], dim=-1)


def _batch(b: int, n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = _mean_free(torch.randn(b, n, dim, generator=g, dtype=torch.float64))
    x1 = _mean_free(1.5 * torch.randn(b, n, dim, generator=g, dtype=torch.float64))
    return x0, x1


# ------------------------------------------------------------------- Kabsch
@pytest.mark.parametrize("dim", [2, 3])
def test_kabsch_recovers_a_known_rotation(dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = _mean_free(torch.randn(64, 7, dim, generator=g, dtype=torch.float64))
    rotation = _random_rotations(64, dim, g)
    estimate = kabsch_rotation(x, x @ rotation)
    torch.testing.assert_close(estimate, rotation, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dim", [2, 3])
def test_kabsch_returns_proper_rotations_even_for_mirror_images(dim: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = _mean_free(torch.randn(200, 5, dim, generator=g, dtype=torch.float64))
    y = x @ _random_rotations(200, dim, g, proper=False)  # y is a mirror image of x
    proper = kabsch_rotation(x, y)
    improper = kabsch_rotation(x, y, allow_reflections=True)
    eye = torch.eye(dim, dtype=torch.float64).expand(200, dim, dim)
    torch.testing.assert_close(proper.transpose(-1, -2) @ proper, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.linalg.det(proper), torch.ones(200, dtype=torch.float64))
    torch.testing.assert_close(torch.linalg.det(improper), -torch.ones(200, dtype=torch.float64))
    residual_proper = (x @ proper - y).square().sum(dim=(1, 2))
    residual_improper = (x @ improper - y).square().sum(dim=(1, 2))
    assert residual_improper.max() < 1e-18
    assert residual_proper.min() > 1e-3  # a mirror image cannot be reached by a rotation


@pytest.mark.parametrize("dim", [2, 3])
def test_kabsch_beats_random_rotations(dim: int) -> None:
    g = torch.Generator().manual_seed(2)
    x, y = _batch(1, 6, dim, seed=3)
    best = (x @ kabsch_rotation(x, y) - y).square().sum()
    trials = _random_rotations(5000, dim, g)
    assert best <= (x @ trials - y).square().sum(dim=(1, 2)).min() + 1e-12


@pytest.mark.parametrize("dim", [1, 2, 3, 4])
@pytest.mark.parametrize("allow_reflections", [False, True])
def test_closed_form_aligned_distance_matches_svd(dim: int, allow_reflections: bool) -> None:
    x, y = _batch(300, 6, dim, seed=4)
    closed = aligned_squared_distance(x, y, allow_reflections=allow_reflections)
    rotation = kabsch_rotation(x, y, allow_reflections=allow_reflections)
    direct = (x @ rotation - y).square().sum(dim=(1, 2))
    torch.testing.assert_close(closed, direct, atol=1e-7, rtol=1e-7)


def test_kabsch_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        kabsch_rotation(torch.zeros(2, 3, 3), torch.zeros(2, 4, 3))


# ------------------------------------------------------------ permutations
def _typed_permutations(types: np.ndarray) -> list[np.ndarray]:
    groups = [np.flatnonzero(types == t) for t in np.unique(types)]
    result = []
    for choice in itertools.product(*(itertools.permutations(g) for g in groups)):
        perm = np.arange(len(types))
        for group, order in zip(groups, choice, strict=True):
            perm[group] = order
        result.append(perm)
    return result


@pytest.mark.parametrize(
    "types",
    [
        np.array([0, 0, 1, 1, 1, 2, 0, 1]),  # small groups: scored all at once
        np.array([3, 0, 0, 0, 0, 0, 0, 3]),  # a group of six: the Hungarian loop
    ],
    ids=["small-groups", "group-of-six"],
)
def test_optimal_permutation_respects_types_and_is_optimal(types: np.ndarray) -> None:
    n = len(types)
    x, y = _batch(6, n, 3, seed=5)
    perm = optimal_permutation(x, y, types)
    candidates = _typed_permutations(types)
    for b in range(len(x)):
        p = perm[b].numpy()
        assert sorted(p) == list(range(n))
        assert (types[p] == types).all(), "an atom was exchanged with an atom of another type"
        cost = (x[b, p] - y[b]).square().sum().item()
        brute = min((x[b, c] - y[b]).square().sum().item() for c in candidates)
        assert cost == pytest.approx(brute, abs=1e-10)


def test_optimal_permutation_without_types_undoes_a_shuffle() -> None:
    x, _ = _batch(4, 9, 3, seed=6)
    shuffle = torch.stack([torch.randperm(9, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    y = torch.gather(x, 1, shuffle[..., None].expand(-1, -1, 3))
    assert torch.equal(optimal_permutation(x, y), shuffle)


def test_atom_types_are_validated() -> None:
    x, y = _batch(2, 4, 2, seed=7)
    with pytest.raises(ValueError, match="shape"):
        optimal_permutation(x, y, np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="integers"):
        optimal_permutation(x, y, np.array([0.0, 0.5, 1.0, 1.0]))


# ---------------------------------------------------------------------- OT
def test_ot_assignment_is_the_optimal_permutation() -> None:
    cost = torch.rand(6, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    index = ot_assignment(cost)
    assert sorted(index.tolist()) == list(range(6))
    total = cost[index, torch.arange(6)].sum().item()
    brute = min(cost[list(p), torch.arange(6)].sum().item() for p in itertools.permutations(range(6)))
    assert total == pytest.approx(brute, abs=1e-12)


@pytest.mark.parametrize("n, dim", [(4, 2), (13, 3)], ids=["dw4-like", "lj13-like"])
def test_eqot_cost_is_not_above_ot_cost_which_is_not_above_no_pairing(n: int, dim: int) -> None:
    x0, x1 = _batch(24, n, dim, seed=9)
    none = Pairing("none")(x0, x1).cost.sum().item()
    plain = Pairing("ot")(x0, x1).cost.sum().item()
    equivariant = Pairing("eqot")(x0, x1).cost.sum().item()
    assert plain <= none + 1e-9
    assert equivariant <= plain + 1e-9
    assert equivariant < 0.9 * plain  # permutations and rotations must help on random pairs
    # entrywise: reducing over symmetries never increases a pair's cost
    eq_cost, _ = equivariant_cost_matrix(x0, x1)
    assert (eq_cost <= squared_distance_matrix(x0, x1) + 1e-9).all()


def test_eqot_result_is_a_permuted_rotated_copy_of_a_distinct_prior_sample() -> None:
    types = np.array([0, 0, 0, 1, 1, 2])
    x0, x1 = _batch(16, 6, 3, seed=10)
    result = Pairing("eqot", types)(x0, x1)
    assert sorted(result.prior_index.tolist()) == list(range(16))
    for j in range(16):
        p = result.permutation[j]
        assert (types[p.numpy()] == types).all()
        rebuilt = x0[result.prior_index[j]][p] @ result.rotation[j]
        torch.testing.assert_close(result.x0[j], rebuilt)
    torch.testing.assert_close(torch.linalg.det(result.rotation), torch.ones(16, dtype=torch.float64))
    torch.testing.assert_close(result.cost, (result.x0 - x1).square().sum(dim=(1, 2)))
    eq_cost, _ = equivariant_cost_matrix(x0, x1, types)
    torch.testing.assert_close(result.cost, eq_cost[result.prior_index, torch.arange(16)], atol=1e-9, rtol=0)


def test_eqot_recovers_permuted_and_shuffled_copies_exactly() -> None:
    g = torch.Generator().manual_seed(11)
    x0, _ = _batch(12, 8, 3, seed=12)
    batch_order = torch.randperm(12, generator=g)
    atom_order = torch.stack([torch.randperm(8, generator=g) for _ in range(12)])
    x1 = torch.gather(x0[batch_order], 1, atom_order[..., None].expand(-1, -1, 3))
    result = Pairing("eqot")(x0, x1)
    assert torch.equal(result.prior_index, batch_order)
    assert result.cost.max() < 1e-20


def test_eqot_recovers_rotated_and_shuffled_copies_exactly() -> None:
    g = torch.Generator().manual_seed(13)
    types = np.arange(7)  # nothing to permute: only the rotation is left to find
    x0, _ = _batch(10, 7, 3, seed=14)
    batch_order = torch.randperm(10, generator=g)
    x1 = x0[batch_order] @ _random_rotations(10, 3, g)
    result = Pairing("eqot", types)(x0, x1)
    assert torch.equal(result.prior_index, batch_order)
    assert result.cost.max() < 1e-20


def test_reflections_lower_the_cost_only_when_allowed() -> None:
    x0, x1 = _batch(16, 5, 3, seed=15)
    proper = Pairing("eqot")(x0, x1)
    improper = Pairing("eqot", allow_reflections=True)(x0, x1)
    assert improper.cost.sum() <= proper.cost.sum() + 1e-9
    assert (torch.linalg.det(proper.rotation) > 0).all()
    assert (torch.linalg.det(improper.rotation) < 0).any()


def test_block_pairing_stays_within_blocks() -> None:
    x0, x1 = _batch(20, 4, 2, seed=16)
    result = Pairing("eqot", block_size=8)(x0, x1)
    index = result.prior_index
    assert sorted(index.tolist()) == list(range(20))
    assert ((index // 8) == (torch.arange(20) // 8)).all()
    assert result.cost.sum() <= Pairing("none")(x0, x1).cost.sum()


def test_pairing_keeps_device_and_dtype_and_rejects_bad_input() -> None:
    x0, x1 = _batch(8, 4, 2, seed=17)
    result = Pairing("ot")(x0.float(), x1.float())
    assert result.x0.dtype == torch.float32 and result.rotation.dtype == torch.float32
    with pytest.raises(ValueError, match="pairing method"):
        Pairing("hungarian")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_size"):
        Pairing("ot", block_size=0)
    with pytest.raises(ValueError, match="same batch size"):
        Pairing("ot")(x0, x1[:4])
    with pytest.raises(ValueError, match="atom_types for 3 particles"):
        Pairing("eqot", np.array([0, 0, 1]))(x0, x1)
