"""Train one SAE with several processes: the runner each process runs, and its entry point.

Launch every process with torchrun (one per GPU, or several on a CPU with gloo) and call
:func:`train_distributed` in each, with the same config. Each process loads its own model
replica and streams activations from a disjoint shard of the dataset; the SAE is replicated
and stays identical everywhere (see :class:`~sae_lens_batchtopk.trainer.DistributedSAETrainer`
and :mod:`sae_lens_batchtopk.distributed`). Process 0 alone writes checkpoints and the final
SAE, each folder atomically, and alone logs to wandb; the others wait for it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from datasets import Dataset, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from sae_lens.config import HfDataset, LanguageModelSAERunnerConfig
from sae_lens.constants import RUNNER_CFG_FILENAME
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer
from transformer_lens.HookedTransformer import HookedRootModule
from typing_extensions import override

from sae_lens_batchtopk.atomic import write_folder_atomically, write_json, write_safetensors
from sae_lens_batchtopk.distributed import (
    DEFAULT_TIMEOUT_S,
    DistributedBatch,
    communication_seconds,
    init_process_group,
)
from sae_lens_batchtopk.runner import CalibratingSAETrainingRunner
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import CalibratedBatchTopKTrainingSAEConfig
from sae_lens_batchtopk.trainer import DistributedSAETrainer, check_batch_divides

logger = logging.getLogger(__name__)

# Runner settings that legitimately differ between processes: each process's own devices,
# wandb on process 0 only, output and checkpoints written by process 0 only.
_PER_PROCESS_RUNNER_FIELDS = frozenset(
    {"device", "llm_device", "act_store_device", "logger", "output_path", "checkpoint_path"}
)
_STORE_STATE_PREFIX = "activations_store_state_rank"


def activations_state_filename(rank: int) -> str:
    """Process ``rank``'s activation-stream state in a distributed checkpoint folder."""
    return f"{_STORE_STATE_PREFIX}{rank}.safetensors"


def validate_distributed_runner_config(
    cfg: LanguageModelSAERunnerConfig[Any], world_size: int
) -> None:
    """Refuse, before any model loads, what cannot train on ``world_size`` processes."""
    if not isinstance(cfg.sae, CalibratedBatchTopKTrainingSAEConfig):
        raise ValueError(
            f"distributed training supports this plugin's architectures (calibrated_batchtopk,"
            f" feature_choice), not {cfg.sae.architecture()!r}"
        )
    check_batch_divides(cfg.train_batch_size_tokens, world_size)
    if cfg.sae.calibration_method != "none" and cfg.sae.calibration_tokens % world_size:
        raise ValueError(
            f"calibration_tokens={cfg.sae.calibration_tokens} does not divide over {world_size}"
            f" processes; use a multiple of {world_size} (each process calibrates on its share)"
        )
    if cfg.use_cached_activations:
        raise ValueError(
            "use_cached_activations is not supported on several processes yet: stream"
            " activations from the model (use_cached_activations=False)"
        )


def check_checkpoint_processes(checkpoint: str | Path, world_size: int) -> None:
    """A distributed checkpoint resumes only with the process count that wrote it."""
    written = len(list(Path(checkpoint).glob(f"{_STORE_STATE_PREFIX}*.safetensors")))
    if written != world_size:
        wrote = f"{written} processes" if written else "a single-process run"
        raise ValueError(
            f"resume_from_checkpoint={str(checkpoint)!r} was written by {wrote}; resume it"
            f" with the same number of processes (this launch has {world_size})"
        )


def shard_dataset(dataset: HfDataset, distributed: DistributedBatch) -> Dataset | IterableDataset:
    """This process's disjoint share of the dataset (contiguous rows, or every n-th stream)."""
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(
            f"distributed training shards one dataset split, got {type(dataset).__name__};"
            " pass dataset['train'] (or the split to train on)"
        )
    return split_dataset_by_node(dataset, rank=distributed.rank, world_size=distributed.world_size)


