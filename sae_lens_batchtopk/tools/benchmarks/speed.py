"""``sae-batchtopk bench-speed``: training-step throughput, sparse fast path against dense paths.

Trains, from the same initial weights on the same cached SmolLM2 activations, SAELens's built-in
``batchtopk`` (dense), our ``calibrated_batchtopk`` with ``fast_path=False`` (the dense reference)
and with the fast sparse path, each through SAELens's ``SAETrainer.step`` (so optimizer, gradient
clipping and dead-latent bookkeeping are timed too). ``--matryoshka-widths`` times the Matryoshka
family instead: SAELens's ``matryoshka_batchtopk`` against our ``calibrated_matryoshka_batchtopk``
on both paths, nested at those widths, each with SAELens's default aux setting (AuxK on the whole
SAE's residual) unless ``--use-matryoshka-aux-loss`` asks both for per-level AuxK. Reported per
run: tokens/s over the timed steps (after warm-up), the median step time, the speed-up over the
built-in, the step as a multiple of the encoder matmul (``sae_in @ W_enc + b_enc`` alone, timed
after each timed step of the same run: the one dense cost a batch top-k step cannot avoid, so the
multiple says how much the rest of the step adds), peak memory (measured in a fresh process by
:func:`~sae_lens_batchtopk.tools.benchmarks.harness.probe_training`), and the fractions of the
machine's measured peak matmul throughput reached by the encoder matmul and by the step, counting
only the work the step must do (the dense encoder forward plus the sparse decode/backward). The
path column (sparse or dense) is read from what the steps returned, so a sparse run that fell back
to the dense path shows it. ``--autocast`` trains every run under SAELens's ``autocast=True``
(bfloat16 autocast, which SAELens applies on CPU as on CUDA); the encoder matmul and the peak are
then timed in bfloat16. ``--synthetic-d-in`` replaces the cached activations by seeded Gaussian
ones of that width, loading no model (shapes no cached model gives, e.g. Gemma 2 2B's d_in 2304);
``--memory-only`` runs only the memory probes (``--memory-probe-steps`` steps each), for a shape
whose timed steps would take too long. The fast and dense runs of our architecture are compared
step by step: their MSE curves must agree to float rounding (bfloat16 rounding under autocast),
against a step-to-step change that is orders of magnitude larger. Dead latents are declared after
``--dead-window-steps`` so that every run's AuxK path is exercised and timed; a window no shorter
than the run declares none, which times the steps without any aux loss. The selection alone is
timed too: the fast exact batch top-k against ``torch.topk`` over all ``tokens x d_sae`` entries,
on the same pre-activations.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer
from simple_parsing import ArgumentParser, field, flag
from transformer_lens import HookedTransformer

from sae_lens_batchtopk.runner import make_runner_config
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import (
    ARCHITECTURE,
    CalibratedBatchTopKTrainingSAE,
    CalibratedBatchTopKTrainingSAEConfig,
)
from sae_lens_batchtopk.saes.matryoshka_batchtopk_sae import CALIBRATED_MATRYOSHKA
from sae_lens_batchtopk.selection import batch_topk_indices, n_selected
from sae_lens_batchtopk.tools.benchmarks.activation_cache import CacheSpec
from sae_lens_batchtopk.tools.benchmarks.command_line import (
    Device,
    check_device,
    check_k,
    command_parser,
    nested_widths,
    one_or_more,
    parse_command_line,
    require_positive,
    run_command,
)
from sae_lens_batchtopk.tools.benchmarks.harness import (
    MEMORY_PROBE_STEPS,
    MODEL_NAME,
    activation_statistics,
    force_dead,
    load_model_and_cache,
    machine_info,
    new_sae_and_trainer,
    probe_training,
    synchronize,
    took_sparse_path,
    train_statistics,
    utc_now,
)
from sae_lens_batchtopk.tools.benchmarks.speed_report import (
    FILES,
    speed_table,
    write_speed_outputs,
)

Result = TypeVar("Result")


@dataclass(frozen=True)
class Family:
    """Runs timed together: SAELens's built-in (the baseline) and ours on both paths.

    Run names: the baseline's architecture, ours (the fast sparse path) and ``ours/dense``.
    """

    baseline: str
    ours: str

    @property
    def fast(self) -> str:
        return self.ours

    @property
    def dense(self) -> str:
        return f"{self.ours}/dense"

    @property
    def runs(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Run name -> (architecture, extra SAE options), baseline first."""
        return {
            self.baseline: (self.baseline, {}),
            self.dense: (self.ours, {"fast_path": False}),
            self.fast: (self.ours, {"fast_path": True}),
        }


