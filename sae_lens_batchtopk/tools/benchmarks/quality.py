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
- ``matryoshka_batchtopk`` (asked for explicitly): SAELens's Matryoshka BatchTopK, nested at
  ``--matryoshka-widths`` (default d_sae/8, /4, /2, d_sae) with its default aux setting,
  deployed as its JumpReLU export with the EMA θ (``[ema]``) and, as an extra row, the same
  weights calibrated by us to k (``[l0]``).
- ``calibrated_matryoshka_batchtopk`` (asked for explicitly): ours at the same widths, calibrated
  like ``calibrated_batchtopk`` and also to the held-out L0 of ``matryoshka_batchtopk[ema]``
  when that trains too (``[l0@matryoshka_batchtopk]``): the comparison at equal L0.

With a Matryoshka architecture in the run, every evaluated SAE (the plain ones too, as the
reference without nesting) also gets its NMSE per level: the reconstruction from the codes of
its first ``w`` latents only, for each level width ``w`` (:func:`level_nmse`).

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
  (``[l0@batchtopk]``), the comparison at equal L0 that
  :func:`~.quality_report.equal_l0_verdict` judges, and 3 % below that L0
  (``[l0@batchtopk-3%]``), which decides the verdict when ours lands above the built-in's L0
  on held-out tokens by more than the tolerance.

``--snapshot-tokens`` evaluates one training run at several token budgets: the SAE is copied
as the trainer asks for the first batch after the budget. Under a constant learning rate (no
warm-up, no decay) nothing a step computes depends on the total budget, so the copy equals a
separate run of that many tokens on the same batch stream, bit for bit on CPU
(``tests/test_bench.py`` checks it); any other schedule is refused. Several ``--hook`` values
run one benchmark per hook (each resumable in its own ``--output`` subfolder) and write one
combined table and section.

This module runs the benchmark; the settings and presets are in :mod:`.quality_config`, the
tables, verdicts, plot and section in :mod:`.quality_report`, and what it shares with the speed
benchmark in :mod:`.harness` and :mod:`.command_line`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.metadata
import itertools
import json
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.saes.sae import SAE, TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer
from simple_parsing import ArgumentParser
from transformer_lens import HookedTransformer

from sae_lens_batchtopk.atomic import write_json
from sae_lens_batchtopk.calibration import (
    CalibrationError,
    applicable_methods,
    calibrate_thresholds,
)
from sae_lens_batchtopk.evaluation import reconstruction_stats
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import ARCHITECTURE, CalibratedBatchTopKSAE
from sae_lens_batchtopk.saes.matryoshka_batchtopk_sae import CALIBRATED_MATRYOSHKA
from sae_lens_batchtopk.tools.benchmarks.activation_cache import ActivationCache
from sae_lens_batchtopk.tools.benchmarks.command_line import (
    command_parser,
    given_options,
    one_or_more,
    parse_command_line,
    run_command,
)
from sae_lens_batchtopk.tools.benchmarks.harness import (
    MEMORY_PROBE_STEPS,
    MODEL_NAME,
    load_model_and_cache,
    machine_info,
    model_preservation_scores,
    new_sae_and_trainer,
    probe_peak_memory,
    synchronize,
    train_statistics,
    utc_now,
)
from sae_lens_batchtopk.tools.benchmarks.quality_config import (
    ARCHITECTURES,
    BENCH_PRESET,
    BENCH_PRESET_FIELDS,
    CALIBRATED_ARCHITECTURES,
    DEFAULT_HOOK,
    PRESET_ARCHITECTURES,
    QUICK_SETTINGS,
    BenchConfig,
    bench_only_error,
    is_constant_schedule,
    recorded_settings,
    resolved_settings,
    runner_config_for,
)
from sae_lens_batchtopk.tools.benchmarks.quality_report import (
    FILES,
    LOWER_L0_MARGIN,
    comparison_cells,
    equal_l0_method,
    lower_l0_method,
    results_markdown,
    write_quality_outputs,
)
from sae_lens_batchtopk.tools.offline import load_smollm2, special_token_ids