class DistributedSAETrainingRunner(CalibratingSAETrainingRunner):
    """:class:`CalibratingSAETrainingRunner` as one of several processes training one SAE.

    Every process builds one with the same config. ``train_batch_size_tokens``,
    ``training_tokens`` and ``calibration_tokens`` count the tokens of all processes together
    (the first two as on one process; each process draws its equal share). Differences from
    the single-process runner:

    - the dataset (``override_dataset``, or the one ``dataset_path`` names) is sharded
      disjointly over the processes;
    - training runs through :class:`~sae_lens_batchtopk.trainer.DistributedSAETrainer`;
    - a checkpoint is one folder, written atomically by process 0, holding every process's
      activation-stream state (``activations_store_state_rank{r}.safetensors``); a run
      resumes from it with the same process count, every process reading the folder (a
      shared filesystem, or a copy on every node);
    - calibration statistics are reduced over processes (calibrating on their union), and the
      final SAE is written atomically by process 0 while the others wait;
    - wandb logging (and with it SAELens's evaluations) runs on process 0 only: the config's
      ``logger`` is switched off on the other processes;
    - an interruption (Ctrl-C, SIGTERM) does not checkpoint, since the other processes may be
      anywhere in their step: resume from the last periodic checkpoint.
    """

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig[Any],
        override_dataset: HfDataset | None = None,
        override_model: HookedRootModule | None = None,
        override_sae: TrainingSAE[Any] | None = None,
        *,
        distributed: DistributedBatch | None = None,
    ) -> None:
        if distributed is None:
            distributed = DistributedBatch()
        validate_distributed_runner_config(cfg, distributed.world_size)
        distributed.check_same_settings(_runner_settings(cfg), "runner settings")
        if cfg.resume_from_checkpoint is not None:
            check_checkpoint_processes(cfg.resume_from_checkpoint, distributed.world_size)
        self.distributed = distributed
        if distributed.rank != 0:
            cfg.logger = dataclasses.replace(cfg.logger, log_to_wandb=False)
        if override_dataset is None:
            override_dataset = load_dataset(
                cfg.dataset_path,
                split="train",
                streaming=cfg.streaming,
                trust_remote_code=cfg.dataset_trust_remote_code,
            )
        super().__init__(
            cfg, shard_dataset(override_dataset, distributed), override_model, override_sae
        )
        # Each process draws its share of every batch, and checkpoints its own stream.
        self.activations_store.train_batch_size_tokens = (
            cfg.train_batch_size_tokens // distributed.world_size
        )
        self.activations_store.state_filename = activations_state_filename(distributed.rank)

    @override
    def recording_trainer(self, trainer: SAETrainer[Any, Any]) -> DistributedSAETrainer:
        replica = DistributedSAETrainer.carrying_state_of(trainer, self.distributed)
        replica.save_checkpoint_fn = self._checkpoint_every_process
        return replica

    def _checkpoint_every_process(self, checkpoint_path: Path | None) -> None:
        """Gather every process's activation stream into process 0's checkpoint folder."""
        states = self.distributed.gathered_on_first(self.activations_store.state_dict())
        if checkpoint_path is None or states is None:
            return
        for rank, state in enumerate(states):
            write_safetensors(checkpoint_path / activations_state_filename(rank), state)
        write_json(checkpoint_path / RUNNER_CFG_FILENAME, self.cfg.to_dict())

    @override
    def save_checkpoint(self, checkpoint_path: Path | None) -> None:
        """SAELens's checkpoint on interruption: skipped, the other processes may be anywhere."""
        logger.warning(
            "process %d interrupted: distributed runs do not checkpoint on interruption;"
            " resume from the last periodic checkpoint (n_checkpoints)",
            self.distributed.rank,
        )

    @override
    @override
    def run_trainer_with_interruption_handling(self, trainer: SAETrainer[Any, Any]) -> Any:
        self._communication_start = communication_seconds()
        return super().run_trainer_with_interruption_handling(trainer)

    @override
    def measured_throughput(self, seconds: float, tokens: int) -> dict[str, float]:
        """Also the process count and the time this process spent inside collectives."""
        return {
            **super().measured_throughput(seconds, tokens),
            "processes": self.distributed.world_size,
            "communication_seconds": communication_seconds() - self._communication_start,
        }

    def write_final_sae(
        self,
        sae: TrainingSAE[Any],
        output_path: str,
        log_feature_sparsity: torch.Tensor | None = None,
    ) -> None:
        """Process 0 writes the output folder atomically; the others wait for it."""
        write = super().write_final_sae
        if self.distributed.rank == 0:
            write_folder_atomically(
                Path(output_path), lambda staging: write(sae, str(staging), log_feature_sparsity)
            )
        self.distributed.barrier()


def _runner_settings(cfg: LanguageModelSAERunnerConfig[Any]) -> dict[str, object]:
    return {
        name: value
        for name, value in cfg.to_dict().items()
        if name not in _PER_PROCESS_RUNNER_FIELDS
    }


def train_distributed(
    cfg: LanguageModelSAERunnerConfig[Any],
    *,
    override_model: HookedRootModule | None = None,
    override_dataset: HfDataset | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> TrainingSAE[Any]:
    """Train ``cfg`` as one of the processes a torchrun launch started; call it in each.

    Joins the process group torchrun describes unless one is already initialized (then it
    is used and left alone), trains, calibrates and saves (process 0 writes), and returns the
    trained SAE, identical on every process.
    """
    owns_group = not dist.is_initialized()
    if owns_group:
        init_process_group(timeout_s=timeout_s)
    try:
        runner = DistributedSAETrainingRunner(
            cfg, override_dataset=override_dataset, override_model=override_model
        )
        return runner.run()
    finally:
        if owns_group:
            dist.destroy_process_group()
