"""SAELens's ``SAETrainer``, recording its training curves.

SAELens's trainer reports losses only to wandb, so an offline run would end with no record of
how training went. :class:`RecordingSAETrainer` overrides the trainer's public ``step`` seam
(the one ``fit`` and SAELens's own multi-SAE coordinator call) to keep a sample of every step's
losses and metrics; nothing in SAELens is patched.
"""

from __future__ import annotations

from typing import Any

import torch
from sae_lens.saes.sae import TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer
from typing_extensions import override

# Points kept per curve: enough to see the shape, few enough that recording costs nothing.
CURVE_POINTS = 200


class RecordingSAETrainer(SAETrainer[Any, Any]):
    """``SAETrainer`` that records losses, L0 and the SAE's metrics every ``record_every`` steps.

    Each record holds ``step``, ``tokens`` (training tokens seen), every loss of the step
    (``mse_loss``, ``auxk_loss``, ...), ``l0`` (mean latents per token in the batch) and every
    scalar metric the SAE reports (``running_theta``, ``dead_latent_fraction`` for
    ``calibrated_batchtopk``). Reading values forces one host sync per record, not per step.
    """

    records: list[dict[str, float]]
    record_every: int

    @classmethod
    def carrying_state_of(cls, trainer: SAETrainer[Any, Any]) -> RecordingSAETrainer:
        """A recording trainer that continues exactly where ``trainer`` stands.

        The runner may already have restored a checkpoint into ``trainer`` (optimizer, lr
        schedule, counters, activation scaler), so the state is carried over, not rebuilt.
        """
        recording = cls.__new__(cls)
        recording.__dict__.update(vars(trainer))
        recording.records = []
        recording.record_every = max(trainer.cfg.total_training_steps // CURVE_POINTS, 1)
        return recording

    @override
    def step(self, batch: torch.Tensor) -> TrainStepOutput:
        output = super().step(batch)
        if self.n_training_steps % self.record_every == 0:
            self.records.append(self._record(output))
        return output

    @torch.no_grad()
    def _record(self, output: TrainStepOutput) -> dict[str, float]:
        record = {"step": float(self.n_training_steps), "tokens": float(self.n_training_samples)}
        record.update({name: float(value) for name, value in output.losses.items()})
        # SAELens's own L0 formula: it also reads the sparse codes of the fast path.
        record["l0"] = float(output.feature_acts.bool().float().sum(-1).to_dense().mean())
        for name, value in output.metrics.items():
            scalar = isinstance(value, torch.Tensor) and value.numel() == 1
            if scalar or isinstance(value, (int, float)):
                record[name] = float(value)
        return record
