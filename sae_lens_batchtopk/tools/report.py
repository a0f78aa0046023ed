"""Evaluation report of a trained SAE: ``metrics.json``, ``report.md`` and PNG plots.

A run is only useful if one can see, in the output folder itself, whether the SAE preserves
the model (SAELens's CE-loss and KL scores, run with the full model), whether the inference L0
is the ``k`` that was asked for, how many latents died, and how training went. Every file is
written to a temporary name and renamed into place, so a crash never leaves a half-written
report next to a valid SAE.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.saes.sae import SAE
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore
from transformer_lens.hook_points import HookedRootModule

from sae_lens_batchtopk.atomic import write_atomically, write_json, write_text
from sae_lens_batchtopk.calibration import CalibrationResult
from sae_lens_batchtopk.evaluation import heldout_pass
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import CalibratedBatchTopKSAE

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
CURVES_FILE = "training_curves.json"
L0_PLOT = "l0_per_token.png"
DENSITY_PLOT = "latent_density.png"
CURVES_PLOT = "training_curves.png"

# Curves plotted when present, with their axis labels.
_CURVE_PANELS = {
    "mse_loss": "MSE loss",
    "auxk_loss": "AuxK loss",
    "l0": "L0 (batch top-k)",
    "running_theta": "running θ",
    "dead_latent_fraction": "dead latent fraction",
}


def save_figure(path: Path, figure: Figure) -> None:
    """A figure as PNG, atomically, then closed (pyplot keeps every open figure in memory)."""
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)


def evaluate(
    sae: SAE[Any],
    model: HookedRootModule,
    eval_store: ActivationsStore,
    heldout_batches: Sequence[torch.Tensor],
    *,
    ce_eval_batches: int,
    exclude_special_tokens: bool | list[int],
) -> tuple[dict[str, Any], list[float], dict[str, torch.Tensor]]:
    """Metrics, per-latent firing densities and per-token L0 of ``sae``.

    ``run_evals`` splices the SAE into the full model (CE loss, KL) on ``ce_eval_batches``
    batches of the eval store and measures sparsity and variance on as many tokens as
    ``heldout_batches`` hold; ``heldout_pass`` then compares threshold mode with the
    training rule (batch top-k) on exactly the held-out batches.
    """
    calibrated = CalibratedBatchTopKSAE.from_sae(sae)
    k = calibrated.cfg.k
    n_heldout = sum(batch.shape[0] for batch in heldout_batches)
    tokens_per_eval_batch = eval_store.store_batch_size_prompts * eval_store.context_size
    eval_config = EvalConfig(
        n_eval_reconstruction_batches=ce_eval_batches,
        compute_kl=True,
        compute_ce_loss=True,
        n_eval_sparsity_variance_batches=max(math.ceil(n_heldout / tokens_per_eval_batch), 1),
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
    )
    sae_lens_metrics, feature_metrics = run_evals(
        sae,
        eval_store,
        model,
        ActivationScaler(),
        eval_config,
        exclude_special_tokens=exclude_special_tokens,
        verbose=True,
    )
    density = [float(value) for value in feature_metrics["feature_density"]]
    threshold_pass = heldout_pass(calibrated, heldout_batches)
    batch_topk_pass = heldout_pass(calibrated.batch_topk_view(), heldout_batches)
    threshold_stats = threshold_pass.stats(target_l0=k)
    batch_topk_stats = batch_topk_pass.stats(target_l0=k)
    metrics = {
        "architecture": sae.cfg.architecture(),
        "k": k,
        "d_sae": sae.cfg.d_sae,
        "hook_name": sae.cfg.metadata.hook_name,
        "model_name": sae.cfg.metadata.model_name,
        "headline": {
            "ce_loss_score": sae_lens_metrics["model_performance_preservation"]["ce_loss_score"],
            "kl_div_score": sae_lens_metrics["model_behavior_preservation"]["kl_div_score"],
            "explained_variance": sae_lens_metrics["reconstruction_quality"]["explained_variance"],
            "mse": sae_lens_metrics["reconstruction_quality"]["mse"],
            "l0": sae_lens_metrics["sparsity"]["l0"],
            "nmse_heldout": threshold_stats["nmse"],
            "inference_l0_heldout": threshold_stats["l0_mean"],
            "inference_l0_deviation_from_k": threshold_stats["l0_deviation"],
            "dead_latent_fraction": sum(d == 0 for d in density) / len(density),
        },
        "sae_lens_run_evals": sae_lens_metrics,
        "heldout": {"threshold": threshold_stats, "batch_topk": batch_topk_stats},
        "calibration": sae.cfg.metadata.get("calibration"),
        "training_throughput": sae.cfg.metadata.get("training_throughput"),
    }
    per_token = {
        "threshold": threshold_pass.l0_per_token,
        "batch_topk": batch_topk_pass.l0_per_token,
    }
    return metrics, density, per_token


def write_report(
    output_dir: Path,
    sae: SAE[Any],
    model: HookedRootModule,
    eval_store: ActivationsStore,
    heldout_batches: Sequence[torch.Tensor],
    *,
    ce_eval_batches: int,
    exclude_special_tokens: bool | list[int],
    training_curves: list[dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Evaluate ``sae`` and write metrics, plots and the Markdown report into ``output_dir``.

    ``training_curves`` (the training run's records) are plotted when given. Returns the
    metrics written to ``metrics.json``.
    """
    metrics, density, per_token = evaluate(
        sae,
        model,
        eval_store,
        heldout_batches,
        ce_eval_batches=ce_eval_batches,
        exclude_special_tokens=exclude_special_tokens,
    )
    save_figure(output_dir / L0_PLOT, l0_histogram(per_token, metrics["k"]))
    save_figure(output_dir / DENSITY_PLOT, density_histogram(density))
    plots = [L0_PLOT, DENSITY_PLOT]
    if training_curves:
        save_figure(output_dir / CURVES_PLOT, training_curve_figure(training_curves))
        plots.append(CURVES_PLOT)
    write_json(output_dir / METRICS_FILE, metrics)
    markdown = report_markdown(metrics, sae, plots)
    write_text(output_dir / REPORT_FILE, markdown)
    return metrics