BATCHTOPK = Family(baseline="batchtopk", ours=ARCHITECTURE)
MATRYOSHKA = Family(baseline="matryoshka_batchtopk", ours=CALIBRATED_MATRYOSHKA)


@dataclass(frozen=True)
class SpeedConfig:
    """Settings of a speed benchmark; defaults are the issue's shape (d_in is the model's).

    Each field is a command-line option (d_sae is --d-sae), its docstring the help.
    """

    d_sae: int = 16384
    """Dictionary size."""
    k: float = 32.0
    """Target L0 (batch top-k keeps k x batch entries per step)."""
    batch_size: int = 4096
    """Tokens per training step."""
    steps: int = 20
    """Timed training steps per run."""
    warmup_steps: int = 2
    """Untimed steps before them (allocations, kernel selection)."""
    dead_window_steps: int = 2
    """Latents idle this many steps count as dead for AuxK (built-in: dead_feature_window;
    ours: that many steps' tokens), so every run's AuxK path is timed."""
    dead_fraction: float | None = None
    """Instead, this fraction of the latents (one seeded set, e.g. 0.25) counts as dead at
    every step of every run, whatever fired: AuxK timed at a fixed dead fraction."""
    lr: float = 4e-4
    """Adam learning rate."""
    hook_name: str = field(default="blocks.3.hook_resid_post", alias="--hook")
    """The hook whose cached activations every run trains on."""
    device: Device = "cpu"
    """Where the runs train."""
    runs: tuple[str, ...] = one_or_more(metavar="RUN")
    """Runs to time (default: all three): batchtopk (the baseline),
    calibrated_batchtopk/dense, calibrated_batchtopk; with --matryoshka-widths,
    matryoshka_batchtopk (the baseline), calibrated_matryoshka_batchtopk/dense,
    calibrated_matryoshka_batchtopk."""
    matryoshka_widths: tuple[int, ...] = one_or_more(metavar="WIDTH")
    """Time the Matryoshka family, nested at these widths (strictly increasing; d_sae is
    appended when the last is below it), e.g. 512 2048 8192 16384."""
    use_matryoshka_aux_loss: bool = flag(False, negative_prefix="--no-")
    """With --matryoshka-widths: per-level AuxK for every run (SAELens's
    use_matryoshka_aux_loss; off by default there, and costlier: one aux decode per level)."""
    autocast: bool = flag(False, negative_prefix="--no-")
    """Train every run under SAELens's autocast=True (bfloat16 mixed precision, on CPU as on
    CUDA); the encoder matmul and the peak matmul are then timed in bfloat16 too."""
    synthetic_d_in: int | None = None
    """Train on seeded Gaussian activations of this width instead of cached model activations
    (no model or cache is loaded): for shapes the cached model cannot give, e.g. 2304."""
    memory_only: bool = flag(False, negative_prefix="--no-")
    """Only the peak-memory probes: no timed steps, selection or peak-matmul timing (a
    large shape's memory table at the cost of the probes alone)."""
    memory_probe_steps: int = MEMORY_PROBE_STEPS
    """Training steps of each run's peak-memory probe (fewer for a large shape)."""
    seed: int = 42
    """Seed of the batches and of every run's initial weights."""
    cache_dir: Path | None = None
    """Where cached activations live (default: $SAE_BATCHTOPK_CACHE/activations or
    ~/.cache/sae_lens_batchtopk/activations)."""
    output: Path = Path("speed_output")
    """Folder for speed.json, speed.md, speed_loss_curves.png and
    BENCHMARKS_speed_section.md."""
    model_name: str = field(default=MODEL_NAME, cmd=False)
    """The model's label in the cache key."""

    def __post_init__(self) -> None:
        if not self.runs:
            object.__setattr__(self, "runs", tuple(self.family.runs))

    @property
    def family(self) -> Family:
        """The Matryoshka family when widths are given, plain BatchTopK otherwise."""
        return MATRYOSHKA if self.matryoshka_widths else BATCHTOPK

    def validate(self) -> None:
        """Reject bad settings before any work, naming the command-line option at fault."""
        unknown = sorted(set(self.runs) - set(self.family.runs))
        if unknown:
            raise ValueError(
                f"--runs: unknown {unknown}; choose from {list(self.family.runs)}"
                f" (--matryoshka-widths times {list(MATRYOSHKA.runs)})"
            )
        require_positive(
            self, ("d_sae", "batch_size", "steps", "dead_window_steps", "memory_probe_steps")
        )
        if self.synthetic_d_in is not None:
            require_positive(self, ("synthetic_d_in",))
        if self.matryoshka_widths:
            nested_widths(self.matryoshka_widths, self.d_sae)
        elif self.use_matryoshka_aux_loss:
            raise ValueError("--use-matryoshka-aux-loss needs --matryoshka-widths")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.dead_fraction is not None and not 0 < self.dead_fraction < 1:
            raise ValueError(
                f"--dead-fraction must be between 0 and 1 (exclusive), got {self.dead_fraction}"
            )
        check_k(self.k, self.d_sae)
        require_positive(self, ("lr",))
        check_device(self.device)

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps

    @property
    def n_batches(self) -> int:
        """Batches the benchmark draws: every training step's, and the memory probe's."""
        timed = 0 if self.memory_only else self.total_steps
        return max(timed, self.memory_probe_steps)

    @property
    def matmul_dtype(self) -> torch.dtype:
        """The dtype the encoder matmul runs in: autocast's (SAELens's bfloat16) or float32."""
        return torch.bfloat16 if self.autocast else torch.float32

    def family_options(self) -> dict[str, Any]:
        """The SAE options every run of the family shares (the nesting of Matryoshka runs)."""
        if not self.matryoshka_widths:
            return {}
        return {
            "matryoshka_widths": nested_widths(self.matryoshka_widths, self.d_sae),
            "use_matryoshka_aux_loss": self.use_matryoshka_aux_loss,
        }

    def cache_spec(self) -> CacheSpec:
        """Just enough tokens for every step; the other splits are token-sized placeholders."""
        return CacheSpec(
            model_name=self.model_name,
            hook_name=self.hook_name,
            train_tokens=self.n_batches * self.batch_size,
            calibration_tokens=1,
            heldout_tokens=1,
            eval_sequences=1,
            context_size=128,
            seed=self.seed,
        )


