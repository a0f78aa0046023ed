"""``sae-batchtopk bench``: SAELens's TopK, BatchTopK and JumpReLU next to ours, same tokens.

A comparison is only fair if everything but the architecture is held fixed, so every run here
trains through SAELens's own ``SAETrainer`` on the same cached activations
(:mod:`.activation_cache`), in the same batch order, with the same batch size, Adam settings,
learning-rate schedule (cosine to lr/10), activation normalization (SAELens's
``expected_average_only_in``, factor computed once from the train split), decoder bias
initialisation (the train-split mean) and seed; no language model runs inside the training loop.
Each run is then evaluated the way it would be deployed:

- ``topk``: SAELens's TopK inference SAE (per-token top k).
- ``batchtopk``: SAELens's JumpReLU export of its BatchTopK (threshold = its EMA), through
  ``CalibratedBatchTopKSAE.from_sae``, which applies SAELens's own
  ``process_state_dict_for_saving_inference``.
- ``jumprelu``: SAELens's JumpReLU with the Gemma Scope 2 quadratic L0 penalty around
  ``target_l0 = k`` (coefficient ``--jumprelu-l0-coefficient``), the straight-through gradient
  passed to the encoder too (Anthropic's setting; with it off, only the threshold, moving about
  ``lr`` per step, can lower L0, which short runs cannot afford), and its threshold initialised
  at the (1 - k/d_sae) quantile of the initial pre-activations so it starts near the target.
  No sweep: the L0 it actually reaches is what the table reports.
- ``calibrated_batchtopk``: one training run, calibrated three times (``paper``, ``l0``,
  ``per_latent``) on the calibration split.

Per evaluated SAE: held-out inference L0 (mean, p5/p50/p95, deviation from k), NMSE and
explained variance (:func:`~sae_lens_batchtopk.evaluation.reconstruction_stats`), CE-loss and
KL scores with the full model on fixed held-out sequences, dead-latent fraction, training
throughput and peak memory. Outputs go to ``--output``: ``bench.json``, ``bench.md``,
``nmse_vs_l0.png`` and ``BENCHMARKS_section.md`` (a ready-to-paste section with the command,
machine and date).

Everything above is the ``bench`` preset, which overrides every architecture's settings so that
only the architecture differs. That hides how users meet the library, so ``--preset
sae-lens-defaults`` does the opposite: each run gets SAELens's own defaults, read from
``LanguageModelSAERunnerConfig`` and each architecture's training config (learning rate,
constant schedule, batch size, Adam betas, dead-feature window, no activation normalisation,
each architecture's own decoder-bias init, ...). Only ``architecture``, ``k``, ``d_in``,
``d_sae``, ``device``, ``seed`` and the training tokens are set (and logging is off); each run
file records the resolved trainer and SAE settings. It compares ``topk``, ``batchtopk`` and
``calibrated_batchtopk``, deployed as follows:

- ``topk``: its TopK inference SAE; ``batchtopk``: its JumpReLU export with the EMA θ
  (``[ema]``) and, as an extra row, the same weights calibrated by us to k (``[l0]``).
- ``calibrated_batchtopk``: calibrated with ``l0`` to k (``[l0]``) and, on the same split, to the
  held-out inference L0 the built-in ``batchtopk[ema]`` reached in the same cell
  (``[l0@batchtopk]``), the comparison at equal L0 that :func:`equal_l0_verdict` judges.

``--snapshot-tokens`` evaluates one training run at several token budgets: the SAE is copied
as the trainer asks for the first batch after the budget. Under a constant learning rate (no
warm-up, no decay) nothing a step computes depends on the total budget, so the copy equals a
separate run of that many tokens on the same batch stream, bit for bit on CPU
(``tests/test_bench.py`` checks it); any other schedule is refused. Several ``--hook`` values
run one benchmark per hook (each resumable in its own ``--output`` subfolder) and write one
combined table and section.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import gc
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import FuncFormatter, NullFormatter
from sae_lens.config import LanguageModelSAERunnerConfig, SAETrainerConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import SAE, TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer
from transformer_lens import HookedTransformer

from sae_lens_batchtopk.aux_losses import registered_aux_losses
from sae_lens_batchtopk.calibration import (
    METHODS,
    CalibrationError,
    applicable_methods,
    calibrate_thresholds,
    check_token_budget,
)
from sae_lens_batchtopk.evaluation import reconstruction_stats
from sae_lens_batchtopk.runner import make_runner_config
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import ARCHITECTURE, CalibratedBatchTopKSAE
from sae_lens_batchtopk.saes.feature_choice_sae import FEATURE_CHOICE
from sae_lens_batchtopk.tools.benchmarks.activation_cache import (
    ActivationCache,
    CacheSpec,
    load_or_create_activation_cache,
)
from sae_lens_batchtopk.tools.offline import default_cache_dir, load_smollm2, special_token_ids
from sae_lens_batchtopk.tools.report import write_atomically, write_json

ARCHITECTURES: tuple[str, ...] = ("topk", "batchtopk", "jumprelu", ARCHITECTURE, FEATURE_CHOICE)
DEFAULT_ARCHITECTURES: tuple[str, ...] = ("topk", "batchtopk", "jumprelu", ARCHITECTURE)
# Our architectures train with registered aux losses and export through calibration.
CALIBRATED_ARCHITECTURES = frozenset({ARCHITECTURE, FEATURE_CHOICE})
# Aux coefficient of every registered loss in a variant (Gao et al.'s 1/32).
AUX_COEFFICIENT = 1 / 32
MODEL_NAME = "SmolLM2-135M-Instruct"
JSON_FILE = "bench.json"
MARKDOWN_FILE = "bench.md"
PLOT_FILE = "nmse_vs_l0.png"
SECTION_FILE = "BENCHMARKS_section.md"
# Training steps the peak-memory probe runs: memory is steady after the first optimizer step.
MEMORY_PROBE_STEPS = 4
# One JSON file per finished training run, so an interrupted benchmark resumes where it stopped.
RUNS_DIR = "runs"
# Settings that choose which runs exist rather than what any run computes.
_RUN_SELECTION_SETTINGS = frozenset(
    {"k", "d_sae", "architectures", "aux_variants", "output", "cache_dir", "rerun", "memory_probe"}
)
BENCH_PRESET = "bench"
SAE_LENS_DEFAULTS_PRESET = "sae-lens-defaults"
PRESETS: tuple[str, ...] = (BENCH_PRESET, SAE_LENS_DEFAULTS_PRESET)
# What the sae-lens-defaults preset compares, in training order: ours is calibrated to the L0
# the built-in batchtopk reached in the same cell, so batchtopk trains first.
PRESET_ARCHITECTURES: tuple[str, ...] = ("topk", "batchtopk", ARCHITECTURE)
# BenchConfig fields only the bench preset reads (field -> option). The sae-lens-defaults preset
# takes SAELens's values instead, so setting any of them there is an error, not a silent no-op.
BENCH_PRESET_FIELDS: dict[str, str] = {
    "lr": "--lr",
    "adam_beta1": "adam_beta1",
    "adam_beta2": "adam_beta2",
    "batch_size": "--batch-size",
    "dead_window_tokens": "--dead-window-tokens",
    "jumprelu_l0_coefficient": "--jumprelu-l0-coefficient",
    "aux_variants": "--aux-variants",
}
# Settings added after run files were first written: hashed only when they differ from these
# defaults, so runs finished before the settings existed keep their fingerprint and resume.
_LATER_SETTINGS: dict[str, Any] = {"preset": BENCH_PRESET, "snapshot_tokens": ()}
# Held-out L0s within this relative distance count as equal for the verdict. Calibrating to a
# target on the calibration split lands about half a percent off it on held-out tokens.
EQUAL_L0_TOLERANCE = 0.01
# Label of ours calibrated to the built-in batchtopk's held-out L0.
EQUAL_L0_METHOD = "l0@batchtopk"
# The RSS sampler's period: short enough to catch the peak of a training step.
_RSS_SAMPLE_SECONDS = 0.005
# Tokens encoded at once while evaluating; bounds the tokens x d_sae working memory.
_EVAL_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class BenchConfig:
    """Every setting of a benchmark; the defaults are the full (non ``--quick``) benchmark.

    Attributes:
        dead_window_tokens: a latent is dead for AuxK after this many training tokens without
            firing. Ours counts tokens (``dead_tokens_window``); SAELens's built-ins count steps
            (``dead_feature_window``), so they get ``dead_window_tokens // batch_size`` steps
            and ours exactly that many steps' worth of tokens: the same window for both.
        jumprelu_l0_coefficient: weight of JumpReLU's quadratic L0 penalty around k.
        aux_variants: aux-loss sets our architectures train with, one run each: ``"none"``, a
            registered loss name, or names joined by ``+`` (``"auxk+zipf"``); each loss gets
            coefficient 1/32. Several variants compare dead-latent revival on the same tokens.
        eval_sequences / context_size: held-out sequences (and their length) for CE/KL.
        rerun: retrain runs already finished in ``output/runs`` with the same settings
            (by default they are reused, so an interrupted benchmark resumes).
        memory_probe: measure each run's peak memory in a fresh process
            (:func:`probe_peak_memory`, a few seconds per run); ``False`` reports ``None``.
        preset: ``"bench"`` (every setting above, shared by all architectures) or
            ``"sae-lens-defaults"`` (SAELens's own trainer and SAE-config defaults per
            architecture; the fields in :data:`BENCH_PRESET_FIELDS` must stay at their defaults).
        architectures: empty means the preset's own list (:data:`DEFAULT_ARCHITECTURES`, or
            :data:`PRESET_ARCHITECTURES`).
        snapshot_tokens: also evaluate each run after this many training tokens (rounded down
            to whole batches), a copy taken during the one training run; needs a constant
            learning rate (see the module docstring).
    """

    k: tuple[float, ...] = (16, 32, 64)
    d_sae: tuple[int, ...] = (4608,)
    hook_name: str = "blocks.3.hook_resid_post"
    train_tokens: int = 500_000
    calibration_tokens: int = 100_000
    heldout_tokens: int = 50_000
    eval_sequences: int = 16
    context_size: int = 128
    batch_size: int = 4096
    lr: float = 4e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    epochs: int = 1
    dead_window_tokens: int = 1_000_000
    jumprelu_l0_coefficient: float = 1.0
    device: str = "cpu"
    architectures: tuple[str, ...] = ()
    aux_variants: tuple[str, ...] = ("auxk",)
    cache_dir: Path | None = None
    output: Path = Path("bench_output")
    seed: int = 42
    model_name: str = MODEL_NAME
    rerun: bool = False
    memory_probe: bool = True
    preset: str = BENCH_PRESET
    snapshot_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.architectures:
            default = DEFAULT_ARCHITECTURES if self.preset == BENCH_PRESET else PRESET_ARCHITECTURES
            object.__setattr__(self, "architectures", default)

    def validate(self) -> None:
        """Reject bad settings before any work, naming the command-line option at fault."""
        if self.preset not in PRESETS:
            raise ValueError(f"--preset: unknown {self.preset!r}; choose from {PRESETS}")
        if self.preset == BENCH_PRESET:
            allowed = ARCHITECTURES
        else:
            allowed = PRESET_ARCHITECTURES
            self._check_preset_fields()
        unknown = sorted(set(self.architectures) - set(allowed))
        if unknown:
            raise ValueError(
                f"--architectures: {unknown} not available with --preset {self.preset};"
                f" choose from {allowed}"
            )
        ours_alone = ARCHITECTURE in self.architectures and "batchtopk" not in self.architectures
        if self.preset != BENCH_PRESET and ours_alone:
            raise ValueError(
                f"--architectures: --preset {self.preset} calibrates {ARCHITECTURE} to the"
                " L0 the built-in batchtopk reached; add batchtopk"
            )
        known_losses = set(registered_aux_losses())
        for variant in self.aux_variants:
            if variant != "none" and set(variant.split("+")) - known_losses:
                raise ValueError(
                    f"--aux-variants: {variant!r} is not 'none' or '+'-joined names of"
                    f" registered aux losses {sorted(known_losses)}"
                )
        if not self.k or not self.d_sae:
            raise ValueError("--k and --d-sae need at least one value each")
        for d_sae in self.d_sae:
            if d_sae <= 0:
                raise ValueError(f"--d-sae must be positive, got {d_sae}")
            for k in self.k:
                if not 0 < k <= d_sae:
                    raise ValueError(f"--k {k} must be in (0, --d-sae {d_sae}]")
                if "topk" in self.architectures and k != int(k):
                    raise ValueError(f"--k {k}: the topk architecture needs an integer k")
                if CALIBRATED_ARCHITECTURES & set(self.architectures):
                    try:
                        for method in METHODS:
                            check_token_budget(method, self.calibration_tokens, k, d_sae)
                    except ValueError as error:
                        raise ValueError(f"--calibration-tokens: {error}") from None
        positive = {
            "--train-tokens": self.train_tokens,
            "--calibration-tokens": self.calibration_tokens,
            "--heldout-tokens": self.heldout_tokens,
            "--eval-sequences": self.eval_sequences,
            "--batch-size": self.batch_size,
            "--epochs": self.epochs,
            "--dead-window-tokens": self.dead_window_tokens,
        }
        for option, value in positive.items():
            if value <= 0:
                raise ValueError(f"{option} must be positive, got {value}")
        if self.train_tokens < self.training_batch_size:
            raise ValueError(
                f"--train-tokens {self.train_tokens} is less than one training batch"
                f" ({self.training_batch_size} tokens)"
            )
        if self.dead_window_tokens < self.batch_size:
            raise ValueError("--dead-window-tokens must be at least one --batch-size")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine")
        self._check_snapshots()

    def _check_preset_fields(self) -> None:
        """Under sae-lens-defaults, the bench preset's own settings must not be set at all."""
        defaults = BenchConfig()
        for name, option in BENCH_PRESET_FIELDS.items():
            if getattr(self, name) != getattr(defaults, name):
                raise ValueError(
                    f"{option}: --preset {self.preset} uses SAELens's own value; drop {option}"
                )

    def _check_snapshots(self) -> None:
        if not self.snapshot_tokens:
            return
        schedule = learning_rate_schedule(self)
        if not is_constant_schedule(schedule):
            raise ValueError(
                "--snapshot-tokens: snapshots equal separate shorter runs only under a constant"
                f" learning rate, and --preset {self.preset} trains with {schedule}; train"
                " separately instead"
            )
        for tokens in self.snapshot_tokens:
            if not self.training_batch_size <= tokens < self.total_training_tokens:
                raise ValueError(
                    f"--snapshot-tokens {tokens}: must be at least one training batch"
                    f" ({self.training_batch_size} tokens) and below the"
                    f" {self.total_training_tokens} tokens every run trains on"
                )
        if len(set(self.snapshot_steps)) < len(self.snapshot_tokens):
            raise ValueError(
                f"--snapshot-tokens {list(self.snapshot_tokens)}: two values fall in the same"
                f" training batch of {self.training_batch_size} tokens"
            )

    @property
    def training_batch_size(self) -> int:
        """Tokens per training step: ``batch_size``, or SAELens's default under its preset."""
        if self.preset == BENCH_PRESET:
            return self.batch_size
        return int(runner_defaults()["train_batch_size_tokens"])

    @property
    def dead_window_steps(self) -> int:
        return self.dead_window_tokens // self.batch_size

    @property
    def total_training_tokens(self) -> int:
        """Tokens every run trains on: whole batches of ``epochs`` passes over the train split."""
        batch = self.training_batch_size
        return (self.train_tokens // batch) * batch * self.epochs

    @property
    def snapshot_steps(self) -> list[int]:
        """Training steps after which snapshots are taken (whole batches), ascending."""
        return sorted(tokens // self.training_batch_size for tokens in self.snapshot_tokens)

    def cache_spec(self) -> CacheSpec:
        return CacheSpec(
            model_name=self.model_name,
            hook_name=self.hook_name,
            train_tokens=self.train_tokens,
            calibration_tokens=self.calibration_tokens,
            heldout_tokens=self.heldout_tokens,
            eval_sequences=self.eval_sequences,
            context_size=self.context_size,
            seed=self.seed,
        )


QUICK_SETTINGS: dict[str, Any] = {
    "k": (8,),
    "d_sae": (256,),
    "train_tokens": 8192,
    "calibration_tokens": 2048,
    "heldout_tokens": 1024,
    "eval_sequences": 2,
    "context_size": 64,
    "batch_size": 256,
    "lr": 1e-3,
    "epochs": 2,
    "dead_window_tokens": 4096,
}


def run_benchmark(
    config: BenchConfig,
    *,
    model: HookedTransformer | None = None,
    command: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate every requested run, write the outputs, and return the results.

    Args:
        config: the benchmark settings (validated first, before anything is loaded).
        model: the language model; loaded with
            :func:`~sae_lens_batchtopk.tools.offline.load_smollm2`
            when omitted. Passing one lets tests and notebooks reuse a loaded model.
        command: the command line recorded in the ``BENCHMARKS.md`` section.
        show_progress: progress bars for caching and training.

    Each finished training run (its evaluated SAEs' rows) is written at once to
    ``output/runs/<run>.json`` with a fingerprint of the settings; a later call with the same
    settings reuses it instead of retraining (unless ``config.rerun``), so a benchmark that
    takes hours can be interrupted and resumed, or widened to more k values.

    Returns:
        The content of ``bench.json``: ``settings``, ``machine``, ``cache`` and ``rows`` (one
        per evaluated SAE, ordered by d_sae then k).
    """
    config.validate()
    model, cache = load_model_and_cache(
        config.cache_spec(), config.device, config.cache_dir, model, show_progress
    )
    evaluation = _Evaluation(
        model=model,
        heldout=cache.batches("heldout", _EVAL_BATCH_TOKENS),
        calibration=cache.batches("calibration", config.training_batch_size),
        special_ids=special_token_ids(model.tokenizer),
    )
    stats = train_statistics(cache) if config.preset == BENCH_PRESET else None
    runs_dir = Path(config.output) / RUNS_DIR
    fingerprint = settings_fingerprint(config)
    rows: list[dict[str, Any]] = []
    for d_sae in config.d_sae:
        for k in config.k:
            for architecture, variant in _runs(config):
                run_file = runs_dir / f"{_run_name(architecture, variant, k, d_sae)}.json"
                runner_config = _runner_config(
                    architecture, k, d_sae, config, cache.d_in, variant, show_progress
                )
                builtin_l0s = _builtin_l0s(config, architecture, rows, k, d_sae)
                # Ours is calibrated to the built-in's L0s: a stored run is valid only for them.
                if builtin_l0s is not None:
                    run_fingerprint = _hash([fingerprint, builtin_l0s])
                else:
                    run_fingerprint = fingerprint
                run = _finished_run(run_file, run_fingerprint, config.rerun)
                if run is not None:
                    if show_progress:
                        print(f"reusing {run_file} (same settings)")
                else:
                    run = {
                        "fingerprint": run_fingerprint,
                        "resolved_settings": resolved_settings(runner_config),
                        "rows": _train_and_evaluate(
                            runner_config,
                            architecture,
                            variant,
                            k,
                            config,
                            cache,
                            stats,
                            evaluation,
                            builtin_l0s,
                        ),
                        "machine": machine_info(),
                        "date": _now(),
                    }
                    runs_dir.mkdir(parents=True, exist_ok=True)
                    write_json(run_file, run)
                rows.extend(_with_memory_probe(run_file, run, runner_config, config, cache, stats))
    rows.sort(key=lambda row: (row["d_sae"], row["k"], row.get("training_tokens", 0)))

    results = {
        "settings": _settings_dict(config),
        "machine": machine_info(),
        "date": _now(),
        "command": command,
        "cache": {"path": str(cache.path), "reused": not cache.created},
        "rows": rows,
    }
    if config.preset != BENCH_PRESET:
        results["cells"] = comparison_cells(rows)
    _write_outputs(results, Path(config.output))
    return results


@dataclass(frozen=True)
class _Evaluation:
    """What every trained SAE is evaluated with: the same tokens and model for all."""

    model: HookedTransformer
    heldout: list[torch.Tensor]
    calibration: list[torch.Tensor]
    special_ids: list[int]


def _train_and_evaluate(
    runner_config: LanguageModelSAERunnerConfig[Any],
    architecture: str,
    variant: str | None,
    k: float,
    config: BenchConfig,
    cache: ActivationCache,
    statistics: tuple[float, torch.Tensor] | None,
    evaluation: _Evaluation,
    builtin_l0s: Mapping[str, float] | None,
) -> list[dict[str, Any]]:
    """Train one run and evaluate each deployed form at each budget: one row per pair.

    CE/KL scores of every form and budget share one pass of the model over the eval tokens.
    """
    rows: list[dict[str, Any]] = []
    saes: dict[str, SAE[Any]] = {}
    label = architecture if variant is None else f"{architecture}/{variant}"
    for trained, training in _train(runner_config, k, config, cache, statistics):
        tokens = training["training_tokens"]
        builtin_l0 = None if builtin_l0s is None else builtin_l0s[str(tokens)]
        for method, sae, extra in _inference_saes(
            architecture, trained, evaluation.calibration, config, builtin_l0
        ):
            row_label = label if method is None else f"{label}[{method}]"
            saes[f"{row_label}@{tokens}"] = sae
            rows.append(
                {
                    "label": row_label,
                    "architecture": architecture,
                    "aux_variant": variant,
                    "method": method,
                    "k": k,
                    "d_sae": runner_config.sae.d_sae,
                    **_preset_fields(config),
                    **reconstruction_stats(sae, evaluation.heldout, target_l0=k),
                    **training,
                    **extra,
                }
            )
    scores = model_preservation_scores(
        evaluation.model,
        cache.eval_tokens,
        config.hook_name,
        saes,
        special_ids=evaluation.special_ids,
    )
    for row in rows:
        row.update(scores[f"{row['label']}@{row['training_tokens']}"])
    return rows


def _preset_fields(config: BenchConfig) -> dict[str, Any]:
    """Row fields of the sae-lens-defaults preset, whose tables compare cells across hooks."""
    if config.preset == BENCH_PRESET:
        return {}
    return {"preset": config.preset, "hook": config.hook_name}


def _builtin_l0s(
    config: BenchConfig, architecture: str, rows: Sequence[Mapping[str, Any]], k: float, d_sae: int
) -> dict[str, float] | None:
    """Held-out L0 of ``batchtopk[ema]`` per training budget (tokens, as a JSON key) in this
    cell, for calibrating ours to it; ``None`` where no such comparison is made."""
    if config.preset == BENCH_PRESET or architecture != ARCHITECTURE:
        return None
    return {
        str(row["training_tokens"]): row["l0_mean"]
        for row in rows
        if row["label"] == "batchtopk[ema]" and row["k"] == k and row["d_sae"] == d_sae
    }


def _runs(config: BenchConfig) -> Iterator[tuple[str, str | None]]:
    """(architecture, aux variant) pairs to train; built-ins keep their own aux loss (None).

    The sae-lens-defaults preset has no variants and trains in :data:`PRESET_ARCHITECTURES`
    order, whatever order ``--architectures`` lists them in.
    """
    if config.preset != BENCH_PRESET:
        for architecture in PRESET_ARCHITECTURES:
            if architecture in config.architectures:
                yield architecture, None
        return
    for architecture in config.architectures:
        if architecture in CALIBRATED_ARCHITECTURES:
            for variant in config.aux_variants:
                yield architecture, variant
        else:
            yield architecture, None


def _run_name(architecture: str, variant: str | None, k: float, d_sae: int) -> str:
    label = architecture if variant is None else f"{architecture}-{variant}"
    return f"{label}-k{k:g}-d{d_sae}"


def settings_fingerprint(config: BenchConfig) -> str:
    """Hash of every setting a run's numbers depend on, and of this package's version.

    A finished run is reused only under the same fingerprint; the k / d_sae / architecture
    lists only choose which runs exist, so widening them reuses the runs already done.
    """
    settings = {
        name: value
        for name, value in _settings_dict(config).items()
        if name not in _RUN_SELECTION_SETTINGS
    }
    for name, default in _LATER_SETTINGS.items():
        if settings.get(name) == default:
            del settings[name]
    settings["package_version"] = _package_version()
    return _hash(settings)


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _package_version() -> str:
    try:
        return importlib.metadata.version("sae-lens-batchtopk")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _finished_run(path: Path, fingerprint: str, rerun: bool) -> dict[str, Any] | None:
    """A run finished earlier under the same settings (its stored file), else ``None``."""
    if rerun or not path.is_file():
        return None
    stored = json.loads(path.read_text())
    return stored if stored.get("fingerprint") == fingerprint else None


def _with_memory_probe(
    run_file: Path,
    run: dict[str, Any],
    runner_config: LanguageModelSAERunnerConfig[Any],
    config: BenchConfig,
    cache: ActivationCache,
    statistics: tuple[float, torch.Tensor] | None,
) -> list[dict[str, Any]]:
    """The run's rows with ``peak_memory_mb`` from :func:`probe_peak_memory`.

    Probed once per run and stored in its file (``memory_probe``), so resuming does not
    repeat it; ``--no-memory-probe`` leaves the figure out (``None``).
    """
    if "memory_probe" not in run and config.memory_probe:
        batches = itertools.islice(
            cache.train_batches(config.training_batch_size, seed=config.seed), MEMORY_PROBE_STEPS
        )
        run["memory_probe"] = {
            "peak_memory_mb": probe_peak_memory(runner_config, list(batches), statistics),
            "steps": MEMORY_PROBE_STEPS,
        }
        write_json(run_file, run)
    peak = run.get("memory_probe", {}).get("peak_memory_mb")
    return [{**row, "peak_memory_mb": peak} for row in run["rows"]]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _aux_losses(variant: str) -> dict[str, float]:
    return {} if variant == "none" else dict.fromkeys(variant.split("+"), AUX_COEFFICIENT)


def _settings_dict(config: BenchConfig) -> dict[str, Any]:
    """The benchmark's settings as recorded (and fingerprinted): what its runs depend on.

    Under the sae-lens-defaults preset the bench preset's own settings are left out (nothing
    reads them) and SAELens's version and trainer defaults are recorded in their place.
    """
    settings = dataclasses.asdict(config)
    settings["cache_dir"] = str(config.cache_dir) if config.cache_dir else None
    settings["output"] = str(config.output)
    settings["total_training_tokens"] = config.total_training_tokens
    if config.preset == BENCH_PRESET:
        settings["dead_window_steps"] = config.dead_window_steps
        return settings
    for name in BENCH_PRESET_FIELDS:
        del settings[name]
    settings["sae_lens_version"] = importlib.metadata.version("sae-lens")
    settings["sae_lens_trainer_defaults"] = sae_lens_trainer_defaults()
    settings["snapshot_training_tokens"] = [
        steps * config.training_batch_size for steps in config.snapshot_steps
    ]
    return settings


def train_statistics(cache: ActivationCache) -> tuple[float, torch.Tensor]:
    """SAELens's ``expected_average_only_in`` factor (sqrt(d_in) / mean norm) and the mean.

    Computed once from the train split and handed to every run, instead of letting each
    ``SAETrainer`` estimate the factor from batches it would draw (and so skip) from its data
    stream. The mean initialises every SAE's decoder bias: residual streams have a large mean,
    and a zero-initialised bias that Adam moves by about ``lr`` per step would dominate the
    error of short runs, hiding the differences between architectures.
    """
    norm_sum, total = 0.0, torch.zeros(cache.d_in, dtype=torch.double)
    for chunk in cache.splits["train"].split(65_536):  # float32 copies one chunk at a time
        chunk = chunk.double()
        norm_sum += float(chunk.norm(dim=-1).sum())
        total += chunk.sum(0)
    n_tokens = cache.splits["train"].shape[0]
    return math.sqrt(cache.d_in) * n_tokens / norm_sum, (total / n_tokens).float()


@functools.cache
def runner_defaults() -> dict[str, Any]:
    """``LanguageModelSAERunnerConfig``'s field defaults, read from SAELens's dataclass."""
    defaults: dict[str, Any] = {}
    for field in dataclasses.fields(LanguageModelSAERunnerConfig):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults


def sae_lens_trainer_defaults() -> dict[str, Any]:
    """SAELens's defaults for the runner settings its ``SAETrainer`` reads (JSON-ready).

    The names are those ``SAETrainerConfig`` shares with the runner config, plus the batch
    size (``train_batch_size_tokens`` there, ``train_batch_size_samples`` in the trainer);
    what only places files or logs (device, checkpoint path, logger) is left out.
    """
    defaults = runner_defaults()
    shared = {field.name for field in dataclasses.fields(SAETrainerConfig)} & defaults.keys()
    names = [*sorted(shared - {"device", "checkpoint_path", "logger"}), "train_batch_size_tokens"]
    return {name: defaults[name] for name in names}


def _trainer_options(config: BenchConfig, show_progress: bool) -> dict[str, Any]:
    """The runner-level options a preset sets; everything else keeps SAELens's default."""
    options: dict[str, Any] = {
        "training_tokens": config.total_training_tokens,
        "device": config.device,
        "seed": config.seed,
        "log_to_wandb": False,
        "verbose": show_progress,
    }
    if config.preset == BENCH_PRESET:
        options.update(
            train_batch_size_tokens=config.batch_size,
            lr=config.lr,
            lr_end=config.lr / 10,
            lr_scheduler_name="cosineannealing",
            adam_beta1=config.adam_beta1,
            adam_beta2=config.adam_beta2,
            dead_feature_window=config.dead_window_steps,
        )
    return options


def learning_rate_schedule(config: BenchConfig) -> dict[str, Any]:
    """The schedule every run of ``config`` trains with: the preset's, else SAELens's default."""
    options = _trainer_options(config, show_progress=False)
    names = ("lr_scheduler_name", "lr_warm_up_steps", "lr_decay_steps")
    return {name: options.get(name, runner_defaults()[name]) for name in names}


def is_constant_schedule(schedule: Mapping[str, Any]) -> bool:
    """Whether the learning rate is the same at every step, whatever the total budget.

    Only then is the state after N steps of a long run the state of an N-step run: warm-up,
    decay and cosine schedules are stretched to the total number of steps.
    """
    return (
        schedule["lr_scheduler_name"] == "constant"
        and schedule["lr_warm_up_steps"] == 0
        and schedule["lr_decay_steps"] == 0
    )


def _sae_options(
    architecture: str,
    k: float,
    d_sae: int,
    config: BenchConfig,
    d_in: int,
    aux_variant: str | None,
) -> dict[str, Any]:
    if config.preset != BENCH_PRESET:
        # SAELens's own config for the architecture: only the shape and k are set.
        return {"d_in": d_in, "d_sae": d_sae, "k": int(k) if architecture == "topk" else float(k)}
    options: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": d_sae,
        "normalize_activations": "expected_average_only_in",
    }
    if architecture == "topk":
        options["k"] = int(k)
    elif architecture == "batchtopk":
        options["k"] = float(k)
    elif architecture == "jumprelu":
        options.update(
            jumprelu_sparsity_loss_mode="quadratic",
            jumprelu_ste_to_input=True,
            target_l0=float(k),
            l0_coefficient=config.jumprelu_l0_coefficient,
        )
    else:
        options.update(
            k=float(k),
            dead_tokens_window=config.dead_window_steps * config.batch_size,
            calibration_method="none",
            aux_losses=_aux_losses(aux_variant or "auxk"),
        )
    return options


def _runner_config(
    architecture: str,
    k: float,
    d_sae: int,
    config: BenchConfig,
    d_in: int,
    aux_variant: str | None,
    show_progress: bool,
) -> LanguageModelSAERunnerConfig[Any]:
    """The SAELens runner config of one run: everything but the architecture is shared."""
    return make_runner_config(
        architecture,
        **_sae_options(architecture, k, d_sae, config, d_in, aux_variant),
        **_trainer_options(config, show_progress),
    )


def resolved_settings(runner_config: LanguageModelSAERunnerConfig[Any]) -> dict[str, Any]:
    """What a run trains with, as SAELens resolved it: its ``SAETrainer`` and SAE configs."""
    trainer = dataclasses.asdict(runner_config.to_sae_trainer_config())
    return {"trainer": trainer, "sae": runner_config.sae.to_dict()}


def _train(
    runner_config: LanguageModelSAERunnerConfig[Any],
    k: float,
    config: BenchConfig,
    cache: ActivationCache,
    statistics: tuple[float, torch.Tensor] | None,
) -> list[tuple[TrainingSAE[Any], dict[str, Any]]]:
    """One run through SAELens's ``SAETrainer``, evaluated at every budget it reaches.

    Returns ``(SAE, training figures)`` per budget, ascending: a copy taken at each of
    ``config.snapshot_steps`` (see :func:`_snapshots_at`), then the trained SAE itself.
    """
    if config.snapshot_steps and not is_constant_schedule(vars(runner_config)):
        # BenchConfig.validate refuses this first; checked again on what actually trains.
        raise ValueError("--snapshot-tokens: snapshots need a constant learning rate")
    batches = cache.train_batches(config.training_batch_size, seed=config.seed)
    sae, trainer = new_sae_and_trainer(runner_config, batches, statistics)
    extra: dict[str, Any] = {}
    if runner_config.sae.architecture() == "jumprelu":
        scaling_factor = statistics[0] if statistics is not None else 1.0
        extra["jumprelu_init_threshold"] = _init_jumprelu_threshold(
            sae,
            cache.train_batches(config.training_batch_size, seed=config.seed + 1),
            scaling_factor,
            k,
        )
        extra["jumprelu_l0_coefficient"] = config.jumprelu_l0_coefficient
    snapshots: list[tuple[TrainingSAE[Any], float, float]] = []
    trainer.data_provider = _snapshots_at(trainer, batches, config.snapshot_steps, snapshots)
    start = time.perf_counter()
    trainer.fit()
    if config.device == "cuda":
        torch.cuda.synchronize()
    snapshots.append((sae, time.perf_counter(), _dead_fraction(trainer)))
    budgets = []
    for (trained, end, dead_fraction), steps in zip(
        snapshots, [*config.snapshot_steps, trainer.n_training_steps], strict=True
    ):
        tokens = steps * config.training_batch_size
        budgets.append(
            (
                trained,
                {
                    "train_seconds": end - start,
                    "train_tokens_per_s": tokens / (end - start),
                    "training_tokens": tokens,
                    "snapshot": trained is not sae,
                    "train_dead_fraction": dead_fraction,
                    **extra,
                },
            )
        )
    return budgets


def _snapshots_at(
    trainer: SAETrainer[Any, Any],
    batches: Iterator[torch.Tensor],
    steps: Sequence[int],
    snapshots: list[tuple[TrainingSAE[Any], float, float]],
) -> Iterator[torch.Tensor]:
    """``batches``, appending a copy of the SAE to ``snapshots`` after each of ``steps``.

    The trainer asks for a batch once it has finished ``trainer.n_training_steps`` steps, so
    the copy is the SAE after exactly that many steps, whatever the trainer drew before the
    loop. Each entry: (copy, ``perf_counter`` time, SAELens's dead-latent fraction then).
    """
    pending = list(steps)
    for batch in batches:
        if pending and trainer.n_training_steps == pending[0]:
            pending.pop(0)
            if trainer.cfg.device.startswith("cuda"):
                torch.cuda.synchronize()
            snapshots.append(
                (copy.deepcopy(trainer.sae), time.perf_counter(), _dead_fraction(trainer))
            )
        yield batch


def _dead_fraction(trainer: SAETrainer[Any, Any]) -> float:
    """SAELens's own dead-latent fraction: no firing for over ``dead_feature_window`` steps."""
    return float(trainer.dead_neurons.float().mean())


def load_model_and_cache(
    spec: CacheSpec,
    device: str,
    cache_dir: Path | None,
    model: HookedTransformer | None,
    show_progress: bool,
) -> tuple[HookedTransformer, ActivationCache]:
    """The model (SmolLM2 unless one is given) and the cached activations of ``spec``.

    The cache is generated on first use under ``cache_dir`` (default:
    ``default_cache_dir() / "activations"``) and reused by every later run with the same spec.
    """
    if model is None:
        model = load_smollm2(device=device)
    directory = Path(cache_dir) if cache_dir else default_cache_dir() / "activations"
    cache = load_or_create_activation_cache(spec, model, directory, show_progress=show_progress)
    return model, cache


def new_sae_and_trainer(
    runner_config: LanguageModelSAERunnerConfig[Any],
    batches: Iterator[torch.Tensor],
    statistics: tuple[float, torch.Tensor] | None,
) -> tuple[TrainingSAE[Any], SAETrainer[Any, Any]]:
    """A fresh SAE and its ``SAETrainer``, set up identically for every compared run.

    Same seed for the initial weights. With ``statistics`` (the bench preset), the decoder
    bias starts at the train-split mean (see :func:`train_statistics`) and the activation
    scaling factor is fixed in advance, so the trainer does not estimate it from (and thereby
    consume) batches of ``batches``. Without (``None``, the sae-lens-defaults preset), both
    are left to SAELens and the architecture, as a user of the library gets them.
    """
    torch.manual_seed(runner_config.seed)
    sae_class = SAE_TRAINING_CLASS_REGISTRY[runner_config.sae.architecture()][0]
    sae = sae_class(runner_config.sae).to(runner_config.device)
    trainer = SAETrainer(cfg=runner_config.to_sae_trainer_config(), sae=sae, data_provider=batches)
    if statistics is not None:
        scaling_factor, train_mean = statistics
        with torch.no_grad():
            sae.b_dec.copy_(train_mean * scaling_factor)
        trainer.activation_scaler.scaling_factor = scaling_factor
    return sae, trainer


@torch.no_grad()
def _init_jumprelu_threshold(
    sae: TrainingSAE[Any], batches: Iterator[torch.Tensor], scaling_factor: float, k: float
) -> float:
    """Start JumpReLU at L0 ≈ k: the (1 - k/d_sae) quantile of its initial pre-activations.

    SAELens's default initial threshold (0.01) fires on about half the latents, and Adam moves
    the threshold by about ``lr`` per step, so short runs would never get near k; starting at
    the target leaves the quadratic penalty only the drift to correct. ``batches`` should be a
    separate stream (another seed), so the stream the SAEs train on stays identical.
    """
    batch = next(batches).to(sae.device)
    hidden_pre = sae.process_sae_in(batch * scaling_factor) @ sae.W_enc + sae.b_enc
    flat = hidden_pre.flatten()
    n_above = min(max(int(k * batch.shape[0]), 1), flat.numel() - 1)
    value = float(flat.kthvalue(flat.numel() - n_above).values.clamp(min=1e-6))
    sae.threshold.fill_(value)
    return value


def _inference_saes(
    architecture: str,
    trained: TrainingSAE[Any],
    calibration: Sequence[torch.Tensor],
    config: BenchConfig,
    builtin_l0: float | None,
) -> Iterator[tuple[str | None, SAE[Any], dict[str, Any]]]:
    """The deployed form(s) of a trained SAE: ``(method, inference SAE, extra row fields)``.

    ``builtin_l0``: the held-out L0 of the built-in ``batchtopk[ema]`` in the same cell, which
    ours is also calibrated to under the sae-lens-defaults preset (``None`` otherwise).
    """
    defaults_preset = config.preset != BENCH_PRESET
    if architecture == "batchtopk":
        yield "ema", CalibratedBatchTopKSAE.from_sae(trained), {}
        if defaults_preset:  # the built-in's weights, calibrated by us to k
            converted = CalibratedBatchTopKSAE.from_sae(trained)
            yield "l0", converted, _calibrate(converted, calibration, "l0")
    elif architecture in CALIBRATED_ARCHITECTURES:
        equal_l0: list[tuple[str, SAE[Any], dict[str, Any]]] = []
        failure: dict[str, Any] = {}
        if builtin_l0 is not None:
            # First, so that a target ours cannot reach is reported on its [l0] row instead of
            # ending the benchmark.
            try:
                extra = _calibrate(trained, calibration, "l0", target_l0=builtin_l0)
                equal_l0.append((EQUAL_L0_METHOD, CalibratedBatchTopKSAE.from_sae(trained), extra))
            except CalibrationError as error:
                failure = {"equal_l0_error": str(error)}
        for method in ("l0",) if defaults_preset else applicable_methods(trained):
            extra = _calibrate(trained, calibration, method)
            yield method, CalibratedBatchTopKSAE.from_sae(trained), {**extra, **failure}
        yield from equal_l0
    else:
        yield None, _export(trained), {}


def _calibrate(
    sae: SAE[Any],
    calibration: Sequence[torch.Tensor],
    method: str,
    target_l0: float | None = None,
) -> dict[str, Any]:
    """Calibrate ``sae`` in place on the whole calibration split; the row fields it reports."""
    n_tokens = sum(batch.shape[0] for batch in calibration)
    result = calibrate_thresholds(
        sae,
        calibration,
        method=method,
        target_l0=target_l0,
        n_tokens=n_tokens,
    )
    return {
        "calibration_theta": result.theta,
        "calibration_l0": result.achieved_l0,
        "calibration_tokens": result.n_tokens,
        "calibration_target_l0": result.target_l0,
    }


@torch.no_grad()
def _export(trained: TrainingSAE[Any]) -> SAE[Any]:
    """SAELens's ``save_inference_model`` conversion, in memory instead of through disk."""
    state = trained.state_dict()
    trained.process_state_dict_for_saving_inference(state)
    inference = SAE.from_dict(trained.cfg.get_inference_sae_cfg_dict())
    inference.load_state_dict(state)
    return inference.to(trained.device)


@torch.no_grad()
def model_preservation_scores(
    model: HookedTransformer,
    tokens: torch.Tensor,
    hook_name: str,
    saes: Mapping[str, SAE[Any]],
    *,
    special_ids: Sequence[int],
    sequences_per_forward: int = 4,
) -> dict[str, dict[str, float]]:
    """CE-loss and KL scores of each SAE spliced into ``hook_name``, on fixed sequences.

    ``CE score = (CE_zero - CE_sae) / (CE_zero - CE_clean)`` and ``KL score = 1 - KL_sae /
    KL_zero`` with ``KL = KL(clean || patched)`` per position, as in SAELens's ``run_evals``.
    Splicing (and zero-ablation) touches only non-special positions: special tokens were
    excluded from training, and the BOS residual is an outlier no SAE here reconstructs. The
    clean and zero-ablated passes run once per chunk and are shared by every SAE.
    """
    special = torch.tensor(list(special_ids))
    sums = {name: {"ce": 0.0, "kl": 0.0} for name in [*saes, "zero"]}
    clean_ce, n_positions = 0.0, 0
    for chunk in tokens.split(sequences_per_forward):
        chunk = chunk.to(model.cfg.device)
        splice_mask = ~torch.isin(chunk.cpu(), special).to(chunk.device)
        clean = model(chunk).log_softmax(-1)
        clean_ce += _next_token_nll(clean, chunk)
        n_positions += chunk[:, 1:].numel()
        for name in sums:
            sae = saes.get(name)

            def splice(
                activation: torch.Tensor,
                hook: Any,
                sae: SAE[Any] | None = sae,
                mask: torch.Tensor = splice_mask,
            ) -> torch.Tensor:
                patched = activation.clone()
                if sae is None:
                    patched[mask] = 0
                else:
                    inputs = activation[mask].to(sae.device, sae.dtype)
                    patched[mask] = sae.decode(sae.encode(inputs)).to(activation.dtype)
                return patched

            logits = model.run_with_hooks(chunk, fwd_hooks=[(hook_name, splice)])
            patched = logits.log_softmax(-1)
            sums[name]["ce"] += _next_token_nll(patched, chunk)
            kl = (clean.exp() * (clean - patched)).sum(-1)[:, :-1]
            sums[name]["kl"] += float(kl.sum())
    ce_clean = clean_ce / n_positions
    ce_zero = sums["zero"]["ce"] / n_positions
    kl_zero = sums["zero"]["kl"] / n_positions
    scores = {}
    for name in saes:
        ce = sums[name]["ce"] / n_positions
        kl = sums[name]["kl"] / n_positions
        scores[name] = {
            "ce_loss_clean": ce_clean,
            "ce_loss_zero": ce_zero,
            "ce_loss_sae": ce,
            "ce_loss_score": (ce_zero - ce) / (ce_zero - ce_clean),
            "kl_div_zero": kl_zero,
            "kl_div_sae": kl,
            "kl_div_score": 1 - kl / kl_zero,
        }
    return scores


def _next_token_nll(log_probs: torch.Tensor, tokens: torch.Tensor) -> float:
    """Summed negative log-likelihood of each next token (positions 0..n-2 predict 1..n-1)."""
    return -float(log_probs[:, :-1].gather(-1, tokens[:, 1:, None]).sum())


@contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float]]:
    """Peak memory above the starting level while the block runs, in MB.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: resident set size sampled by
    a background thread; ``ru_maxrss`` is a process-lifetime maximum, so a run that peaks below
    an earlier run would read 0, and tracemalloc does not see torch's allocations.
    """
    result = {"mb": float("nan")}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["mb"] = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        return
    baseline = _rss_bytes()
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(_RSS_SAMPLE_SECONDS):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result["mb"] = (max(peak[0], _rss_bytes()) - baseline) / 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def probe_peak_memory(
    runner_config: LanguageModelSAERunnerConfig[Any],
    batches: Sequence[torch.Tensor],
    statistics: tuple[float, torch.Tensor] | None,
) -> float:
    """Peak memory of training (weights, gradients, optimizer state, temporaries), in MB.

    Runs ``len(batches)`` training steps of a fresh SAE in a fresh (spawned) process. Measured
    inside a long-lived process the figure is wrong for every run but the first: memory an
    earlier run freed stays resident in the allocator and is reused without raising the RSS
    (a fast run after a dense one read 44 MB instead of 173 MB). Memory per step is steady
    after the first optimizer step, so a few steps give the run's peak.
    """
    context = torch.multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return float(
            pool.apply(_probe_in_child, (runner_config, torch.stack(list(batches)), statistics))
        )


