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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from sae_lens.saes.topk_sae import act_times_W_dec

from sae_lens_batchtopk.sparse_codes import SparseCodes, decode_codes, gather_preactivations


@dataclass(frozen=True)
class SparseStepWeights:
    """The weights one training step reads; the parameters themselves, so gradients reach them.

    Attributes:
        W_enc: ``(d_in, d_sae)``.
        b_enc: ``(d_sae,)``.
        W_dec: ``(d_sae, d_in)``, contiguous.
        decoder_scale: the decoder row norms when selection rescales by them, else ``None``;
            differentiable (it multiplies the selected values and divides the decoded ones).
    """

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    decoder_scale: torch.Tensor | None

    @classmethod
    def of(
        cls,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        *,
        rescale_acts_by_decoder_norm: bool,
    ) -> SparseStepWeights:
        scale = W_dec.norm(dim=-1) if rescale_acts_by_decoder_norm else None
        return cls(W_enc, b_enc, W_dec, scale)


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
        """``AuxLossInputs.reconstruct_selected``: relu'd pre-activations there, decoded."""
        codes = selected_codes(self.sae_in, self.weights, self.hidden_pre, token_idx, latent_idx)
        return decode_without_bias(replace(codes, values=codes.values.relu()), self.weights)


def selection_preactivations(sae_in: torch.Tensor, weights: SparseStepWeights) -> torch.Tensor:
    """Dense pre-activations in selection units, without gradient.

    Every entry competes in the selection, so this matmul cannot be avoided; scaling W_enc's
    columns costs less than scaling the ``tokens x d_sae`` output.
    """
    with torch.no_grad():
        scale = weights.decoder_scale
        if scale is None:
            return torch.addmm(weights.b_enc, sae_in, weights.W_enc)
        return torch.addmm(weights.b_enc * scale, sae_in, weights.W_enc * scale)


def selected_codes(
    sae_in: torch.Tensor,
    weights: SparseStepWeights,
    hidden_pre: torch.Tensor,
    token_idx: torch.Tensor,
    latent_idx: torch.Tensor,
) -> SparseCodes:
    """Differentiable pre-activations (selection units) at the given entries of ``hidden_pre``.

    ``token_idx`` must be ascending. The gradient reaches ``sae_in``, the selected columns of
    ``W_enc``, ``b_enc`` and (through the scale) the selected decoder rows.
    """
    selected = hidden_pre[token_idx, latent_idx]
    scale = weights.decoder_scale
    if scale is None:
        values = gather_preactivations(
            sae_in, weights.W_enc, weights.b_enc, token_idx, latent_idx, selected
        )
    else:
        latent_scale = scale[latent_idx]
        raw = gather_preactivations(
            sae_in,
            weights.W_enc,
            weights.b_enc,
            token_idx,
            latent_idx,
            selected / latent_scale.detach(),
        )
        values = raw * latent_scale
    return SparseCodes(token_idx, latent_idx, values, sae_in.shape[0], weights.W_enc.shape[1])


def decode_without_bias(codes: SparseCodes, weights: SparseStepWeights) -> torch.Tensor:
    """``act_times_W_dec`` of the codes through the selected decoder rows only."""
    if weights.decoder_scale is not None:
        values = codes.values * weights.decoder_scale.reciprocal()[codes.latent_idx]
        codes = replace(codes, values=values)
    return decode_codes(codes, weights.W_dec)


def sparse_forward(
    sae_in: torch.Tensor,
    weights: SparseStepWeights,
    select: Callable[[torch.Tensor], torch.Tensor],
) -> SparseForward:
    """Encode, select and decode one ``(n_tokens, d_in)`` batch on the sparse path.

    ``select`` maps the detached ``(n_tokens, d_sae)`` pre-activations to the ascending
    row-major flat indices of the entries the training rule keeps. No ``tokens x d_sae``
    tensor is kept for the backward pass.
    """
    sae_in = sae_in.contiguous()
    hidden_pre, codes = sparse_encode(sae_in, weights, select)
    return SparseForward(sae_in, weights, hidden_pre, codes, decode_without_bias(codes, weights))


def sparse_encode(
    sae_in: torch.Tensor,
    weights: SparseStepWeights,
    select: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, SparseCodes]:
    """The encode half of :func:`sparse_forward`: detached pre-activations and the codes.

    ``sae_in`` must be contiguous. Kept apart so that a step decoding the codes differently
    (Matryoshka's nested decodes) encodes exactly as every other architecture does.
    """
    hidden_pre = selection_preactivations(sae_in, weights)
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
) -> NestedSparseForward:
    """:func:`sparse_forward` with Matryoshka's nested decodes in place of the single decode.

    The selection is global (one ``select`` over the whole dictionary); only the decode is
    nested, so each selected entry is still decoded once (:func:`decode_nested_without_bias`).
    """
    sae_in = sae_in.contiguous()
    hidden_pre, codes = sparse_encode(sae_in, weights, select)
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
