"""The quality benchmark's settings, and what each run trains with under each preset.

:class:`BenchConfig` holds every setting of one benchmark (one hook) and is also the command
line: each field is an option. The ``bench`` preset sets every trainer and SAE option so that
only the architecture differs between runs; the ``sae-lens-defaults`` preset sets only what
must be set and leaves everything else at SAELens's own defaults (read from its dataclasses
here, not copied). :func:`runner_config_for` turns a setting and one (architecture, k, d_sae)
into the SAELens runner config a run trains with.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from sae_lens.config import LanguageModelSAERunnerConfig, SAETrainerConfig
from simple_parsing import field, flag

from sae_lens_batchtopk.aux_losses import registered_aux_losses
from sae_lens_batchtopk.calibration import METHODS, check_token_budget
from sae_lens_batchtopk.runner import make_runner_config
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import ARCHITECTURE
from sae_lens_batchtopk.saes.feature_choice_sae import FEATURE_CHOICE
from sae_lens_batchtopk.saes.matryoshka_batchtopk_sae import CALIBRATED_MATRYOSHKA
from sae_lens_batchtopk.tools.benchmarks.activation_cache import CacheSpec
from sae_lens_batchtopk.tools.benchmarks.command_line import (
    Device,
    check_device,
    check_k,
    nested_widths,
    one_or_more,
    option_name,
    require_positive,
)
from sae_lens_batchtopk.tools.benchmarks.harness import MODEL_NAME

# The bench preset's architectures, in training order: a built-in trains before the one of ours
# that is calibrated to its L0 (EQUAL_L0_BUILTINS).
ARCHITECTURES: tuple[str, ...] = (
    "topk",
    "batchtopk",
    "jumprelu",
    ARCHITECTURE,
    FEATURE_CHOICE,
    "matryoshka_batchtopk",
    CALIBRATED_MATRYOSHKA,
)
DEFAULT_ARCHITECTURES: tuple[str, ...] = ("topk", "batchtopk", "jumprelu", ARCHITECTURE)
# Our architectures train with registered aux losses and export through calibration.
CALIBRATED_ARCHITECTURES = frozenset({ARCHITECTURE, FEATURE_CHOICE, CALIBRATED_MATRYOSHKA})
MATRYOSHKA_ARCHITECTURES = frozenset({"matryoshka_batchtopk", CALIBRATED_MATRYOSHKA})
# Matryoshka widths when --matryoshka-widths is not given: these fractions of d_sae.
DEFAULT_LEVEL_FRACTIONS: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2)
# Aux coefficient of every registered loss in a variant (Gao et al.'s 1/32).
AUX_COEFFICIENT = 1 / 32
DEFAULT_HOOK = "blocks.3.hook_resid_post"
Preset = Literal["bench", "sae-lens-defaults"]
BENCH_PRESET, SAE_LENS_DEFAULTS_PRESET = PRESETS = get_args(Preset)
# What the sae-lens-defaults preset compares, in training order: ours is calibrated to the L0
# the built-in batchtopk reached in the same cell, so batchtopk trains first.
PRESET_ARCHITECTURES: tuple[str, ...] = ("topk", "batchtopk", ARCHITECTURE)
# BenchConfig fields only the bench preset reads. The sae-lens-defaults preset takes SAELens's
# values instead, so setting any of them there is an error, not a silent no-op.
BENCH_PRESET_FIELDS: tuple[str, ...] = (
    "lr",
    "adam_beta1",
    "adam_beta2",
    "batch_size",
    "dead_window_tokens",
    "jumprelu_l0_coefficient",
    "aux_variants",
)


@dataclass(frozen=True)
class BenchConfig:
    """Every setting of one benchmark (one hook); the defaults are the full benchmark.

    Each field is also a command-line option (train_tokens is --train-tokens) and the
    docstring below it is the option's help.
    """

    k: tuple[float, ...] = one_or_more(16, 32, 64)
    """Target L0s; one run per k and d_sae."""
    d_sae: tuple[int, ...] = one_or_more(4608)
    """Dictionary sizes; one run per k and d_sae."""
    hook_name: str = field(default=DEFAULT_HOOK, cmd=False)
    """The hook whose activations every run trains on (the command line's --hook)."""
    train_tokens: int = 500_000
    """Tokens in the train split (one epoch)."""
    calibration_tokens: int = 100_000
    """Tokens in the calibration split, which sets our thresholds."""
    heldout_tokens: int = 50_000
    """Tokens in the held-out split that L0, NMSE and dead latents are measured on."""
    eval_sequences: int = 16
    """Held-out sequences for the CE/KL scores."""
    context_size: int = 128
    """Tokens per cached sequence (and per CE/KL sequence)."""
    batch_size: int = 4096
    """Tokens per training step (bench preset)."""
    lr: float = 4e-4
    """Adam learning rate, cosine-annealed to lr/10 (bench preset)."""
    adam_beta1: float = 0.9
    """Adam's beta1 (bench preset)."""
    adam_beta2: float = 0.999
    """Adam's beta2 (bench preset)."""
    epochs: int = 1
    """Passes over the train split."""
    dead_window_tokens: int = 1_000_000
    """A latent is dead for AuxK after this many training tokens without firing. Ours counts
    tokens; SAELens's built-ins count steps, so they get this // --batch-size steps and ours
    exactly that many steps' worth of tokens: the same window for both (bench preset)."""
    jumprelu_l0_coefficient: float = 1.0
    """Weight of JumpReLU's quadratic L0 penalty around k (bench preset)."""
    device: Device = "cpu"
    """Where the SAEs train and the model runs."""
    architectures: tuple[str, ...] = one_or_more(metavar="ARCH")
    """Subset of topk, batchtopk, jumprelu, calibrated_batchtopk, feature_choice,
    matryoshka_batchtopk, calibrated_matryoshka_batchtopk (default: the first four), trained
    in that order; with --preset sae-lens-defaults, of topk, batchtopk, calibrated_batchtopk
    (default: all three)."""
    matryoshka_widths: tuple[int, ...] = one_or_more(metavar="WIDTH")
    """Level widths of the Matryoshka architectures (strictly increasing; d_sae is appended
    when the last is below it); default d_sae/8, d_sae/4, d_sae/2, d_sae. With a Matryoshka
    architecture, every run is also evaluated per level (bench preset)."""
    aux_variants: tuple[str, ...] = one_or_more("auxk", metavar="VARIANT")
    """Aux-loss sets calibrated_batchtopk and feature_choice train with, one run each: 'none',
    a registered loss, or '+'-joined losses (auxk zipf auxk+zipf none), each at coefficient
    1/32; several compare dead-latent revival on the same tokens (bench preset)."""
    cache_dir: Path | None = None
    """Where cached activations live (default: $SAE_BATCHTOPK_CACHE/activations or
    ~/.cache/sae_lens_batchtopk/activations); reused by runs with the same key."""
    output: Path = Path("bench_output")
    """Folder for bench.json, bench.md, nmse_vs_l0.png and BENCHMARKS_section.md."""
    seed: int = 42
    """Seed of the splits, the batch order and every SAE's initial weights."""
    model_name: str = field(default=MODEL_NAME, cmd=False)
    """The model's label in the cache key and the outputs."""
    rerun: bool = flag(False, negative_prefix="--no-")
    """Retrain runs already finished in OUTPUT/runs with the same settings (by default they
    are reused, so an interrupted benchmark resumes)."""
    memory_probe: bool = flag(True, negative_prefix="--no-")
    """Measure each run's peak memory in a fresh process (a few seconds per run);
    --no-memory-probe leaves peak MB empty."""
    preset: Preset = BENCH_PRESET
    """bench: every architecture shares the settings marked (bench preset); sae-lens-defaults:
    each run keeps SAELens's own trainer and SAE-config defaults, only architecture, k, shape,
    device, seed and tokens are set, and the bench preset's options are refused."""
    snapshot_tokens: tuple[int, ...] = one_or_more(metavar="TOKENS")
    """Also evaluate every run after this many training tokens (rounded down to whole
    batches), a copy taken during the same run; needs a constant learning rate (the
    sae-lens-defaults preset)."""

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
        if self.matryoshka_widths and not MATRYOSHKA_ARCHITECTURES & set(self.architectures):
            raise ValueError(
                "--matryoshka-widths: no Matryoshka architecture in --architectures (add"
                f" {' or '.join(sorted(MATRYOSHKA_ARCHITECTURES))})"
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
            self.level_widths(d_sae)
            for k in self.k:
                check_k(k, d_sae)
                if "topk" in self.architectures and k != int(k):
                    raise ValueError(f"--k {k}: the topk architecture needs an integer k")
                if CALIBRATED_ARCHITECTURES & set(self.architectures):
                    try:
                        for method in METHODS:
                            check_token_budget(method, self.calibration_tokens, k, d_sae)
                    except ValueError as error:
                        raise ValueError(f"--calibration-tokens: {error}") from None
        require_positive(
            self,
            (
                "train_tokens",
                "calibration_tokens",
                "heldout_tokens",
                "eval_sequences",
                "batch_size",
                "epochs",
                "dead_window_tokens",
                "lr",
            ),
        )
        if self.train_tokens < self.training_batch_size:
            raise ValueError(
                f"--train-tokens {self.train_tokens} is less than one training batch"
                f" ({self.training_batch_size} tokens)"
            )
        if self.dead_window_tokens < self.batch_size:
            raise ValueError("--dead-window-tokens must be at least one --batch-size")
        check_device(self.device)
        self._check_snapshots()

    def _check_preset_fields(self) -> None:
        """Under sae-lens-defaults, the bench preset's own settings must not be set at all."""
        defaults = BenchConfig()
        for name in BENCH_PRESET_FIELDS:
            if getattr(self, name) != getattr(defaults, name):
                raise bench_only_error(name, self.preset)

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

    def level_widths(self, d_sae: int) -> list[int] | None:
        """The Matryoshka level widths at ``d_sae``; ``None`` without a Matryoshka architecture.

        Defaults to :data:`DEFAULT_LEVEL_FRACTIONS` of ``d_sae`` (576/1152/2304/4608 at 4608).
        """
        if not MATRYOSHKA_ARCHITECTURES & set(self.architectures):
            return None
        widths = self.matryoshka_widths or tuple(
            int(d_sae * fraction) for fraction in DEFAULT_LEVEL_FRACTIONS
        )
        return nested_widths(widths, d_sae)

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


def bench_only_error(name: str, preset: str) -> ValueError:
    """The error for a bench-preset setting under a preset that takes SAELens's value."""
    option = option_name(name)
    return ValueError(f"{option}: --preset {preset} uses SAELens's own value; drop {option}")


def recorded_settings(config: BenchConfig) -> dict[str, Any]:
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
        if MATRYOSHKA_ARCHITECTURES & set(config.architectures):
            # Every run is evaluated per level then: its stored rows depend on the widths.
            settings["matryoshka_levels"] = {
                str(d_sae): config.level_widths(d_sae) for d_sae in config.d_sae
            }
        return settings
    for name in BENCH_PRESET_FIELDS:
        del settings[name]
    settings["sae_lens_version"] = importlib.metadata.version("sae-lens")
    settings["sae_lens_trainer_defaults"] = sae_lens_trainer_defaults()
    settings["snapshot_training_tokens"] = [
        steps * config.training_batch_size for steps in config.snapshot_steps
    ]
    return settings


@functools.cache
def runner_defaults() -> dict[str, Any]:
    """``LanguageModelSAERunnerConfig``'s field defaults, read from SAELens's dataclass."""
    defaults: dict[str, Any] = {}
    for runner_field in dataclasses.fields(LanguageModelSAERunnerConfig):
        if runner_field.default is not dataclasses.MISSING:
            defaults[runner_field.name] = runner_field.default
        elif runner_field.default_factory is not dataclasses.MISSING:
            defaults[runner_field.name] = runner_field.default_factory()
    return defaults


def sae_lens_trainer_defaults() -> dict[str, Any]:
    """SAELens's defaults for the runner settings its ``SAETrainer`` reads (JSON-ready).

    The names are those ``SAETrainerConfig`` shares with the runner config, plus the batch
    size (``train_batch_size_tokens`` there, ``train_batch_size_samples`` in the trainer);
    what only places files or logs (device, checkpoint path, logger) is left out.
    """
    defaults = runner_defaults()
    shared = {each.name for each in dataclasses.fields(SAETrainerConfig)} & defaults.keys()
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


def _aux_losses(variant: str) -> dict[str, float]:
    return {} if variant == "none" else dict.fromkeys(variant.split("+"), AUX_COEFFICIENT)


def runner_config_for(
    architecture: str,
    k: float,
    d_sae: int,
    config: BenchConfig,
    d_in: int,
    aux_variant: str | None,
    show_progress: bool,
) -> LanguageModelSAERunnerConfig[Any]:
    """The SAELens runner config of one run: what the preset sets, SAELens's defaults else."""
    if config.preset == BENCH_PRESET:
        sae_options = _bench_sae_options(architecture, k, d_sae, config, aux_variant)
    else:
        # SAELens's own config for the architecture: only the shape and k are set.
        sae_options = {"k": int(k) if architecture == "topk" else float(k)}
    return make_runner_config(
        architecture,
        d_in=d_in,
        d_sae=d_sae,
        **sae_options,
        **_trainer_options(config, show_progress),
    )


def _bench_sae_options(
    architecture: str, k: float, d_sae: int, config: BenchConfig, aux_variant: str | None
) -> dict[str, Any]:
    """The bench preset's SAE options: the same normalisation for all, k in each one's form.

    Both Matryoshka architectures nest at :meth:`BenchConfig.level_widths` and keep SAELens's
    default aux setting (AuxK on the whole SAE's residual, no ``use_matryoshka_aux_loss``).
    """
    options: dict[str, Any] = {"normalize_activations": "expected_average_only_in"}
    if architecture in MATRYOSHKA_ARCHITECTURES:
        options["matryoshka_widths"] = config.level_widths(d_sae)
    if architecture == "topk":
        options["k"] = int(k)
    elif architecture in ("batchtopk", "matryoshka_batchtopk"):
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


def resolved_settings(runner_config: LanguageModelSAERunnerConfig[Any]) -> dict[str, Any]:
    """What a run trains with, as SAELens resolved it: its ``SAETrainer`` and SAE configs."""
    trainer = dataclasses.asdict(runner_config.to_sae_trainer_config())
    return {"trainer": trainer, "sae": runner_config.sae.to_dict()}