def _probe_in_child(
    runner_config: LanguageModelSAERunnerConfig[Any],
    batches: torch.Tensor,
    statistics: tuple[float, torch.Tensor] | None,
) -> float:
    batches = batches.clone()  # private pages, resident before the baseline
    gc.collect()
    with peak_memory(runner_config.device) as peak:
        _, trainer = new_sae_and_trainer(runner_config, iter(batches), statistics)
        for batch in batches:
            trainer.step(batch)
            trainer.n_training_steps += 1
    return peak["mb"]


def machine_info() -> dict[str, Any]:
    """CPU model, core count and GPU (if any): what a benchmark number means depends on them."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def _l0_percentiles(row: Mapping[str, Any]) -> str:
    return f"{row['l0_p5']:.0f}/{row['l0_p50']:.0f}/{row['l0_p95']:.0f}"


def _tokens_cell(row: Mapping[str, Any]) -> str:
    return f"{row['training_tokens']:,}" + (" (snapshot)" if row.get("snapshot") else "")


# (title, row key or a function of the row, format of the value); a missing value prints "-".
Column = tuple[str, str | Callable[[Mapping[str, Any]], str], str]
_HOOK_COLUMN: Column = ("hook", "hook", "`{}`")
_TABLE_COLUMNS: tuple[Column, ...] = (
    ("run", "label", "{}"),
    ("k", "k", "{:g}"),
    ("d_sae", "d_sae", "{}"),
    ("L0 mean", "l0_mean", "{:.2f}"),
    ("L0 p5/p50/p95", _l0_percentiles, ""),
    ("L0 vs k", "l0_deviation", "{:+.1%}"),
    ("NMSE", "nmse", "{:.4f}"),
    ("expl. var.", "explained_variance", "{:.4f}"),
    ("CE score", "ce_loss_score", "{:.4f}"),
    ("KL score", "kl_div_score", "{:.4f}"),
    ("dead", "dead_fraction", "{:.1%}"),
    ("train tok/s", "train_tokens_per_s", "{:,.0f}"),
    ("peak MB", "peak_memory_mb", "{:,.0f}"),
)
# The sae-lens-defaults preset's per-SAE table: budgets, and SAELens's own dead count too.
_PRESET_TABLE_COLUMNS: tuple[Column, ...] = (
    ("run", "label", "{}"),
    _HOOK_COLUMN,
    ("k", "k", "{:g}"),
    ("d_sae", "d_sae", "{}"),
    ("training tokens", _tokens_cell, ""),
    ("L0 mean", "l0_mean", "{:.2f}"),
    ("L0 p5/p50/p95", _l0_percentiles, ""),
    ("L0 vs k", "l0_deviation", "{:+.1%}"),
    ("NMSE", "nmse", "{:.4f}"),
    ("CE score", "ce_loss_score", "{:.4f}"),
    ("KL score", "kl_div_score", "{:.4f}"),
    ("dead (held-out)", "dead_fraction", "{:.1%}"),
    ("dead (SAELens mask)", "train_dead_fraction", "{:.1%}"),
    ("train tok/s", "train_tokens_per_s", "{:,.0f}"),
    ("peak MB", "peak_memory_mb", "{:,.0f}"),
)


def _ours_builtin_topk(title: str, name: str, template: str) -> Column:
    """One column showing a cell's ``name`` figure for ours / built-in / topk."""

    def cell(row: Mapping[str, Any]) -> str:
        values = row[name]
        return "/".join(
            "-" if values.get(run) is None else template.format(values[run])
            for run in ("ours", "builtin", "topk")
        )

    return (f"{title} ours/bt/topk", cell, "")


