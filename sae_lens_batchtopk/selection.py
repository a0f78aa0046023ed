"""Latent selection rules shared by training, calibration and benchmarks.

One implementation of each rule lives here so that the SAE's training pass, the threshold
calibration and the benchmarks cannot drift apart. Every function takes pre-activations with
any number of leading (token) dimensions and the latent dimension last.
"""

from __future__ import annotations

import torch


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
    return torch.where(acts > 0, acts, torch.inf).min()


def feature_choice(hidden_pre: torch.Tensor, capacities: torch.Tensor) -> torch.Tensor:
    """Feature Choice (Ayonrinde 2024): latent ``j`` keeps its own top-``capacities[j]`` tokens.

    The allocation is transposed relative to TopK: capacity is per latent, so a token gets as
    many latents as chose it. Only positive (relu'd) activations count as chosen; a latent with
    fewer positive tokens than its capacity keeps all of them. Works over all leading dims.
    """
    acts = hidden_pre.relu()
    flat = acts.reshape(-1, acts.shape[-1])
    m_max = min(int(capacities.max()), flat.shape[0]) if capacities.numel() else 0
    if m_max == 0:
        return torch.zeros_like(acts)
    top = flat.topk(m_max, dim=0)  # (m_max, d_sae), sorted descending per latent
    rank = torch.arange(m_max, device=flat.device)[:, None]
    keep = rank < capacities.to(flat.device)[None, :]
    values = torch.where(keep, top.values, torch.zeros((), dtype=flat.dtype, device=flat.device))
    return torch.zeros_like(flat).scatter(0, top.indices, values).view_as(acts)


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
