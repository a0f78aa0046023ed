"""What the speed benchmark reports: the per-run table, the loss curves, the section.

Everything here reads the results :mod:`.speed` measured and writes nothing but text and
figures, so a table or plot can change without touching what is timed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from sae_lens_batchtopk.tools.benchmarks.harness import (
    Column,
    OutputFiles,
    markdown_table,
    section_header,
)

FILES = OutputFiles(
    json="speed.json",
    markdown="speed.md",
    plot="speed_loss_curves.png",
    section="BENCHMARKS_speed_section.md",
)


def run_columns(baseline: str) -> tuple[Column, ...]:
    """The per-run table's columns; speed-ups are over ``baseline``, SAELens's built-in."""
    return (
        ("run", "run", "{}"),
        ("path", lambda run: "sparse" if run["fast_path"] else "dense", ""),
        ("tokens/s", "tokens_per_s", "{:,.0f}"),
        (f"speed-up vs {baseline}", "speedup", "{:.2f}x"),
        ("median step (s)", "median_step_s", "{:.3f}"),
        ("peak MB", "peak_memory_mb", "{:,.0f}"),
        ("fraction of peak matmul", "fraction_of_peak", "{:.1%}"),
        ("final MSE", lambda run: f"{run['mse_loss'][-1]:.4f}", ""),
        ("dead at end", "dead_fraction_end", "{:.1%}"),
    )


def speed_table(results: Mapping[str, Any]) -> str:
    """One line per run: throughput, speed-up, step time, memory, fraction of peak, final MSE."""
    return markdown_table(
        [{"run": name, **run} for name, run in results["runs"].items()],
        run_columns(results["baseline"]),
    )


def aux_setting(settings: Mapping[str, Any]) -> str:
    """Which aux losses the timed steps ran: the family's setting, and whether any latent died.

    SAELens and ours count a latent dead once it has been idle for more than the window, so a
    window no shorter than the run declares none and no aux loss runs at all.
    """
    if settings["matryoshka_widths"]:
        rule = (
            "per-level AuxK (`use_matryoshka_aux_loss`)"
            if settings["use_matryoshka_aux_loss"]
            else "AuxK on the whole SAE's residual (SAELens's default, no per-level AuxK)"
        )
    else:
        rule = "AuxK"
    window, steps = settings["dead_window_steps"], settings["warmup_steps"] + settings["steps"]
    if window < steps:
        return f"{rule} active (dead after {window} idle steps)"
    return f"{rule} never runs: no latent can be dead (window {window} steps, run {steps} steps)"


def loss_curves_figure(results: Mapping[str, Any]) -> Figure:
    """Every run's MSE per step: the fast and dense paths of ours should lie on one curve."""
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
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
    settings = results["settings"]
    match = results["curve_match"]
    peak = f"; measured peak float32 matmul {results['peak_matmul_flops'] / 1e9:,.0f} GFLOP/s"
    levels = settings["matryoshka_levels"]
    nesting = f", Matryoshka widths {'/'.join(map(str, levels))}" if levels else ""
    lines = [
        f"## Training-step speed vs SAELens's `{results['baseline']}`, {results['date'][:10]}",
        "",
        *section_header(results, "run_speed_benchmark", machine_note=peak),
        f"- d_in {settings['d_in']}, d_sae {settings['d_sae']}{nesting}, k {settings['k']:g},"
        f" batch {settings['batch_size']} tokens, {settings['steps']} timed steps after"
        f" {settings['warmup_steps']} warm-up steps, same initial weights and batches (real"
        f" SmolLM2 activations, `{settings['hook_name']}`); {aux_setting(settings)}.",
        "",
        speed_table(results),
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
        f"![loss curves]({FILES.plot})",
        "",
    ]
    return "\n".join(lines)


def write_speed_outputs(results: Mapping[str, Any], output: Path) -> None:
    """``speed.json``, ``speed.md``, the ``BENCHMARKS.md`` section and the loss curves."""
    FILES.write(
        output,
        results,
        markdown=speed_table(results) + "\n",
        section=benchmarks_section(results),
        plot=loss_curves_figure(results),
    )
