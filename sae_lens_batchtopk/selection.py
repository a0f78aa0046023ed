"""Latent selection rules shared by training, calibration and benchmarks.

One implementation of each rule lives here so that the SAE's training pass, the threshold
calibration and the benchmarks cannot drift apart. Every function takes pre-activations with
any number of leading (token) dimensions and the latent dimension last.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# Entries of the strided sample the fast batch top-k estimates its candidate threshold from.
_THRESHOLD_SAMPLE_SIZE = 1 << 16


def n_selected(k: float, n_tokens: int) -> int:
    """Number of activations batch top-k keeps for ``n_tokens`` tokens at average L0 ``k``.

    ``int(k * n_tokens)`` (floor) is the rule of the BatchTopK paper and of SAELens's built-in
    ``batchtopk``; a float ``k`` therefore means "on average k latents per token".
    """
    return int(k * n_tokens)


def batch_topk(hidden_pre: torch.Tensor, k: float) -> torch.Tensor:
    """Keep the ``int(k * n_tokens)`` largest relu'd pre-activations over the whole batch.

    Tokens get variable numbers of latents: the budget is shared by every token of the batch
    (all leading dimensions), not allotted per token as in TopK. When fewer than ``n * k``
    pre-activations are positive, every positive one is kept (the rest of the budget selects
    zeros). Among tied values the choice is whatever ``torch.topk`` picks; the kept values are
    the same either way. Gradients flow to the kept entries only.
    """
    acts = hidden_pre.relu()
    flat = acts.flatten()
    n_keep = min(n_selected(k, acts.shape[:-1].numel()), flat.numel())
    if n_keep == 0:
        return torch.zeros_like(acts)
    top = flat.topk(n_keep, sorted=False)
    return torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(acts)


def batch_topk_indices(hidden_pre: torch.Tensor, k: float, *, fast: bool = True) -> torch.Tensor:
    """Row-major flat indices of the positive entries :func:`batch_topk` keeps, ascending.

    The sparse form of the same selection: ``batch_topk(h, k).flatten()`` is non-zero exactly
    at these indices (up to the choice among tied values). Ascending order groups the indices
    by token, the layout the sparse decoder needs.

    ``fast=True`` avoids ``torch.topk`` over all ``tokens x d_sae`` entries, which on a CPU costs
    more than the encoder matmul: a threshold estimated from a strided sample keeps about 2.5x
    the budget as candidates, and the exact top-k runs over those. The result is exact whenever
    the check passes (at least the budget's worth of candidates, or every positive entry); when
    it fails, the plain full ``torch.topk`` runs instead. ``hidden_pre`` must be contiguous.
    """
    flat = hidden_pre.reshape(-1)
    n_keep = min(n_selected(k, hidden_pre.shape[:-1].numel()), flat.numel())
    if n_keep == 0:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    candidates = _threshold_candidates(flat, n_keep, hidden_pre.shape[-1]) if fast else None
    if candidates is None:
        top = flat.topk(n_keep, sorted=False)
        chosen = top.indices[top.values > 0]
    elif candidates.numel() > n_keep:
        chosen = candidates[flat[candidates].topk(n_keep, sorted=False).indices]
    else:
        chosen = candidates
    return chosen.sort().values


def _threshold_candidates(flat: torch.Tensor, n_keep: int, d_sae: int) -> torch.Tensor | None:
    """Indices of the entries above a sampled threshold, or ``None`` if they may miss the top.

    The returned set contains the batch top-k's positive entries when it holds at least
    ``n_keep`` entries (then the ``n_keep`` largest all lie above the threshold), or when the
    threshold is 0 (then it holds every positive entry).
    """
    floor = sampled_floor(flat, n_keep, d_sae)
    if floor is None:
        return None
    candidates = (flat > floor).nonzero().squeeze(1)
    if candidates.numel() >= n_keep or floor == 0.0:
        return candidates
    return None


def sampled_floor(flat: torch.Tensor, n_keep: int, d_sae: int) -> float | None:
    """A value (>= 0) that about 2.5x ``n_keep`` entries of ``flat`` exceed, from a sample.

    An estimate, never trusted blindly: callers count the entries above it and fall back to
    an exhaustive selection when fewer than ``n_keep`` are (the distributed selection agrees on
    one floor for every process this way). ``None`` when the sample is too small to tell.
    The sample stride is coprime with ``d_sae`` so that the sample covers every latent, not
    one residue class of them.
    """
    sample = flat[:: threshold_sample_stride(flat.numel(), d_sae)]
    expected = n_keep * sample.numel() / flat.numel()
    # Twice the expected count plus four standard deviations: misses are ~never, and the
    # candidate top-k stays small.
    n_above = int(2 * expected + 4 * math.sqrt(expected) + 16)
    if n_above >= sample.numel():
        return None
    return max(float(sample.kthvalue(sample.numel() - n_above).values), 0.0)


def threshold_sample_stride(n_entries: int, d_sae: int) -> int:
    """Stride of the sample the fast batch top-k estimates its threshold from.

    About :data:`_THRESHOLD_SAMPLE_SIZE` entries, and coprime with ``d_sae`` so that the sample
    covers every latent rather than one residue class of them.
    """
    stride = max(n_entries // _THRESHOLD_SAMPLE_SIZE, 1)
    while math.gcd(stride, d_sae) != 1:
        stride += 1
    return stride


def threshold_activation(hidden_pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """JumpReLU ``relu(z) * (z > threshold)``, one threshold per latent (broadcast on last dim).

    This is exactly SAELens's ``JumpReLUSAE.encode`` rule, so a threshold-mode BatchTopK SAE and
    its JumpReLU export give bit-identical codes; each token's code depends on that token alone.
    """
    return hidden_pre.relu() * (hidden_pre > threshold)


def min_positive(acts: torch.Tensor) -> torch.Tensor:
    """Smallest strictly positive entry as a 0-d tensor, ``+inf`` when nothing fired.

    For a batch-top-k output this is the batch's effective threshold, the quantity the
    BatchTopK paper averages into its inference threshold θ = E_X[min{z_ij(X) | z_ij(X) > 0}].
    Returning ``inf`` rather than ``None`` keeps callers free of host synchronisation.
    """
    if acts.numel() == 0:
        return acts.new_full((), torch.inf)
    return torch.where(acts > 0, acts, torch.inf).min()


def feature_choice(hidden_pre: torch.Tensor, capacities: torch.Tensor) -> torch.Tensor:
    """Feature Choice (Ayonrinde 2024): latent ``j`` keeps its own top-``capacities[j]`` tokens.

    The allocation is transposed relative to TopK: capacity is per latent, so a token gets as
    many latents as chose it. Only positive (relu'd) activations count as chosen; a latent with
    fewer positive tokens than its capacity keeps all of them. Works over all leading dims.
    """
    flat = hidden_pre.reshape(-1, hidden_pre.shape[-1])
    chosen = _feature_choice_top(flat, capacities)
    if chosen is None:
        return torch.zeros_like(hidden_pre)
    top, keep = chosen
    values = torch.where(keep, top.values, torch.zeros((), dtype=flat.dtype, device=flat.device))
    return torch.zeros_like(flat).scatter(0, top.indices, values).view_as(hidden_pre)


def feature_choice_indices(hidden_pre: torch.Tensor, capacities: torch.Tensor) -> torch.Tensor:
    """Row-major flat indices of the positive entries :func:`feature_choice` keeps, ascending."""
    flat = hidden_pre.reshape(-1, hidden_pre.shape[-1])
    chosen = _feature_choice_top(flat, capacities)
    if chosen is None:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    top, keep = chosen
    latents = torch.arange(flat.shape[1], device=flat.device).expand_as(keep)
    return (top.indices[keep] * flat.shape[1] + latents[keep]).sort().values


def _feature_choice_top(
    flat: torch.Tensor, capacities: torch.Tensor
) -> tuple[torch.return_types.topk, torch.Tensor] | None:
    """Each latent's top tokens (``(m_max, d_sae)``, descending) and which of them it keeps.

    A latent keeps its first ``capacities[j]`` tokens whose pre-activation is positive.
    ``None`` when no latent may keep any token.
    """
    m_max = min(int(capacities.max()), flat.shape[0]) if capacities.numel() else 0
    if m_max == 0:
        return None
    top = flat.topk(m_max, dim=0)
    rank = torch.arange(m_max, device=flat.device)[:, None]
    keep = (rank < capacities.to(flat.device)[None, :]) & (top.values > 0)
    return top, keep


def batch_topk_cutoff(
    pre_activation_chunks: Iterable[torch.Tensor], k: float, n_tokens: int
) -> torch.Tensor:
    """The smallest value :func:`batch_topk` keeps from a batch given as row chunks.

    Returns a 1-element tensor, ``inf`` when nothing positive is kept. The chunks' top values
    are merged as they come, so a batch never has to exist as one ``tokens x d_sae`` tensor
    (what calibration needs at d_sae 65536); the result equals the minimum positive entry of
    ``batch_topk`` on the concatenated chunks.
    """
    top = largest_values(pre_activation_chunks, n_selected(k, n_tokens))
    positives = top[top > 0]
    return positives.min().reshape(1) if positives.numel() else torch.full((1,), math.inf)


def largest_values(pre_activation_chunks: Iterable[torch.Tensor], m: int) -> torch.Tensor:
    """The ``m`` largest relu'd entries of a batch given as row chunks (all, if it has fewer).

    Merged chunk by chunk, so memory stays at one chunk plus ``m`` values. Unordered.
    """
    top = torch.empty(0)
    for chunk in pre_activation_chunks:
        relu = chunk.relu().flatten()
        top = torch.cat([top.to(relu), relu.topk(min(m, relu.numel()), sorted=False).values])
        top = top.topk(min(m, top.numel()), sorted=False).values
    return top


def feature_choice_cutoffs(
    pre_activation_chunks: Iterable[torch.Tensor], capacities: torch.Tensor
) -> torch.Tensor:
    """Each latent's smallest value kept by :func:`feature_choice`, from row chunks.

    ``(d_sae,)``; ``inf`` for a latent with no capacity or nothing positive in the batch.
    Per-column top values are merged chunk by chunk, as :func:`batch_topk_cutoff` does.
    """
    m_max = int(capacities.max()) if capacities.numel() else 0
    d_sae = capacities.numel()
    top = torch.empty(0, d_sae)
    for chunk in pre_activation_chunks:
        relu = chunk.relu().reshape(-1, d_sae)
        top = torch.cat([top.to(relu), relu.topk(min(m_max, relu.shape[0]), dim=0).values])
        top = top.topk(min(m_max, top.shape[0]), dim=0).values
    if top.shape[0] == 0:
        return torch.full((d_sae,), math.inf)
    last_kept = (capacities.to(top.device) - 1).clamp(min=0, max=top.shape[0] - 1)
    cutoff = top.gather(0, last_kept[None]).squeeze(0)
    # Fewer positives than capacity: every positive value was kept.
    smallest_positive = torch.where(top > 0, top, math.inf).min(0).values
    cutoff = torch.where(cutoff > 0, cutoff, smallest_positive)
    return torch.where(capacities.to(top.device) > 0, cutoff, math.inf)


def zipf_weights(d_sae: int, exponent: float) -> torch.Tensor:
    """Zipf-law shares ``r^-s / Σ r^-s`` for ranks ``r = 1..d_sae`` (rank 1 first)."""
    ranks = torch.arange(1, d_sae + 1, dtype=torch.float64)
    weights = ranks.pow(-exponent)
    return weights / weights.sum()


def latent_capacities(
    k: float, n_tokens: int, d_sae: int, *, zipf_exponent: float | None, rank_order: torch.Tensor
) -> torch.Tensor:
    """Per-latent token capacities summing to ``int(k * n_tokens)``.

    Uniform when ``zipf_exponent`` is None (every latent gets ``k * n / d_sae``, the remainder
    spread one each over the first latents in ``rank_order``); otherwise Zipf-distributed over
    ``rank_order`` (latent ids, most frequent first). Largest-remainder rounding keeps the total
    exact; no capacity exceeds ``n_tokens``.
    """
    total = n_selected(k, n_tokens)
    if zipf_exponent is None:
        shares = torch.full((d_sae,), 1.0 / d_sae, dtype=torch.float64)
    else:
        shares = zipf_weights(d_sae, zipf_exponent)
    exact = (shares * total).clamp(max=n_tokens)
    by_rank = exact.floor().long()
    remainder = total - int(by_rank.sum())
    if remainder > 0:
        order = torch.argsort(exact - by_rank, descending=True, stable=True)
        room = by_rank[order] < n_tokens
        bump = order[room][:remainder]
        by_rank[bump] += 1
    capacities = torch.empty(d_sae, dtype=torch.long)
    capacities[rank_order.cpu()] = by_rank
    return capacities
