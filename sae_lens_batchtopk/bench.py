"""``sae-batchtopk bench``: SAELens's TopK, BatchTopK and JumpReLU next to ours, same tokens.

A comparison is only fair if everything but the architecture is held fixed, so every run here
trains through SAELens's own ``SAETrainer`` on the same cached activations
(:mod:`sae_lens_batchtopk.activation_cache`), in the same batch order, with the same batch
size, Adam settings, learning-rate schedule (cosine to lr/10), activation normalization
(SAELens's ``expected_average_only_in``, factor computed once from the train split), decoder
bias initialisation (the train-split mean) and seed; no language model runs inside the training
loop. Each run is then evaluated the way it would be deployed:

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
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import FuncFormatter, NullFormatter
from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import SAE, TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer
from transformer_lens import HookedTransformer

from sae_lens_batchtopk.activation_cache import (
    ActivationCache,
    CacheSpec,
    load_or_create_activation_cache,
)
from sae_lens_batchtopk.aux_losses import registered_aux_losses
from sae_lens_batchtopk.calibration import (
    METHODS,
    applicable_methods,
    calibrate_thresholds,
    check_token_budget,
)
from sae_lens_batchtopk.evaluation import reconstruction_stats
from sae_lens_batchtopk.runner import make_runner_config
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import ARCHITECTURE, CalibratedBatchTopKSAE
from sae_lens_batchtopk.saes.feature_choice_sae import FEATURE_CHOICE
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
    architectures: tuple[str, ...] = DEFAULT_ARCHITECTURES
    aux_variants: tuple[str, ...] = ("auxk",)
    cache_dir: Path | None = None
    output: Path = Path("bench_output")
    seed: int = 42
    model_name: str = MODEL_NAME
    rerun: bool = False
    memory_probe: bool = True

    def validate(self) -> None:
        """Reject bad settings before any work, naming the command-line option at fault."""
        unknown = sorted(set(self.architectures) - set(ARCHITECTURES))
        if unknown or not self.architectures:
            raise ValueError(f"--architectures: unknown {unknown}; choose from {ARCHITECTURES}")
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
        if self.train_tokens < self.batch_size:
            raise ValueError(
                f"--train-tokens {self.train_tokens} is less than one --batch-size"
                f" ({self.batch_size})"
            )
        if self.dead_window_tokens < self.batch_size:
            raise ValueError("--dead-window-tokens must be at least one --batch-size")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine")

    @property
    def dead_window_steps(self) -> int:
        return self.dead_window_tokens // self.batch_size

    @property
    def total_training_tokens(self) -> int:
        """Tokens every run trains on: whole batches of ``epochs`` passes over the train split."""
        return (self.train_tokens // self.batch_size) * self.batch_size * self.epochs

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
    heldout = cache.batches("heldout", _EVAL_BATCH_TOKENS)
    calibration = cache.batches("calibration", config.batch_size)
    stats = train_statistics(cache)

    special_ids = special_token_ids(model.tokenizer)
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
                finished = _finished_run(run_file, fingerprint, config.rerun)
                if finished is not None:
                    if show_progress:
                        print(f"reusing {run_file} (same settings)")
                    rows.extend(
                        _with_memory_probe(run_file, finished, runner_config, config, cache, stats)
                    )
                    continue
                trained, training = _train(runner_config, k, config, cache, stats)
                run_rows: list[dict[str, Any]] = []
                saes: dict[str, SAE[Any]] = {}
                for method, sae, extra in _inference_saes(architecture, trained, calibration):
                    label = architecture if variant is None else f"{architecture}/{variant}"
                    label = label if method is None else f"{label}[{method}]"
                    saes[label] = sae
                    run_rows.append(
                        {
                            "label": label,
                            "architecture": architecture,
                            "aux_variant": variant,
                            "method": method,
                            "k": k,
                            "d_sae": d_sae,
                            **reconstruction_stats(sae, heldout, target_l0=k),
                            **training,
                            **extra,
                        }
                    )
                scores = model_preservation_scores(
                    model, cache.eval_tokens, config.hook_name, saes, special_ids=special_ids
                )
                for row in run_rows:
                    row.update(scores[row["label"]])
                runs_dir.mkdir(parents=True, exist_ok=True)
                run = {
                    "fingerprint": fingerprint,
                    "machine": machine_info(),
                    "date": _now(),
                    "rows": run_rows,
                }
                write_json(run_file, run)
                rows.extend(_with_memory_probe(run_file, run, runner_config, config, cache, stats))
    rows.sort(key=lambda row: (row["d_sae"], row["k"]))

    results = {
        "settings": _settings_dict(config),
        "machine": machine_info(),
        "date": _now(),
        "command": command,
        "cache": {"path": str(cache.path), "reused": not cache.created},
        "rows": rows,
    }
    _write_outputs(results, Path(config.output))
    return results


def _runs(config: BenchConfig) -> Iterator[tuple[str, str | None]]:
    """(architecture, aux variant) pairs to train; built-ins keep their own aux loss (None)."""
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
    settings["package_version"] = _package_version()
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


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
    statistics: tuple[float, torch.Tensor],
) -> list[dict[str, Any]]:
    """The run's rows with ``peak_memory_mb`` from :func:`probe_peak_memory`.

    Probed once per run and stored in its file (``memory_probe``), so resuming does not
    repeat it; ``--no-memory-probe`` leaves the figure out (``None``).
    """
    if "memory_probe" not in run and config.memory_probe:
        batches = itertools.islice(
            cache.train_batches(config.batch_size, seed=config.seed), MEMORY_PROBE_STEPS
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
    settings = dataclasses.asdict(config)
    settings["cache_dir"] = str(config.cache_dir) if config.cache_dir else None
    settings["output"] = str(config.output)
    settings["total_training_tokens"] = config.total_training_tokens
    settings["dead_window_steps"] = config.dead_window_steps
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


def _sae_options(
    architecture: str,
    k: float,
    d_sae: int,
    config: BenchConfig,
    d_in: int,
    aux_variant: str | None,
) -> dict[str, Any]:
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
        training_tokens=config.total_training_tokens,
        train_batch_size_tokens=config.batch_size,
        lr=config.lr,
        lr_end=config.lr / 10,
        lr_scheduler_name="cosineannealing",
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        dead_feature_window=config.dead_window_steps,
        device=config.device,
        seed=config.seed,
        log_to_wandb=False,
        verbose=show_progress,
    )


def _train(
    runner_config: LanguageModelSAERunnerConfig[Any],
    k: float,
    config: BenchConfig,
    cache: ActivationCache,
    statistics: tuple[float, torch.Tensor],
) -> tuple[TrainingSAE[Any], dict[str, Any]]:
    """One run through SAELens's ``SAETrainer``; returns the SAE and its time figures."""
    sae, trainer = new_sae_and_trainer(
        runner_config, cache.train_batches(config.batch_size, seed=config.seed), statistics
    )
    extra: dict[str, Any] = {}
    if runner_config.sae.architecture() == "jumprelu":
        extra["jumprelu_init_threshold"] = _init_jumprelu_threshold(
            sae, cache.train_batches(config.batch_size, seed=config.seed + 1), statistics[0], k
        )
        extra["jumprelu_l0_coefficient"] = config.jumprelu_l0_coefficient
    start = time.perf_counter()
    trainer.fit()
    if config.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return sae, {
        "train_seconds": seconds,
        "train_tokens_per_s": config.total_training_tokens / seconds,
        **extra,
    }


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
    statistics: tuple[float, torch.Tensor],
) -> tuple[TrainingSAE[Any], SAETrainer[Any, Any]]:
    """A fresh SAE and its ``SAETrainer``, set up identically for every compared run.

    Same seed for the initial weights, the decoder bias at the train-split mean (see
    :func:`train_statistics`), and the activation scaling factor fixed in advance, so the
    trainer does not estimate it from (and thereby consume) batches of ``batches``.
    """
    scaling_factor, train_mean = statistics
    torch.manual_seed(runner_config.seed)
    sae_class = SAE_TRAINING_CLASS_REGISTRY[runner_config.sae.architecture()][0]
    sae = sae_class(runner_config.sae).to(runner_config.device)
    with torch.no_grad():
        sae.b_dec.copy_(train_mean * scaling_factor)
    trainer = SAETrainer(cfg=runner_config.to_sae_trainer_config(), sae=sae, data_provider=batches)
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
    architecture: str, trained: TrainingSAE[Any], calibration: Sequence[torch.Tensor]
) -> Iterator[tuple[str | None, SAE[Any], dict[str, Any]]]:
    """The deployed form(s) of a trained SAE: ``(method, inference SAE, extra row fields)``."""
    if architecture == "batchtopk":
        yield "ema", CalibratedBatchTopKSAE.from_sae(trained), {}
    elif architecture in CALIBRATED_ARCHITECTURES:
        n_tokens = sum(batch.shape[0] for batch in calibration)
        for method in applicable_methods(trained):
            result = calibrate_thresholds(trained, calibration, method=method, n_tokens=n_tokens)
            extra = {
                "calibration_theta": result.theta,
                "calibration_l0": result.achieved_l0,
                "calibration_tokens": result.n_tokens,
            }
            yield method, CalibratedBatchTopKSAE.from_sae(trained), extra
    else:
        yield None, _export(trained), {}


