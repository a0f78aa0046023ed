"""The sparse training step, as plain functions over (inputs, weights, selected indices).

Any architecture whose training rule keeps a sparse set of pre-activations (batch top-k,
Feature Choice, Matryoshka's global top-k, ...) calls :func:`sparse_forward` with its own
selection function and gets the codes, the reconstruction and the aux losses'
``reconstruct_selected`` without inheriting from any SAE class. :func:`dense_forward` is the
plain reference the sparse one must equal (losses and gradients, to float rounding): dense
matmuls and autograd, nothing clever.

Units: with ``rescale_acts_by_decoder_norm`` (SAELens's TopK convention), selection runs on
pre-activations times the decoder row norms and the decoder uses unit-norm rows; both paths
here follow it, so the selected values are the numbers the inference thresholds apply to.

Precision: the encoder matmul runs in the weights' dtype, or in the autocast dtype when
autocast is on for the input's device (SAELens's ``autocast=True``: bfloat16); selection is
exact on those values. Everything after it (the selected values, the sparse decode, every
gradient) accumulates in float32 (float64 for float64 weights), see
:mod:`~sae_lens_batchtopk.sparse_codes`. One exception, on CUDA and on CPUs with a matrix unit
(AMX) for the autocast dtype: aux-loss entries dense enough in their columns (AuxK's) are
decoded as matmuls over those columns (:mod:`~sae_lens_batchtopk.column_block`), which under
autocast round their operands, the gradient included, to the matmul dtype as autocast's own
matmuls do; that block is also the one ``tokens x columns`` tensor kept for backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from sae_lens.saes.topk_sae import act_times_W_dec

from sae_lens_batchtopk.column_block import column_block_for, decode_column_block
from sae_lens_batchtopk.sparse_codes import (
    SparseCodes,
    SparseLayout,
    decode_codes,
    gather_preactivations,
)


@dataclass(frozen=True)
class SparseStepWeights:
    """The weights one training step reads; the parameters themselves, so gradients reach them.

    Attributes:
        W_enc: ``(d_in, d_sae)``.
        b_enc: ``(d_sae,)``.
        W_dec: ``(d_sae, d_in)``, contiguous.
        decoder_scale: the decoder row norms when selection rescales by them, else ``None``;
            in the accumulation dtype (a bfloat16 norm would move every selected value by up
            to 0.4 %). Differentiable, for :func:`dense_forward`; the sparse functions use it
            as a constant (see :func:`selected_codes`).
        input_bias: a bias the caller already subtracted from ``sae_in`` (SAELens's ``b_dec``
            with ``apply_b_dec_to_input``), or ``None``. When given, ``sae_in`` is treated as
            a constant and the encoder's input gradient reaches this bias alone, through one
            matrix-vector product (:func:`~sae_lens_batchtopk.sparse_codes.
            gather_preactivations`): a ``sae_in`` whose graph holds other parameters must not
            set it.
    """

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    decoder_scale: torch.Tensor | None
    input_bias: torch.Tensor | None = None

    @classmethod
    def of(
        cls,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        *,
        rescale_acts_by_decoder_norm: bool,
        input_bias: torch.Tensor | None = None,
    ) -> SparseStepWeights:
        scale = None
        if rescale_acts_by_decoder_norm:
            scale = torch.linalg.vector_norm(
                W_dec, dim=-1, dtype=torch.promote_types(W_dec.dtype, torch.float32)
            )
        return cls(W_enc, b_enc, W_dec, scale, input_bias)


@dataclass(frozen=True)
class SparseForward:
    """What one sparse forward pass produced.

    Attributes:
        hidden_pre: ``(n_tokens, d_sae)`` pre-activations in selection units, detached: read
            them to choose latents (aux losses do), never for gradients.
        codes: the selected entries; their values carry the gradient.
        reconstruction: ``(n_tokens, d_in)`` decode of the codes, without the decoder bias.
    """

    sae_in: torch.Tensor
    weights: SparseStepWeights
    hidden_pre: torch.Tensor
    codes: SparseCodes
    reconstruction: torch.Tensor

    def reconstruct_selected(
        self, token_idx: torch.Tensor, latent_idx: torch.Tensor
    ) -> torch.Tensor:
        """``AuxLossInputs.reconstruct_selected``: relu'd pre-activations there, decoded.

        Through the sparse kernels, or on a GPU or an AMX CPU, where the entries are dense
        enough in their columns (AuxK's), as matmuls over those columns (:mod:`~sae_lens_batchtopk.
        column_block`): the same values and gradients.
        """
        dtype = matmul_dtype(self.sae_in, self.weights)
        block = column_block_for(latent_idx, dtype, self.hidden_pre.shape[0])
        if block is not None:
            pre = entry_preactivations(self.hidden_pre, self.weights, token_idx, latent_idx)
            return decode_column_block(self.sae_in, self.weights, pre, token_idx, *block, dtype)
        codes = selected_codes(self.sae_in, self.weights, self.hidden_pre, token_idx, latent_idx)
        return decode_without_bias(replace(codes, values=codes.values.relu()), self.weights)


def matmul_dtype(sae_in: torch.Tensor, weights: SparseStepWeights) -> torch.dtype:
    """The encoder matmul's dtype: autocast's when it is on for ``sae_in``'s device, else the
    weights'."""
    if torch.is_autocast_enabled(sae_in.device.type):
        return torch.get_autocast_dtype(sae_in.device.type)
    return weights.W_enc.dtype


def selection_preactivations(
    sae_in: torch.Tensor, weights: SparseStepWeights, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense pre-activations in selection units, without gradient, in :func:`matmul_dtype`.

    Every entry competes in the selection, so this matmul cannot be avoided; scaling W_enc's
    columns costs less than scaling the ``tokens x d_sae`` output. ``out``, a ``(n_tokens,
    d_sae)`` tensor of that dtype, receives the result: on a CPU, reusing one across steps
    saves page-faulting a fresh ``tokens x d_sae`` allocation (about 10 % of the matmul's time
    at d_sae 16384).
    """
    dtype = matmul_dtype(sae_in, weights)
    with torch.no_grad(), torch.autocast(sae_in.device.type, enabled=False):
        W_enc, b_enc, scale = weights.W_enc, weights.b_enc, weights.decoder_scale
        if scale is not None:
            W_enc, b_enc = W_enc * scale, b_enc * scale
        return torch.addmm(b_enc.to(dtype), sae_in.to(dtype), W_enc.to(dtype), out=out)


def selected_codes(
    sae_in: torch.Tensor,
    weights: SparseStepWeights,
    hidden_pre: torch.Tensor,
    token_idx: torch.Tensor,
    latent_idx: torch.Tensor,
) -> SparseCodes:
    """Differentiable pre-activations (selection units) at the given entries of ``hidden_pre``.

    ``token_idx`` must be ascending. The gradient reaches ``sae_in`` (or
    ``weights.input_bias``), the selected columns of ``W_enc`` and ``b_enc``. The values are
    in the accumulation dtype.

    The decoder scale enters as a constant: it multiplies the values here and divides them in
    :func:`decode_without_bias`, so every reconstruction's gradient through it is exactly
    zero (the dense reference differentiates it and gets rounding noise). Treating it as a
    constant saves a scatter of the gradient per selected entry and the norm's backward.
    """
    n_tokens, d_sae = hidden_pre.shape
    layout = SparseLayout(token_idx, latent_idx, n_tokens, d_sae)
    selected = entry_preactivations(hidden_pre, weights, token_idx, latent_idx)
    values = gather_preactivations(
        sae_in,
        weights.W_enc,
        weights.b_enc,
        token_idx,
        latent_idx,
        selected,
        input_bias=weights.input_bias,
        layout=layout,
    )
    if weights.decoder_scale is not None:
        values = values * weights.decoder_scale.detach()[latent_idx]
    return SparseCodes(token_idx, latent_idx, values, n_tokens, d_sae, layout=layout)


def entry_preactivations(
    hidden_pre: torch.Tensor,
    weights: SparseStepWeights,
    token_idx: torch.Tensor,
    latent_idx: torch.Tensor,
) -> torch.Tensor:
    """``sae_in @ W_enc + b_enc`` at the entries, read from the detached selection-unit
    ``hidden_pre`` with the decoder scale divided out (in the scale's dtype when there is one)."""
    selected = hidden_pre.reshape(-1)[token_idx * hidden_pre.shape[1] + latent_idx]
    if weights.decoder_scale is None:
        return selected
    scale = weights.decoder_scale.detach()[latent_idx]
    return selected.to(scale.dtype) / scale


def decode_without_bias(codes: SparseCodes, weights: SparseStepWeights) -> torch.Tensor:
    """``act_times_W_dec`` of the codes through the selected decoder rows only.

    The decoder scale is a constant here, as in :func:`selected_codes`.
    """
    if weights.decoder_scale is not None:
        values = codes.values / weights.decoder_scale.detach()[codes.latent_idx]
        codes = replace(codes, values=values)
    return decode_codes(codes, weights.W_dec)


def sparse_forward(
    sae_in: torch.Tensor,
    weights: SparseStepWeights,
    select: Callable[[torch.Tensor], torch.Tensor],
    *,
    out: torch.Tensor | None = None,
) -> SparseForward:
    """Encode, select and decode one ``(n_tokens, d_in)`` batch on the sparse path.

    ``select`` maps the detached ``(n_tokens, d_sae)`` pre-activations (in the matmul dtype)
    to the ascending row-major flat indices of the entries the training rule keeps. No
    ``tokens x d_sae`` tensor is kept for the backward pass. The reconstruction is in the
    accumulation dtype. ``out`` receives the pre-activations (see
    :func:`selection_preactivations`); they are read during the forward pass only.
    """
    sae_in = sae_in.contiguous()
    hidden_pre, codes = sparse_encode(sae_in, weights, select, out=out)
    return SparseForward(sae_in, weights, hidden_pre, codes, decode_without_bias(codes, weights))


def sparse_encode(
    sae_in: torch.Tensor,
    weights: SparseStepWeights,
    select: Callable[[torch.Tensor], torch.Tensor],
    *,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SparseCodes]:
    """The encode half of :func:`sparse_forward`: detached pre-activations and the codes.

    ``sae_in`` must be contiguous. Kept apart so that a step decoding the codes differently
    (Matryoshka's nested decodes) encodes exactly as every other architecture does.
    """
    hidden_pre = selection_preactivations(sae_in, weights, out=out)
    with torch.no_grad():
        flat_idx = select(hidden_pre)
    d_sae = hidden_pre.shape[1]
    codes = selected_codes(sae_in, weights, hidden_pre, flat_idx // d_sae, flat_idx % d_sae)
    return hidden_pre, codes


@dataclass(frozen=True)
class DenseForward:
    """The dense reference's counterpart of :class:`SparseForward` (everything differentiable)."""

    hidden_pre: torch.Tensor
    feature_acts: torch.Tensor
    reconstruction: torch.Tensor
    weights: SparseStepWeights

    def reconstruct_selected(
        self, token_idx: torch.Tensor, latent_idx: torch.Tensor
    ) -> torch.Tensor:
        """Scatter the relu'd pre-activations at those entries, then decode densely."""
        return reconstruct_dense(self.hidden_pre, self.weights, token_idx, latent_idx)


def dense_forward(
    sae_in: torch.Tensor,
    weights: SparseStepWeights,
    select_dense: Callable[[torch.Tensor], torch.Tensor],
) -> DenseForward:
    """The reference: dense matmuls and autograd; ``select_dense`` returns the kept activations."""
    if weights.input_bias is not None:
        # Same value as sae_in; its input gradient goes to the bias, as on the sparse path.
        sae_in = sae_in.detach() - (weights.input_bias - weights.input_bias.detach())
    hidden_pre = sae_in @ weights.W_enc + weights.b_enc
    if weights.decoder_scale is not None:
        hidden_pre = hidden_pre * weights.decoder_scale
    feature_acts = select_dense(hidden_pre)
    return DenseForward(
        hidden_pre, feature_acts, decode_dense_without_bias(feature_acts, weights), weights
    )


def decode_dense_without_bias(
    feature_acts: torch.Tensor, weights: SparseStepWeights
) -> torch.Tensor:
    """SAELens's ``act_times_W_dec``: divide by the decoder norms when selection used them."""
    return act_times_W_dec(feature_acts, weights.W_dec, weights.decoder_scale is not None)


def reconstruct_dense(
    hidden_pre: torch.Tensor,
    weights: SparseStepWeights,
    token_idx: torch.Tensor,
    latent_idx: torch.Tensor,
) -> torch.Tensor:
    """Dense ``reconstruct_selected``: ``(n_tokens, d_in)`` from a differentiable ``hidden_pre``."""
    flat = hidden_pre.reshape(-1, hidden_pre.shape[-1])
    acts = torch.zeros_like(flat).index_put(
        (token_idx, latent_idx), flat[token_idx, latent_idx].relu()
    )
    return decode_dense_without_bias(acts, weights)


@dataclass(frozen=True)
class NestedSparseForward(SparseForward):
    """A sparse forward pass with Matryoshka's per-level reconstructions.

    Attributes:
        levels: ``(n_levels, n_tokens, d_in)``; level ``l`` decodes the selected entries of the
            latents below ``widths[l]``, without the decoder bias. ``reconstruction`` is the
            last level (the whole dictionary).
    """

    levels: torch.Tensor


def sparse_nested_forward(
    sae_in: torch.Tensor,
    weights: SparseStepWeights,
    select: Callable[[torch.Tensor], torch.Tensor],
    widths: Sequence[int],
    *,
    out: torch.Tensor | None = None,
) -> NestedSparseForward:
    """:func:`sparse_forward` with Matryoshka's nested decodes in place of the single decode.

    The selection is global (one ``select`` over the whole dictionary); only the decode is
    nested, so each selected entry is still decoded once (:func:`decode_nested_without_bias`).
    """
    sae_in = sae_in.contiguous()
    hidden_pre, codes = sparse_encode(sae_in, weights, select, out=out)
    levels = decode_nested_without_bias(codes, weights, widths)
    return NestedSparseForward(sae_in, weights, hidden_pre, codes, levels[-1], levels)


def decode_nested_without_bias(
    codes: SparseCodes, weights: SparseStepWeights, widths: Sequence[int]
) -> torch.Tensor:
    """Every Matryoshka level's decode at the cost of about one sparse decode.

    Level ``l`` is ``codes[:, :widths[l]] @ W_dec[:widths[l]]`` (with the decoder-norm division
    of :func:`decode_without_bias`); ``widths`` ascend and end at ``codes.d_sae``. Decoding
    each level separately would decode the inner latents' entries once per level. Instead the
    entries are bucketed by band (the latents ``[widths[l-1], widths[l])`` that level ``l``
    adds) into one ``embedding_bag`` call with one bag per (band, token), which decodes every
    entry once into its band's partial reconstruction; a cumulative sum over bands then gives
    the levels. Cost: one sparse decode over the selected entries, a sort of their band
    indices, and ``n_levels x n_tokens x d_in`` additions. Returns ``(n_levels, n_tokens,
    d_in)``; the backward touches the selected decoder rows only.
    """
    n_levels, n_tokens = len(widths), codes.n_tokens
    boundaries = torch.as_tensor(
        widths, dtype=codes.latent_idx.dtype, device=codes.latent_idx.device
    )
    band = torch.bucketize(codes.latent_idx, boundaries, right=True)
    # A stable sort keeps each band's entries in token order: the bags' keys then ascend.
    order = torch.argsort(band, stable=True)
    by_band = SparseCodes(
        token_idx=(band * n_tokens + codes.token_idx)[order],
        latent_idx=codes.latent_idx[order],
        values=codes.values[order],
        n_tokens=n_levels * n_tokens,
        d_sae=codes.d_sae,
    )
    partials = decode_without_bias(by_band, weights).view(n_levels, n_tokens, -1)
    return partials.cumsum(0)


def decode_nested_dense_without_bias(
    feature_acts: torch.Tensor, weights: SparseStepWeights, widths: Sequence[int]
) -> torch.Tensor:
    """The reference for :func:`decode_nested_without_bias`: one dense prefix decode per level.

    What SAELens's ``matryoshka_batchtopk`` computes, ``feature_acts[..., :w] @ W_dec[:w]`` for
    each width ``w``; returns ``(n_levels, *feature_acts.shape[:-1], d_in)``.
    """
    rescale = weights.decoder_scale is not None
    return torch.stack(
        [act_times_W_dec(feature_acts[..., :w], weights.W_dec[:w], rescale) for w in widths]
    )
