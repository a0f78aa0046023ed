"""The ``feature_choice`` training architecture (Ayonrinde 2024, Feature Choice SAEs).

The paper frames latent selection as an allocation of a token x latent budget: TopK caps
latents per token, Mutual Choice caps only the total (it *is* BatchTopK: the top ``k * n``
entries of the whole batch, which is :func:`sae_lens_batchtopk.selection.batch_topk`, so it needs
no class of its own), and Feature Choice caps tokens per latent: in every batch latent ``j``
keeps its own top ``m_j`` tokens. Capacities are uniform (``m = k * n / d_sae``) or follow a Zipf
law over latents ranked by their running firing rate, and always sum to ``int(k * n)``.

Inference cannot use a batch-dependent rule either, so a Feature Choice SAE exports to the same
threshold form as BatchTopK (``calibrated_batchtopk``, and from there to JumpReLU); calibration
on the training SAE matches each latent's firing frequency under Feature Choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from typing_extensions import override

from sae_lens_batchtopk.distributed import DistributedBatch
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import (
    CalibratedBatchTopKTrainingSAE,
    CalibratedBatchTopKTrainingSAEConfig,
    CalibrationMethodOption,
)
from sae_lens_batchtopk.selection import (
    feature_choice,
    feature_choice_indices,
    latent_capacities,
    zipf_weights,
)
from sae_lens_batchtopk.validation import check_choice

FEATURE_CHOICE = "feature_choice"


@dataclass
class FeatureChoiceTrainingSAEConfig(CalibratedBatchTopKTrainingSAEConfig):
    """Training config for ``feature_choice``; every BatchTopK option applies as well.

    Args:
        capacity: ``"uniform"`` (each latent keeps ``k * n / d_sae`` tokens per batch) or
            ``"zipf"`` (capacities ``∝ rank^-zipf_exponent`` over latents ranked by firing rate).
        calibration_method: ``"per_latent"`` by default: Feature Choice gives each latent its
            own cut-off, and one global θ reconstructs far worse at the same L0. ``"paper"``
            is refused: the batch minimum of the selected values is the lowest of ``d_sae``
            per-latent cut-offs, so its average fires at many times the target L0.
    """

    calibration_methods: ClassVar[tuple[str, ...]] = ("l0", "per_latent")

    capacity: Literal["uniform", "zipf"] = "uniform"
    calibration_method: CalibrationMethodOption = "per_latent"

    @override
    @classmethod
    def architecture(cls) -> str:
        return FEATURE_CHOICE

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("capacity", self.capacity, ("uniform", "zipf"))
        if self.capacity == "zipf":
            top_share = float(self.k * zipf_weights(self.d_sae, self.zipf_exponent)[0])
            if top_share > 1:
                raise ValueError(
                    f"Zipf capacities cannot reach L0 k={self.k}: with zipf_exponent="
                    f"{self.zipf_exponent} the top latent would need {top_share:.2f} x the"
                    " batch's tokens; lower zipf_exponent or k, or raise d_sae"
                )


class FeatureChoiceTrainingSAE(CalibratedBatchTopKTrainingSAE):
    """Feature Choice training SAE: batch top-k's machinery with per-latent token capacities.

    Aux losses, dead/under-used tracking, θ and calibration state are inherited; only the
    selection differs. ``running_theta`` here is the minimum selected activation of the batch,
    so the uncalibrated export behaves like BatchTopK's.
    """

    cfg: FeatureChoiceTrainingSAEConfig  # type: ignore[assignment]

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.select

    def select(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """Apply Feature Choice with this batch's capacities."""
        return feature_choice(hidden_pre, self.capacities(hidden_pre.shape[:-1].numel()))

    @override
    def select_indices(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return feature_choice_indices(hidden_pre, self.capacities(hidden_pre.shape[0]))

    @override
    def set_distributed(self, batch: DistributedBatch | None) -> None:
        """Feature Choice selects within each process's batch only (``selection_scope="local"``).

        A latent's top-``m`` tokens over the union would need every process's per-latent top
        values (``m x d_sae`` each, unbounded under Zipf capacities); refused rather than
        silently selecting per process.
        """
        if batch is not None and self.cfg.selection_scope == "global":
            raise ValueError(
                "feature_choice cannot yet select over the whole distributed batch; set"
                " selection_scope='local' (each process applies Feature Choice to its own"
                " batch; gradients and state are still reduced over every process)"
            )
        super().set_distributed(batch)

    def capacities(self, n_tokens: int) -> torch.Tensor:
        """Per-latent token capacities for a batch of ``n_tokens`` (sum ``int(k * n)``)."""
        rank_order = torch.argsort(self.firing_rate, descending=True, stable=True)
        return latent_capacities(
            self.cfg.k,
            n_tokens,
            self.cfg.d_sae,
            zipf_exponent=self.cfg.zipf_exponent if self.cfg.capacity == "zipf" else None,
            rank_order=rank_order,
        )
