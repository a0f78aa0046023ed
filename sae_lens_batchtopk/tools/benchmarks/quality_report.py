"""What the quality benchmark reports: tables, the equal-L0 verdict, the plot, the section.

Everything here reads the results :mod:`.quality` produced (plain rows of numbers) and writes
nothing but text and figures, so a table or plot can change without touching what is measured.
Under the ``sae-lens-defaults`` preset the results also hold ``cells``: one comparison per
(hook, d_sae, k, training budget) of ours against the built-in ``batchtopk`` at equal L0.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import ARCHITECTURE
from sae_lens_batchtopk.tools.benchmarks.harness import (
    L0_PERCENTILES,
    Column,
    OutputFiles,
    markdown_table,
    section_header,
)

FILES = OutputFiles(
    json="bench.json", markdown="bench.md", plot="nmse_vs_l0.png", section="BENCHMARKS_section.md"
)
# Held-out L0s within this relative distance count as equal for the verdict. Calibrating to a
# target on the calibration split lands about half a percent off it on held-out tokens.
EQUAL_L0_TOLERANCE = 0.01


def equal_l0_method(builtin: str) -> str:
    """The method label of ours calibrated to the held-out L0 of SAELens's ``builtin``."""
    return f"l0@{builtin}"


# Label of ours calibrated to the built-in batchtopk's held-out L0.
EQUAL_L0_METHOD = equal_l0_method("batchtopk")
# Ours is also calibrated this far below the built-in's L0: on held-out tokens a calibrated L0
# lands up to ~3 % off its target, and when ours lands above the built-in's L0 by more than
# EQUAL_L0_TOLERANCE, only a comparison at a lower L0 can still decide the verdict.
LOWER_L0_MARGIN = 0.03


def lower_l0_method(builtin: str) -> str:
    """The method label of ours calibrated :data:`LOWER_L0_MARGIN` below ``builtin``'s L0."""
    return f"{equal_l0_method(builtin)}-{LOWER_L0_MARGIN:.0%}"


LOWER_L0_METHOD = lower_l0_method("batchtopk")


def _tokens_cell(row: Mapping[str, Any]) -> str:
    return f"{row['training_tokens']:,}" + (" (snapshot)" if row.get("snapshot") else "")


def _level_nmse(row: Mapping[str, Any]) -> str:
    levels = row.get("level_nmse")
    return "-" if levels is None else "/".join(f"{nmse:.4f}" for nmse in levels)


HOOK_COLUMN: Column = ("hook", "hook", "`{}`")
LEVEL_COLUMN: Column = ("NMSE per level", _level_nmse, "")
# The bench preset's per-SAE table.
TABLE_COLUMNS: tuple[Column, ...] = (
    ("run", "label", "{}"),
    ("k", "k", "{:g}"),
    ("d_sae", "d_sae", "{}"),
    ("L0 mean", "l0_mean", "{:.2f}"),
    L0_PERCENTILES,
    ("L0 vs k", "l0_deviation", "{:+.1%}"),
    ("NMSE", "nmse", "{:.4f}"),
    ("expl. var.", "explained_variance", "{:.4f}"),
    ("CE score", "ce_loss_score", "{:.4f}"),
    ("KL score", "kl_div_score", "{:.4f}"),
    ("dead", "dead_fraction", "{:.1%}"),
    ("train tok/s", "train_tokens_per_s", "{:,.0f}"),
    ("peak MB", "peak_memory_mb", "{:,.0f}"),
)
# The sae-lens-defaults preset's per-SAE table: budgets, and SAELens's own dead count too.
PRESET_TABLE_COLUMNS: tuple[Column, ...] = (
    ("run", "label", "{}"),
    HOOK_COLUMN,
    ("k", "k", "{:g}"),
    ("d_sae", "d_sae", "{}"),
    ("training tokens", _tokens_cell, ""),
    ("L0 mean", "l0_mean", "{:.2f}"),
    L0_PERCENTILES,
    ("L0 vs k", "l0_deviation", "{:+.1%}"),
    ("NMSE", "nmse", "{:.4f}"),
    ("CE score", "ce_loss_score", "{:.4f}"),
    ("KL score", "kl_div_score", "{:.4f}"),
    ("dead (held-out)", "dead_fraction", "{:.1%}"),
    ("dead (SAELens mask)", "train_dead_fraction", "{:.1%}"),
    ("train tok/s", "train_tokens_per_s", "{:,.0f}"),
    ("peak MB", "peak_memory_mb", "{:,.0f}"),
)


