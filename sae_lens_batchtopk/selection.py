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
