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


PATH_COLUMNS: tuple[Column, ...] = (
    ("run", "run", "{}"),
    ("path", lambda run: "sparse" if run["fast_path"] else "dense", ""),
)
MEMORY_COLUMNS: tuple[Column, ...] = (*PATH_COLUMNS, ("peak MB", "peak_memory_mb", "{:,.0f}"))


def run_columns(baseline: str) -> tuple[Column, ...]:
    """The per-run table's columns; speed-ups are over ``baseline``, SAELens's built-in.

    ``× encoder matmul`` is the median step over the median encoder matmul timed beside it in
    the same run; both fractions of peak are of the same measured peak matmul.
    """
    return (
        *PATH_COLUMNS,
        ("tokens/s", "tokens_per_s", "{:,.0f}"),
        (f"speed-up vs {baseline}", "speedup", "{:.2f}x"),
        ("median step (s)", "median_step_s", "{:.3f}"),
        ("× encoder matmul", "x_encoder_matmul", "{:.2f}x"),
        ("peak MB", "peak_memory_mb", "{:,.0f}"),
        ("step: fraction of peak matmul", "fraction_of_peak", "{:.1%}"),
        ("encoder matmul: fraction of peak", "encoder_matmul_fraction_of_peak", "{:.1%}"),
        ("final MSE", lambda run: f"{run['mse_loss'][-1]:.4f}", ""),
        ("dead (last step)", "dead_fraction_end", "{:.1%}"),
    )


def speed_table(results: Mapping[str, Any]) -> str:
    """One line per run: throughput, speed-up, step time and its multiple of the encoder
    matmul, memory, fractions of peak, final MSE; only run, path and memory when memory_only."""
    memory_only = results["settings"]["memory_only"]
    return markdown_table(
        [{"run": name, **run} for name, run in results["runs"].items()],
        MEMORY_COLUMNS if memory_only else run_columns(results["baseline"]),
    )


def aux_setting(settings: Mapping[str, Any]) -> str:
    """Which aux losses the steps ran: the family's setting, and whether any latent died.

    SAELens and ours count a latent dead once it has been idle for more than the window, so a
    window no shorter than the run declares none and no aux loss runs at all. A memory_only
    run's steps are its memory probe's.
    """
    if settings["matryoshka_widths"]:
        rule = (
            "per-level AuxK (`use_matryoshka_aux_loss`)"
            if settings["use_matryoshka_aux_loss"]
            else "AuxK on the whole SAE's residual (SAELens's default, no per-level AuxK)"
        )
    else:
        rule = "AuxK"
    if settings.get("dead_fraction") is not None:
        return f"{rule} active ({settings['dead_fraction']:.0%} of the latents dead at every step)"
    window = settings["dead_window_steps"]
    steps = (
        settings["memory_probe_steps"]
        if settings["memory_only"]
        else settings["warmup_steps"] + settings["steps"]
    )
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


def precision(settings: Mapping[str, Any]) -> str:
    """Whether the steps ran under autocast: the step's dtype decides what its peak is."""
    if settings["autocast"]:
        return "autocast on (SAELens's `autocast=True`: bfloat16 matmuls, float32 weights)"
    return "autocast off (float32)"


def benchmarks_section(results: Mapping[str, Any]) -> str:
    """A ``BENCHMARKS.md`` section: command, machine, date, settings, table, curve match.

    A memory_only section has the settings and the memory table alone.
    """
    settings = results["settings"]
    levels = settings["matryoshka_levels"]
    nesting = f", Matryoshka widths {'/'.join(map(str, levels))}" if levels else ""
    shape = (
        f"- d_in {settings['d_in']}, d_sae {settings['d_sae']}{nesting}, k {settings['k']:g},"
        f" batch {settings['batch_size']} tokens"
    )
    batches = f"same initial weights and batches ({results['activations']})"
    if settings["memory_only"]:
        return "\n".join(
            [
                f"## Peak training memory vs SAELens's `{results['baseline']}`,"
                f" {results['date'][:10]}",
                "",
                *section_header(results, "run_speed_benchmark"),
                f"{shape}, {settings['memory_probe_steps']} training steps per run in a fresh"
                f" process, {batches}; {precision(settings)}; {aux_setting(settings)}.",
                "",
                speed_table(results),
                "",
                f"![peak memory]({FILES.plot})",
                "",
            ]
        )
    match = results["curve_match"]
    peak = (
        f"; measured peak {results['peak_matmul_dtype']} matmul"
        f" {results['peak_matmul_flops'] / 1e9:,.0f} GFLOP/s"
    )
    lines = [
        f"## Training-step speed vs SAELens's `{results['baseline']}`, {results['date'][:10]}",
        "",
        *section_header(results, "run_speed_benchmark", machine_note=peak),
        f"{shape}, {settings['steps']} timed steps after {settings['warmup_steps']} warm-up"
        f" steps, {batches}; {precision(settings)}; {aux_setting(settings)}.",
        "- `× encoder matmul`: the median step over the median encoder matmul"
        " (`sae_in @ W_enc + b_enc` alone, no gradient, in the step's dtype), timed after each"
        " timed step of the same run.",
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


def memory_figure(results: Mapping[str, Any]) -> Figure:
    """A memory_only run's figure: each run's peak training memory (it trains no curve)."""
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    names = list(results["runs"])
    axes.barh(names, [results["runs"][name]["peak_memory_mb"] for name in names])
    axes.set_xlabel("peak training memory (MB)")
    axes.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    return figure


def write_speed_outputs(results: Mapping[str, Any], output: Path) -> None:
    """``speed.json``, ``speed.md``, the ``BENCHMARKS.md`` section and the figure: the loss
    curves, or a memory_only run's peak memory per run."""
    memory_only = results["settings"]["memory_only"]
    FILES.write(
        output,
        results,
        markdown=speed_table(results) + "\n",
        section=benchmarks_section(results),
        plot=memory_figure(results) if memory_only else loss_curves_figure(results),
    )
