"""``sae-batchtopk bench-speed``: training-step throughput, sparse fast path against dense paths.

Trains, from the same initial weights on the same cached SmolLM2 activations, SAELens's built-in
``batchtopk`` (dense), our ``calibrated_batchtopk`` with ``fast_path=False`` (the dense
reference) and with the fast sparse path, each through SAELens's ``SAETrainer.step`` (so
optimizer, gradient clipping and dead-latent bookkeeping are timed too). Reported per run:
tokens/s over the timed steps (after warm-up), the median step time, the speed-up over the
built-in, peak memory (measured in a fresh process by ``quality.probe_peak_memory``), and the
fraction of the machine's peak matmul throughput the step reaches counting only the work it
must do (the dense encoder forward plus the sparse decode/backward). The fast and dense runs
of our architecture are compared step by step: their MSE curves must agree to float rounding,
against a step-to-step change that is orders of magnitude larger. Dead latents are declared
after ``--dead-window-steps`` so that every run's AuxK path is exercised and timed. The
selection alone is timed too: the fast exact batch top-k against ``torch.topk`` over all
``tokens x d_sae`` entries, on the same pre-activations.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import shlex
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch
from transformer_lens import HookedTransformer

from sae_lens_batchtopk.runner import make_runner_config
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import (
    ARCHITECTURE,
    CalibratedBatchTopKTrainingSAE,
    CalibratedBatchTopKTrainingSAEConfig,
)
from sae_lens_batchtopk.selection import batch_topk_indices, n_selected
from sae_lens_batchtopk.tools.benchmarks.activation_cache import CacheSpec
from sae_lens_batchtopk.tools.benchmarks.quality import (
    MEMORY_PROBE_STEPS,
    MODEL_NAME,
    load_model_and_cache,
    machine_info,
    new_sae_and_trainer,
    probe_peak_memory,
    train_statistics,
    write_outputs,
)

# Run name -> (architecture, extra SAE options).
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "batchtopk": ("batchtopk", {}),
    f"{ARCHITECTURE}/dense": (ARCHITECTURE, {"fast_path": False}),
    ARCHITECTURE: (ARCHITECTURE, {"fast_path": True}),
}
BASELINE = "batchtopk"
FAST, DENSE = ARCHITECTURE, f"{ARCHITECTURE}/dense"
JSON_FILE = "speed.json"
MARKDOWN_FILE = "speed.md"
PLOT_FILE = "speed_loss_curves.png"
SECTION_FILE = "BENCHMARKS_speed_section.md"


@dataclass(frozen=True)
class SpeedConfig:
    """Settings of a speed benchmark; defaults are the issue's shape (d_in is the model's).

    Attributes:
        steps: timed training steps per run, after ``warmup_steps`` untimed ones.
        dead_window_steps: latents idle this many steps count as dead for AuxK (built-in:
            ``dead_feature_window``; ours: that many steps' tokens).
    """

    d_sae: int = 16384
    k: float = 32.0
    batch_size: int = 4096
    steps: int = 20
    warmup_steps: int = 2
    dead_window_steps: int = 2
    lr: float = 4e-4
    hook_name: str = "blocks.3.hook_resid_post"
    device: str = "cpu"
    runs: tuple[str, ...] = tuple(RUNS)
    seed: int = 42
    cache_dir: Path | None = None
    output: Path = Path("speed_output")
    model_name: str = MODEL_NAME

    def validate(self) -> None:
        """Reject bad settings before any work, naming the command-line option at fault."""
        unknown = sorted(set(self.runs) - set(RUNS))
        if unknown or not self.runs:
            raise ValueError(f"--runs: unknown {unknown}; choose from {list(RUNS)}")
        for option, value in {
            "--d-sae": self.d_sae,
            "--batch-size": self.batch_size,
            "--steps": self.steps,
            "--dead-window-steps": self.dead_window_steps,
        }.items():
            if value <= 0:
                raise ValueError(f"{option} must be positive, got {value}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"--k {self.k} must be in (0, --d-sae {self.d_sae}]")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine")

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps

    def cache_spec(self) -> CacheSpec:
        """Just enough tokens for every step; the other splits are token-sized placeholders."""
        return CacheSpec(
            model_name=self.model_name,
            hook_name=self.hook_name,
            train_tokens=self.total_steps * self.batch_size,
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


def run_speed_benchmark(
    config: SpeedConfig,
    *,
    model: HookedTransformer | None = None,
    command: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Time every requested run on the same batches, write the outputs, return the results."""
    config.validate()
    _, cache = load_model_and_cache(
        config.cache_spec(), config.device, config.cache_dir, model, show_progress
    )
    train_stats = train_statistics(cache)
    batches = list(
        itertools.islice(
            cache.train_batches(config.batch_size, seed=config.seed), config.total_steps
        )
    )
    runs = {name: time_training_steps(name, config, batches, train_stats) for name in config.runs}
    results = {
        "settings": {
            **dataclasses.asdict(config),
            "cache_dir": str(config.cache_dir) if config.cache_dir else None,
            "output": str(config.output),
            "d_in": cache.d_in,
        },
        "machine": machine_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "peak_matmul_flops": peak_matmul_flops(config.device),
        "selection": time_selection(config, batches[0] * train_stats[0]),
        "runs": runs,
        "curve_match": curve_match(runs),
    }
    for run in runs.values():
        run["fraction_of_peak"] = run["required_flops_per_s"] / results["peak_matmul_flops"]
        if BASELINE in runs:
            run["speedup"] = run["tokens_per_s"] / runs[BASELINE]["tokens_per_s"]
    _write_outputs(results, Path(config.output))
    return results


def time_training_steps(
    name: str,
    config: SpeedConfig,
    batches: Sequence[torch.Tensor],
    train_stats: tuple[float, torch.Tensor],
) -> dict[str, Any]:
    """Train one run for ``config.total_steps`` steps; time each; record its MSE curve."""
    architecture, extra = RUNS[name]
    runner_config = make_runner_config(
        architecture,
        d_in=batches[0].shape[-1],
        d_sae=config.d_sae,
        k=config.k,
        normalize_activations="expected_average_only_in",
        **extra,
        **(
            {"dead_tokens_window": config.dead_window_steps * config.batch_size}
            if architecture == ARCHITECTURE
            else {}
        ),
        training_tokens=config.total_steps * config.batch_size,
        train_batch_size_tokens=config.batch_size,
        lr=config.lr,
        dead_feature_window=config.dead_window_steps,
        device=config.device,
        seed=config.seed,
        log_to_wandb=False,
        verbose=False,
    )
    sae, trainer = new_sae_and_trainer(runner_config, iter(batches), train_stats)
    seconds, mse, selected = [], [], []
    for batch in batches:
        _synchronize(config.device)
        start = time.perf_counter()
        output = trainer.step(batch)
        trainer.n_training_steps += 1
        _synchronize(config.device)
        seconds.append(time.perf_counter() - start)
        mse.append(float(output.losses["mse_loss"].detach()))
        selected.append(float(output.feature_acts.bool().float().sum().to_dense()))
    timed = seconds[config.warmup_steps :]
    d_in = batches[0].shape[-1]
    # Work the step cannot avoid: the dense encoder forward, and per selected entry a
    # decode, its two gradients and the encoder's two gradients (d_in multiply-adds each).
    required = 2 * config.batch_size * d_in * config.d_sae + 10 * statistics.mean(selected) * d_in
    return {
        "architecture": architecture,
        "fast_path": bool(getattr(sae.cfg, "fast_path", False)),
        "tokens_per_s": config.steps * config.batch_size / sum(timed),
        "median_step_s": statistics.median(timed),
        "peak_memory_mb": probe_peak_memory(
            runner_config, batches[:MEMORY_PROBE_STEPS], train_stats
        ),
        "required_flops_per_s": required / statistics.median(timed),
        "mse_loss": mse,
        "dead_fraction_end": float(trainer.dead_neurons.float().mean()),
    }


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
            _synchronize(config.device)
            start = time.perf_counter()
            select()
            _synchronize(config.device)
            seconds[name].append(time.perf_counter() - start)
    fast = batch_topk_indices(hidden_pre, config.k)
    reference = batch_topk_indices(hidden_pre, config.k, fast=False)
    return {
        **{f"{name}_s": statistics.median(times) for name, times in seconds.items()},
        "same_selection": bool(torch.equal(fast, reference)),
    }


def curve_match(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, float] | None:
    """How far the fast path's MSE curve is from the dense path's, against the curve's noise.

    ``max_relative_difference``: largest ``|fast - dense| / dense`` over steps.
    ``step_to_step_change``: median ``|mse[t+1] - mse[t]| / mse[t]`` of the dense curve, the
    scale a real difference in training would have to exceed.
    """
    if FAST not in runs or DENSE not in runs:
        return None
    fast, dense = runs[FAST]["mse_loss"], runs[DENSE]["mse_loss"]
    changes = [abs(b - a) / a for a, b in itertools.pairwise(dense)]
    return {
        "max_relative_difference": max(
            abs(f - d) / abs(d) for f, d in zip(fast, dense, strict=True)
        ),
        "step_to_step_change": statistics.median(changes) if changes else float("nan"),
    }


def peak_matmul_flops(device: str, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` float32 FLOP/s of a square matmul: the machine's practical peak."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b  # warm-up (allocations, kernel selection)
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def markdown_table(results: Mapping[str, Any]) -> str:
    """One line per run: throughput, speed-up, step time, memory, fraction of peak, final MSE."""
    lines = [
        "| run | path | tokens/s | speed-up vs batchtopk | median step (s) | peak MB"
        " | fraction of peak matmul | final MSE | dead at end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in results["runs"].items():
        speedup = f"{run['speedup']:.2f}x" if "speedup" in run else "-"
        lines.append(
            f"| {name} | {'sparse' if run['fast_path'] else 'dense'}"
            f" | {run['tokens_per_s']:,.0f} | {speedup} | {run['median_step_s']:.3f}"
            f" | {run['peak_memory_mb']:,.0f} | {run['fraction_of_peak']:.1%}"
            f" | {run['mse_loss'][-1]:.4f} | {run['dead_fraction_end']:.1%} |"
        )
    return "\n".join(lines)


def loss_curves_figure(results: Mapping[str, Any]) -> plt.Figure:
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, run in results["runs"].items():
        axes.plot(range(1, len(run["mse_loss"]) + 1), run["mse_loss"], "o-", ms=3, label=name)
    axes.set_xlabel("training step")
    axes.set_ylabel("MSE loss (scaled activations)")
    axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def benchmarks_section(results: Mapping[str, Any]) -> str:
    """A ``BENCHMARKS.md`` section: command, machine, date, settings, table, curve match."""
    machine, settings = results["machine"], results["settings"]
    match = results["curve_match"]
    lines = [
        f"## Training-step speed, {results['date'][:10]}",
        "",
        "```",
        results["command"] or "(called from Python: run_speed_benchmark)",
        "```",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, GPU: {machine['gpu'] or 'none'};"
        f" torch {machine['torch']}; device `{settings['device']}`; measured peak float32"
        f" matmul {results['peak_matmul_flops'] / 1e9:,.0f} GFLOP/s.",
        f"- Date (UTC): {results['date']}.",
        f"- d_in {settings['d_in']}, d_sae {settings['d_sae']}, k {settings['k']:g}, batch"
        f" {settings['batch_size']} tokens, {settings['steps']} timed steps after"
        f" {settings['warmup_steps']} warm-up steps, same initial weights and batches (real"
        f" SmolLM2 activations, `{settings['hook_name']}`); AuxK active (dead after"
        f" {settings['dead_window_steps']} idle steps).",
        "",
        markdown_table(results),
        "",
    ]
    if match is not None:
        lines += [
            f"Fast vs dense MSE curve: largest relative difference"
            f" {match['max_relative_difference']:.2e} over all steps; median step-to-step"
            f" change of the curve {match['step_to_step_change']:.2e}.",
            "",
        ]
    selection = results["selection"]
    lines += [
        f"Selection alone (one batch's pre-activations): fast exact batch top-k"
        f" {selection['fast_exact_s'] * 1e3:.1f} ms vs `torch.topk` over all entries"
        f" {selection['torch_topk_s'] * 1e3:.1f} ms; same entries selected:"
        f" {'yes' if selection['same_selection'] else 'NO'}.",
        "",
        f"![loss curves]({PLOT_FILE})",
        "",
    ]
    return "\n".join(lines)


def _write_outputs(results: Mapping[str, Any], output: Path) -> None:
    write_outputs(
        output,
        {JSON_FILE: results},
        {MARKDOWN_FILE: markdown_table(results) + "\n", SECTION_FILE: benchmarks_section(results)},
        {PLOT_FILE: loss_curves_figure(results)},
    )


def build_parser() -> argparse.ArgumentParser:
    defaults = SpeedConfig()
    parser = argparse.ArgumentParser(
        prog="sae-batchtopk bench-speed",
        description="Training-step throughput of calibrated_batchtopk (sparse fast path and dense"
        " reference) against SAELens's built-in batchtopk, on the same cached activations.",
    )
    parser.add_argument("--d-sae", type=int, default=defaults.d_sae)
    parser.add_argument("--k", type=float, default=defaults.k)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="timed steps per run")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--dead-window-steps", type=int, default=defaults.dead_window_steps)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--hook", default=defaults.hook_name)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=defaults.device)
    parser.add_argument("--runs", nargs="+", default=list(defaults.runs), metavar="RUN")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=defaults.output)
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes; explicit options still take precedence"
    )
    return parser


def config_from_argv(argv: Sequence[str]) -> SpeedConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK_SETTINGS)
        args = parser.parse_args(argv)
    return SpeedConfig(
        d_sae=args.d_sae,
        k=args.k,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        dead_window_steps=args.dead_window_steps,
        lr=args.lr,
        hook_name=args.hook,
        device=args.device,
        runs=tuple(args.runs),
        seed=args.seed,
        cache_dir=args.cache_dir,
        output=args.output,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sae-batchtopk bench-speed``."""
    argv = sys.argv[1:] if argv is None else argv
    config = config_from_argv(argv)
    try:
        config.validate()
    except ValueError as error:
        print(f"sae-batchtopk bench-speed: error: {error}", file=sys.stderr)
        return 2
    results = run_speed_benchmark(
        config, command=shlex.join(["sae-batchtopk", "bench-speed", *argv])
    )
    print(markdown_table(results))
    print(f"\nwrote {JSON_FILE}, {MARKDOWN_FILE}, {PLOT_FILE}, {SECTION_FILE} to {config.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
