"""Sparse codes and the kernels of the fast training step: sparse decode, sparse encoder backward.

After batch top-k only about ``k`` of ``d_sae`` latents per token are non-zero, yet a dense
training step multiplies and back-propagates through ``tokens x d_sae`` matrices: besides
the encoder forward (unavoidable: every pre-activation is a candidate), the decode, its two
gradients and the encoder's two gradients are each a dense ``tokens x d_in x d_sae`` matmul.
Here the selected activations are kept as :class:`SparseCodes` (values, token indices, latent
indices; a varying number per token) and

- :func:`decode_codes` reconstructs with ``embedding_bag`` over the selected rows of
  ``W_dec``;
- :func:`gather_preactivations` returns the pre-activations at the selected positions,

each with a hand-written backward that touches only the selected rows and columns: per-entry
dot products (``torch.sparse.sampled_addmm``, a fused sampled matmul) and per-latent sums
(``embedding_bag`` over the entries grouped by latent). torch's own ``embedding_bag``
backward is several times slower on a CPU (its per-sample-weight gradient loops entry by
entry). No ``tokens x d_sae`` tensor is kept for the backward pass.

Precision: the kernels accumulate in float32 (float64 for float64 inputs) whatever the
weights' dtype and the autocast state, so bfloat16 weights or a bfloat16 encoder matmul round
the inputs, never the sums; gradients come back in each input's own dtype.

The dense reference these must match is the plain path of
:class:`~sae_lens_batchtopk.saes.calibrated_batchtopk_sae.CalibratedBatchTopKTrainingSAE`
(``fast_path=False``); the tests compare losses and gradients.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SparseLayout:
    """Where the entries of a sparse ``(n_tokens, d_sae)`` matrix are, in the kernels' forms.

    Built once per set of entries and shared by the forward and backward passes of every
    kernel over them, so the grouping by latent (a sort) is computed once per step.

    Attributes:
        token_idx: ``(nnz,)`` token (row) of each entry, ascending.
        latent_idx: ``(nnz,)`` latent (column) of each entry.
        n_tokens: rows (tokens with no entry included).
        d_sae: columns.
    """

    token_idx: torch.Tensor
    latent_idx: torch.Tensor
    n_tokens: int
    d_sae: int

    @cached_property
    def token_starts(self) -> torch.Tensor:
        """``(n_tokens,)`` start of each token's entries: ``embedding_bag`` offsets."""
        return _run_starts(self.token_idx, self.n_tokens)

    @cached_property
    def by_latent(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The entries grouped by latent: ``(order, token of each, start of each latent)``.

        ``order`` is a stable sort of the entries by latent, so within a latent the tokens
        ascend and every sum over them runs in a fixed order (reproducible gradients). The
        starts have ``d_sae + 1`` entries (CSR row pointers of the transposed matrix).
        """
        # int32 keys sort about twice as fast as int64 ones.
        latents, order = torch.sort(self.latent_idx.to(torch.int32), stable=True)
        return order, self.token_idx[order], _run_starts(latents, self.d_sae + 1)


@dataclass(frozen=True)
class SparseCodes:
    """Selected activations of an ``(n_tokens, d_sae)`` code matrix, grouped by token.

    Attributes:
        token_idx: ``(nnz,)`` token (row) of each entry, ascending.
        latent_idx: ``(nnz,)`` latent (column) of each entry.
        values: ``(nnz,)`` the activations; they carry the gradient.
        n_tokens: rows of the dense matrix (tokens with no entry included).
        d_sae: columns of the dense matrix.
        layout: the index structures of these entries; built from the indices when not given.
            ``dataclasses.replace`` with new values keeps it, so codes derived from the same
            entries share one layout.
    """

    token_idx: torch.Tensor
    latent_idx: torch.Tensor
    values: torch.Tensor
    n_tokens: int
    d_sae: int
    layout: SparseLayout = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        layout = self.layout
        if layout is None or (
            layout.token_idx is not self.token_idx or layout.latent_idx is not self.latent_idx
        ):
            layout = SparseLayout(self.token_idx, self.latent_idx, self.n_tokens, self.d_sae)
            object.__setattr__(self, "layout", layout)

    def token_offsets(self) -> torch.Tensor:
        """Start of each token's entries: ``embedding_bag`` offsets, one bag per token."""
        return self.layout.token_starts

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

    Returns ``(n_tokens, d_in)`` in the accumulation dtype (float32, or float64 for float64
    inputs), without the decoder bias.
    """
    return _DecodeCodes.apply(codes.values, W_dec, codes.layout)


def gather_preactivations(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    token_idx: torch.Tensor,
    latent_idx: torch.Tensor,
    values: torch.Tensor,
    *,
    input_bias: torch.Tensor | None = None,
    layout: SparseLayout | None = None,
) -> torch.Tensor:
    """``(sae_in @ W_enc + b_enc)[token_idx, latent_idx]`` with a sparse backward.

    ``values`` must already hold those pre-activations (in any float dtype, e.g. from a
    bfloat16 matmul): the caller has computed the dense pre-activations once, without
    gradient, to select from them, and the forward does not repeat that matmul. The result is
    in the accumulation dtype. The backward sends gradients to ``sae_in``, ``W_enc`` and
    ``b_enc`` through the selected columns only. ``token_idx`` must be ascending.

    ``input_bias``: a bias already subtracted from ``sae_in`` (SAELens's ``b_dec`` with
    ``apply_b_dec_to_input``), when that bias is all ``sae_in``'s gradient is needed for.
    ``sae_in`` is then treated as a constant and the bias receives ``-Σ_t ∂L/∂sae_in[t] =
    -W_enc @ (the per-latent sums of the gradient)``: one matrix-vector product instead of a
    ``tokens x d_in`` sparse product. ``layout`` may pass the entries' :class:`SparseLayout`
    when the caller has one, to share its index structures.
    """
    if layout is None:
        layout = SparseLayout(token_idx, latent_idx, sae_in.shape[0], W_enc.shape[1])
    if input_bias is not None:
        sae_in = sae_in.detach()
    return _GatherPreactivations.apply(sae_in, W_enc, b_enc, input_bias, layout, values)


class _DecodeCodes(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, values: torch.Tensor, W_dec: torch.Tensor, layout: SparseLayout
    ) -> torch.Tensor:
        ctx.layout = layout
        ctx.save_for_backward(values, W_dec)
        return _bag_sums(layout, values, W_dec)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        values, W_dec = ctx.saved_tensors
        layout: SparseLayout = ctx.layout
        grad = _accumulating(grad, W_dec.dtype)
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = _entry_dots(layout, grad, W_dec).to(values.dtype)
        if ctx.needs_input_grad[1]:
            grad_W_dec = _latent_sums(layout, grad, values).to(W_dec.dtype)
        return grad_values, grad_W_dec, None


class _GatherPreactivations(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        sae_in: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        input_bias: torch.Tensor | None,
        layout: SparseLayout,
        values: torch.Tensor,
    ) -> torch.Tensor:
        ctx.layout = layout
        ctx.save_for_backward(sae_in, W_enc)
        return values.detach().to(_accumulation_dtype(W_enc.dtype), copy=True)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        sae_in, W_enc = ctx.saved_tensors
        layout: SparseLayout = ctx.layout
        grad = _accumulating(grad, W_enc.dtype)
        grad_in = grad_W_enc = grad_b_enc = grad_input_bias = None
        if ctx.needs_input_grad[0]:
            # Row t: sum over t's entries of grad * W_enc[:, latent].
            grad_in = _bag_sums(layout, grad, W_enc.t()).to(sae_in.dtype)
        if ctx.needs_input_grad[1]:
            # Column j: sum over j's entries of grad * sae_in[token].
            grad_W_enc = _latent_sums(layout, sae_in, grad).t().to(W_enc.dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            per_latent = grad.new_zeros(layout.d_sae).index_add_(0, layout.latent_idx, grad)
            if ctx.needs_input_grad[2]:
                grad_b_enc = per_latent.to(W_enc.dtype)
            if ctx.needs_input_grad[3]:
                with torch.autocast(W_enc.device.type, enabled=False):
                    grad_input_bias = torch.mv(_accumulating(W_enc, W_enc.dtype), per_latent)
                grad_input_bias = grad_input_bias.neg().to(W_enc.dtype)
        return grad_in, grad_W_enc, grad_b_enc, grad_input_bias, None, None


def _bag_sums(layout: SparseLayout, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``(n_tokens, d)``: row t is the sum over t's entries of ``weights * table[latent]``."""
    acc_table = _accumulating(table, table.dtype)
    return F.embedding_bag(
        layout.latent_idx,
        acc_table,
        layout.token_starts,
        mode="sum",
        per_sample_weights=weights.to(acc_table.dtype),
    )


def _latent_sums(layout: SparseLayout, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(d_sae, d)``: row j is the sum over j's entries of ``weights * rows[token]``."""
    order, tokens, starts = layout.by_latent
    acc_rows = _accumulating(rows, rows.dtype)
    return F.embedding_bag(
        tokens,
        acc_rows,
        starts[:-1],
        mode="sum",
        per_sample_weights=weights[order].to(acc_rows.dtype),
    )


def _entry_dots(layout: SparseLayout, rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``(nnz,)``: ``rows[token] · table[latent]`` for every entry, as one sampled matmul.

    Computed latent by latent (a CSR pattern of the transposed matrix), so each table row is
    read once and dotted with all of its tokens' rows while cached: about twice as fast on a
    CPU as going token by token, which reads a table row per entry.
    """
    acc_table = _accumulating(table, table.dtype)
    order, tokens, starts = layout.by_latent
    # 32-bit indices whenever they fit: every sparse backend (cuSPARSE included) takes them.
    index_dtype = torch.int32 if tokens.numel() < 2**31 else torch.int64
    with warnings.catch_warnings():
        # torch flags sparse CSR as beta on first use; the pattern below is valid by build.
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
        pattern = torch.sparse_csr_tensor(
            starts.to(index_dtype),
            tokens.to(index_dtype),
            acc_table.new_ones(tokens.numel()),
            (layout.d_sae, layout.n_tokens),
            check_invariants=False,
        )
    by_latent = torch.sparse.sampled_addmm(
        pattern, acc_table, _accumulating(rows, table.dtype).t(), beta=0.0
    ).values()
    return torch.empty_like(by_latent).index_copy_(0, order, by_latent)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for reduced-precision floats, the dtype itself for float32 and float64."""
    return torch.promote_types(dtype, torch.float32)


def _accumulating(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` as a contiguous tensor in ``dtype``'s accumulation dtype (no copy if it is)."""
    return tensor.to(_accumulation_dtype(dtype)).contiguous()


def _run_starts(sorted_keys: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Start of each key's run in an ascending key vector (empty runs included)."""
    return torch.searchsorted(
        sorted_keys, torch.arange(n_keys, device=sorted_keys.device, dtype=sorted_keys.dtype)
    )
