"""Batch top-k selection against a brute-force reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sae_lens_batchtopk import selection
from sae_lens_batchtopk.selection import (
    batch_topk,
    batch_topk_cutoff,
    batch_topk_indices,
    feature_choice,
    feature_choice_cutoffs,
    indices_above,
    min_positive,
    n_selected,
    per_token_topk_indices,
    threshold_activation,
)


def brute_force_batch_topk(hidden_pre: torch.Tensor, k: float) -> torch.Tensor:
    """Sort every relu'd entry, keep the first int(k * n_tokens) in a stable order.

    The stable sort breaks ties by the lowest flat index: the rule batch_topk documents.
    """
    acts = hidden_pre.relu()
    flat = acts.flatten().tolist()
    n_keep = min(int(k * acts.shape[:-1].numel()), len(flat))
    order = sorted(range(len(flat)), key=lambda i: -flat[i])
    kept = torch.zeros(len(flat), dtype=hidden_pre.dtype)
    for i in order[:n_keep]:
        kept[i] = flat[i]
    return kept.view_as(acts)


def assert_valid_selection(result: torch.Tensor, hidden_pre: torch.Tensor, k: float) -> None:
    """The kept entries are exactly the brute force's, ties included."""
    assert torch.equal(result, brute_force_batch_topk(hidden_pre, k))


def brute_force_per_token_topk(
    hidden_pre: torch.Tensor, columns: torch.Tensor, k: int
) -> list[tuple[int, int]]:
    """Per token, its k largest positive entries among columns; ties to the lowest latent."""
    kept = []
    for token, row in enumerate(hidden_pre.float().tolist()):
        ranked = sorted(columns.tolist(), key=lambda latent: (-row[latent], latent))
        kept += [(token, latent) for latent in ranked[:k] if row[latent] > 0]
    return sorted(kept)


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