# One JSON file per finished training run, so an interrupted benchmark resumes where it stopped.
RUNS_DIR = "runs"
# Settings that choose which runs exist rather than what any run computes.
_RUN_SELECTION_SETTINGS = frozenset(
    {"k", "d_sae", "architectures", "aux_variants", "output", "cache_dir", "rerun", "memory_probe"}
)
# Settings added after run files were first written: hashed only when they differ from these
# defaults, so runs finished before the settings existed keep their fingerprint and resume.
_LATER_SETTINGS: dict[str, Any] = {
    "preset": BENCH_PRESET,
    "snapshot_tokens": (),
    "matryoshka_widths": (),
}
# Tokens encoded at once while evaluating; bounds the tokens x d_sae working memory.
_EVAL_BATCH_TOKENS = 4096


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
                runner_config = runner_config_for(
                    architecture, k, d_sae, config, cache.d_in, variant, show_progress
                )
                builtin_l0s = _builtin_l0s(config, architecture, rows, k, d_sae)
                # Ours is calibrated to the built-in's L0s: a stored run is valid only for them.
                if builtin_l0s is not None:
                    margins = _lower_l0_margins(config)
                    run_fingerprint = _hash([fingerprint, builtin_l0s, *margins])
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
                        "date": utc_now(),
                    }
                    runs_dir.mkdir(parents=True, exist_ok=True)
                    write_json(run_file, run)
                rows.extend(_with_memory_probe(run_file, run, runner_config, config, cache, stats))
    rows.sort(key=lambda row: (row["d_sae"], row["k"], row.get("training_tokens", 0)))

    results = {
        "settings": recorded_settings(config),
        "machine": machine_info(),
        "date": utc_now(),
        "command": command,
        "cache": {"path": str(cache.path), "reused": not cache.created},
        "rows": rows,
    }
    if config.preset != BENCH_PRESET:
        results["cells"] = comparison_cells(rows)
    write_quality_outputs(results, Path(config.output))
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
    widths = config.level_widths(runner_config.sae.d_sae)
    for trained, training in _train(runner_config, k, config, cache, statistics):
        tokens = training["training_tokens"]
        builtin_l0 = None if builtin_l0s is None else builtin_l0s[str(tokens)]
        for method, sae, extra in _inference_saes(
            architecture, trained, evaluation.calibration, config, builtin_l0
        ):
            row_label = label if method is None else f"{label}[{method}]"
            saes[f"{row_label}@{tokens}"] = sae
            levels = {}
            if widths is not None:
                levels = {
                    "level_widths": widths,
                    "level_nmse": level_nmse(sae, evaluation.heldout, widths),
                }
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
                    **levels,
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


@torch.no_grad()
def level_nmse(
    sae: SAE[Any], batches: Sequence[torch.Tensor], widths: Sequence[int]
) -> list[float]:
    """Normalized MSE of each nested level: decoding only the codes of latents below ``w``.

    The codes are the deployed form's own (thresholds, TopK, ...) computed over the whole
    dictionary; level ``w`` keeps those of latents ``[0, w)`` and zeroes the rest, which is
    how a Matryoshka prefix is used on its own. Normalised as
    :func:`~sae_lens_batchtopk.evaluation.reconstruction_stats` (per-batch mean), so the
    level ``w = d_sae`` is the row's NMSE.
    """
    errors = [0.0] * len(widths)
    variance = 0.0
    for batch in batches:
        x = batch.to(sae.device, sae.dtype)
        codes = sae.encode(x)
        for level, width in enumerate(widths):
            prefix = codes.clone()
            prefix[:, width:] = 0
            errors[level] += float((sae.decode(prefix) - x).double().pow(2).sum())
        variance += float((x - x.mean(0)).double().pow(2).sum())
    return [error / variance for error in errors]


