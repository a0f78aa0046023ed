"""Runner configuration from flat keyword arguments, and the calibrating training runner.

SAELens's ``LanguageModelSAERunnerConfig`` takes the architecture as the *type* of its ``sae``
config and nests logging options in a ``LoggingConfig``. Researchers think in one flat list of
options ("architecture, k, d_sae, hook, lr, tokens"), so :func:`make_runner_config` routes
each keyword to the object that owns it and refuses anything nobody owns.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

import torch
import wandb
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.config import HfDataset, LanguageModelSAERunnerConfig, LoggingConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.optim import get_lr_scheduler
from sae_lens.training.sae_trainer import SAETrainer
from transformer_lens.HookedTransformer import HookedRootModule
from typing_extensions import override

from sae_lens_batchtopk.activations_store import ResumableActivationsStore
from sae_lens_batchtopk.aux_losses import acts_on_dead_latents_only
from sae_lens_batchtopk.calibration import (
    CalibrationError,
    CalibrationResult,
)
from sae_lens_batchtopk.evaluation import calibrate_with_report
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import (
    ARCHITECTURE,
    CalibratedBatchTopKTrainingSAE,
    CalibratedBatchTopKTrainingSAEConfig,
)
from sae_lens_batchtopk.selection import n_selected
from sae_lens_batchtopk.trainer import RecordingSAETrainer
from sae_lens_batchtopk.validation import check_finite_number, check_positive_int

logger = logging.getLogger(__name__)

# Options that both the runner and the SAE config carry; they must agree, so one keyword sets both.
_SHARED_FIELDS = frozenset({"device", "dtype"})


def runner_option_names(architecture: str = ARCHITECTURE) -> dict[str, list[str]]:
    """Valid flat option names for ``architecture``, grouped by the config that owns them."""
    sae_config_class = _training_config_class(architecture)
    return {
        "sae": sorted(f.name for f in fields(sae_config_class) if f.name != "metadata"),
        "runner": sorted(
            f.name for f in fields(LanguageModelSAERunnerConfig) if f.name not in ("sae",)
        ),
        "logger": sorted(f.name for f in fields(LoggingConfig)),
    }


def make_runner_config(
    architecture: str = ARCHITECTURE, **kwargs: Any
) -> LanguageModelSAERunnerConfig[Any]:
    """Build a SAELens runner config from flat options.

    Every registered training architecture works, SAELens's built-ins included (``"topk"``,
    ``"batchtopk"``, ``"jumprelu"``, ...). SAE options (``d_in``, ``d_sae``, ``k``, ...) go to the
    architecture's training config, logging options (``log_to_wandb``, ``wandb_project``, ...)
    to ``LoggingConfig``, the rest to the runner; ``device`` and ``dtype`` go to both the runner
    and the SAE. Unknown options raise ``ValueError`` listing the valid ones.
    """
    names = runner_option_names(architecture)
    sae_names, runner_names, logger_names = (set(names[g]) for g in ("sae", "runner", "logger"))
    unknown = sorted(set(kwargs) - sae_names - runner_names - logger_names)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for architecture {architecture!r}. Valid options:\n"
            f"  SAE ({architecture}): {names['sae']}\n"
            f"  runner: {names['runner']}\n"
            f"  logging: {names['logger']}"
        )
    if "logger" in kwargs and any(k in logger_names for k in kwargs):
        raise ValueError("pass either logger=LoggingConfig(...) or flat logging options, not both")

    sae_kwargs = {k: v for k, v in kwargs.items() if k in sae_names}
    runner_kwargs = {k: v for k, v in kwargs.items() if k in runner_names}
    logger_kwargs = {k: v for k, v in kwargs.items() if k in logger_names}
    for shared in _SHARED_FIELDS & set(runner_kwargs) & sae_names:
        sae_kwargs[shared] = runner_kwargs[shared]
    if "logger" not in runner_kwargs:
        runner_kwargs["logger"] = LoggingConfig(**logger_kwargs)

    sae_config = _training_config_class(architecture)(**sae_kwargs)
    runner_cfg = LanguageModelSAERunnerConfig(sae=sae_config, **runner_kwargs)
    validate_runner_config(runner_cfg)
    record_dead_window(runner_cfg)
    return runner_cfg


def validate_runner_config(cfg: LanguageModelSAERunnerConfig[Any]) -> None:
    """Refuse, before any model is loaded, runner settings that would fail or mislead later.

    SAELens checks few runner fields: ``lr=nan`` or ``train_batch_size_tokens=0`` pass its
    constructor and crash (or train NaNs) after the model has loaded. Every check here names
    the field; the learning-rate schedule is checked by building SAELens's own scheduler.
    """
    for name in (
        "training_tokens",
        "train_batch_size_tokens",
        "context_size",
        "store_batch_size_prompts",
        "n_batches_in_buffer",
        "dead_feature_window",
        "feature_sampling_window",
        "n_batches_for_norm_estimate",
        "n_restart_cycles",
    ):
        check_positive_int(name, getattr(cfg, name))
    for name in ("n_checkpoints", "lr_warm_up_steps", "lr_decay_steps"):
        check_positive_int(name, getattr(cfg, name), allow_zero=True)
    check_finite_number("lr", cfg.lr)
    if cfg.lr <= 0:
        raise ValueError(f"lr must be > 0, got lr={cfg.lr}")
    check_finite_number("lr_end", cfg.lr_end, low=0.0)
    for name in ("adam_beta1", "adam_beta2"):
        check_finite_number(name, getattr(cfg, name), low=0.0)
        if getattr(cfg, name) >= 1:
            raise ValueError(f"{name} must be < 1, got {name}={getattr(cfg, name)}")
    check_finite_number(
        "activations_mixing_fraction", cfg.activations_mixing_fraction, low=0.0, high=1.0
    )
    if cfg.training_tokens < cfg.train_batch_size_tokens:
        raise ValueError(
            f"training_tokens={cfg.training_tokens} is less than one batch"
            f" (train_batch_size_tokens={cfg.train_batch_size_tokens}); raise training_tokens"
        )
    if (
        isinstance(cfg.sae, BatchTopKTrainingSAEConfig)
        and n_selected(cfg.sae.k, cfg.train_batch_size_tokens) < 1
    ):
        raise ValueError(
            f"k={cfg.sae.k} keeps int(k x train_batch_size_tokens) ="
            f" int({cfg.sae.k} x {cfg.train_batch_size_tokens}) = 0 activations per batch;"
            " raise k or train_batch_size_tokens"
        )
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    try:
        get_lr_scheduler(
            cfg.lr_scheduler_name,
            optimizer=probe,
            training_steps=cfg.total_training_steps,
            lr=cfg.lr,
            warm_up_steps=cfg.lr_warm_up_steps,
            decay_steps=cfg.lr_decay_steps,
            lr_end=cfg.lr_end,  # type: ignore[arg-type]
            num_cycles=cfg.n_restart_cycles,
        )
    except ValueError as error:
        raise ValueError(f"learning-rate schedule (lr_scheduler_name, ...): {error}") from None


def check_activation_buffer(cfg: LanguageModelSAERunnerConfig[Any]) -> None:
    """The runner's activation buffer must hold at least one training batch.

    SAELens's mixing buffer refuses a smaller one, but only once the model has loaded and the
    first batch is drawn; SAELens's own defaults (20 x 128 tokens, 4096-token batches) trip it.
    Training from an iterator of batches (``SAETrainer`` alone) has no such buffer.
    """
    positions = len(range(cfg.context_size)[slice(*cfg.seqpos_slice)])
    if cfg.n_batches_in_buffer * positions < cfg.train_batch_size_tokens:
        raise ValueError(
            f"the activation buffer holds n_batches_in_buffer x context positions ="
            f" {cfg.n_batches_in_buffer} x {positions} tokens, fewer than one batch"
            f" (train_batch_size_tokens={cfg.train_batch_size_tokens}); raise"
            " n_batches_in_buffer"
        )


def record_dead_window(cfg: LanguageModelSAERunnerConfig[Any]) -> dict[str, Any] | None:
    """Record in the SAE config's metadata which dead-latent window training will use.

    For our architectures: an explicit ``dead_tokens_window``, or SAELens's
    ``dead_feature_window`` steps of ``train_batch_size_tokens`` tokens (what the trainer's
    ``dead_neuron_mask`` counts). Logged, and saved with the SAE. ``None`` for others.
    """
    sae_cfg = cfg.sae
    if not isinstance(sae_cfg, CalibratedBatchTopKTrainingSAEConfig):
        return None
    if sae_cfg.dead_tokens_window is not None:
        window = {"tokens": sae_cfg.dead_tokens_window, "source": "dead_tokens_window"}
    else:
        window = {
            "tokens": cfg.dead_feature_window * cfg.train_batch_size_tokens,
            "steps": cfg.dead_feature_window,
            "source": "dead_feature_window (SAELens's trainer dead_neuron_mask)",
        }
    sae_cfg.metadata.dead_latent_window = window
    logger.info("dead-latent window: %s", window)
    _warn_if_dead_window_outlasts_run(sae_cfg, window["tokens"], cfg.training_tokens)
    return window


def _warn_if_dead_window_outlasts_run(
    sae_cfg: CalibratedBatchTopKTrainingSAEConfig, window_tokens: int, training_tokens: int
) -> None:
    """Warn when no latent can count as dead before training ends, so AuxK never acts.

    SAELens's default ``dead_feature_window`` (1000 steps of 4096 tokens) outlasts every run
    shorter than 4.1M tokens: AuxK then trains nothing, silently, in SAELens's ``batchtopk``
    and here alike. A warning, not an error, because SAELens accepts the setting.
    """
    idle = sorted(name for name in sae_cfg.resolved_aux_losses if acts_on_dead_latents_only(name))
    if not idle or window_tokens < training_tokens:
        return
    field = "dead_feature_window" if sae_cfg.dead_tokens_window is None else "dead_tokens_window"
    warnings.warn(
        f"aux losses {idle} will never act: the dead-latent window ({window_tokens:,} tokens,"
        f" from {field}) is not shorter than training_tokens ({training_tokens:,}), so no"
        " latent counts as dead before training ends. Shorten dead_tokens_window (tokens) or"
        " dead_feature_window (steps of train_batch_size_tokens), e.g. to a tenth of the run,"
        " if latents should be revived",
        stacklevel=3,
    )


def _training_config_class(architecture: str) -> type[Any]:
    try:
        return SAE_TRAINING_CLASS_REGISTRY[architecture][1]
    except KeyError:
        raise ValueError(
            f"unknown architecture {architecture!r}; registered training architectures: "
            f"{sorted(SAE_TRAINING_CLASS_REGISTRY)}"
        ) from None


class CalibratingSAETrainingRunner(LanguageModelSAETrainingRunner):
    """SAELens's runner, plus threshold calibration on unseen tokens before the final save.

    Training is SAELens's own. At ``save_final_sae`` (activation-norm scaling already folded
    into the weights) a ``calibrated_batchtopk`` SAE is calibrated with the method, target and
    token count of its config on activations drawn *after* training, so the store has not shown
    them to the trainer; a further disjoint slice is held out for the before/after report. The
    result is recorded in the saved config's metadata under ``calibration``. Other
    architectures are saved exactly as SAELens would. Training curves (losses, L0, θ, dead
    fraction; 200 points) are recorded without wandb, in ``training_curves``.

    A run resumed with ``resume_from_checkpoint`` continues the interrupted one: activations
    come from a :class:`~sae_lens_batchtopk.activations_store.ResumableActivationsStore` (for
    training and evaluation), and the trainer's step count is corrected on resume (see
    :func:`_continue_counters`). On CPU the result is bitwise that of an uninterrupted run.
    SAELens builds its own store in ``__init__`` first; it is discarded, which for a dataset
    named by path means opening it twice. With ``prefetch_llm_batches`` a checkpoint records
    the stream as far as the prefetch thread has drawn it, so a resumed run skips those batches.
    """

    calibration: CalibrationResult | None = None
    calibration_report: dict[str, dict[str, float]] | None = None
    training_curves: list[dict[str, float]]
    training_throughput: dict[str, float] | None = None

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig[Any],
        override_dataset: HfDataset | None = None,
        override_model: HookedRootModule | None = None,
        override_sae: TrainingSAE[Any] | None = None,
    ) -> None:
        # Checked before SAELens loads the model, so a bad setting costs nothing.
        validate_runner_config(cfg)
        check_activation_buffer(cfg)
        window = record_dead_window(cfg)
        super().__init__(cfg, override_dataset, override_model, override_sae)
        if window is not None:  # also when the caller passed its own SAE (override_sae)
            self.sae.cfg.metadata.dead_latent_window = window
        self.activations_store = ResumableActivationsStore.from_config(
            self.model, self.cfg, override_dataset=override_dataset
        )
        self.evaluator.activations_store = self.activations_store
        if cfg.prefetch_llm_batches and (cfg.n_checkpoints > 0 or cfg.save_final_checkpoint):
            warnings.warn(
                "prefetch_llm_batches: checkpoints record the activation stream as far as the "
                "prefetch thread has drawn it, so a run resumed from one skips those batches",
                stacklevel=2,
            )

    @override
    def run_trainer_with_interruption_handling(self, trainer: SAETrainer[Any, Any]) -> Any:
        """Train through a :class:`RecordingSAETrainer` carrying ``trainer``'s state.

        After ``run()``, ``training_curves`` holds the records. The state is copied back
        because ``run()`` reads the final feature sparsity from the trainer object it built.
        """
        if self.cfg.resume_from_checkpoint is not None:
            _continue_counters(trainer)
        recording = self.recording_trainer(trainer)
        start, tokens_before = time.perf_counter(), recording.n_training_samples
        try:
            return super().run_trainer_with_interruption_handling(recording)
        finally:
            self.training_throughput = self.measured_throughput(
                time.perf_counter() - start, recording.n_training_samples - tokens_before
            )
            self.training_curves = recording.records
            trainer.__dict__.update(
                {name: value for name, value in vars(recording).items() if name in vars(trainer)}
            )

    def measured_throughput(self, seconds: float, tokens: int) -> dict[str, float]:
        """Training wall time (the language model's forward passes included) and tokens/s.

        Saved in the SAE's metadata (``training_throughput``) and the report.
        """
        return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9)}

    def recording_trainer(self, trainer: SAETrainer[Any, Any]) -> RecordingSAETrainer:
        """The trainer that trains: SAELens's, carried into one that records its curves."""
        return RecordingSAETrainer.carrying_state_of(trainer)

    @override
    def save_final_sae(
        self,
        sae: TrainingSAE[Any],
        output_path: str,
        log_feature_sparsity: torch.Tensor | None = None,
    ) -> None:
        sae.cfg.metadata.training_throughput = self.training_throughput
        if isinstance(sae, CalibratedBatchTopKTrainingSAE) and sae.cfg.calibration_method != "none":
            try:
                self._calibrate(sae)
            except CalibrationError as error:
                # The weights cost the whole run: save them (running θ, marked as such) before
                # reporting that the calibration target could not be reached.
                sae.cfg.metadata.calibration = {"error": str(error)}
                self.write_final_sae(sae, output_path, log_feature_sparsity)
                raise CalibrationError(
                    f"{error}; the trained SAE was saved uncalibrated (running θ) to"
                    f" {output_path}: recalibrate it with a reachable target"
                    " (sae-batchtopk calibrate, or calibrate_thresholds)"
                ) from error
        self.write_final_sae(sae, output_path, log_feature_sparsity)

    def write_final_sae(
        self,
        sae: TrainingSAE[Any],
        output_path: str,
        log_feature_sparsity: torch.Tensor | None = None,
    ) -> None:
        """Write the trained (and calibrated) SAE as SAELens's runner does."""
        super().save_final_sae(sae, output_path, log_feature_sparsity)

    def _calibrate(self, sae: CalibratedBatchTopKTrainingSAE) -> None:
        cfg = sae.cfg
        # On several processes each draws its share of the tokens from its own stream.
        n_processes = sae.distributed.world_size if sae.distributed is not None else 1
        report_tokens = min(max(cfg.calibration_tokens // 4, 1), 262_144)
        heldout = draw_batches(self.activations_store, max(report_tokens // n_processes, 1))
        self.calibration, self.calibration_report = calibrate_with_report(
            sae,
            self.activations_store,
            heldout,
            method=cfg.calibration_method,  # type: ignore[arg-type]
            target_l0=cfg.calibration_target_l0,
            n_tokens=cfg.calibration_tokens // n_processes,
            show_progress=self.cfg.verbose,
            distributed=sae.distributed,
        )
        cfg.metadata.calibration = {
            **self.calibration.to_metadata(),
            "heldout": self.calibration_report,
        }
        if self.cfg.logger.log_to_wandb:
            wandb.log(
                {
                    f"calibration/{mode}/{name}": value
                    for mode, stats in self.calibration_report.items()
                    for name, value in stats.items()
                }
            )


def _continue_counters(trainer: SAETrainer[Any, Any]) -> None:
    """Set a resumed trainer's counters to what the uninterrupted run's were at the checkpoint.

    ``SAETrainer.fit`` saves a checkpoint *before* counting the step it has just taken, so a
    checkpoint after k steps records ``n_training_steps = k - 1`` (SAELens 6.54): resumed, the
    run ends one step short, and its sparsity windows (hence ``sparsity.safetensors`` and the
    saved L0) and logging cadence are shifted by a step. Every step of the runner trains on
    exactly ``train_batch_size_tokens`` activations, so k is the sample count divided by that.
    Checkpoint thresholds already passed are dropped, or the resumed run would write an extra
    checkpoint after its first step.
    """
    batch_size = trainer.cfg.train_batch_size_samples
    if trainer.n_training_samples % batch_size:
        raise ValueError(
            f"the checkpoint has trained on {trainer.n_training_samples} activations, not a "
            f"whole number of batches of train_batch_size_tokens={batch_size}; resume with the "
            "batch size the run had"
        )
    trainer.n_training_steps = trainer.n_training_samples // batch_size
    trainer.checkpoint_thresholds = [
        threshold
        for threshold in trainer.checkpoint_thresholds
        if threshold >= trainer.n_training_samples
    ]


def draw_batches(batches: Iterable[torch.Tensor], n_tokens: int) -> list[torch.Tensor]:
    """Whole ``(n, d_in)`` batches from an activation stream until ``n_tokens`` were drawn."""
    drawn: list[torch.Tensor] = []
    n_drawn = 0
    for batch in batches:
        drawn.append(batch.reshape(-1, batch.shape[-1]))
        n_drawn += drawn[-1].shape[0]
        if n_drawn >= n_tokens:
            break
    return drawn