def test_ties_go_to_the_lowest_flat_indices() -> None:
    hidden_pre = torch.tensor([[1.0, 1.0, 1.0, 0.5], [1.0, 1.0, 0.2, 0.1]])
    result = batch_topk(hidden_pre, 2)  # 4 of the 5 tied ones: the first four in row-major order
    assert torch.equal(result, torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert_valid_selection(result, hidden_pre, 2)
    assert torch.equal(batch_topk_indices(hidden_pre, 2), torch.tensor([0, 1, 2, 4]))


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


def bfloat16_grid(*shape: int, seed: int) -> torch.Tensor:
    """bfloat16 values on a coarse grid: most of them tie with many others."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * 8).round().div(4).bfloat16()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_topk_ties_on_a_coarse_grid_match_brute_force(dtype: torch.dtype) -> None:
    hidden_pre = bfloat16_grid(40, 96, seed=3).to(dtype)
    for k in (0.5, 3, 7.25):
        assert_valid_selection(batch_topk(hidden_pre, k), hidden_pre, k)


def test_exhaustive_small_per_token_ties() -> None:
    columns = torch.tensor([0, 2, 3])
    for values in itertools.product([-1.0, 1.0, 2.0], repeat=4):
        hidden_pre = torch.tensor(values).view(1, 4)
        for k in (1, 2, 3):
            token_idx, latent_idx = per_token_topk_indices(hidden_pre, columns, k)
            got = list(zip(token_idx.tolist(), latent_idx.tolist(), strict=True))
            assert got == brute_force_per_token_topk(hidden_pre, columns, k)


@pytest.mark.parametrize(
    ("n_tokens", "d_sae", "n_columns", "k"),
    [(48, 4096, 1024, 40), (64, 3000, 3000, 100), (16, 600, 200, 12), (8, 300, 40, 60)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fast", [True, False])
def test_per_token_topk_matches_brute_force(
    n_tokens: int, d_sae: int, n_columns: int, k: int, dtype: torch.dtype, fast: bool
) -> None:
    generator = torch.Generator().manual_seed(n_columns)
    if dtype == torch.bfloat16:
        hidden_pre = bfloat16_grid(n_tokens, d_sae, seed=k)
    else:
        hidden_pre = torch.randn(n_tokens, d_sae, generator=generator)
    hidden_pre[0] = -1.0  # a token with nothing positive
    columns = torch.randperm(d_sae, generator=generator)[:n_columns].sort().values
    token_idx, latent_idx = per_token_topk_indices(hidden_pre, columns, k, fast=fast)
    got = list(zip(token_idx.tolist(), latent_idx.tolist(), strict=True))
    assert got == brute_force_per_token_topk(hidden_pre, columns, k)


class ReferenceRows:
    """Counts the tokens the per-token top-k hands to its reference selection."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows = 0
        reference = selection._per_token_topk_reference

        def counting(block: torch.Tensor, columns: torch.Tensor, k: int) -> object:
            self.rows += block.shape[0]
            return reference(block, columns, k)

        monkeypatch.setattr(selection, "_per_token_topk_reference", counting)


def test_per_token_topk_selects_from_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    hidden_pre = torch.randn(256, 8192, generator=torch.Generator().manual_seed(5))
    columns = torch.arange(0, 8192, 2)
    spy = ReferenceRows(monkeypatch)
    token_idx, latent_idx = per_token_topk_indices(hidden_pre, columns, 64)
    assert spy.rows == 0  # no token needed the full-row selection
    reference = per_token_topk_indices(hidden_pre, columns, 64, fast=False)
    assert torch.equal(token_idx, reference[0]) and torch.equal(latent_idx, reference[1])


def test_per_token_topk_exact_when_the_sample_misleads(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tokens 0-9: every sampled column is large and every other one tiny, so the sampled floor
    # sits among the large values and leaves fewer than k candidates: those tokens must fall
    # back to the reference. The other tokens are ordinary.
    n_tokens, d_sae, k = 32, 4096, 600
    generator = torch.Generator().manual_seed(7)
    hidden_pre = torch.randn(n_tokens, d_sae, generator=generator)
    stride = d_sae // selection._TOKEN_SAMPLE_SIZE
    hidden_pre[:10] = torch.rand(10, d_sae, generator=generator) * 1e-3
    hidden_pre[:10, ::stride] = 10 + torch.rand(10, d_sae // stride, generator=generator)
    columns = torch.arange(d_sae)
    spy = ReferenceRows(monkeypatch)
    token_idx, latent_idx = per_token_topk_indices(hidden_pre, columns, k)
    assert spy.rows == 10
    got = list(zip(token_idx.tolist(), latent_idx.tolist(), strict=True))
    assert got == brute_force_per_token_topk(hidden_pre, columns, k)


def test_per_token_topk_without_columns_or_budget() -> None:
    hidden_pre = torch.randn(4, 10)
    for columns, k in ((torch.tensor([], dtype=torch.long), 3), (torch.tensor([1, 4]), 0)):
        token_idx, latent_idx = per_token_topk_indices(hidden_pre, columns, k)
        assert token_idx.numel() == latent_idx.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n_rows", "n_columns"), [(37, 101), (64, 16), (1, 7), (0, 5), (3, 0)])
def test_indices_above_equals_nonzero_of_the_compare(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, n_rows: int, n_columns: int
) -> None:
    # Chunks of 3 rows of 101 entries: chunk boundaries inside 8-byte words, a ragged last
    # chunk; values on a coarse grid, so entries equal to the floor occur (they are not above).
    monkeypatch.setattr(selection, "_CANDIDATE_CHUNK_ENTRIES", 320)
    generator = torch.Generator().manual_seed(n_rows * 1000 + n_columns)
    values = (torch.randn(n_rows, n_columns, generator=generator) * 4).round().to(dtype)
    per_row = torch.randn(n_rows, generator=generator).round().to(dtype)
    for floor in (2.0, 0.0, -100.0, 100.0, per_row):
        expected = values > (floor[:, None] if isinstance(floor, torch.Tensor) else floor)
        got = indices_above(values, floor)
        assert got.dtype == torch.long
        assert torch.equal(got, expected.flatten().nonzero().squeeze(1))