def l0_histogram(per_token: dict[str, torch.Tensor], k: float) -> Figure:
    """Per-token L0 in threshold mode and under batch top-k: BatchTopK's adaptive allocation."""
    figure, axes = plt.subplots(figsize=(6.4, 3.6))
    top = int(max(int(values.max()) for values in per_token.values())) + 1
    bins = torch.linspace(0, top, min(top, 80) + 1).tolist()
    for mode, values in per_token.items():
        axes.hist(
            values.numpy(),
            bins=bins,
            alpha=0.55,
            label=f"{mode} (mean {values.float().mean():.1f})",
        )
    axes.axvline(k, color="black", linestyle="--", label=f"k = {k:g}")
    axes.set_xlabel("active latents per token (L0)")
    axes.set_ylabel("held-out tokens")
    axes.set_title("Per-token L0 (adaptive allocation)")
    axes.legend()
    figure.tight_layout()
    return figure


def density_histogram(density: Sequence[float]) -> Figure:
    """log10 firing frequency of each latent; latents that never fired are counted apart."""
    values = torch.tensor(density, dtype=torch.float64)
    alive = values[values > 0]
    figure, axes = plt.subplots(figsize=(6.4, 3.6))
    if alive.numel():
        axes.hist(alive.log10().numpy(), bins=60)
    axes.set_xlabel("log10 firing frequency")
    axes.set_ylabel("latents")
    axes.set_title(f"Latent density ({values.numel() - alive.numel()} of {values.numel()} dead)")
    figure.tight_layout()
    return figure


def training_curve_figure(records: list[dict[str, float]]) -> Figure:
    """One panel per recorded quantity, against training tokens."""
    panels = [name for name in _CURVE_PANELS if any(name in record for record in records)]
    figure = plt.figure(figsize=(6.4, 2.0 * len(panels)))
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for axis, name in zip(axes, panels, strict=True):
        points = [(record["tokens"], record[name]) for record in records if name in record]
        axis.plot([tokens for tokens, _ in points], [value for _, value in points])
        axis.set_ylabel(_CURVE_PANELS[name])
        if name == "mse_loss":
            axis.set_yscale("log")
    axes[-1].set_xlabel("training tokens")
    figure.tight_layout()
    return figure


