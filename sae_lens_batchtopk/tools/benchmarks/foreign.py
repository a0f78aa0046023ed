"""``sae-batchtopk bench-import``: a foreign BatchTopK SAE, imported and recalibrated.

Other libraries export BatchTopK SAEs with an uncalibrated threshold (dictionary_learning's EMA of
batch minima, sparsify none at all), so their inference L0 is not the k they were trained for.
This benchmark takes one such checkpoint, imports it with
:func:`~sae_lens_batchtopk.importers.load_foreign_sae` and, on the splits of one of our activation
caches (:mod:`.activation_cache`), measures on the held-out split:

- the imported SAE as it comes (threshold mode with the foreign θ: exactly what the foreign
  library computes at inference),
- its training rule (batch top-k over each batch of ``--batch-size`` tokens), the reference the
  thresholds should reproduce,
- the same weights after calibrating on the calibration split to k with each ``--methods``
  entry (:func:`~sae_lens_batchtopk.evaluation.calibrate_with_report`),

each with inference L0 (mean, percentiles, deviation from k), NMSE and dead fraction, written
as ``import.json``, ``import.md``, ``import_l0_nmse.png`` and a ``BENCHMARKS.md`` section.

The foreign SAE must have been trained on the cache's *train* split, so that the calibration and
held-out splits are tokens it never saw: ``train_dictionary_learning.py`` (beside this file) trains
dictionary_learning's own ``BatchTopKTrainer`` that way. It is never imported here because it
needs the ``dictionary-learning`` package, which this one does not depend on: run it in an
environment of its own, then point this command at the folder it wrote.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from simple_parsing import ArgumentParser, field

from sae_lens_batchtopk.calibration import METHODS, check_token_budget
from sae_lens_batchtopk.evaluation import calibrate_with_report
from sae_lens_batchtopk.importers import ForeignSource, load_foreign_sae
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import CalibratedBatchTopKSAE
from sae_lens_batchtopk.tools.benchmarks.activation_cache import (
    load_activation_cache,
    read_cache_header,
)
from sae_lens_batchtopk.tools.benchmarks.command_line import (
    CONFIG,
    Device,
    check_device,
    command_parser,
    one_or_more,
    require_positive,
    run_command,
)
from sae_lens_batchtopk.tools.benchmarks.harness import (
    L0_PERCENTILES,
    Column,
    OutputFiles,
    machine_info,
    markdown_table,
    section_header,
    utc_now,
)

FILES = OutputFiles(
    json="import.json",
    markdown="import.md",
    plot="import_l0_nmse.png",
    section="BENCHMARKS_import_section.md",
)
# Row labels of the imported SAE before calibration.
FOREIGN_THETA, BATCH_TOPK = "foreign θ (as imported)", "batch top-k (training rule)"


@dataclass(frozen=True)
class ImportConfig:
    """Settings of one import benchmark; each field is a command-line option."""

    # simple_parsing's field() declares the options; RUF009 expects dataclasses' own.
    checkpoint: Path = field(positional=True)  # noqa: RUF009
    """The foreign checkpoint folder (dictionary_learning's trainer_<i>/, or sparsify's
    hookpoint folder)."""
    cache: Path
    """The activation cache file (.safetensors, written by bench or bench-speed) whose train
    split the foreign SAE was trained on: calibrated on its calibration split, measured on its
    held-out split."""
    source: ForeignSource = field(default="dictionary_learning", alias="--from")  # noqa: RUF009
    """The library that wrote the checkpoint."""
    k: float | None = None
    """The L0 to calibrate to (default: the foreign SAE's k)."""
    methods: tuple[str, ...] = one_or_more(*METHODS, metavar="METHOD")
    """Calibration methods to compare, each from the imported weights: paper, l0,
    per_latent."""
    batch_size: int = 4096
    """Tokens per calibration batch and per batch-top-k batch (the foreign training batch)."""
    device: Device = "cpu"
    """Where the SAE encodes."""
    output: Path = Path("import_output")
    """Folder for import.json, import.md, import_l0_nmse.png and
    BENCHMARKS_import_section.md."""


def build_parser() -> ArgumentParser:
    """``sae-batchtopk bench-import``'s options: :class:`ImportConfig`'s fields."""
    return command_parser(
        "sae-batchtopk bench-import",
        "Import a foreign BatchTopK SAE, measure its held-out inference L0 and NMSE with its"
        " own threshold, calibrate it to k on a cached split, and measure again.",
        ImportConfig,
        quick=False,
    )


@dataclass(frozen=True)
class ImportJob:
    """A validated config and what validating it read: the imported SAE and the target L0."""

    config: ImportConfig
    sae: CalibratedBatchTopKSAE
    target_l0: float


def prepare(config: ImportConfig) -> ImportJob:
    """Check every setting, import the checkpoint and read the cache header: no heavy work.

    Raises ``ValueError`` naming the option at fault (the importer's errors name the file and
    field of the checkpoint).
    """
    unknown = sorted(set(config.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    require_positive(config, ("batch_size",))
    check_device(config.device)
    try:
        spec, d_in = read_cache_header(config.cache)
    except ValueError as error:
        raise ValueError(f"--cache: {error}") from None
    sae = load_foreign_sae(config.checkpoint, config.source, device=config.device)
    if sae.cfg.d_in != d_in:
        raise ValueError(
            f"--cache: activations of width {d_in}, but {config.checkpoint} takes d_in"
            f" {sae.cfg.d_in}"
        )
    target = float(config.k if config.k is not None else sae.cfg.k)
    if not 0 < target <= sae.cfg.d_sae:
        raise ValueError(f"--k {target:g} must be in (0, {sae.cfg.d_sae}], the checkpoint's d_sae")
    for method in config.methods:
        try:
            check_token_budget(
                method,
                spec.calibration_tokens,
                target,
                sae.cfg.d_sae,
                field="the cache's calibration_tokens",
            )
        except ValueError as error:
            raise ValueError(f"--methods {method}: {error}") from None
    return ImportJob(config, sae, target)


def run_import_benchmark(job: ImportJob, *, command: str | None = None) -> dict[str, Any]:
    """Measure, calibrate with each method and measure again; write the outputs."""
    config, sae, target = job.config, job.sae, job.target_l0
    cache = load_activation_cache(config.cache)
    heldout = cache.batches("heldout", config.batch_size)
    calibration = cache.batches("calibration", config.batch_size)
    rows: list[dict[str, Any]] = []
    for method in config.methods:
        result, report = calibrate_with_report(
            copy.deepcopy(sae), calibration, heldout, method=method, target_l0=target
        )
        if not rows:  # the uncalibrated SAE measures the same before every method
            theta = float(sae.threshold.median())
            rows.append({"label": FOREIGN_THETA, **report["threshold_before"], "theta": theta})
            rows.append({"label": BATCH_TOPK, **report["batch_topk"]})
        rows.append(
            {
                "label": f"calibrated [{method}]",
                "method": method,
                **report["threshold_after"],
                "theta": result.theta,
                "calibration_l0": result.achieved_l0,
                "calibration_tokens": result.n_tokens,
            }
        )
    results = {
        "settings": {
            **dataclasses.asdict(config),
            **{name: str(getattr(config, name)) for name in ("checkpoint", "cache", "output")},
            "target_l0": target,
            "cache_spec": dataclasses.asdict(cache.spec),
        },
        "foreign": sae.cfg.metadata.imported_from,
        "shape": {"d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k},
        "tokens": {
            "calibration": int(cache.splits["calibration"].shape[0]),
            "heldout": int(cache.splits["heldout"].shape[0]),
        },
        "machine": machine_info(),
        "date": utc_now(),
        "command": command,
        "rows": rows,
    }
    FILES.write(
        Path(config.output),
        results,
        markdown=import_table(results) + "\n",
        section=benchmarks_section(results),
        plot=l0_nmse_figure(results),
    )
    return results


COLUMNS: tuple[Column, ...] = (
    ("SAE", "label", "{}"),
    ("L0 mean", "l0_mean", "{:.2f}"),
    L0_PERCENTILES,
    ("L0 vs k", "l0_deviation", "{:+.1%}"),
    ("NMSE", "nmse", "{:.4f}"),
    ("expl. var.", "explained_variance", "{:.4f}"),
    ("dead", "dead_fraction", "{:.1%}"),
    ("θ (median over latents)", "theta", "{:.4g}"),
    ("L0 on calibration tokens", "calibration_l0", "{:.2f}"),
)


def import_table(results: Mapping[str, Any]) -> str:
    """One line per measured form: as imported, its training rule, each calibration."""
    return markdown_table(results["rows"], COLUMNS)


def l0_nmse_figure(results: Mapping[str, Any]) -> Figure:
    """Held-out inference L0 (against k) and NMSE of each measured form, side by side."""
    rows, target = results["rows"], results["settings"]["target_l0"]
    labels = [row["label"] for row in rows]
    figure = Figure(figsize=(9, 3.5))
    l0_axes, nmse_axes = figure.subplots(1, 2)
    l0_axes.barh(labels, [row["l0_mean"] for row in rows], color="tab:blue")
    l0_axes.axvline(target, color="black", linestyle="--", label=f"k = {target:g}")
    l0_axes.set_xlabel("held-out inference L0 (mean)")
    l0_axes.legend(fontsize=8)
    nmse_axes.barh(labels, [row["nmse"] for row in rows], color="tab:orange")
    nmse_axes.set_xlabel("held-out NMSE")
    nmse_axes.set_yticklabels([])
    for axes in (l0_axes, nmse_axes):
        axes.invert_yaxis()
        axes.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    return figure


def benchmarks_section(results: Mapping[str, Any]) -> str:
    """A ``BENCHMARKS.md`` section: command, machine, date, what was imported, the table."""
    settings, foreign, shape = results["settings"], results["foreign"], results["shape"]
    spec = settings["cache_spec"]
    before = next(row for row in results["rows"] if row["label"] == FOREIGN_THETA)
    trainer = f"{foreign['source']} {foreign.get('trainer_class') or ''}".strip()
    return "\n".join(
        [
            f"## Foreign SAE imported and recalibrated ({settings['source']}),"
            f" {results['date'][:10]}",
            "",
            *section_header(results, "run_import_benchmark"),
            f"- Checkpoint `{settings['checkpoint']}`: {trainer}, d_in {shape['d_in']},"
            f" d_sae {shape['d_sae']}, k"
            f" {shape['k']:g}; threshold as imported: {foreign['threshold_origin']}.",
            f"- Activations: {spec['model_name']} `{spec['hook_name']}`, the cache"
            f" `{Path(settings['cache']).name}` (trained on its {spec['train_tokens']:,}-token"
            f" train split); calibrated to k = {settings['target_l0']:g} on its"
            f" {results['tokens']['calibration']:,} calibration tokens in batches of"
            f" {settings['batch_size']}, measured on its {results['tokens']['heldout']:,}"
            " held-out tokens.",
            f"- As imported, the held-out inference L0 is {before['l0_mean']:.2f} for k ="
            f" {settings['target_l0']:g} ({before['l0_deviation']:+.1%}).",
            "",
            import_table(results),
            "",
            f"![L0 and NMSE]({FILES.plot})",
            "",
        ]
    )


def parse_command(argv: Sequence[str]) -> ImportJob:
    """The validated settings ``argv`` asks for, with the checkpoint imported."""
    return prepare(getattr(build_parser().parse_args(list(argv)), CONFIG))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sae-batchtopk bench-import`` (and of ``python -m`` on this module)."""
    return run_command("bench-import", argv, parse_command, _run)


def _run(job: ImportJob, command: str) -> str:
    results = run_import_benchmark(job, command=command)
    return f"{import_table(results)}\n\nwrote {', '.join(FILES)} to {job.config.output}"


if __name__ == "__main__":
    sys.exit(main())