_CELL_COLUMNS: tuple[Column, ...] = (
    _HOOK_COLUMN,
    ("k", "k", "{:g}"),
    ("d_sae", "d_sae", "{}"),
    ("training tokens", _tokens_cell, ""),
    ("ours L0 @k", "ours_l0", "{:.2f}"),
    ("ours NMSE @k", "ours_nmse", "{:.4f}"),
    ("ours L0 @bt", "ours_equal_l0", "{:.2f}"),
    ("ours NMSE @bt L0", "ours_equal_l0_nmse", "{:.4f}"),
    ("bt[ema] L0", "builtin_l0", "{:.2f}"),
    ("bt[ema] NMSE", "builtin_nmse", "{:.4f}"),
    ("bt[l0] NMSE @k", "builtin_calibrated_nmse", "{:.4f}"),
    ("topk NMSE", "topk_nmse", "{:.4f}"),
    _ours_builtin_topk("CE score", "ce_loss_score", "{:.4f}"),
    _ours_builtin_topk("KL score", "kl_div_score", "{:.4f}"),
    _ours_builtin_topk("dead", "dead_fraction", "{:.1%}"),
    ("ours ≤ bt NMSE at equal L0", "verdict", "{}"),
)


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[Column] = _TABLE_COLUMNS
) -> str:
    """One line per row; runs that share a training run share tok/s and memory.

    Rows from several hooks (a combined benchmark) get a hook column if ``columns`` lacks one.
    """
    if _HOOK_COLUMN not in columns and len({row.get("hook") for row in rows}) > 1:
        columns = (_HOOK_COLUMN, *columns)
    lines = [
        "| " + " | ".join(title for title, _, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = [
            key(row)
            if callable(key)
            else "-"
            if row.get(key) is None
            else template.format(row[key])
            for _, key, template in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def equal_l0_verdict(
    ours_l0: float,
    ours_nmse: float,
    builtin_l0: float,
    builtin_nmse: float,
    tolerance: float = EQUAL_L0_TOLERANCE,
) -> str:
    """Is ours at or below the built-in's NMSE at equal held-out L0? ``yes``/``no``/``unclear``.

    Ours is calibrated to the built-in's L0 on the calibration split, so on held-out tokens the
    two L0s differ slightly. Within ``tolerance`` (relative) they count as equal and NMSE
    decides. Beyond it, NMSE falls as L0 grows, so the answer is still certain when ours has
    the lower L0 and no higher NMSE (``yes``) or the higher L0 and a higher NMSE (``no``);
    otherwise the L0 gap could explain the NMSE difference and the answer is ``unclear``.
    """
    gap = (ours_l0 - builtin_l0) / builtin_l0
    if abs(gap) <= tolerance:
        return "yes" if ours_nmse <= builtin_nmse else "no"
    if gap < 0 and ours_nmse <= builtin_nmse:
        return "yes"
    if gap > 0 and ours_nmse > builtin_nmse:
        return "no"
    return "unclear"


def comparison_cells(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (hook, d_sae, k, training budget) of the sae-lens-defaults preset.

    Ours is ``calibrated_batchtopk[l0]`` (to k) and ``[l0@batchtopk]`` (to the built-in's L0),
    the built-in is ``batchtopk[ema]`` (``[l0]``: its weights calibrated by us to k), TopK is
    ``topk``. ``verdict`` (:func:`equal_l0_verdict`) is ``None`` when a run is missing, and
    ``n/a: <why>`` when ours could not be calibrated to the built-in's L0.
    """
    groups: dict[tuple[Any, ...], dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        key = (row.get("hook"), row["d_sae"], row["k"], row["training_tokens"])
        groups.setdefault(key, {})[row["label"]] = row
    cells = []
    for (hook, d_sae, k, tokens), by_label in groups.items():
        ours = by_label.get(f"{ARCHITECTURE}[l0]", {})
        equal = by_label.get(f"{ARCHITECTURE}[{EQUAL_L0_METHOD}]", {})
        builtin = by_label.get("batchtopk[ema]", {})
        compared = {"ours": ours, "builtin": builtin, "topk": by_label.get("topk", {})}
        verdict = None
        if equal and builtin:
            verdict = equal_l0_verdict(
                equal["l0_mean"], equal["nmse"], builtin["l0_mean"], builtin["nmse"]
            )
        elif ours.get("equal_l0_error"):
            verdict = "n/a: " + ours["equal_l0_error"]
        cells.append(
            {
                "hook": hook,
                "d_sae": d_sae,
                "k": k,
                "training_tokens": tokens,
                "snapshot": next(iter(by_label.values())).get("snapshot"),
                "ours_l0": ours.get("l0_mean"),
                "ours_nmse": ours.get("nmse"),
                "ours_equal_l0": equal.get("l0_mean"),
                "ours_equal_l0_nmse": equal.get("nmse"),
                "builtin_l0": builtin.get("l0_mean"),
                "builtin_nmse": builtin.get("nmse"),
                "builtin_calibrated_nmse": by_label.get("batchtopk[l0]", {}).get("nmse"),
                "topk_nmse": compared["topk"].get("nmse"),
                **{
                    name: {run: row.get(name) for run, row in compared.items()}
                    for name in ("ce_loss_score", "kl_div_score", "dead_fraction")
                },
                "verdict": verdict,
            }
        )
    return cells


def nmse_vs_l0_figure(rows: Sequence[Mapping[str, Any]]) -> plt.Figure:
    """NMSE against held-out inference L0, one line per run and d_sae across the k values.

    Log-log, as in the papers: the runs worth comparing differ by a few percent in NMSE and
    would be flattened on a linear axis by a failed run an order of magnitude above them. The
    L0 axis is ticked at the target budgets ``k`` in plain numbers, which stays readable when
    every run sits near a single k. One colour per line (a table can hold more than ten runs)
    and one marker per architecture, with the legend outside the axes so it hides no point.
    Hooks and (under the sae-lens-defaults preset) training budgets get lines of their own.
    """
    figure, axes = plt.subplots(figsize=(9, 4.5))
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        budget = row["training_tokens"] if row.get("preset") else None
        groups.setdefault((row["label"], row["d_sae"], row.get("hook"), budget), []).append(row)
    colours = matplotlib.colormaps["tab20"].resampled(max(len(groups), 2))
    markers = dict(zip(sorted({row["architecture"] for row in rows}), itertools.cycle("osD^vP*X")))
    varies = [len({key[part] for key in groups}) > 1 for part in range(4)]
    for index, ((label, d_sae, hook, budget), group) in enumerate(groups.items()):
        group = sorted(group, key=lambda row: row["l0_mean"])
        details = [
            text
            for text, shown in zip(
                (f"d_sae {d_sae}", f"{hook}", f"{budget:,} tok" if budget else ""),
                varies[1:],
                strict=True,
            )
            if shown
        ]
        axes.plot(
            [row["l0_mean"] for row in group],
            [row["nmse"] for row in group],
            linestyle="-",
            marker=markers[group[0]["architecture"]],
            color=colours(index),
            label=f"{label} ({', '.join(details)})" if details else label,
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xticks(sorted({float(row["k"]) for row in rows}))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("held-out inference L0 (mean; ticks at the target k)")
    axes.set_ylabel("normalized MSE (held-out, log)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    return figure


def _hooks_text(settings: Mapping[str, Any]) -> str:
    """``hook `a` `` for one benchmark, ``hooks `a`, `b` `` for combined ones."""
    hooks = settings["hook_name"]
    hooks = [hooks] if isinstance(hooks, str) else hooks
    return ("hook " if len(hooks) == 1 else "hooks ") + ", ".join(f"`{hook}`" for hook in hooks)


def benchmarks_section(results: Mapping[str, Any]) -> str:
    """A ``BENCHMARKS.md`` section: command, machine, date, settings, table(s), plot."""
    machine = results["machine"]
    settings = results["settings"]
    gpu = machine["gpu"] or "none"
    header = [
        "```",
        results["command"] or "(called from Python: run_benchmark)",
        "```",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, GPU: {gpu};"
        f" torch {machine['torch']}; device `{settings['device']}`.",
        f"- Date (UTC): {results['date']}.",
    ]
    evaluation = (
        f" seed {settings['seed']}; {settings['calibration_tokens']:,} calibration tokens,"
        f" {settings['heldout_tokens']:,} held-out tokens,"
        f" CE/KL on {settings['eval_sequences']} sequences of {settings['context_size']}."
    )
    if settings.get("preset", BENCH_PRESET) != BENCH_PRESET:
        return _defaults_section(results, header, evaluation)
    return "\n".join(
        [
            f"## BatchTopK benchmark, {results['date'][:10]}",
            "",
            *header,
            f"- Model {settings['model_name']}, {_hooks_text(settings)};"
            f" {settings['total_training_tokens']:,} training tokens per run"
            f" ({settings['epochs']} epoch(s) of {settings['train_tokens']:,}),"
            f" batch {settings['batch_size']}, Adam lr {settings['lr']:g} (cosine to lr/10),"
            + evaluation,
            "",
            markdown_table(results["rows"]),
            "",
            f"![NMSE vs L0]({PLOT_FILE})",
            "",
        ]
    )


def _defaults_section(results: Mapping[str, Any], header: list[str], evaluation: str) -> str:
    settings = results["settings"]
    trainer = settings["sae_lens_trainer_defaults"]
    snapshots = settings["snapshot_training_tokens"]
    failing = [cell for cell in results["cells"] if cell["verdict"] not in (None, "yes")]
    lines = [
        f"## SAELens defaults: calibrated_batchtopk vs batchtopk vs topk, {results['date'][:10]}",
        "",
        *header,
        f"- Model {settings['model_name']}, {_hooks_text(settings)};"
        f" {settings['total_training_tokens']:,} training tokens per run"
        f" ({settings['epochs']} epoch(s) of {settings['train_tokens']:,})," + evaluation,
        f"- Every run has SAELens {settings['sae_lens_version']}'s own defaults, read from its"
        f" dataclasses: lr {trainer['lr']:g} ({trainer['lr_scheduler_name']}, warm-up"
        f" {trainer['lr_warm_up_steps']}, decay {trainer['lr_decay_steps']}), Adam betas"
        f" ({trainer['adam_beta1']}, {trainer['adam_beta2']}), batch"
        f" {trainer['train_batch_size_tokens']} tokens, dead_feature_window"
        f" {trainer['dead_feature_window']} steps, and each architecture's own SAE-config"
        " defaults (recorded per run in `runs/*.json`); only architecture, k, d_in, d_sae,"
        " device, seed and training tokens are set. No decoder-bias override, no fixed"
        " activation scaling.",
    ]
    if snapshots:
        lines.append(
            f"- Rows at {', '.join(f'{tokens:,}' for tokens in snapshots)} tokens are"
            " snapshots: copies of the same runs taken during training. Under the constant"
            " learning rate they equal separate runs of that many tokens on the same batches"
            " (bitwise on CPU, `tests/test_bench.py`)."
        )
    lines += [
        "- Ours is calibrated (`l0`) to k, and to the held-out L0 of the built-in"
        " `batchtopk[ema]` (SAELens's JumpReLU export) in the same cell; the last column"
        f" compares those two at equal L0 (within {EQUAL_L0_TOLERANCE:.0%}; `unclear` when the"
        " L0 gap could explain the NMSE gap). `bt[l0]`: the built-in's weights calibrated by us"
        " to k.",
        "",
        markdown_table(results["cells"], _CELL_COLUMNS),
        "",
        "Cells where ours is not at or below the built-in's NMSE at equal L0: "
        + (
            "; ".join(
                f"`{cell['hook']}` k={cell['k']:g} at {cell['training_tokens']:,} tokens"
                f" ({cell['verdict']})"
                for cell in failing
            )
            or "none"
        )
        + ".",
        "",
        markdown_table(results["rows"], _PRESET_TABLE_COLUMNS),
        "",
        f"![NMSE vs L0]({PLOT_FILE})",
        "",
    ]
    return "\n".join(lines)


def _markdown(results: Mapping[str, Any]) -> str:
    """``bench.md``: the per-SAE table, after the cell summary under the defaults preset."""
    if "cells" not in results:
        return markdown_table(results["rows"]) + "\n"
    cells = markdown_table(results["cells"], _CELL_COLUMNS)
    return cells + "\n\n" + markdown_table(results["rows"], _PRESET_TABLE_COLUMNS) + "\n"


def _write_outputs(results: Mapping[str, Any], output: Path) -> None:
    write_outputs(
        output,
        {JSON_FILE: results},
        {MARKDOWN_FILE: _markdown(results), SECTION_FILE: benchmarks_section(results)},
        {PLOT_FILE: nmse_vs_l0_figure(results["rows"])},
    )


def run_benchmarks(
    configs: Sequence[BenchConfig],
    output: Path,
    *,
    model: HookedTransformer | None = None,
    command: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """:func:`run_benchmark` once per config (one per hook), then one combined result.

    Every config is validated, and every hook checked against the model, before any cache is
    built or run trained. Each config keeps its own ``output`` (resumable on its own); the
    combined ``bench.json``, tables, section and plot go to ``output``.
    """
    for config in configs:
        config.validate()
    if model is None:
        model = load_smollm2(device=configs[0].device)
    check_hooks(model, [config.hook_name for config in configs])
    per_hook = [
        run_benchmark(config, model=model, command=command, show_progress=show_progress)
        for config in configs
    ]
    rows = [
        {**row, "hook": results["settings"]["hook_name"]}
        for results in per_hook
        for row in results["rows"]
    ]
    results = {
        "settings": {
            **per_hook[0]["settings"],
            "hook_name": [config.hook_name for config in configs],
            "output": str(output),
        },
        "machine": machine_info(),
        "date": _now(),
        "command": command,
        "cache": [results["cache"] for results in per_hook],
        "rows": rows,
    }
    if "cells" in per_hook[0]:
        results["cells"] = comparison_cells(rows)
    _write_outputs(results, Path(output))
    return results


def check_hooks(model: HookedTransformer, hooks: Sequence[str]) -> None:
    """Refuse hooks the model does not have, before any activation is cached."""
    missing = [hook for hook in hooks if hook not in model.hook_dict]
    if missing:
        raise ValueError(f"--hook: {missing} are not hooks of {MODEL_NAME}")


def per_hook_configs(config: BenchConfig, hooks: Sequence[str]) -> list[BenchConfig]:
    """One config per hook; with several, each writes into its own ``output/<hook>`` folder."""
    if len(set(hooks)) < len(hooks):
        raise ValueError(f"--hook: {list(hooks)} lists a hook twice")
    if len(hooks) == 1:
        return [dataclasses.replace(config, hook_name=hooks[0])]
    return [
        dataclasses.replace(config, hook_name=hook, output=Path(config.output) / hook)
        for hook in hooks
    ]


def write_outputs(
    output: Path,
    json_files: Mapping[str, Any],
    text_files: Mapping[str, str],
    figures: Mapping[str, plt.Figure],
) -> None:
    """Write a benchmark's JSON, text and PNG files into ``output``, each atomically."""
    output.mkdir(parents=True, exist_ok=True)
    for name, content in json_files.items():
        write_json(output / name, content)
    for name, text in text_files.items():
        write_atomically(output / name, lambda tmp, text=text: tmp.write_text(text))
    for name, figure in figures.items():
        write_atomically(
            output / name, lambda tmp, figure=figure: figure.savefig(tmp, format="png", dpi=110)
        )
        plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options; defaults come from :class:`BenchConfig`."""
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(
        prog="sae-batchtopk bench",
        description="Benchmark SAELens topk / batchtopk / jumprelu against calibrated_batchtopk"
        " on the same cached SmolLM2 activations.",
    )
    parser.add_argument("--k", type=float, nargs="+", default=list(defaults.k))
    parser.add_argument("--d-sae", type=int, nargs="+", default=list(defaults.d_sae))
    parser.add_argument(
        "--hook",
        nargs="+",
        default=[defaults.hook_name],
        help="one or more hooks; with several, each gets its own OUTPUT/<hook> folder and"
        " OUTPUT holds the combined tables",
    )
    parser.add_argument("--train-tokens", type=int, default=defaults.train_tokens)
    parser.add_argument("--calibration-tokens", type=int, default=defaults.calibration_tokens)
    parser.add_argument("--heldout-tokens", type=int, default=defaults.heldout_tokens)
    parser.add_argument(
        "--eval-sequences",
        type=int,
        default=defaults.eval_sequences,
        help="held-out sequences for the CE/KL scores",
    )
    parser.add_argument("--context-size", type=int, default=defaults.context_size)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument(
        "--epochs", type=int, default=defaults.epochs, help="passes over the train split"
    )
    parser.add_argument(
        "--dead-window-tokens",
        type=int,
        default=defaults.dead_window_tokens,
        help="AuxK dead-latent window; built-ins get it in steps (this // --batch-size)",
    )
    parser.add_argument(
        "--jumprelu-l0-coefficient", type=float, default=defaults.jumprelu_l0_coefficient
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=defaults.device)
    parser.add_argument(
        "--architectures",
        nargs="+",
        default=[],
        metavar="ARCH",
        help=f"subset of {', '.join(ARCHITECTURES)} (default: {' '.join(DEFAULT_ARCHITECTURES)});"
        f" with --preset {SAE_LENS_DEFAULTS_PRESET}, of {' '.join(PRESET_ARCHITECTURES)} (default:"
        " all three)",
    )
    parser.add_argument(
        "--aux-variants",
        nargs="+",
        default=list(defaults.aux_variants),
        metavar="VARIANT",
        help="aux-loss sets for calibrated_batchtopk / feature_choice, one run each: 'none',"
        " a registered loss, or '+'-joined losses (e.g. auxk zipf auxk+zipf none)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where cached activations live (default: $SAE_BATCHTOPK_CACHE/activations or"
        " ~/.cache/sae_lens_batchtopk/activations); reused by runs with the same key",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=defaults.output,
        help=f"folder for {JSON_FILE}, {MARKDOWN_FILE}, {PLOT_FILE} and {SECTION_FILE}",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--rerun",
        action="store_true",
        help=f"retrain runs already finished in OUTPUT/{RUNS_DIR} with the same settings"
        " (default: reuse them, so an interrupted benchmark resumes)",
    )
    parser.add_argument(
        "--no-memory-probe",
        dest="memory_probe",
        action="store_false",
        help="skip the per-run peak-memory probe in a fresh process (peak MB reads -)",
    )
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default=defaults.preset,
        help=f"{BENCH_PRESET}: every architecture shares the settings above;"
        f" {SAE_LENS_DEFAULTS_PRESET}: each run keeps SAELens's own trainer and SAE-config"
        " defaults, only architecture, k, shape, device, seed and tokens are set (compares"
        f" {', '.join(PRESET_ARCHITECTURES)}; the options only the {BENCH_PRESET} preset"
        " reads are refused)",
    )
    parser.add_argument(
        "--snapshot-tokens",
        type=int,
        nargs="+",
        default=list(defaults.snapshot_tokens),
        metavar="TOKENS",
        help="also evaluate every run after this many training tokens, copied during the same"
        " run (needs a constant learning rate: the sae-lens-defaults preset)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes (about a minute on an idle 2-core CPU); options given explicitly"
        " still take precedence",
    )
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; ``--quick`` swaps in :data:`QUICK_SETTINGS` as the defaults.

    Under ``--preset sae-lens-defaults`` an option only the bench preset reads is an error
    even when given its default value (it would otherwise be silently ignored), and ``--quick``
    leaves those settings alone.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    quick = QUICK_SETTINGS
    if args.preset != BENCH_PRESET:
        given = _given_options(parser, argv, BENCH_PRESET_FIELDS)
        if given:
            parser.error(_bench_only_message(BENCH_PRESET_FIELDS[given[0]], args.preset))
        quick = {name: value for name, value in quick.items() if name not in BENCH_PRESET_FIELDS}
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args


def _given_options(
    parser: argparse.ArgumentParser, argv: Sequence[str], names: Iterable[str]
) -> list[str]:
    """Which of the ``names`` (option destinations) ``argv`` sets explicitly.

    argparse fills a default only into a namespace that lacks the attribute, so a namespace
    pre-set to a marker keeps the marker exactly where the option was not given.
    """
    unset = object()
    names = list(names)
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(names, unset)))
    return [name for name in names if getattr(probe, name) is not unset]


def _bench_only_message(option: str, preset: str) -> str:
    return f"{option}: --preset {preset} uses SAELens's own value; drop {option}"


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The benchmark settings of ``args``, for the first ``--hook`` (see per_hook_configs)."""
    config = BenchConfig(
        k=tuple(args.k),
        d_sae=tuple(args.d_sae),
        hook_name=args.hook[0],
        train_tokens=args.train_tokens,
        calibration_tokens=args.calibration_tokens,
        heldout_tokens=args.heldout_tokens,
        eval_sequences=args.eval_sequences,
        context_size=args.context_size,
        batch_size=args.batch_size,
        lr=args.lr,
        epochs=args.epochs,
        dead_window_tokens=args.dead_window_tokens,
        jumprelu_l0_coefficient=args.jumprelu_l0_coefficient,
        device=args.device,
        architectures=tuple(args.architectures or ()),
        aux_variants=tuple(args.aux_variants),
        cache_dir=args.cache_dir,
        output=args.output,
        seed=args.seed,
        rerun=args.rerun,
        memory_probe=args.memory_probe,
        preset=args.preset,
        snapshot_tokens=tuple(args.snapshot_tokens),
    )
    return config


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sae-batchtopk bench`` (and of ``python -m`` on this module)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    config = config_from_args(args)
    try:
        configs = per_hook_configs(config, args.hook)
        for hook_config in configs:
            hook_config.validate()
        model = load_smollm2(device=config.device)
        check_hooks(model, args.hook)
    except ValueError as error:
        print(f"sae-batchtopk bench: error: {error}", file=sys.stderr)
        return 2
    command = shlex.join(["sae-batchtopk", "bench", *argv])
    if len(configs) == 1:
        results = run_benchmark(configs[0], model=model, command=command)
    else:
        results = run_benchmarks(configs, config.output, model=model, command=command)
    print(_markdown(results))
    print(f"wrote {JSON_FILE}, {MARKDOWN_FILE}, {PLOT_FILE}, {SECTION_FILE} to {config.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