def _preset_fields(config: BenchConfig) -> dict[str, Any]:
    """Row fields of the sae-lens-defaults preset, whose tables compare cells across hooks."""
    if config.preset == BENCH_PRESET:
        return {}
    return {"preset": config.preset, "hook": config.hook_name}


def _equal_l0_builtin(config: BenchConfig, architecture: str) -> str | None:
    """The built-in whose held-out L0 ``architecture`` is also calibrated to, if any.

    SAELens's exports land at whatever L0 their EMA θ gives, so a comparison at equal L0 moves
    ours there: ``calibrated_batchtopk`` to ``batchtopk`` under the sae-lens-defaults preset,
    ``calibrated_matryoshka_batchtopk`` to ``matryoshka_batchtopk`` whenever both train.
    """
    if architecture == ARCHITECTURE and config.preset != BENCH_PRESET:
        return "batchtopk"
    if architecture == CALIBRATED_MATRYOSHKA and "matryoshka_batchtopk" in config.architectures:
        return "matryoshka_batchtopk"
    return None


def _lower_l0_margins(config: BenchConfig) -> tuple[float, ...]:
    """How far below the built-in's L0 ours is also calibrated: only under the sae-lens-defaults
    preset, where :func:`~.quality_report.comparison_cells` judges the equal-L0 verdict.

    Part of ours' run fingerprint too, so run files from before the lower calibration retrain.
    """
    return (LOWER_L0_MARGIN,) if config.preset != BENCH_PRESET else ()


def _builtin_l0s(
    config: BenchConfig, architecture: str, rows: Sequence[Mapping[str, Any]], k: float, d_sae: int
) -> dict[str, float] | None:
    """Held-out L0 of the built-in's ``[ema]`` row per training budget (tokens, as a JSON key)
    in this cell, for calibrating ours to it; ``None`` where no such comparison is made."""
    builtin = _equal_l0_builtin(config, architecture)
    if builtin is None:
        return None
    return {
        str(row["training_tokens"]): row["l0_mean"]
        for row in rows
        if row["label"] == f"{builtin}[ema]" and row["k"] == k and row["d_sae"] == d_sae
    }


def _runs(config: BenchConfig) -> Iterator[tuple[str, str | None]]:
    """(architecture, aux variant) pairs to train; built-ins keep their own aux loss (None).

    Runs train in :data:`ARCHITECTURES` order (:data:`PRESET_ARCHITECTURES` under the
    sae-lens-defaults preset, which has no variants), whatever order ``--architectures`` lists
    them in: a built-in trains before the one of ours calibrated to its L0.
    """
    if config.preset != BENCH_PRESET:
        for architecture in PRESET_ARCHITECTURES:
            if architecture in config.architectures:
                yield architecture, None
        return
    for architecture in ARCHITECTURES:
        if architecture not in config.architectures:
            continue
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
        for name, value in recorded_settings(config).items()
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
    synchronize(config.device)
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
            synchronize(trainer.cfg.device)
            snapshots.append(
                (copy.deepcopy(trainer.sae), time.perf_counter(), _dead_fraction(trainer))
            )
        yield batch


