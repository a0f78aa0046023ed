"""Resuming a run from a checkpoint continues the same run, bitwise on CPU.

SAELens's runner resumed from a checkpoint ends one step short and trains on other activations
than an uninterrupted run (its store checkpoints only a dataset row count). These tests pin the
fix: the same step count, the same activation batches in the same order, the same weights and
state buffers, whether through the runner or through the store alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_CONTEXT, TINY_D_MODEL, TINY_HOOK, tiny_runner_kwargs
from datasets import Array2D, Dataset, Features
from sae_lens.constants import ACTIVATIONS_STORE_STATE_FILENAME
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.training.mixing_buffer import mixing_buffer
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer

from sae_lens_batchtopk import make_runner_config
from sae_lens_batchtopk.activations_store import ResumableActivationsStore, ResumableMixingBuffer
from sae_lens_batchtopk.runner import CalibratingSAETrainingRunner

TRAINING_TOKENS = 4096
BATCH_TOKENS = 64


class _Recorder(Iterator[torch.Tensor]):
    """Passes batches through, keeping a copy of each."""

    def __init__(self, source: Iterator[torch.Tensor]) -> None:
        self.source = source
        self.batches: list[torch.Tensor] = []

    def __next__(self) -> torch.Tensor:
        batch = next(self.source)
        self.batches.append(batch.clone())
        return batch


class _RecordingRunner(CalibratingSAETrainingRunner):
    """Keeps the trainer and every batch it trained on (norm estimate included)."""

    trainer: SAETrainer[Any, Any]
    recorder: _Recorder

    def run_trainer_with_interruption_handling(self, trainer: SAETrainer[Any, Any]) -> Any:
        self.trainer = trainer
        self.recorder = _Recorder(trainer.data_provider)
        trainer.data_provider = self.recorder
        return super().run_trainer_with_interruption_handling(trainer)


def _run(
    folder: Path, model: HookedTransformer, dataset: Dataset, seed: int, **overrides: Any
) -> tuple[_RecordingRunner, Any]:
    options: dict[str, Any] = {
        "training_tokens": TRAINING_TOKENS,
        "train_batch_size_tokens": BATCH_TOKENS,
        "n_checkpoints": 1,
        "normalize_activations": "expected_average_only_in",
        "feature_sampling_window": 10,  # sparsity windows reset mid-run, so steps must align
        "log_to_wandb": True,  # the evaluator only runs when logging; WANDB_MODE is disabled
        "wandb_log_frequency": 8,
        "eval_every_n_wandb_logs": 4,  # evaluates after steps 32 and 64; checkpoint after 33
        "n_eval_batches": 1,
        "eval_batch_size_prompts": 3,
    }
    cfg = make_runner_config(**tiny_runner_kwargs(folder, **{**options, **overrides}))
    torch.manual_seed(seed)  # SAE initialisation; the activation stream must not depend on it
    runner = _RecordingRunner(cfg, override_model=model, override_dataset=dataset)
    return runner, runner.run()


def test_runner_resume_equals_uninterrupted_run(
    tmp_path: Path,
    tiny_model: HookedTransformer,
    tiny_dataset: Dataset,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    full, full_sae = _run(tmp_path / "full", tiny_model, tiny_dataset, seed=0)
    (checkpoint,) = Path(full.cfg.checkpoint_path).iterdir()

    resumed, resumed_sae = _run(
        tmp_path / "resumed",
        tiny_model,
        tiny_dataset,
        seed=1,
        resume_from_checkpoint=str(checkpoint),
    )

    steps = TRAINING_TOKENS // BATCH_TOKENS
    assert full.trainer.n_training_steps == resumed.trainer.n_training_steps == steps
    steps_after_checkpoint = steps - int(checkpoint.name) // BATCH_TOKENS
    assert len(resumed.recorder.batches) == steps_after_checkpoint
    for step, (expected, got) in enumerate(
        zip(full.recorder.batches[-steps_after_checkpoint:], resumed.recorder.batches, strict=True)
    ):
        assert torch.equal(expected, got), f"activation batch {step} after the checkpoint differs"

    full_state, resumed_state = full_sae.state_dict(), resumed_sae.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for name, tensor in full_state.items():
        assert torch.equal(tensor, resumed_state[name]), name
    for name in ("act_freq_scores", "n_forward_passes_since_fired", "log_feature_sparsity"):
        assert torch.equal(getattr(full.trainer, name), getattr(resumed.trainer, name)), name
    for name in ("sae_weights.safetensors", "sparsity.safetensors"):
        expected_file = load_file(tmp_path / "full" / "output" / name)
        got_file = load_file(tmp_path / "resumed" / "output" / name)
        assert all(torch.equal(t, got_file[k]) for k, t in expected_file.items()), name
    # Its only checkpoint threshold was passed before the checkpoint: nothing more to write.
    resumed_checkpoints = Path(resumed.cfg.checkpoint_path)
    assert not resumed_checkpoints.exists() or not any(resumed_checkpoints.iterdir())
    # Evaluation draws from the training store, so its draws are part of the checkpoint.
    assert full.evaluator.activations_store is full.activations_store
    assert isinstance(full.activations_store, ResumableActivationsStore)

    # The checkpoint, an odd number of steps in, is not a whole number of steps twice as large.
    assert (int(checkpoint.name) // BATCH_TOKENS) % 2 == 1
    with pytest.raises(ValueError, match="whole number of batches of train_batch_size_tokens=128"):
        _run(
            tmp_path / "other_batch",
            tiny_model,
            tiny_dataset,
            seed=1,
            resume_from_checkpoint=str(checkpoint),
            train_batch_size_tokens=2 * BATCH_TOKENS,
        )


def _store(
    folder: Path, model: HookedTransformer, dataset: Dataset, seed: int
) -> ResumableActivationsStore:
    cfg = make_runner_config(**tiny_runner_kwargs(folder, train_batch_size_tokens=BATCH_TOKENS))
    torch.manual_seed(seed)  # the store's shuffles must not depend on the global generator
    return ResumableActivationsStore.from_config(model, cfg, override_dataset=dataset)


def _advance(store: ActivationsStore, n_batches: int) -> None:
    for _ in range(n_batches):
        next(store)
    store.get_batch_tokens(3)  # as the evaluator does between training steps


def test_store_checkpoint_continues_the_stream(
    tmp_path: Path, tiny_model: HookedTransformer, tiny_dataset: Dataset
) -> None:
    # 44 rows: passes over the dataset end mid-batch, so the stream crosses epoch boundaries.
    dataset = tiny_dataset.select(range(44))
    n_before, n_after = 13, 24
    saving = _store(tmp_path, tiny_model, dataset, seed=0)
    _advance(saving, n_before)
    saving.save_to_checkpoint(tmp_path)
    position = saving.n_dataset_processed
    assert position > len(dataset), "the checkpoint should come after an epoch boundary"
    assert [p.name for p in tmp_path.iterdir()] == [ACTIVATIONS_STORE_STATE_FILENAME]
    continued = [next(saving).clone() for _ in range(n_after)]

    never_saved = _store(tmp_path, tiny_model, dataset, seed=0)
    _advance(never_saved, n_before)
    uninterrupted = [next(never_saved).clone() for _ in range(n_after)]

    resumed = _store(tmp_path, tiny_model, dataset, seed=1)
    resumed.load_from_checkpoint(tmp_path)
    assert resumed.n_dataset_processed == position
    for step, (expected, saved_run, got) in enumerate(
        zip(uninterrupted, continued, [next(resumed) for _ in range(n_after)], strict=True)
    ):
        assert torch.equal(expected, saved_run), f"saving changed batch {step}"
        assert torch.equal(expected, got), f"batch {step} after the checkpoint differs"


def test_store_checkpoint_continues_cached_activations(
    tmp_path: Path, tiny_model: HookedTransformer, tiny_dataset: Dataset
) -> None:
    """Training from cached activations: the position is the next cached row, not the dataset's."""
    cache = tmp_path / "cache"
    features = Features({TINY_HOOK: Array2D((TINY_CONTEXT, TINY_D_MODEL), "float32")})
    activations = torch.randn(40, TINY_CONTEXT, TINY_D_MODEL).numpy()
    Dataset.from_dict({TINY_HOOK: activations}, features=features).save_to_disk(cache)
    cfg = make_runner_config(
        **tiny_runner_kwargs(tmp_path, use_cached_activations=True, cached_activations_path=cache)
    )
    saving, resumed = (
        ResumableActivationsStore.from_config(tiny_model, cfg, override_dataset=tiny_dataset)
        for _ in range(2)
    )
    for _ in range(7):
        next(saving)
    saving.save_to_checkpoint(tmp_path)
    assert saving.current_row_idx > 0
    resumed.load_from_checkpoint(tmp_path)
    for step in range(20):
        assert torch.equal(next(saving), next(resumed)), f"batch {step} after loading differs"


