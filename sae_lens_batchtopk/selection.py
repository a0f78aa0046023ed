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
# Columns per token the fast per-token top-k estimates each token's floor from.
_TOKEN_SAMPLE_SIZE = 512
# Entries :func:`indices_above` compares per chunk on a CPU: a 4 MB mask, reused in cache.
_CANDIDATE_CHUNK_ENTRIES = 1 << 22


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
    pre-activations are positive, every positive one is kept. Ties at the smallest kept value
    go to the lowest row-major flat indices, so the kept set is a function of the values alone
    (no backend's tie order): on the coarse bfloat16 grid ties are common, and the fast index
    form, :func:`batch_topk_indices`, must keep exactly the same entries. Gradients flow to
    the kept entries only.
    """
    acts = hidden_pre.relu()
    flat = acts.detach().flatten()
    n_keep = min(n_selected(k, acts.shape[:-1].numel()), flat.numel())
    keep = largest_mask(flat, n_keep) & (flat > 0)
    return torch.where(keep.view_as(acts), acts, 0.0)


def largest_mask(values: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Mask of the ``n_keep`` largest entries of a 1-D tensor; ties go to the lowest indices.

    The tie rule makes the result depend on the values and their order only, so a selection
    computed from a subset of candidates (kept in ascending index order) equals this one on
    the whole tensor whenever every entry tied with the cut-off is among the candidates.
    """
    if n_keep >= values.numel():
        return torch.ones_like(values, dtype=torch.bool)
    if n_keep <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    cutoff = values.kthvalue(values.numel() - n_keep + 1).values
    keep = values > cutoff
    tied = (values == cutoff).nonzero().squeeze(1)
    keep[tied[: n_keep - int(keep.sum())]] = True
    return keep


def batch_topk_indices(hidden_pre: torch.Tensor, k: float, *, fast: bool = True) -> torch.Tensor:
    """Row-major flat indices of the entries :func:`batch_topk` keeps, ascending.

    The sparse form of the same selection, ties included: ``batch_topk(h, k).flatten()`` is
    non-zero exactly at these indices. Ascending order groups the indices by token, the layout
    the sparse decoder needs.

    The kept entries are chosen among candidates, the entries above a floor. ``fast=True``
    estimates a floor from a strided sample (:func:`sampled_floor`) that about 2.5x the
    budget exceed, so the exact selection (:func:`largest_mask`) runs over a few hundred
    thousand values rather than every ``tokens x d_sae`` entry; ``torch.topk`` over all of them
    costs more than the encoder matmul on a CPU. The candidates suffice whenever they number
    at least the budget (then every entry tied with the cut-off is among them) or the floor is
    0 (then they are every positive entry); when the sample misled, or with ``fast=False``,
    the candidates are every positive entry. ``hidden_pre`` must be contiguous.
    """
    flat = hidden_pre.reshape(-1)
    n_keep = min(n_selected(k, hidden_pre.shape[:-1].numel()), flat.numel())
    if n_keep == 0:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    rows = flat.view(-1, hidden_pre.shape[-1])
    candidates = None
    floor = sampled_floor(flat, n_keep, hidden_pre.shape[-1]) if fast else None
    if floor is not None:
        candidates = indices_above(rows, floor)
        if candidates.numel() < n_keep and floor > 0:
            candidates = None
    if candidates is None:
        candidates = indices_above(rows, 0.0)
    return candidates[largest_mask(flat[candidates], n_keep)]


def indices_above(values: torch.Tensor, floor: float | torch.Tensor) -> torch.Tensor:
    """Ascending row-major flat indices of the entries of a 2-D ``values`` above ``floor``.

    ``floor`` is one number, or one per row (a ``(rows,)`` tensor). The same indices as
    ``(values > floor).flatten().nonzero()``, the form used on CUDA. On a CPU that form costs
    about twice the compare itself when few entries pass (the candidate passes of the
    selections: under 1 %): it page-faults in a fresh mask as large as ``values`` and
    ``nonzero`` scans it byte by byte. Here the compare writes chunk by chunk into one small
    reused mask, and ``nonzero`` runs over the mask's 8-byte words, then over the bytes of the
    few words with an entry set. ``values`` must be contiguous.
    """
    if floor_is_per_row := isinstance(floor, torch.Tensor):
        floor = floor[:, None]
    if values.device.type != "cpu":
        return (values > floor).flatten().nonzero().squeeze(1)
    n_rows, n_columns = values.shape
    chunk_rows = max(_CANDIDATE_CHUNK_ENTRIES // max(n_columns, 1), 1)
    # Whole 8-byte words, the tail beyond a chunk's entries kept False.
    mask = torch.zeros(-(-min(chunk_rows, n_rows) * n_columns // 8) * 8, dtype=torch.bool)
    parts = [torch.zeros(0, dtype=torch.long)]
    for start in range(0, n_rows, chunk_rows):
        chunk = values[start : start + chunk_rows]
        n_entries = chunk.numel()
        n_words = -(-n_entries // 8)
        mask[n_entries : n_words * 8] = False
        chunk_floor = floor[start : start + chunk_rows] if floor_is_per_row else floor
        torch.gt(chunk, chunk_floor, out=mask[:n_entries].view(chunk.shape))
        bytes_of_words = mask[: n_words * 8].view(n_words, 8)
        words = bytes_of_words.view(torch.int64).flatten().nonzero().squeeze(1)
        found = bytes_of_words.index_select(0, words).flatten().nonzero().squeeze(1)
        parts.append(words[found >> 3] * 8 + (found & 7) + start * n_columns)
    return torch.cat(parts)


def sampled_floor(flat: torch.Tensor, n_keep: int, d_sae: int) -> float | None:
    """A value (>= 0) that about 2.5x ``n_keep`` entries of ``flat`` exceed, from a sample.

    An estimate, never trusted blindly: callers count the entries above it and fall back when
    fewer than ``n_keep`` are (the distributed selection agrees on one floor for every process
    this way). ``None`` when the sample is too small to tell. The sample stride is coprime
    with ``d_sae`` so that the sample covers every latent, not one residue class of them.
    """
    sample = flat[:: threshold_sample_stride(flat.numel(), d_sae)]
    expected = n_keep * sample.numel() / flat.numel()
    # Twice the expected count plus four standard deviations: misses are ~never, and the
    # candidate selection stays small.
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


def per_token_topk_indices(
    hidden_pre: torch.Tensor, columns: torch.Tensor, k: int, *, fast: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``k`` largest positive entries among ``columns``: AuxK's dead top-k.

    ``hidden_pre`` is ``(n_tokens, d_sae)``, ``columns`` ascending latent indices (the dead or
    under-used latents). Returns ``(token_idx, latent_idx)`` in ascending (token, latent)
    order. Ties at a token's smallest kept value go to the lowest latent indices, as in
    :func:`batch_topk`, so the result depends on the values alone. Only positive entries are
    returned: AuxK decodes relu'd values, the others would decode to nothing.

    ``fast=False`` is the plain reference: a top-k in every row of the gathered ``tokens x
    len(columns)`` block. ``fast=True`` selects over candidates instead: a strided sample of
    the columns gives each token a floor that somewhat more than ``k`` of its entries exceed
    (about 1.7x at k 288 of 4096 columns), and the exact per-token selection runs over the
    entries above their token's floor (a compare and a ``nonzero`` over the block, then a
    top-k over rows a few times shorter). A token's candidates suffice when there are at
    least ``k`` of them (then every entry tied with its cut-off is among them) or its floor is
    0 (then they are all its positive entries); the tokens the sample misled, if any, are
    selected by the reference.
    """
    empty = torch.zeros(0, dtype=torch.long, device=hidden_pre.device)
    if columns.numel() == 0 or k <= 0:
        return empty, empty
    block = hidden_pre.index_select(1, columns)
    floors = _sampled_token_floors(block, k) if fast else None
    if floors is None:
        return _per_token_topk_reference(block, columns, k)
    n_columns = block.shape[1]
    flat_idx = indices_above(block, floors)
    token_idx, position = flat_idx // n_columns, flat_idx % n_columns
    counts = torch.bincount(token_idx, minlength=block.shape[0])
    keep = _segment_largest_mask(token_idx, block.view(-1)[flat_idx], counts, k)
    misled = (counts < k) & (floors > 0)
    if bool(misled.any()):
        keep &= ~misled[token_idx]
    kept = keep.nonzero().squeeze(1)
    token_idx, latent_idx = token_idx[kept], columns[position[kept]]
    if not bool(misled.any()):
        return token_idx, latent_idx
    rows = misled.nonzero().squeeze(1)
    row_tokens, row_latents = _per_token_topk_reference(block[rows], columns, k)
    return _merge_by_token((token_idx, latent_idx), (rows[row_tokens], row_latents))


def _merge_by_token(
    first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two ``(token_idx, latent_idx)`` lists, each ascending, with disjoint tokens.

    Each entry's place is its own index plus the number of the other list's entries with a
    smaller token (two ``searchsorted``), so no sort of the whole list is needed.
    """
    (first_tokens, first_latents), (second_tokens, second_latents) = first, second
    total = first_tokens.numel() + second_tokens.numel()
    tokens, latents = first_tokens.new_empty(total), first_latents.new_empty(total)
    for own_tokens, own_latents, other_tokens in (
        (first_tokens, first_latents, second_tokens),
        (second_tokens, second_latents, first_tokens),
    ):
        place = torch.arange(own_tokens.numel(), device=own_tokens.device)
        place += torch.searchsorted(other_tokens, own_tokens)
        tokens[place], latents[place] = own_tokens, own_latents
    return tokens, latents


def _sampled_token_floors(block: torch.Tensor, k: int) -> torch.Tensor | None:
    """Per row of ``block``, a value (>= 0) that somewhat more than ``k`` of its entries exceed.

    From every ``stride``-th column; ``None`` when that sample is too small to tell (few
    columns, or ``k`` close to their number: then the reference is cheap anyway). The margin
    (four standard deviations, no factor 2) is smaller than the batch-wide
    :func:`sampled_floor`'s: a token the sample misleads costs one row of the reference, not a
    second selection.
    """
    n_columns = block.shape[1]
    sample = block[:, :: max(n_columns // _TOKEN_SAMPLE_SIZE, 1)]
    expected = k * sample.shape[1] / n_columns
    n_above = int(expected + 4 * math.sqrt(expected) + 2)
    if n_above >= sample.shape[1] // 2:
        return None
    return sample.topk(n_above + 1, dim=1, sorted=False).values.amin(1).clamp(min=0)


def _per_token_topk_reference(
    block: torch.Tensor, columns: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`per_token_topk_indices` on the gathered ``(n_tokens, len(columns))`` block."""
    keep = block > 0
    if k < block.shape[1]:
        cutoff = block.topk(k, dim=1, sorted=False).values.amin(1, keepdim=True)
        above = block > cutoff
        tied = block == cutoff
        spare = k - above.sum(1, keepdim=True)
        keep &= above | (tied & (tied.cumsum(1) <= spare))
    token_idx, position = keep.nonzero().unbind(1)
    return token_idx, columns[position]


def _segment_largest_mask(
    segment_idx: torch.Tensor, values: torch.Tensor, counts: torch.Tensor, k: int
) -> torch.Tensor:
    """Mask of each segment's ``k`` largest values; ties go to the segment's earliest entries.

    ``segment_idx`` is ascending (entries grouped by segment, e.g. by token) and ``counts[s]``
    the number of entries of segment ``s``: :func:`largest_mask` per segment, vectorised. The
    values are laid out in a ``(n_segments, max count)`` matrix padded with ``-inf``, whose
    row-wise top-k gives each segment's cut-off (``-inf``, keep all, for a segment with fewer
    than ``k`` entries).
    """
    width = int(counts.max()) if counts.numel() else 0
    if width <= k:
        return torch.ones_like(values, dtype=torch.bool)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(values.numel(), device=values.device) + (
        segment_idx * width - starts[segment_idx]
    )
    padded = values.new_full((counts.numel() * width,), -math.inf)
    padded[slot] = values
    top = padded.view(-1, width).topk(k, dim=1, sorted=False).values
    cutoff = top.amin(1)[segment_idx]
    keep = values > cutoff
    tied = (values == cutoff).nonzero().squeeze(1)
    tied_segments = segment_idx[tied]
    spare = k - torch.bincount(segment_idx[keep], minlength=counts.numel())
    rank = torch.arange(tied.numel(), device=values.device)
    rank -= torch.searchsorted(tied_segments, tied_segments)
    keep[tied[rank < spare[tied_segments]]] = True
    return keep


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
