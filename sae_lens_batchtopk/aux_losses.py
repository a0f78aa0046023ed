"""Auxiliary-loss registry and the built-in AuxK loss.

SAE configs name the auxiliary losses they train with (``aux_losses={"auxk": 1/32}``); each
name maps to a function registered here that turns an :class:`AuxLossInputs` into a scalar.
The coefficient is applied by the SAE (through SAELens's coefficient schedulers, so warm-up
works), never inside the loss function: applying it twice is a known bug elsewhere.

A loss registered with ``sparse_ready=True`` promises to take its gradient only through
:attr:`AuxLossInputs.reconstruct_selected`; only then may the SAE train on its fast sparse path,
where ``hidden_pre`` is detached and ``feature_acts`` is a sparse tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from sae_lens_batchtopk.selection import per_token_topk_indices


def batch_variance(rows: torch.Tensor) -> torch.Tensor:
    """``mean_t ||v_t - mean(v)||²``: total variance of a batch of vectors."""
    return (rows - rows.mean(0)).pow(2).sum(-1).mean()


@dataclass(frozen=True)
class AuxLossInputs:
    """What an auxiliary loss may look at during one training step.

    Attributes:
        sae_in: the SAE's input batch, shape ``(..., d_in)``.
        sae_out: the SAE's reconstruction (with decoder bias), same shape.
        hidden_pre: pre-activations as the selection saw them (already multiplied by the decoder
            row norms when the SAE rescales by them), shape ``(..., d_sae)``. On the sparse
            path it is detached: read it to choose latents, never to take gradients.
        feature_acts: the selected activations; dense with ``hidden_pre``'s shape, or on the
            sparse path a detached sparse COO tensor of shape ``(n_tokens, d_sae)``.
        dead_mask: boolean ``(d_sae,)``, latents that have not fired for the SAE's dead window.
        underused_mask: boolean ``(d_sae,)``, latents firing less often than the Zipf-law target
            for their frequency rank (dead latents included); see :func:`zipf_loss`.
        k_aux: how many dead latents per token an AuxK-style loss may use.
        decode_directions: maps activations of shape ``(..., d_sae)`` to ``(..., d_in)`` through
            the decoder *without* the decoder bias (the residual already contains it). Dense
            path only.
        reconstruct_selected: ``(token_idx, latent_idx) -> (n_tokens, d_in)``: decodes, without
            the decoder bias, the relu'd pre-activations at those positions (token indices
            ascending, tokens counted over all leading dims), with gradients reaching the
            encoder at those positions and the decoder rows. Sparse on the sparse path, dense
            otherwise: a loss written with it trains identically on both.
        variance: :func:`batch_variance` over the whole training batch. When the batch is
            spread over processes with global selection it reduces over all of them, so a loss
            normalised by it equals the single-process loss on the concatenated batch.
    """

    sae_in: torch.Tensor
    sae_out: torch.Tensor
    hidden_pre: torch.Tensor
    feature_acts: torch.Tensor
    dead_mask: torch.Tensor
    underused_mask: torch.Tensor
    k_aux: int
    decode_directions: Callable[[torch.Tensor], torch.Tensor]
    reconstruct_selected: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    variance: Callable[[torch.Tensor], torch.Tensor] = batch_variance


AuxLossFn = Callable[[AuxLossInputs], torch.Tensor]

_AUX_LOSSES: dict[str, AuxLossFn] = {}
_SPARSE_READY: set[str] = set()
_DEAD_LATENTS_ONLY: set[str] = set()


def register_aux_loss(
    name: str,
    fn: AuxLossFn,
    *,
    overwrite: bool = False,
    sparse_ready: bool = False,
    dead_latents_only: bool = False,
) -> None:
    """Make ``fn`` available to SAE configs under ``name``.

    Raises ``ValueError`` if the name is taken, unless ``overwrite=True``: silently replacing a
    loss would change what existing configs train with. ``sparse_ready=True`` declares that
    ``fn`` takes gradients only through ``inputs.reconstruct_selected``, so SAEs using it may
    keep their fast sparse training path; otherwise they fall back to the dense one.
    ``dead_latents_only=True`` declares that ``fn`` is zero while no latent is dead, so a run
    whose dead-latent window is as long as the run can be warned that the loss never acts.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"aux loss name must be a non-empty string, got {name!r}")
    if name in _AUX_LOSSES and not overwrite:
        raise ValueError(
            f"aux loss {name!r} is already registered; pass overwrite=True to replace it"
        )
    _AUX_LOSSES[name] = fn
    _SPARSE_READY.discard(name)
    _DEAD_LATENTS_ONLY.discard(name)
    if sparse_ready:
        _SPARSE_READY.add(name)
    if dead_latents_only:
        _DEAD_LATENTS_ONLY.add(name)


def is_sparse_ready(name: str) -> bool:
    """Whether the loss registered under ``name`` works on the sparse training path."""
    get_aux_loss(name)
    return name in _SPARSE_READY


def acts_on_dead_latents_only(name: str) -> bool:
    """Whether the loss registered under ``name`` is zero while no latent is dead."""
    get_aux_loss(name)
    return name in _DEAD_LATENTS_ONLY


def registered_aux_losses() -> tuple[str, ...]:
    """Names of every registered auxiliary loss, built-ins included, sorted."""
    return tuple(sorted(_AUX_LOSSES))


def get_aux_loss(name: str) -> AuxLossFn:
    """The loss registered under ``name``; the error lists the registered names."""
    try:
        return _AUX_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown aux loss {name!r}; registered aux losses: {list(registered_aux_losses())}"
            " (add one with sae_lens_batchtopk.register_aux_loss)"
        ) from None


