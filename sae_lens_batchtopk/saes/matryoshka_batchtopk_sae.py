"""The ``calibrated_matryoshka_batchtopk`` training architecture (Bussmann et al. 2025).

A Matryoshka SAE's dictionary is a nest of prefixes, ``matryoshka_widths`` ``w_1 < ... < w_L =
d_sae``, each trained to reconstruct the input on its own: the loss is the sum over levels of
``||x - (b_dec + codes[:, :w_l] @ W_dec[:w_l])||²``, so early latents learn general features
and later ones refine them instead of absorbing them. Selection is one global batch top-k over
the whole dictionary, as in ``calibrated_batchtopk``; only the loss is nested.

This is SAELens's ``matryoshka_batchtopk`` (same fields, same loss, same per-level aux-loss
option) on this plugin's machinery: the fast sparse step with every level decoded from the
selected entries only (:func:`~sae_lens_batchtopk.sparse_step.decode_nested_without_bias`),
the aux-loss registry, dead-latent tracking, and thresholds calibrated after training. The
nesting shapes training only: inference is the same encoder and decoder, so the SAE exports
to the ``calibrated_batchtopk`` inference form (and from there to JumpReLU).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import pairwise

import torch
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from typing_extensions import override

from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import (
    SAE_LENS_FIELDS,
    CalibratedBatchTopKTrainingSAE,
    CalibratedBatchTopKTrainingSAEConfig,
)
from sae_lens_batchtopk.sparse_step import (
    decode_nested_dense_without_bias,
    reconstruct_dense,
    sparse_nested_forward,
)
from sae_lens_batchtopk.validation import check_finite_number

CALIBRATED_MATRYOSHKA = "calibrated_matryoshka_batchtopk"


@dataclass
class CalibratedMatryoshkaBatchTopKTrainingSAEConfig(CalibratedBatchTopKTrainingSAEConfig):
    """Training config for ``calibrated_matryoshka_batchtopk``; every BatchTopK option applies.

    A SAELens ``matryoshka_batchtopk`` config with its architecture renamed means the same
    (:data:`MATRYOSHKA_SAE_LENS_FIELDS`).

    Args:
        matryoshka_widths: the nested dictionary widths, strictly increasing, each a prefix of
            the latents: level ``l`` reconstructs from latents ``[0, widths[l])``. As in
            SAELens, a list not ending at ``d_sae`` gets ``d_sae`` appended (with a warning),
            so the last level is always the whole SAE.
        use_matryoshka_aux_loss: SAELens's option: each level's dead latents (those in
            ``[widths[l-1], widths[l])``) reconstruct the residual of that level's
            reconstruction rather than the whole SAE's, and the aux losses of the levels add
            up. Applies to every configured aux loss (``aux_losses``).
        group_weights: one weight per level multiplying that level's reconstruction loss
            (dictionary_learning's ``group_weights``); ``None`` weighs every level 1, SAELens's
            loss. dictionary_learning trains with the mean of its weighted level losses, so its
            weights ``g`` correspond to ``group_weights = g / n_levels`` here.
    """

    matryoshka_widths: list[int] = field(default_factory=list)
    use_matryoshka_aux_loss: bool = False
    group_weights: list[float] | None = None

    @override
    @classmethod
    def architecture(cls) -> str:
        return CALIBRATED_MATRYOSHKA

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_widths()
        if not isinstance(self.use_matryoshka_aux_loss, bool):
            raise TypeError(
                "use_matryoshka_aux_loss must be true or false, got"
                f" {self.use_matryoshka_aux_loss!r}"
            )
        self._check_group_weights()
        # SAELens recorded the fields in the metadata before the widths were completed.
        self.add_training_info_to_metadata()

    def _check_widths(self) -> None:
        widths = self.matryoshka_widths
        example = f"e.g. [{self.d_sae // 4}, {self.d_sae // 2}, {self.d_sae}]"
        if not isinstance(widths, (list, tuple)) or not widths:
            raise ValueError(
                f"matryoshka_widths must list the nested dictionary widths ending at d_sae,"
                f" {example}; got matryoshka_widths={widths!r}"
            )
        for width in widths:
            if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
                raise ValueError(
                    f"matryoshka_widths must hold positive integers, got {width!r} in"
                    f" matryoshka_widths={list(widths)}"
                )
        if any(later <= earlier for earlier, later in pairwise(widths)):
            raise ValueError(
                "matryoshka_widths must be strictly increasing (each level a larger prefix of"
                f" the dictionary), got matryoshka_widths={list(widths)}; {example}"
            )
        if widths[-1] > self.d_sae:
            raise ValueError(
                f"matryoshka_widths ends at {widths[-1]}, beyond d_sae={self.d_sae}; the widths"
                " are prefixes of the dictionary: end them at d_sae or raise d_sae"
            )
        self.matryoshka_widths = list(widths)
        if widths[-1] < self.d_sae:
            warnings.warn(
                f"matryoshka_widths={list(widths)} does not end at d_sae={self.d_sae}; a final"
                " level of width d_sae is added (as SAELens does)",
                stacklevel=4,
            )
            self.matryoshka_widths.append(self.d_sae)
        if len(self.matryoshka_widths) == 1:
            warnings.warn(
                "matryoshka_widths has a single level: this trains a plain BatchTopK SAE"
                " (calibrated_batchtopk); give more widths to nest the dictionary",
                stacklevel=4,
            )

    def _check_group_weights(self) -> None:
        if self.group_weights is None:
            return
        n_levels = len(self.matryoshka_widths)
        if not isinstance(self.group_weights, (list, tuple)) or len(self.group_weights) != (
            n_levels
        ):
            raise ValueError(
                f"group_weights={self.group_weights!r} must give one weight per level:"
                f" {n_levels} for matryoshka_widths={self.matryoshka_widths}"
            )
        for index, weight in enumerate(self.group_weights):
            check_finite_number(f"group_weights[{index}]", weight, low=0.0)
        self.group_weights = [float(weight) for weight in self.group_weights]

    @property
    def level_weights(self) -> list[float]:
        """Each level's reconstruction-loss weight: ``group_weights``, or 1 for every level."""
        if self.group_weights is None:
            return [1.0] * len(self.matryoshka_widths)
        return list(self.group_weights)


# How each field of SAELens's MatryoshkaBatchTopKTrainingSAEConfig is honoured here; a test
# checks the list against SAELens's dataclass.
MATRYOSHKA_SAE_LENS_FIELDS: dict[str, str] = {
    **SAE_LENS_FIELDS,
    "normalize_activations": (
        "same, every level de-normalised (SAELens's matryoshka fails on layer_norm and"
        " constant_norm_rescale); those two refused with aux losses"
    ),
    "matryoshka_widths": "same; validated at construction, d_sae appended with a warning",
    "use_matryoshka_aux_loss": "same: per-level residuals, for every configured aux loss",
}


class CalibratedMatryoshkaBatchTopKTrainingSAE(CalibratedBatchTopKTrainingSAE):
    """Matryoshka BatchTopK training SAE: global batch top-k, nested reconstruction losses.

    Selection, aux losses, dead/under-used tracking, θ, the NaN guard and calibration are
    inherited from :class:`CalibratedBatchTopKTrainingSAE`. The step's losses are SAELens's
    ``matryoshka_batchtopk`` ones: ``mse_loss`` for the whole SAE and ``inner_mse_loss_<w>`` for
    each inner width ``w`` (each times its ``group_weights`` entry when set), plus the aux
    losses, per level with ``use_matryoshka_aux_loss``. ``sae_out`` is the whole SAE's
    reconstruction.

    On the sparse path every level is decoded from the selected entries in one pass
    (:func:`~sae_lens_batchtopk.sparse_step.sparse_nested_forward`), so the nesting costs about
    one sparse decode however many levels there are, and no ``tokens x d_sae`` tensor is kept
    for the backward pass. The dense path decodes each level as SAELens does.
    """

    cfg: CalibratedMatryoshkaBatchTopKTrainingSAEConfig  # type: ignore[assignment]

    @override
    def _sparse_training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        # A constant, as in the plain step: b_dec's gradient comes through the input bias.
        sae_in = self.process_sae_in(step_input.sae_in).detach()
        weights = self.step_weights()
        forward = sparse_nested_forward(
            sae_in,
            weights,
            self.select_indices,
            self.cfg.matryoshka_widths,
            out=self._preactivation_buffer(sae_in, weights),
        )
        feature_acts = forward.codes.to_sparse_coo()
        sae_out, losses = self._matryoshka_losses(
            step_input,
            feature_acts,
            forward.hidden_pre,
            forward.levels,
            forward.reconstruct_selected,
        )
        return TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=feature_acts,
            loss=sum(losses.values()),  # type: ignore[arg-type]
            losses=losses,
        )

    @override
    def _dense_training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        feature_acts, hidden_pre = self.encode_with_hidden_pre(step_input.sae_in)
        weights = self.step_weights()
        levels = decode_nested_dense_without_bias(feature_acts, weights, self.cfg.matryoshka_widths)
        sae_out, losses = self._matryoshka_losses(
            step_input,
            feature_acts,
            hidden_pre,
            levels,
            partial(reconstruct_dense, hidden_pre, weights),
        )
        return TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=sum(losses.values()),  # type: ignore[arg-type]
            losses=losses,
        )

    def _matryoshka_losses(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        levels: torch.Tensor,
        reconstruct_selected: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The whole SAE's reconstruction and the named losses, from the per-level decodes."""
        outputs = self.level_outputs(levels)
        mse = [
            weight * self.reconstruction_mse_loss(output, step_input.sae_in)
            for weight, output in zip(self.cfg.level_weights, outputs, strict=True)
        ]
        inner = zip(self.cfg.matryoshka_widths[:-1], mse[:-1], strict=True)
        losses = {"mse_loss": mse[-1], **{f"inner_mse_loss_{w}": loss for w, loss in inner}}
        if self.cfg.resolved_aux_losses:
            whole = self.aux_loss_inputs(
                step_input, feature_acts, hidden_pre, outputs[-1], reconstruct_selected
            )
            parts = [whole]
            if self.cfg.use_matryoshka_aux_loss:
                parts = [
                    replace(
                        whole,
                        sae_out=output,
                        dead_mask=whole.dead_mask & band,
                        underused_mask=whole.underused_mask & band,
                    )
                    for output, band in zip(outputs, self.level_bands(), strict=True)
                ]
            losses.update(self.weighted_aux_losses(step_input, parts))
        return outputs[-1], losses

    def level_outputs(self, levels: torch.Tensor) -> torch.Tensor:
        """Each level's reconstruction as SAELens's ``decode`` would return it.

        Adds the decoder bias, passes the whole SAE's level through ``hook_sae_recons`` (SAELens
        hooks only that one) and de-normalises all levels in one call: SAELens's output
        de-normalisation may keep per-batch state that it consumes on use.
        """
        with_bias = levels + self.b_dec
        outer = with_bias[-1]
        hooked = self.hook_sae_recons(outer)
        if hooked is not outer:
            with_bias = torch.cat([with_bias[:-1], hooked[None]])
        return self.run_time_activation_norm_fn_out(with_bias)

    def level_bands(self) -> list[torch.Tensor]:
        """Boolean ``(d_sae,)`` masks of the latents each level adds: ``[w_{l-1}, w_l)``."""
        latents = torch.arange(self.cfg.d_sae, device=self.W_dec.device)
        starts = [0, *self.cfg.matryoshka_widths[:-1]]
        return [
            (latents >= start) & (latents < end)
            for start, end in zip(starts, self.cfg.matryoshka_widths, strict=True)
        ]
