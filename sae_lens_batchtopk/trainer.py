"""SAELens's ``SAETrainer``, recording its training curves, and as one of several processes.

SAELens's trainer reports losses only to wandb, so an offline run would end with no record of
how training went. :class:`RecordingSAETrainer` overrides the trainer's public ``step`` seam
(the one ``fit`` and SAELens's own multi-SAE coordinator call) to keep a sample of every step's
losses and metrics; nothing in SAELens is patched.

:class:`DistributedSAETrainer` trains one replica of an SAE on each of several processes
(torch.distributed, launched by torchrun), so that together they train exactly the SAE one
process would train on the concatenation of their batches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from sae_lens.saes.sae import TrainStepOutput
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.sae_trainer import SAETrainer
from sae_lens.training.types import DataProvider
from typing_extensions import override

from sae_lens_batchtopk.atomic import write_folder_atomically
from sae_lens_batchtopk.distributed import DistributedBatch
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import CalibratedBatchTopKTrainingSAE

# Points kept per curve: enough to see the shape, few enough that recording costs nothing.
CURVE_POINTS = 200
# Devices whose parameters PyTorch's fused Adam updates.
_FUSED_ADAM_DEVICES = frozenset({"cpu", "cuda"})
# Trainer settings that legitimately differ between processes: each process's own device,
# wandb on process 0 only, checkpoints written by process 0 only.
_PER_PROCESS_TRAINER_FIELDS = frozenset({"device", "logger", "checkpoint_path"})


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
        Its Adam runs as PyTorch's fused implementation (:func:`use_fused_adam`).
        """
        recording = cls.__new__(cls)
        recording.__dict__.update(vars(trainer))
        use_fused_adam(recording.optimizer)
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


def use_fused_adam(optimizer: torch.optim.Optimizer) -> None:
    """Run SAELens's Adam as PyTorch's fused implementation, where every parameter allows it.

    The same optimizer: same update rule, hyperparameters and state, to float rounding. Only
    the implementation changes, one fused kernel per parameter instead of a dozen passes over
    each (SAELens builds ``Adam`` with the defaults, the single-tensor loop on a CPU): 23 ms
    instead of 100 ms per step for Adam and clipping at d_in 576, d_sae 16384, about a tenth of
    a sparse training step. Adam reads the flag from its parameter groups at every step, and a
    checkpoint saved with it restores it. Existing step counters move to their parameter's
    device, as loading a fused optimizer's state does. Left as it is for another optimizer,
    non-float parameters, a device without fused kernels, or a differentiable Adam.
    """
    if type(optimizer) is not torch.optim.Adam:
        return
    groups = optimizer.param_groups
    params = [param for group in groups for param in group["params"]]
    if any(group["differentiable"] for group in groups) or not all(
        param.is_floating_point() and param.device.type in _FUSED_ADAM_DEVICES for param in params
    ):
        return
    for group in groups:
        group["fused"], group["foreach"] = True, False
    for param in params:
        state = optimizer.state.get(param, {})
        if "step" in state:
            state["step"] = state["step"].to(dtype=torch.float32, device=param.device)


def check_batch_divides(train_batch_size_tokens: int, world_size: int) -> None:
    """Each process must get the same whole number of rows of every training batch.

    Equal shares make the mean of the processes' per-row-mean losses (and gradients) the
    union's, and keep every step's selection over the same number of tokens.
    """
    if train_batch_size_tokens % world_size:
        raise ValueError(
            f"train_batch_size_tokens={train_batch_size_tokens} does not divide over"
            f" {world_size} processes; use a multiple of {world_size} (each process then trains"
            " on train_batch_size_tokens / processes rows of every batch)"
        )


@dataclass
class DistributedActivationScaler(ActivationScaler):
    """SAELens's scaler, with the norm scaling factor estimated from every process's rows.

    Every replica must scale its rows by the same factor, the one a single process would
    estimate from all of them; ``distributed`` is required (a dataclass field after SAELens's
    defaulted ones).
    """

    distributed: DistributedBatch | None = None

    @override
    @torch.no_grad()
    def estimate_scaling_factor(
        self,
        d_in: int,
        data_provider: DataProvider,
        n_batches_for_norm_estimate: int = int(1e3),
    ) -> None:
        assert self.distributed is not None
        totals = torch.zeros(2, dtype=torch.float64)
        for _ in range(n_batches_for_norm_estimate):
            norms = next(data_provider).norm(dim=-1).double()
            totals += torch.stack([norms.sum().cpu(), torch.tensor(norms.numel())])
        totals = self.distributed.summed(totals)
        self.scaling_factor = d_in**0.5 / float(totals[0] / totals[1])