def _ours_builtin_topk(title: str, name: str, template: str) -> Column:
    """One column showing a cell's ``name`` figure for ours / built-in / topk."""

    def cell(row: Mapping[str, Any]) -> str:
        values = row[name]
        return "/".join(
            "-" if values.get(run) is None else template.format(values[run])
            for run in ("ours", "builtin", "topk")
        )

    return (f"{title} ours/bt/topk", cell, "")


CELL_COLUMNS: tuple[Column, ...] = (
    HOOK_COLUMN,
    ("k", "k", "{:g}"),
    ("d_sae", "d_sae", "{}"),
    ("training tokens", _tokens_cell, ""),
    ("ours L0 @k", "ours_l0", "{:.2f}"),
    ("ours NMSE @k", "ours_nmse", "{:.4f}"),
    ("ours L0 @bt", "ours_equal_l0", "{:.2f}"),
    ("ours NMSE @bt L0", "ours_equal_l0_nmse", "{:.4f}"),
    ("bt[ema] L0", "builtin_l0", "{:.2f}"),
    ("bt[ema] NMSE", "builtin_nmse", "{:.4f}"),
    ("bt[l0] NMSE @k", "builtin_calibrated_nmse", "{:.4f}"),
    ("topk NMSE", "topk_nmse", "{:.4f}"),
    _ours_builtin_topk("CE score", "ce_loss_score", "{:.4f}"),
    _ours_builtin_topk("KL score", "kl_div_score", "{:.4f}"),
    _ours_builtin_topk("dead", "dead_fraction", "{:.1%}"),
    ("ours ≤ bt NMSE at equal L0", "verdict", "{}"),
)


def quality_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[Column] = TABLE_COLUMNS
) -> str:
    """One line per row; runs that share a training run share tok/s and memory.

    Rows from several hooks (a combined benchmark) get a hook column if ``columns`` lacks one;
    rows evaluated per Matryoshka level get their per-level NMSE after the NMSE column.
    """
    if HOOK_COLUMN not in columns and len({row.get("hook") for row in rows}) > 1:
        columns = (HOOK_COLUMN, *columns)
    if any("level_nmse" in row for row in rows):
        after = next(i for i, column in enumerate(columns) if column[1] == "nmse") + 1
        columns = (*columns[:after], LEVEL_COLUMN, *columns[after:])
    return markdown_table(rows, columns)


def equal_l0_verdict(
    ours_l0: float,
    ours_nmse: float,
    builtin_l0: float,
    builtin_nmse: float,
    tolerance: float = EQUAL_L0_TOLERANCE,
) -> str:
    """Is ours at or below the built-in's NMSE at equal held-out L0? ``yes``/``no``/``unclear``.

    Ours is calibrated to the built-in's L0 on the calibration split, so on held-out tokens the
    two L0s differ slightly. Within ``tolerance`` (relative) they count as equal and NMSE
    decides. Beyond it, NMSE falls as L0 grows, so the answer is still certain when ours has
    the lower L0 and no higher NMSE (``yes``) or the higher L0 and a higher NMSE (``no``);
    otherwise the L0 gap could explain the NMSE difference and the answer is ``unclear``.
    """
    gap = (ours_l0 - builtin_l0) / builtin_l0
    if abs(gap) <= tolerance:
        return "yes" if ours_nmse <= builtin_nmse else "no"
    if gap < 0 and ours_nmse <= builtin_nmse:
        return "yes"
    if gap > 0 and ours_nmse > builtin_nmse:
        return "no"
    return "unclear"