def _calibration_section(sae: SAE[Any]) -> list[str]:
    calibration = sae.cfg.metadata.get("calibration")
    if not calibration:
        return ["No calibration recorded: inference uses the running θ of training."]
    summary = {
        f.name: calibration[f.name] for f in fields(CalibrationResult) if f.name != "thresholds"
    }
    result = CalibrationResult(**summary, thresholds=sae.threshold.detach().cpu())
    if "heldout" not in calibration:
        return [f"Calibration: {json.dumps(summary)}"]
    return [format_calibration_report(result, calibration["heldout"])]


def report_markdown(metrics: dict[str, Any], sae: SAE[Any], plots: Sequence[str]) -> str:
    """The report: headline numbers, both encode modes on held-out tokens, calibration, plots."""
    headline = metrics["headline"]
    lines = [
        f"# BatchTopK SAE report: {metrics['model_name']} `{metrics['hook_name']}`",
        "",
        f"Architecture `{metrics['architecture']}`, d_sae {metrics['d_sae']}, k {metrics['k']:g}.",
        "",
        *_throughput_lines(metrics.get("training_throughput")),
        "| metric | value |",
        "|---|---|",
        *(f"| {name} | {value:.4g} |" for name, value in headline.items()),
        "",
        "## Held-out tokens: threshold mode vs batch top-k",
        "",
        "| mode | L0 mean | L0 p5 | L0 p50 | L0 p95 | L0 vs k | NMSE | explained variance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, stats in metrics["heldout"].items():
        lines.append(
            f"| {mode} | {stats['l0_mean']:.2f} | {stats['l0_p5']:.0f} | {stats['l0_p50']:.0f} | "
            f"{stats['l0_p95']:.0f} | {stats['l0_deviation']:+.1%} | {stats['nmse']:.4f} | "
            f"{stats['explained_variance']:.4f} |"
        )
    lines += ["", "## Calibration", "", *_calibration_section(sae), "", "## Plots", ""]
    lines += [f"![{Path(plot).stem}]({plot})" for plot in plots]
    return "\n".join(lines) + "\n"


REPORT_ROWS = {
    "threshold_before": "threshold mode, before calibration",
    "batch_topk": "batch top-k mode (training rule)",
    "threshold_after": "threshold mode, after calibration",
}


def format_calibration_report(
    result: CalibrationResult, report: dict[str, dict[str, float]]
) -> str:
    """Markdown: the calibration numbers, then held-out L0 percentiles and NMSE per mode."""
    lines = [
        f"Calibration: method `{result.method}`, target L0 {result.target_l0}, "
        f"{result.n_tokens:,} tokens, θ (median) {result.theta:.6g}, "
        f"L0 on calibration tokens {result.achieved_l0:.3f}, "
        f"latents never firing {result.n_never_fired}.",
        "",
        "| held-out tokens | L0 mean | L0 p5 | L0 p50 | L0 p95 | L0 vs target | NMSE |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label in REPORT_ROWS.items():
        row = report[key]
        lines.append(
            f"| {label} | {row['l0_mean']:.2f} | {row['l0_p5']:.0f} | {row['l0_p50']:.0f} | "
            f"{row['l0_p95']:.0f} | {row.get('l0_deviation', float('nan')):+.1%} | "
            f"{row['nmse']:.4f} |"
        )
    return "\n".join(lines)


def _throughput_lines(throughput: dict[str, float] | None) -> list[str]:
    """How long training took (model forward passes included), on how many processes."""
    if not throughput:
        return []
    line = (
        f"Training: {throughput['tokens']:,.0f} tokens in {throughput['seconds']:.1f} s"
        f" ({throughput['tokens_per_s']:,.0f} tokens/s"
    )
    if "processes" in throughput:
        share = throughput["communication_seconds"] / max(throughput["seconds"], 1e-9)
        line += f" on {throughput['processes']:.0f} processes, {share:.1%} of it in collectives"
    return [line + ").", ""]