class DistributedSAETrainer(RecordingSAETrainer):
    """One replica of an SAE trained by several processes; together, one SAE on their union.

    Every process runs this trainer with its own data provider, whose batches hold
    ``train_batch_size_samples / world_size`` rows: the config's batch size is the batch of
    all processes together, as is the token count (``n_training_samples``) it trains for. On
    top of SAELens's trainer (nothing patched, public seams and subclassing only):

    - the SAE spans the processes (:meth:`CalibratedBatchTopKTrainingSAE.set_distributed`):
      selection per its ``selection_scope``, union-wide training state;
    - after each backward pass, before SAELens clips them, the gradients are averaged over
      processes (a post-accumulate-grad hook queues one all-reduce at the end of backward, as
      PyTorch's DDP does), so clipping and Adam see the union's gradient;
    - SAELens's own counters are the union's: a latent's steps since it fired are the minimum
      over processes (its ``dead_neuron_mask`` is then global), firing counts are summed;
    - the activation-norm scaling factor is estimated from every process's rows;
    - process 0 writes checkpoints, each folder atomically; the others wait for it;
    - at the start every process checks it has the same settings, and takes process 0's
      weights, so the replicas start identical.

    Build it from an ``SAETrainer`` with :meth:`carrying_state_of`, as the recording trainer.
    """

    distributed: DistributedBatch
    _averaging_queued: bool

    @classmethod
    @override
    def carrying_state_of(
        cls, trainer: SAETrainer[Any, Any], distributed: DistributedBatch | None = None
    ) -> DistributedSAETrainer:
        """``trainer``'s state, trained with the processes of ``distributed`` (default group)."""
        replica = cast(DistributedSAETrainer, super().carrying_state_of(trainer))
        replica._join(distributed if distributed is not None else DistributedBatch())
        return replica

    def _join(self, distributed: DistributedBatch) -> None:
        sae = self.sae
        if not isinstance(sae, CalibratedBatchTopKTrainingSAE):
            raise TypeError(
                f"distributed training supports this plugin's architectures, not"
                f" {sae.cfg.architecture()!r}: SAELens's own SAEs would select and keep their"
                " state per process"
            )
        check_batch_divides(self.cfg.train_batch_size_samples, distributed.world_size)
        if sae.cfg.normalize_activations == "covariance_whitening":
            raise ValueError(
                "normalize_activations='covariance_whitening' is not supported on several"
                " processes yet; use 'expected_average_only_in' or 'none'"
            )
        distributed.check_same_settings(self._settings(), "training settings")
        sae.set_distributed(distributed)
        assert sae.distributed is not None
        self.distributed = sae.distributed
        self.distributed.broadcast_state(sae)
        self.activation_scaler = DistributedActivationScaler(
            scaling_factor=self.activation_scaler.scaling_factor,
            whitening=self.activation_scaler.whitening,
            distributed=self.distributed,
        )
        self._averaging_queued = False
        for parameter in sae.parameters():
            parameter.register_post_accumulate_grad_hook(self._queue_gradient_averaging)

    def _settings(self) -> dict[str, object]:
        trainer = {
            f"trainer.{field.name}": getattr(self.cfg, field.name)
            for field in dataclasses.fields(self.cfg)
            if field.name not in _PER_PROCESS_TRAINER_FIELDS
        }
        sae = {f"sae.{name}": value for name, value in self.sae.cfg.to_dict().items()}
        sae.pop("sae.device", None)
        return {**trainer, **sae}

    def _queue_gradient_averaging(self, _parameter: torch.Tensor) -> None:
        """At the first gradient of a backward pass, average them all once it has finished.

        The callback runs after every gradient of the pass has been accumulated, on every
        process whatever its graph (a parameter without a gradient counts as zero), and
        before ``backward()`` returns, hence before SAELens clips them.
        """
        if not self._averaging_queued:
            self._averaging_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._average_gradients)

    def _average_gradients(self) -> None:
        self._averaging_queued = False
        self.distributed.average_gradients(self.sae.parameters())

    @override
    def step(self, batch: torch.Tensor) -> TrainStepOutput:
        world_size = self.distributed.world_size
        share = self.cfg.train_batch_size_samples // world_size
        if batch.shape[0] != share:
            raise ValueError(
                f"process {self.distributed.rank} got a batch of {batch.shape[0]} activations;"
                f" with {world_size} processes each must get train_batch_size_tokens /"
                f" {world_size} = {share}"
            )
        # The other processes' rows of this step, counted first, as SAELens counts its own.
        self.n_training_samples += share * (world_size - 1)
        fired_before = self.act_freq_scores.clone()
        output = super().step(batch)
        self.n_forward_passes_since_fired = self.distributed.minimum(
            self.n_forward_passes_since_fired
        )
        fired_now = self.distributed.summed(self.act_freq_scores - fired_before)
        self.act_freq_scores = fired_before + fired_now
        return output

    @override
    def save_checkpoint(
        self,
        checkpoint_name: str,
        base_path: Path | str | None = None,
        wandb_aliases: list[str] | None = None,
    ) -> None:
        """Process 0 writes the checkpoint folder atomically; every process then continues.

        The other processes still call ``save_checkpoint_fn`` (with no path), so a runner can
        gather their state (their activation streams) into process 0's folder.
        """
        base = base_path if base_path is not None else self.cfg.checkpoint_path
        save = super().save_checkpoint
        if self.distributed.rank != 0:
            if self.save_checkpoint_fn is not None:
                self.save_checkpoint_fn(checkpoint_path=None)
        elif base is None:
            save(checkpoint_name, base_path, wandb_aliases)
        else:
            write_folder_atomically(
                Path(base) / checkpoint_name,
                lambda staging: save(staging.name, staging.parent, wandb_aliases),
            )
        self.distributed.barrier()