def _lower_l0_verdict(lower: Mapping[str, Any], builtin: Mapping[str, Any]) -> str | None:
    """The verdict from ours calibrated below the built-in's L0, when that one is certain.

    Ours at its equal-L0 target can land above the built-in's held-out L0 by more than the
    tolerance; then a lower NMSE proves nothing (:func:`equal_l0_verdict`: ``unclear``). Ours
    calibrated :data:`LOWER_L0_MARGIN` lower, on the same calibration split (held-out tokens
    choose nothing), lands within the tolerance or below: a lower NMSE there is a ``yes`` at
    equal L0, since NMSE only falls as ours' L0 rises to the built-in's.
    """
    verdict = equal_l0_verdict(lower["l0_mean"], lower["nmse"], builtin["l0_mean"], builtin["nmse"])
    if verdict == "unclear":
        return None
    return f"{verdict} (ours at L0 {lower['l0_mean']:.2f}: NMSE {lower['nmse']:.4f})"


def comparison_cells(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (hook, d_sae, k, training budget) of the sae-lens-defaults preset.

    Ours is ``calibrated_batchtopk[l0]`` (to k), ``[l0@batchtopk]`` (to the built-in's L0)
    and ``[l0@batchtopk-3%]`` (below it), the built-in is ``batchtopk[ema]`` (``[l0]``: its
    weights calibrated by us to k), TopK is ``topk``. ``verdict`` (:func:`equal_l0_verdict`,
    then :func:`_lower_l0_verdict` where that is ``unclear``) is ``None`` when a run is
    missing, and ``n/a: <why>`` when ours could not be calibrated to the built-in's L0.
    """
    groups: dict[tuple[Any, ...], dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        key = (row.get("hook"), row["d_sae"], row["k"], row["training_tokens"])
        groups.setdefault(key, {})[row["label"]] = row
    cells = []
    for (hook, d_sae, k, tokens), by_label in groups.items():
        ours = by_label.get(f"{ARCHITECTURE}[l0]", {})
        equal = by_label.get(f"{ARCHITECTURE}[{EQUAL_L0_METHOD}]", {})
        lower = by_label.get(f"{ARCHITECTURE}[{LOWER_L0_METHOD}]", {})
        builtin = by_label.get("batchtopk[ema]", {})
        compared = {"ours": ours, "builtin": builtin, "topk": by_label.get("topk", {})}
        verdict = None
        if equal and builtin:
            verdict = equal_l0_verdict(
                equal["l0_mean"], equal["nmse"], builtin["l0_mean"], builtin["nmse"]
            )
            if verdict == "unclear" and lower:
                verdict = _lower_l0_verdict(lower, builtin) or verdict
        elif ours.get("equal_l0_error"):
            verdict = "n/a: " + ours["equal_l0_error"]
        cells.append(
            {
                "hook": hook,
                "d_sae": d_sae,
                "k": k,
                "training_tokens": tokens,
                "snapshot": next(iter(by_label.values())).get("snapshot"),
                "ours_l0": ours.get("l0_mean"),
                "ours_nmse": ours.get("nmse"),
                "ours_equal_l0": equal.get("l0_mean"),
                "ours_equal_l0_nmse": equal.get("nmse"),
                "ours_lower_l0": lower.get("l0_mean"),
                "ours_lower_l0_nmse": lower.get("nmse"),
                "builtin_l0": builtin.get("l0_mean"),
                "builtin_nmse": builtin.get("nmse"),
                "builtin_calibrated_nmse": by_label.get("batchtopk[l0]", {}).get("nmse"),
                "topk_nmse": compared["topk"].get("nmse"),
                **{
                    name: {run: row.get(name) for run, row in compared.items()}
                    for name in ("ce_loss_score", "kl_div_score", "dead_fraction")
                },
                "verdict": verdict,
            }
        )
    return cells


def nmse_vs_l0_figure(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """NMSE against held-out inference L0, one line per run and d_sae across the k values.

    Log-log, as in the papers: the runs worth comparing differ by a few percent in NMSE and
    would be flattened on a linear axis by a failed run an order of magnitude above them. The
    L0 axis is ticked at the target budgets ``k`` in plain numbers, which stays readable when
    every run sits near a single k. One colour per line (a table can hold more than ten runs)
    and one marker per architecture, with the legend outside the axes so it hides no point.
    Hooks and (under the sae-lens-defaults preset) training budgets get lines of their own.
    """
    figure = Figure(figsize=(9, 4.5))
    axes = figure.subplots()
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        budget = row["training_tokens"] if row.get("preset") else None
        groups.setdefault((row["label"], row["d_sae"], row.get("hook"), budget), []).append(row)
    colours = matplotlib.colormaps["tab20"].resampled(max(len(groups), 2))
    markers = dict(zip(sorted({row["architecture"] for row in rows}), itertools.cycle("osD^vP*X")))
    varies = [len({key[part] for key in groups}) > 1 for part in range(4)]
    for index, ((label, d_sae, hook, budget), group) in enumerate(groups.items()):
        group = sorted(group, key=lambda row: row["l0_mean"])
        details = [
            text
            for text, shown in zip(
                (f"d_sae {d_sae}", f"{hook}", f"{budget:,} tok" if budget else ""),
                varies[1:],
                strict=True,
            )
            if shown
        ]
        axes.plot(
            [row["l0_mean"] for row in group],
            [row["nmse"] for row in group],
            linestyle="-",
            marker=markers[group[0]["architecture"]],
            color=colours(index),
            label=f"{label} ({', '.join(details)})" if details else label,
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


def _hooks_text(settings: Mapping[str, Any]) -> str:
    """``hook `a` `` for one benchmark, ``hooks `a`, `b` `` for combined ones."""
    hooks = settings["hook_name"]
    hooks = [hooks] if isinstance(hooks, str) else hooks
    return ("hook " if len(hooks) == 1 else "hooks ") + ", ".join(f"`{hook}`" for hook in hooks)


def benchmarks_section(results: Mapping[str, Any]) -> str:
    """A ``BENCHMARKS.md`` section: command, machine, date, settings, table(s), plot."""
    settings = results["settings"]
    header = section_header(results, "run_benchmark")
    evaluation = (
        f" seed {settings['seed']}; {settings['calibration_tokens']:,} calibration tokens,"
        f" {settings['heldout_tokens']:,} held-out tokens,"
        f" CE/KL on {settings['eval_sequences']} sequences of {settings['context_size']}."
    )
    if "cells" in results:  # the sae-lens-defaults preset
        return _defaults_section(results, header, evaluation)
    return "\n".join(
        [
            f"## BatchTopK benchmark, {results['date'][:10]}",
            "",
            *header,
            f"- Model {settings['model_name']}, {_hooks_text(settings)};"
            f" {settings['total_training_tokens']:,} training tokens per run"
            f" ({settings['epochs']} epoch(s) of {settings['train_tokens']:,}),"
            f" batch {settings['batch_size']}, Adam lr {settings['lr']:g} (cosine to lr/10),"
            + evaluation,
            *_levels_note(settings),
            "",
            quality_table(results["rows"]),
            "",
            f"![NMSE vs L0]({FILES.plot})",
            "",
        ]
    )


def _levels_note(settings: Mapping[str, Any]) -> list[str]:
    """What the per-level NMSE column means, with the widths, when the run has one."""
    levels = settings.get("matryoshka_levels")
    if not levels:
        return []
    widths = "; ".join(f"d_sae {d_sae}: {'/'.join(map(str, w))}" for d_sae, w in levels.items())
    return [
        f"- Matryoshka level widths ({widths}), for `matryoshka_batchtopk` and"
        " `calibrated_matryoshka_batchtopk` alike, each with SAELens's default aux setting (AuxK"
        ' on the whole SAE\'s residual). "NMSE per level": the reconstruction from the codes of'
        " the first w latents only, for each width w, for every row (the plain architectures as"
        " the reference without nesting). `matryoshka_batchtopk[ema]` is SAELens's JumpReLU"
        " export, `[l0]` the same weights calibrated by us to k; `[l0@matryoshka_batchtopk]` is"
        " ours calibrated to the `[ema]` row's held-out L0 (equal L0)."
    ]


def _defaults_section(results: Mapping[str, Any], header: list[str], evaluation: str) -> str:
    settings = results["settings"]
    trainer = settings["sae_lens_trainer_defaults"]
    snapshots = settings["snapshot_training_tokens"]
    failing = [
        cell
        for cell in results["cells"]
        if cell["verdict"] is not None and not cell["verdict"].startswith("yes")
    ]
    lines = [
        f"## SAELens defaults: calibrated_batchtopk vs batchtopk vs topk, {results['date'][:10]}",
        "",
        *header,
        f"- Model {settings['model_name']}, {_hooks_text(settings)};"
        f" {settings['total_training_tokens']:,} training tokens per run"
        f" ({settings['epochs']} epoch(s) of {settings['train_tokens']:,})," + evaluation,
        f"- Every run has SAELens {settings['sae_lens_version']}'s own defaults, read from its"
        f" dataclasses: lr {trainer['lr']:g} ({trainer['lr_scheduler_name']}, warm-up"
        f" {trainer['lr_warm_up_steps']}, decay {trainer['lr_decay_steps']}), Adam betas"
        f" ({trainer['adam_beta1']}, {trainer['adam_beta2']}), batch"
        f" {trainer['train_batch_size_tokens']} tokens, dead_feature_window"
        f" {trainer['dead_feature_window']} steps, and each architecture's own SAE-config"
        " defaults (recorded per run in `runs/*.json`); only architecture, k, d_in, d_sae,"
        " device, seed and training tokens are set. No decoder-bias override, no fixed"
        " activation scaling.",
    ]
    if snapshots:
        lines.append(
            f"- Rows at {', '.join(f'{tokens:,}' for tokens in snapshots)} tokens are"
            " snapshots: copies of the same runs taken during training. Under the constant"
            " learning rate they equal separate runs of that many tokens on the same batches"
            " (bitwise on CPU, `tests/test_bench.py`)."
        )
    lines += [
        "- Ours is calibrated (`l0`) to k, and to the held-out L0 of the built-in"
        " `batchtopk[ema]` (SAELens's JumpReLU export) in the same cell; the last column"
        f" compares those two at equal L0 (within {EQUAL_L0_TOLERANCE:.0%}; `unclear` when the"
        " L0 gap could explain the NMSE gap). Where ours lands above the built-in's L0 by more"
        f" than that, ours calibrated {LOWER_L0_MARGIN:.0%} lower on the same split decides when"
        " it can (its L0 and NMSE are then in the verdict). `bt[l0]`: the built-in's weights"
        " calibrated by us to k.",
        "",
        quality_table(results["cells"], CELL_COLUMNS),
        "",
        "Cells where ours is not at or below the built-in's NMSE at equal L0: "
        + (
            "; ".join(
                f"`{cell['hook']}` k={cell['k']:g} at {cell['training_tokens']:,} tokens"
                f" ({cell['verdict']})"
                for cell in failing
            )
            or "none"
        )
        + ".",
        "",
        quality_table(results["rows"], PRESET_TABLE_COLUMNS),
        "",
        f"![NMSE vs L0]({FILES.plot})",
        "",
    ]
    return "\n".join(lines)


def results_markdown(results: Mapping[str, Any]) -> str:
    """``bench.md``: the per-SAE table, after the cell summary under the defaults preset."""
    if "cells" not in results:
        return quality_table(results["rows"]) + "\n"
    cells = quality_table(results["cells"], CELL_COLUMNS)
    return cells + "\n\n" + quality_table(results["rows"], PRESET_TABLE_COLUMNS) + "\n"


def write_quality_outputs(results: Mapping[str, Any], output: Path) -> None:
    """``bench.json``, ``bench.md``, the ``BENCHMARKS.md`` section and the plot."""
    FILES.write(
        output,
        results,
        markdown=results_markdown(results),
        section=benchmarks_section(results),
        plot=nmse_vs_l0_figure(results["rows"]),
    )
