"""Batch top-k selection against a brute-force reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sae_lens_batchtopk.selection import (
    batch_topk,
    batch_topk_cutoff,
    feature_choice,
    feature_choice_cutoffs,
    min_positive,
    n_selected,
    threshold_activation,
)


def brute_force_batch_topk(hidden_pre: torch.Tensor, k: float) -> torch.Tensor:
    """Sort every relu'd entry, keep the first int(k * n_tokens) in a stable order."""
    acts = hidden_pre.relu()
    flat = acts.flatten().tolist()
    n_keep = min(int(k * acts.shape[:-1].numel()), len(flat))
    order = sorted(range(len(flat)), key=lambda i: -flat[i])
    kept = torch.zeros(len(flat))
    for i in order[:n_keep]:
        kept[i] = flat[i]
    return kept.view_as(acts)


def assert_valid_selection(result: torch.Tensor, hidden_pre: torch.Tensor, k: float) -> None:
    """Ties may be broken either way: compare kept values and the selection invariant."""
    reference = brute_force_batch_topk(hidden_pre, k)
    assert torch.equal(result.flatten().sort().values, reference.flatten().sort().values)
    relu = hidden_pre.relu()
    kept = result != 0
    # every kept value equals its relu'd pre-activation, and no dropped value beats a kept one
    assert torch.equal(result[kept], relu[kept])
    if kept.any() and (~kept).any():
        assert relu[~kept].max() <= result[kept].min()


@pytest.mark.parametrize(
    ("shape", "k"),
    [((8, 10), 3), ((8, 10), 2.5), ((4, 5, 10), 3), ((2, 3, 4, 10), 1.75), ((1, 10), 10)],
)
def test_matches_brute_force(shape: tuple[int, ...], k: float) -> None:
    torch.manual_seed(0)
    hidden_pre = torch.randn(shape)
    result = batch_topk(hidden_pre, k)
    assert result.shape == hidden_pre.shape
    assert_valid_selection(result, hidden_pre, k)
    n_positive = int((hidden_pre > 0).sum())
    expected = min(n_selected(k, hidden_pre.shape[:-1].numel()), n_positive)
    assert int((result > 0).sum()) == expected


def test_total_budget_is_shared_not_per_token() -> None:
    hidden_pre = torch.tensor([[9.0, 8.0, 7.0, 6.0], [0.1, 0.2, -1.0, -1.0]])
    result = batch_topk(hidden_pre, 2)
    assert (result[0] > 0).sum() == 4
    assert (result[1] > 0).sum() == 0


def test_ties_keep_exact_count() -> None:
    hidden_pre = torch.tensor([[1.0, 1.0, 1.0, 0.5], [1.0, 1.0, 0.2, 0.1]])
    result = batch_topk(hidden_pre, 2)  # 4 of the 5 tied ones
    assert int((result > 0).sum()) == 4
    assert set(result[result > 0].tolist()) == {1.0}
    assert_valid_selection(result, hidden_pre, 2)


def test_fewer_positives_than_budget() -> None:
    hidden_pre = torch.tensor([[-1.0, 2.0, -3.0], [-0.5, -0.1, 0.3]])
    result = batch_topk(hidden_pre, 3)
    assert torch.equal(result, hidden_pre.relu())


def test_float_k_floors() -> None:
    assert n_selected(2.5, 3) == 7
    assert n_selected(0.3, 3) == 0
    result = batch_topk(torch.randn(3, 8), 0.3)
    assert not result.any()


def test_gradient_reaches_only_kept_entries() -> None:
    torch.manual_seed(1)
    hidden_pre = torch.randn(6, 12, requires_grad=True)
    result = batch_topk(hidden_pre, 2)
    result.sum().backward()
    assert hidden_pre.grad is not None
    assert torch.equal(hidden_pre.grad != 0, result != 0)


def test_exhaustive_small_ties() -> None:
    for values in itertools.product([0.0, 1.0, 2.0], repeat=6):
        hidden_pre = torch.tensor(values).view(2, 3)
        for k in (0.5, 1, 1.5, 3):
            assert_valid_selection(batch_topk(hidden_pre, k), hidden_pre, k)


def test_threshold_activation_is_jumprelu_rule() -> None:
    hidden_pre = torch.tensor([[0.5, 1.0, -2.0, 3.0]])
    threshold = torch.tensor([0.5, 0.2, -3.0, 3.5])
    assert torch.equal(
        threshold_activation(hidden_pre, threshold), torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    )


def test_min_positive() -> None:
    assert float(min_positive(torch.tensor([0.0, 3.0, 0.5, -1.0]))) == 0.5
    assert torch.isinf(min_positive(torch.zeros(4)))


@pytest.mark.parametrize("k", [0.5, 3.0, 7.25])
def test_batch_topk_cutoff_from_chunks_is_the_smallest_kept_value(k: float) -> None:
    hidden_pre = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    kept = batch_topk(hidden_pre, k)
    cutoff = batch_topk_cutoff(hidden_pre.split(7), k, hidden_pre.shape[0])
    assert cutoff.item() == kept[kept > 0].min().item()
    assert batch_topk_cutoff((-hidden_pre.abs()).split(7), k, 40).item() == math.inf


def test_feature_choice_cutoffs_from_chunks_are_each_latents_smallest_kept_value() -> None:
    hidden_pre = torch.randn(40, 24, generator=torch.Generator().manual_seed(2))
    hidden_pre[:, 3] = -1.0  # a latent with nothing positive
    capacities = torch.randint(0, 6, (24,), generator=torch.Generator().manual_seed(3))
    kept = feature_choice(hidden_pre, capacities)
    cutoffs = feature_choice_cutoffs(hidden_pre.split(9), capacities)
    expected = torch.where(kept > 0, kept, math.inf).min(0).values
    assert torch.equal(cutoffs, expected)
