"""Sparse codes and the kernels of the fast training step: sparse decode, sparse encoder backward.

After batch top-k only about ``k`` of ``d_sae`` latents per token are non-zero, yet a dense
training step multiplies and back-propagates through ``tokens x d_sae`` matrices: besides
the encoder forward (unavoidable: every pre-activation is a candidate), the decode, its two
gradients and the encoder's two gradients are each a dense ``tokens x d_in x d_sae`` matmul.
Here the selected activations are kept as :class:`SparseCodes` (values, token indices, latent
indices; a varying number per token) and

- :func:`decode_codes` reconstructs with ``embedding_bag`` over the selected rows of
  ``W_dec``; torch's own backward of it touches only those rows (as in sparsify's eager path);
- :func:`gather_preactivations` returns the pre-activations at the selected positions with a
  backward that touches only the selected columns of ``W_enc`` (two more ``embedding_bag``
  calls and an ``index_add``), so no ``tokens x d_sae`` tensor is kept for the backward pass.

The dense reference these must match is the plain path of
:class:`~sae_lens_batchtopk.saes.calibrated_batchtopk_sae.CalibratedBatchTopKTrainingSAE`
(``fast_path=False``); the tests compare losses and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SparseCodes:
    """Selected activations of an ``(n_tokens, d_sae)`` code matrix, grouped by token.

    Attributes:
        token_idx: ``(nnz,)`` token (row) of each entry, ascending.
        latent_idx: ``(nnz,)`` latent (column) of each entry.
        values: ``(nnz,)`` the activations; they carry the gradient.
        n_tokens: rows of the dense matrix (tokens with no entry included).
        d_sae: columns of the dense matrix.
    """

    token_idx: torch.Tensor
    latent_idx: torch.Tensor
    values: torch.Tensor
    n_tokens: int
    d_sae: int

    def token_offsets(self) -> torch.Tensor:
        """Start of each token's entries: ``embedding_bag`` offsets, one bag per token."""
        return _offsets(self.token_idx, self.n_tokens)

    def to_dense(self) -> torch.Tensor:
        """The ``(n_tokens, d_sae)`` matrix (differentiable in ``values``)."""
        dense = self.values.new_zeros(self.n_tokens, self.d_sae)
        return dense.index_put((self.token_idx, self.latent_idx), self.values)

    def to_sparse_coo(self) -> torch.Tensor:
        """A detached sparse COO tensor, the form SAELens's trainer accepts as feature acts."""
        return torch.sparse_coo_tensor(
            torch.stack([self.token_idx, self.latent_idx]),
            self.values.detach(),
            (self.n_tokens, self.d_sae),
            is_coalesced=True,
            check_invariants=False,
        )


def decode_codes(codes: SparseCodes, W_dec: torch.Tensor) -> torch.Tensor:
    """``codes.to_dense() @ W_dec`` touching only the selected rows, forward and backward.

    Returns ``(n_tokens, d_in)``, without the decoder bias. ``W_dec`` must be contiguous.
    """
    return F.embedding_bag(
        codes.latent_idx,
        W_dec,
        codes.token_offsets(),
        mode="sum",
        per_sample_weights=codes.values.to(W_dec.dtype),
    )


def gather_preactivations(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    token_idx: torch.Tensor,
    latent_idx: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """``(sae_in @ W_enc + b_enc)[token_idx, latent_idx]`` with a sparse backward.

    ``values`` must already hold those pre-activations: the caller has computed the dense
    pre-activations once, without gradient, to select from them, and the forward does not
    repeat that matmul. The backward sends gradients to ``sae_in``, ``W_enc`` and ``b_enc``
    through the selected columns only. ``token_idx`` must be ascending.
    """
    return _GatherPreactivations.apply(sae_in, W_enc, b_enc, token_idx, latent_idx, values)


class _GatherPreactivations(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        sae_in: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        token_idx: torch.Tensor,
        latent_idx: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(sae_in, W_enc, token_idx, latent_idx)
        return values.detach().clone()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        sae_in, W_enc, token_idx, latent_idx = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        grad = grad.to(W_enc.dtype)
        grad_in = grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[0]:
            # Row t of the input gradient: sum over t's entries of grad * W_enc[:, latent].
            grad_in = F.embedding_bag(
                latent_idx,
                W_enc.t().contiguous(),
                _offsets(token_idx, sae_in.shape[0]),
                mode="sum",
                per_sample_weights=grad,
            )
        if ctx.needs_input_grad[1]:
            # Column j of W_enc's gradient: sum over j's entries of grad * sae_in[token].
            order = torch.argsort(latent_idx, stable=True)
            grad_W_enc = F.embedding_bag(
                token_idx[order],
                sae_in.contiguous(),
                _offsets(latent_idx[order], d_sae),
                mode="sum",
                per_sample_weights=grad[order],
            ).t()
        if ctx.needs_input_grad[2]:
            grad_b_enc = grad.new_zeros(d_sae).index_add_(0, latent_idx, grad)
        return grad_in, grad_W_enc, grad_b_enc, None, None, None


def _offsets(sorted_bags: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Start of each bag's run in an ascending bag-index vector (empty bags included)."""
    return torch.searchsorted(
        sorted_bags, torch.arange(n_bags, device=sorted_bags.device, dtype=sorted_bags.dtype)
    )