@pytest.mark.parametrize("mix_fraction", [0.0, 0.5, 1.0])
def test_mixing_buffer_serves_what_sae_lens_serves(mix_fraction: float) -> None:
    """Same batches as SAELens's ``mixing_buffer`` when its global generator has the same seed."""
    chunks = [torch.randn(n, 4) for n in (50, 30, 70, 20, 90, 40, 60, 80)]
    torch.manual_seed(3)
    expected = list(mixing_buffer(100, 16, iter(chunks), mix_fraction))[:12]
    generator = torch.Generator().manual_seed(3)
    buffer = ResumableMixingBuffer(100, 16, iter(chunks), mix_fraction, generator)
    got = [next(buffer) for _ in expected]
    assert len(expected) == 12
    assert all(torch.equal(e, g) for e, g in zip(expected, got, strict=True))


def test_store_checkpoint_errors_name_the_field(
    tmp_path: Path, tiny_model: HookedTransformer, tiny_dataset: Dataset
) -> None:
    store = _store(tmp_path, tiny_model, tiny_dataset, seed=0)
    next(store)
    state = store.state_dict()
    path = str(tmp_path / "state.safetensors")

    save_file({**state, "mixing_kept": torch.zeros(3, TINY_D_MODEL + 1)}, path)
    with pytest.raises(ValueError, match=r"mixing_kept.*d_in=16"):
        _store(tmp_path, tiny_model, tiny_dataset, seed=0).load(path)

    save_file({k: v for k, v in state.items() if k != "mixing_rng_state"}, path)
    with pytest.raises(ValueError, match="mixing_rng_state"):
        _store(tmp_path, tiny_model, tiny_dataset, seed=0).load(path)

    save_file({**state, "mixing_unserved": torch.zeros(BATCH_TOKENS + 1, TINY_D_MODEL)}, path)
    with pytest.raises(ValueError, match="train_batch_size_tokens=64"):
        _store(tmp_path, tiny_model, tiny_dataset, seed=0).load(path)

    save_file({**state, "sequences_in_epoch": torch.tensor(10**6)}, path)
    with pytest.raises(ValueError, match="sequences_in_epoch=1000000"):
        _store(tmp_path, tiny_model, tiny_dataset, seed=0).load(path)

    save_file({"n_dataset_processed": state["n_dataset_processed"]}, path)
    with pytest.warns(UserWarning, match="written by SAELens's ActivationsStore"):
        _store(tmp_path, tiny_model, tiny_dataset, seed=0).load(path)