def _dead_fraction(trainer: SAETrainer[Any, Any]) -> float:
    """SAELens's own dead-latent fraction: no firing for over ``dead_feature_window`` steps."""
    return float(trainer.dead_neurons.float().mean())


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

    ``builtin_l0``: the held-out L0 of the built-in's ``[ema]`` row in the same cell, which
    ours is also calibrated to (:func:`_equal_l0_builtin`; ``None`` otherwise).
    """
    defaults_preset = config.preset != BENCH_PRESET
    if architecture in ("batchtopk", "matryoshka_batchtopk"):
        yield "ema", CalibratedBatchTopKSAE.from_sae(trained), {}
        if defaults_preset or architecture == "matryoshka_batchtopk":
            # The built-in's weights, calibrated by us to k.
            converted = CalibratedBatchTopKSAE.from_sae(trained)
            yield "l0", converted, _calibrate(converted, calibration, "l0")
    elif architecture in CALIBRATED_ARCHITECTURES:
        equal_l0: list[tuple[str, SAE[Any], dict[str, Any]]] = []
        failure: dict[str, Any] = {}
        builtin = _equal_l0_builtin(config, architecture)
        if builtin_l0 is not None and builtin is not None:
            # First, so that a target ours cannot reach is reported on its [l0] row instead of
            # ending the benchmark.
            targets = {equal_l0_method(builtin): builtin_l0}
            for margin in _lower_l0_margins(config):
                targets[lower_l0_method(builtin)] = builtin_l0 * (1 - margin)
            try:
                for method, target in targets.items():
                    extra = _calibrate(trained, calibration, "l0", target_l0=target)
                    equal_l0.append((method, CalibratedBatchTopKSAE.from_sae(trained), extra))
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
        "date": utc_now(),
        "command": command,
        "cache": [results["cache"] for results in per_hook],
        "rows": rows,
    }
    if "cells" in per_hook[0]:
        results["cells"] = comparison_cells(rows)
    write_quality_outputs(results, Path(output))
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


@dataclass(frozen=True)
class HookOptions:
    """Hooks to benchmark: one benchmark each, combined into one table."""

    hook: tuple[str, ...] = one_or_more(DEFAULT_HOOK)
    """One or more hooks; with several, each gets its own OUTPUT/<hook> folder (resumable on
    its own) and OUTPUT holds the combined tables."""


def build_parser() -> ArgumentParser:
    """``sae-batchtopk bench``'s options: :class:`BenchConfig`'s fields and ``--hook``."""
    return command_parser(
        "sae-batchtopk bench",
        "Benchmark SAELens topk / batchtopk / jumprelu against calibrated_batchtopk on the"
        " same cached SmolLM2 activations.",
        BenchConfig,
        hooks=HookOptions,
    )


def quick_settings(config: BenchConfig) -> dict[str, Any]:
    """``--quick``'s defaults; the sae-lens-defaults preset keeps SAELens's values instead."""
    if config.preset == BENCH_PRESET:
        return QUICK_SETTINGS
    return {
        name: value for name, value in QUICK_SETTINGS.items() if name not in BENCH_PRESET_FIELDS
    }


def parse_command(argv: Sequence[str]) -> tuple[BenchConfig, list[BenchConfig]]:
    """The settings ``argv`` asks for, and one validated config per ``--hook``.

    Under ``--preset sae-lens-defaults`` an option only the bench preset reads is an error
    even when given its default value (it would otherwise be silently ignored).
    """
    args = parse_command_line(build_parser, argv, quick_settings)
    config: BenchConfig = args.config
    if config.preset != BENCH_PRESET:
        given = given_options(build_parser, argv, BENCH_PRESET_FIELDS)
        if given:
            raise bench_only_error(given[0], config.preset)
    configs = per_hook_configs(config, args.hooks.hook)
    for hook_config in configs:
        hook_config.validate()
    return config, configs


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sae-batchtopk bench`` (and of ``python -m`` on this module)."""
    return run_command("bench", argv, _prepare, _run)


def _prepare(argv: list[str]) -> tuple[BenchConfig, list[BenchConfig], HookedTransformer]:
    """Everything that can refuse the command before any run: settings, then the hooks."""
    config, configs = parse_command(argv)
    model = load_smollm2(device=config.device)
    check_hooks(model, [hook_config.hook_name for hook_config in configs])
    return config, configs, model


def _run(prepared: tuple[BenchConfig, list[BenchConfig], HookedTransformer], command: str) -> str:
    config, configs, model = prepared
    if len(configs) == 1:
        results = run_benchmark(configs[0], model=model, command=command)
    else:
        results = run_benchmarks(configs, config.output, model=model, command=command)
    return f"{results_markdown(results)}\nwrote {', '.join(FILES)} to {config.output}"


if __name__ == "__main__":
    sys.exit(main())