def auxk_loss(inputs: AuxLossInputs) -> torch.Tensor:
    """Gao et al.'s AuxK: the top-``k_aux`` dead latents reconstruct the main residual.

    ``L_aux = Var(x) · mean_t ||e_t - ê_t||² / Var(e)`` with ``Var(v) = mean_t ||v_t -
    mean(v)||²``, where ``e = x - x̂`` is *detached* (the aux loss must only move the dead
    latents, never the main reconstruction) and ``ê`` decodes only the ``k_aux`` largest
    relu'd pre-activations among dead latents, *without* the decoder bias (``e`` already
    contains it).

    Scale: openai/sparse_autoencoder trains ``NMSE(x̂, x) + 1/32 · NMSE(ê, e)``, each term
    normalised by its own target's variance. SAELens's main loss is the plain squared error
    ``mean_t ||x_t - x̂_t||²``, i.e. ``Var(x) · NMSE(x̂, x)``; multiplying the aux term by the
    same ``Var(x)`` keeps Gao et al.'s ratio between the two losses, so their coefficient 1/32
    means the same at any activation scale and any point in training. (Dividing by ``Var(e)``
    alone would weaken the aux loss by a factor ``Var(x)``, hundreds for residual streams,
    and leave most dead latents dead.) Returns 0 when no latent is dead or the residual has
    no variance.
    """
    return masked_residual_loss(inputs, inputs.dead_mask)


def zipf_loss(inputs: AuxLossInputs) -> torch.Tensor:
    """``aux_zipf_loss``: AuxK generalised from dead latents to under-used ones.

    Our definition (the Feature Choice paper's formula is not public): rank latents by their
    running firing rate, most frequent first; the Zipf target for rank ``r`` is
    ``t_r = min(1, k · r^-s / Σ_q q^-s)`` (``s = zipf_exponent``), so the targets sum to the
    average L0 ``k``. A latent is *under-used* when its rate is below ``underused_margin · t_r``;
    dead latents always are. The loss is exactly AuxK's with the dead set replaced by the
    under-used set: the top-``k_aux`` under-used latents per token reconstruct the detached
    residual without decoder bias, scaled as AuxK is. With no under-used
    live latent it equals AuxK, so it revives dead latents and also feeds rarely-firing ones.
    """
    return masked_residual_loss(inputs, inputs.underused_mask)


def auxk_sae_lens_loss(inputs: AuxLossInputs) -> torch.Tensor:
    """AuxK in SAELens's units: ``min(n_dead / k_aux, 1) · mean_t ||ê_t - e_t||²``.

    What SAELens's ``topk``/``batchtopk`` train with (its ``aux_loss_coefficient``, default 1,
    multiplies this), for reproducing a SAELens run: no variance normalisation, so its weight
    relative to the main loss grows with the residual's scale and shrinks as reconstruction
    improves; the scale ``min(n_dead / k_aux, 1)`` weakens it while few latents are dead.
    ``e`` and ``ê`` are as in :func:`auxk_loss`; as there (and in Gao et al.), only positive
    dead pre-activations decode, where SAELens also decodes negative ones.
    """
    error = masked_residual_loss(inputs, inputs.dead_mask, units="squared_error")
    # In the loss's dtype: a float32 scale would round a float64 loss (SAELens's is a Python float).
    scale = (inputs.dead_mask.sum().to(error.dtype) / inputs.k_aux).clamp(max=1.0)
    return scale * error


def masked_residual_loss(
    inputs: AuxLossInputs,
    mask: torch.Tensor,
    *,
    units: Literal["main_loss", "squared_error"] = "main_loss",
) -> torch.Tensor:
    """The shared AuxK computation over the latents in ``mask`` (see :func:`auxk_loss`).

    ``units="main_loss"`` scales the error by ``Var(x) / Var(e)`` (Gao et al.'s ratio to the
    main loss); ``"squared_error"`` returns the plain ``mean_t ||ê_t - e_t||²``.
    """
    columns = mask.nonzero().squeeze(1)
    if columns.numel() == 0:
        return inputs.sae_out.new_zeros(())
    with torch.no_grad():
        flat_pre = inputs.hidden_pre.detach().reshape(-1, inputs.hidden_pre.shape[-1])
        token_idx, latent_idx = per_token_topk_indices(flat_pre, columns, inputs.k_aux)
    aux_recon = inputs.reconstruct_selected(token_idx, latent_idx)
    residual = (inputs.sae_in - inputs.sae_out).detach()
    flat_residual = residual.reshape(-1, residual.shape[-1])
    error = (aux_recon.reshape_as(flat_residual) - flat_residual).pow(2).sum(-1).mean()
    if units == "squared_error":
        return error
    variance = inputs.variance(flat_residual)
    # In the residual's dtype: bfloat16 inputs would round the variance by up to 0.4 %.
    flat_in = inputs.sae_in.detach().reshape_as(flat_residual).to(flat_residual.dtype)
    scale = inputs.variance(flat_in) / variance.clamp_min(1e-30)
    return torch.where(variance > 0, error * scale, error.new_zeros(()))


register_aux_loss("auxk", auxk_loss, sparse_ready=True, dead_latents_only=True)
register_aux_loss("zipf", zipf_loss, sparse_ready=True)
register_aux_loss("auxk_sae_lens", auxk_sae_lens_loss, sparse_ready=True, dead_latents_only=True)