QUICK_SETTINGS: dict[str, Any] = {
    "d_sae": 512,
    "k": 8.0,
    "batch_size": 256,
    "steps": 4,
    "warmup_steps": 1,
}


def build_parser() -> ArgumentParser:
    """``sae-batchtopk bench-speed``'s options: :class:`SpeedConfig`'s fields."""
    return command_parser(
        "sae-batchtopk bench-speed",
        "Training-step throughput of calibrated_batchtopk (sparse fast path and dense"
        " reference) against SAELens's built-in batchtopk, or of the Matryoshka variants"
        " (--matryoshka-widths), on the same cached activations.",
        SpeedConfig,
    )


def parse_command(argv: Sequence[str]) -> SpeedConfig:
    """The validated settings ``argv`` asks for."""
    config: SpeedConfig = parse_command_line(build_parser, argv, lambda _: QUICK_SETTINGS).config
    config.validate()
    return config


def run_speed_benchmark(
    config: SpeedConfig,
    *,
    model: HookedTransformer | None = None,
    command: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Time every requested run on the same batches, write the outputs, return the results.

    With ``config.memory_only``, each run's memory probe is all that runs.
    """
    config.validate()
    batches, train_stats, activations = training_batches(config, model, show_progress)
    d_in = batches[0].shape[-1]
    results: dict[str, Any] = {
        "settings": {
            **dataclasses.asdict(config),
            "cache_dir": str(config.cache_dir) if config.cache_dir else None,
            "output": str(config.output),
            "d_in": d_in,
            "matryoshka_levels": config.family_options().get("matryoshka_widths"),
        },
        "activations": activations,
        "machine": machine_info(),
        "date": utc_now(),
        "command": command,
        "baseline": config.family.baseline,
    }
    if config.memory_only:
        results["runs"] = {
            name: probe_run_memory(name, config, batches, train_stats) for name in config.runs
        }
        write_speed_outputs(results, Path(config.output))
        return results
    runs = {name: time_training_steps(name, config, batches, train_stats) for name in config.runs}
    peak = peak_matmul_flops(config.device, config.matmul_dtype)
    results |= {
        "peak_matmul_flops": peak,
        "peak_matmul_dtype": str(config.matmul_dtype).removeprefix("torch."),
        "selection": time_selection(config, batches[0] * train_stats[0]),
        "runs": runs,
        "curve_match": curve_match(runs, config.family),
    }
    speedups = speed_ups(runs, config.family.baseline)
    for name, run in runs.items():
        run["fraction_of_peak"] = run["required_flops_per_s"] / peak
        run["encoder_matmul_fraction_of_peak"] = (
            encoder_flops(config, d_in) / run["encoder_matmul_s"] / peak
        )
        if name in speedups:
            run["speedup"] = speedups[name]
    write_speed_outputs(results, Path(config.output))
    return results


def training_batches(
    config: SpeedConfig, model: HookedTransformer | None, show_progress: bool
) -> tuple[list[torch.Tensor], tuple[float, torch.Tensor], str]:
    """The batches every run trains on, their statistics, and a line saying what they are.

    Cached model activations, or with ``config.synthetic_d_in`` seeded standard Gaussian ones
    of that width: a timing or memory figure depends on the shape, not on the values (the MSE
    curves of Gaussian noise say little about training, though the fast-vs-dense match holds).
    """
    if config.synthetic_d_in is not None:
        generator = torch.Generator().manual_seed(config.seed)
        batches = [
            torch.randn(config.batch_size, config.synthetic_d_in, generator=generator)
            for _ in range(config.n_batches)
        ]
        description = (
            f"synthetic activations: seeded standard Gaussian, d_in {config.synthetic_d_in};"
            " no model loaded"
        )
        return batches, activation_statistics(batches), description
    _, cache = load_model_and_cache(
        config.cache_spec(), config.device, config.cache_dir, model, show_progress
    )
    batches = list(
        itertools.islice(cache.train_batches(config.batch_size, seed=config.seed), config.n_batches)
    )
    description = f"real {config.model_name} activations, `{config.hook_name}`"
    return batches, train_statistics(cache), description


def runner_config_for(
    name: str, config: SpeedConfig, d_in: int
) -> LanguageModelSAERunnerConfig[Any]:
    """The SAELens runner config of run ``name``: its architecture, the shared settings."""
    architecture, extra = config.family.runs[name]
    return make_runner_config(
        architecture,
        d_in=d_in,
        d_sae=config.d_sae,
        k=config.k,
        normalize_activations="expected_average_only_in",
        **extra,
        **config.family_options(),
        **(
            {"dead_tokens_window": config.dead_window_steps * config.batch_size}
            if architecture == config.family.ours and config.dead_fraction is None
            else {}
        ),
        training_tokens=config.total_steps * config.batch_size,
        train_batch_size_tokens=config.batch_size,
        lr=config.lr,
        dead_feature_window=config.dead_window_steps,
        autocast=config.autocast,
        device=config.device,
        seed=config.seed,
        log_to_wandb=False,
        verbose=False,
    )


def probe_run_memory(
    name: str,
    config: SpeedConfig,
    batches: Sequence[torch.Tensor],
    train_stats: tuple[float, torch.Tensor],
) -> dict[str, Any]:
    """Run ``name``'s peak memory over ``config.memory_probe_steps`` steps, and its path."""
    runner_config = runner_config_for(name, config, batches[0].shape[-1])
    probe = probe_training(
        runner_config,
        batches[: config.memory_probe_steps],
        train_stats,
        dead_set=forced_dead_set(config),
    )
    return {
        "architecture": runner_config.sae.architecture(),
        "fast_path": probe.sparse_path,
        "peak_memory_mb": probe.peak_mb,
    }


def time_training_steps(
    name: str,
    config: SpeedConfig,
    batches: Sequence[torch.Tensor],
    train_stats: tuple[float, torch.Tensor],
) -> dict[str, Any]:
    """Train one run for ``config.total_steps`` steps; time each; record its MSE curve.

    After each timed step, the encoder matmul alone is timed on that step's batch (see
    :func:`encoder_matmul`): measured in the same run, alternating with the steps, so that
    the step's multiple of it is unmoved by the machine's state drifting between runs.
    ``fast_path`` is whether every step (timed and memory-probed) took the sparse path.
    The batches are on the run's device before the first step, as an activation store on
    that device hands them over: a host-to-device copy is not part of the step being timed.
    """
    d_in = batches[0].shape[-1]
    runner_config = runner_config_for(name, config, d_in)
    sae, trainer = new_sae_and_trainer(runner_config, iter(batches), train_stats)
    matmul_out = torch.zeros(  # zeros, not empty: paged in before the first timing
        config.batch_size, config.d_sae, dtype=config.matmul_dtype, device=config.device
    )
    seconds, matmul_seconds, mse, selected, sparse = [], [], [], [], []
    dead_set = forced_dead_set(config)
    on_device = [batch.to(config.device) for batch in batches[: config.total_steps]]
    for step, batch in enumerate(on_device):
        if dead_set is not None:
            force_dead(trainer, dead_set)
        dead_fraction = float(trainer.dead_neurons.float().mean())  # what the step's AuxK sees
        output, elapsed = _timed(config.device, lambda batch=batch: trainer.step(batch))
        trainer.n_training_steps += 1
        if step >= config.warmup_steps:
            seconds.append(elapsed)
            matmul = encoder_matmul(sae, trainer, batch, matmul_out)
            matmul_seconds.append(_timed(config.device, matmul)[1])
        mse.append(float(output.losses["mse_loss"].detach()))
        selected.append(float(output.feature_acts.bool().float().sum().to_dense()))
        sparse.append(took_sparse_path(output))
    probe = probe_training(
        runner_config, batches[: config.memory_probe_steps], train_stats, dead_set=dead_set
    )
    # Work the step cannot avoid: the dense encoder forward, and per selected entry a
    # decode, its two gradients and the encoder's two gradients (d_in multiply-adds each).
    required = encoder_flops(config, d_in) + 10 * statistics.mean(selected) * d_in
    speed = throughput(seconds, config.batch_size)
    encoder_matmul_s = statistics.median(matmul_seconds)
    return {
        "architecture": runner_config.sae.architecture(),
        "fast_path": all(sparse) and probe.sparse_path,
        **speed,
        "encoder_matmul_s": encoder_matmul_s,
        "x_encoder_matmul": speed["median_step_s"] / encoder_matmul_s,
        "peak_memory_mb": probe.peak_mb,
        "required_flops_per_s": required / speed["median_step_s"],
        "mse_loss": mse,
        "dead_fraction_end": dead_fraction,
    }


def forced_dead_set(config: SpeedConfig) -> torch.Tensor | None:
    """The latents ``--dead-fraction`` declares dead (the same seeded set for every run)."""
    if config.dead_fraction is None:
        return None
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(config.d_sae, generator=generator)
    return order[: round(config.dead_fraction * config.d_sae)].sort().values


def encoder_flops(config: SpeedConfig, d_in: int) -> int:
    """FLOPs of one batch's dense encoder matmul: a multiply and an add per weight and token."""
    return 2 * config.batch_size * d_in * config.d_sae


def encoder_matmul(
    sae: TrainingSAE[Any], trainer: SAETrainer[Any, Any], batch: torch.Tensor, out: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """``sae_in @ W_enc + b_enc`` for ``batch``, as one call ready to be timed alone.

    On the SAE's processed input (the trainer's scaled batch through ``process_sae_in``),
    without gradient, in ``out``'s dtype (the step's: autocast's bfloat16 or float32), the
    casts to it included, as the step pays them. The result goes into ``out``, allocated once
    per run: what is timed is the matmul, not the page faults of a fresh ``tokens x d_sae``
    tensor, which would flatter the step's multiple of it.
    """
    with torch.no_grad():
        sae_in = sae.process_sae_in(trainer.activation_scaler(batch.to(out.device)))
    dtype = out.dtype

    def matmul() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(out.device.type, enabled=False):
            return torch.addmm(sae.b_enc.to(dtype), sae_in.to(dtype), sae.W_enc.to(dtype), out=out)

    return matmul


def throughput(step_seconds: Sequence[float], batch_size: int) -> dict[str, float]:
    """Tokens per second over the timed steps, and their median step time.

    Tokens/s divides all timed tokens by all timed seconds, so a slow step counts in full;
    the median step shows the typical step, unmoved by one disturbed step.
    """
    return {
        "tokens_per_s": len(step_seconds) * batch_size / sum(step_seconds),
        "median_step_s": statistics.median(step_seconds),
    }


def speed_ups(runs: Mapping[str, Mapping[str, Any]], baseline: str) -> dict[str, float]:
    """Each run's tokens/s over the ``baseline`` run's (SAELens's built-in); none without it."""
    if baseline not in runs:
        return {}
    baseline_speed = runs[baseline]["tokens_per_s"]
    return {name: run["tokens_per_s"] / baseline_speed for name, run in runs.items()}


def time_selection(config: SpeedConfig, sae_in: torch.Tensor, repeats: int = 5) -> dict[str, Any]:
    """Median seconds of the fast exact batch top-k and of ``torch.topk`` over all entries.

    Both select the same entries (checked) from the pre-activations of one scaled training
    batch under a freshly initialised ``calibrated_batchtopk`` SAE.
    """
    sae = CalibratedBatchTopKTrainingSAE(
        CalibratedBatchTopKTrainingSAEConfig(
            d_in=sae_in.shape[-1], d_sae=config.d_sae, k=config.k, device=config.device
        )
    )
    with torch.no_grad():
        hidden_pre = sae.process_sae_in(sae_in.to(config.device)) @ sae.W_enc + sae.b_enc
        hidden_pre *= sae.W_dec.norm(dim=-1)
    n_keep = n_selected(config.k, hidden_pre.shape[0])
    seconds: dict[str, list[float]] = {"fast_exact": [], "torch_topk": []}
    for _ in range(repeats):
        for name, select in (
            ("fast_exact", lambda: batch_topk_indices(hidden_pre, config.k)),
            ("torch_topk", lambda: hidden_pre.flatten().topk(n_keep, sorted=False).indices),
        ):
            seconds[name].append(_timed(config.device, select)[1])
    fast = batch_topk_indices(hidden_pre, config.k)
    reference = batch_topk_indices(hidden_pre, config.k, fast=False)
    return {
        **{f"{name}_s": statistics.median(times) for name, times in seconds.items()},
        "same_selection": bool(torch.equal(fast, reference)),
    }


def curve_match(runs: Mapping[str, Mapping[str, Any]], family: Family) -> dict[str, float] | None:
    """How far the fast path's MSE curve is from the dense path's, against the curve's noise.

    ``max_relative_difference``: largest ``|fast - dense| / dense`` over steps.
    ``step_to_step_change``: median ``|mse[t+1] - mse[t]| / mse[t]`` of the dense curve, the
    scale a real difference in training would have to exceed.
    """
    if family.fast not in runs or family.dense not in runs:
        return None
    fast, dense = runs[family.fast]["mse_loss"], runs[family.dense]["mse_loss"]
    changes = [abs(b - a) / a for a, b in itertools.pairwise(dense)]
    return {
        "max_relative_difference": max(
            abs(f - d) / abs(d) for f, d in zip(fast, dense, strict=True)
        ),
        "step_to_step_change": statistics.median(changes) if changes else float("nan"),
    }


def peak_matmul_flops(
    device: str, dtype: torch.dtype = torch.float32, size: int | None = None, repeats: int = 5
) -> float:
    """Best-of-``repeats`` FLOP/s of a square ``dtype`` matmul: the machine's practical peak.

    Measured in the dtype the runs' matmuls use: bfloat16 under autocast has its own peak
    (several times float32's on a GPU's tensor cores). The default size, 2048 on a CPU and
    8192 on CUDA, is large enough to reach it: a GPU finishes a 2048 matmul so fast that launch
    overhead would lower the peak and so inflate every fraction of it.
    """
    size = size or (8192 if device == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up (allocations, kernel selection)
    best = min(_timed(device, lambda: a @ b)[1] for _ in range(repeats))
    return 2 * size**3 / best


def _timed(device: str, call: Callable[[], Result]) -> tuple[Result, float]:
    """``call()`` and its wall-clock seconds, queued device work included."""
    synchronize(device)
    start = time.perf_counter()
    result = call()
    synchronize(device)
    return result, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sae-batchtopk bench-speed`` (and of ``python -m`` on this module)."""
    return run_command("bench-speed", argv, parse_command, _run)


def _run(config: SpeedConfig, command: str) -> str:
    results = run_speed_benchmark(config, command=command)
    return f"{speed_table(results)}\n\nwrote {', '.join(FILES)} to {config.output}"


if __name__ == "__main__":
    sys.exit(main())