@torch.no_grad()
def _export(trained: TrainingSAE[Any]) -> SAE[Any]:
    """SAELens's ``save_inference_model`` conversion, in memory instead of through disk."""
    state = trained.state_dict()
    trained.process_state_dict_for_saving_inference(state)
    inference = SAE.from_dict(trained.cfg.get_inference_sae_cfg_dict())
    inference.load_state_dict(state)
    return inference.to(trained.device)


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
    statistics: tuple[float, torch.Tensor],
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
    statistics: tuple[float, torch.Tensor],
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


_TABLE_COLUMNS = (
    ("run", "label", "{}"),
    ("k", "k", "{:g}"),
    ("d_sae", "d_sae", "{}"),
    ("L0 mean", "l0_mean", "{:.2f}"),
    ("L0 p5/p50/p95", None, ""),
    ("L0 vs k", "l0_deviation", "{:+.1%}"),
    ("NMSE", "nmse", "{:.4f}"),
    ("expl. var.", "explained_variance", "{:.4f}"),
    ("CE score", "ce_loss_score", "{:.4f}"),
    ("KL score", "kl_div_score", "{:.4f}"),
    ("dead", "dead_fraction", "{:.1%}"),
    ("train tok/s", "train_tokens_per_s", "{:,.0f}"),
    ("peak MB", "peak_memory_mb", "{:,.0f}"),
)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per evaluated SAE; runs that share a training run share tok/s and memory."""
    lines = [
        "| " + " | ".join(title for title, _, _ in _TABLE_COLUMNS) + " |",
        "|" + "---|" * len(_TABLE_COLUMNS),
    ]
    for row in rows:
        cells = [
            f"{row['l0_p5']:.0f}/{row['l0_p50']:.0f}/{row['l0_p95']:.0f}"
            if key is None
            else "-"
            if row[key] is None
            else template.format(row[key])
            for _, key, template in _TABLE_COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def nmse_vs_l0_figure(rows: Sequence[Mapping[str, Any]]) -> plt.Figure:
    """NMSE against held-out inference L0, one line per run and d_sae across the k values.

    Log-log, as in the papers: the runs worth comparing differ by a few percent in NMSE and
    would be flattened on a linear axis by a failed run an order of magnitude above them. The
    L0 axis is ticked at the target budgets ``k`` in plain numbers, which stays readable when
    every run sits near a single k. One colour per line (a table can hold more than ten runs)
    and one marker per architecture, with the legend outside the axes so it hides no point.
    """
    figure, axes = plt.subplots(figsize=(9, 4.5))
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["label"], row["d_sae"]), []).append(row)
    colours = matplotlib.colormaps["tab20"].resampled(max(len(groups), 2))
    markers = dict(zip(sorted({row["architecture"] for row in rows}), itertools.cycle("osD^vP*X")))
    several_sizes = len({row["d_sae"] for row in rows}) > 1
    for index, ((label, d_sae), group) in enumerate(groups.items()):
        group = sorted(group, key=lambda row: row["l0_mean"])
        axes.plot(
            [row["l0_mean"] for row in group],
            [row["nmse"] for row in group],
            linestyle="-",
            marker=markers[group[0]["architecture"]],
            color=colours(index),
            label=f"{label} (d_sae {d_sae})" if several_sizes else label,
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


def benchmarks_section(results: Mapping[str, Any]) -> str:
    """A ``BENCHMARKS.md`` section: command, machine, date, settings, table, plot."""
    machine = results["machine"]
    settings = results["settings"]
    gpu = machine["gpu"] or "none"
    return "\n".join(
        [
            f"## BatchTopK benchmark, {results['date'][:10]}",
            "",
            "```",
            results["command"] or "(called from Python: run_benchmark)",
            "```",
            "",
            f"- Machine: {machine['cpu']}, {machine['cores']} cores, GPU: {gpu};"
            f" torch {machine['torch']}; device `{settings['device']}`.",
            f"- Date (UTC): {results['date']}.",
            f"- Model {settings['model_name']}, hook `{settings['hook_name']}`;"
            f" {settings['total_training_tokens']:,} training tokens per run"
            f" ({settings['epochs']} epoch(s) of {settings['train_tokens']:,}),"
            f" batch {settings['batch_size']}, Adam lr {settings['lr']:g} (cosine to lr/10),"
            f" seed {settings['seed']}; {settings['calibration_tokens']:,} calibration tokens,"
            f" {settings['heldout_tokens']:,} held-out tokens,"
            f" CE/KL on {settings['eval_sequences']} sequences of {settings['context_size']}.",
            "",
            markdown_table(results["rows"]),
            "",
            f"![NMSE vs L0]({PLOT_FILE})",
            "",
        ]
    )


def _write_outputs(results: Mapping[str, Any], output: Path) -> None:
    write_outputs(
        output,
        {JSON_FILE: results},
        {
            MARKDOWN_FILE: markdown_table(results["rows"]) + "\n",
            SECTION_FILE: benchmarks_section(results),
        },
        {PLOT_FILE: nmse_vs_l0_figure(results["rows"])},
    )


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
    parser.add_argument("--hook", default=defaults.hook_name)
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
        default=list(defaults.architectures),
        metavar="ARCH",
        help=f"subset of {', '.join(ARCHITECTURES)}",
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
        "--quick",
        action="store_true",
        help="tiny shapes (about a minute on an idle 2-core CPU); options given explicitly"
        " still take precedence",
    )
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; ``--quick`` swaps in :data:`QUICK_SETTINGS` as the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK_SETTINGS)
        args = parser.parse_args(argv)
    return args


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    config = BenchConfig(
        k=tuple(args.k),
        d_sae=tuple(args.d_sae),
        hook_name=args.hook,
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
        architectures=tuple(args.architectures),
        aux_variants=tuple(args.aux_variants),
        cache_dir=args.cache_dir,
        output=args.output,
        seed=args.seed,
        rerun=args.rerun,
        memory_probe=args.memory_probe,
    )
    return config


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sae-batchtopk bench`` and ``python -m sae_lens_batchtopk.bench``."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    config = config_from_args(args)
    try:
        config.validate()
    except ValueError as error:
        print(f"sae-batchtopk bench: error: {error}", file=sys.stderr)
        return 2
    results = run_benchmark(config, command=shlex.join(["sae-batchtopk", "bench", *argv]))
    print(markdown_table(results["rows"]))
    print(f"\nwrote {JSON_FILE}, {MARKDOWN_FILE}, {PLOT_FILE}, {SECTION_FILE} to {config.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
