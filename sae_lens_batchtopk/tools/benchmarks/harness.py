"""What every benchmark here shares, so that their numbers mean the same thing.

Both benchmarks train through SAELens's own ``SAETrainer`` on cached activations
(:mod:`.activation_cache`), set up every SAE the same way (:func:`new_sae_and_trainer`), measure
peak memory in a fresh process (:func:`probe_peak_memory`), record the machine, and write their
JSON, Markdown and PNG outputs atomically; the quality benchmark also scores SAEs spliced into
the model (:func:`model_preservation_scores`). One implementation of each keeps two benchmarks
from drifting apart.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from matplotlib.figure import Figure
from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import SAE, TrainingSAE, TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer
from transformer_lens import HookedTransformer

from sae_lens_batchtopk.atomic import write_json, write_text
from sae_lens_batchtopk.cpu_memory import RETAINED, cpu_allocator_state, retain_freed_cpu_memory
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import CalibratedBatchTopKTrainingSAE
from sae_lens_batchtopk.tools.benchmarks.activation_cache import (
    ActivationCache,
    CacheSpec,
    load_or_create_activation_cache,
)
from sae_lens_batchtopk.tools.offline import default_cache_dir, load_smollm2
from sae_lens_batchtopk.tools.report import save_figure
from sae_lens_batchtopk.trainer import use_fused_adam

MODEL_NAME = "SmolLM2-135M-Instruct"
# Training steps the peak-memory probe runs: memory is steady after the first optimizer step.
MEMORY_PROBE_STEPS = 4
# The RSS sampler's period: short enough to catch the peak of a training step.
_RSS_SAMPLE_SECONDS = 0.005


def load_model_and_cache(
    spec: CacheSpec,
    device: str,
    cache_dir: Path | None,
    model: HookedTransformer | None,
    show_progress: bool,
) -> tuple[HookedTransformer, ActivationCache]:
    """The model (SmolLM2 unless one is given) and the cached activations of ``spec``.

    The cache is generated on first use under ``cache_dir`` (default:
    ``default_cache_dir() / "activations"``) and reused by every later run with the same spec.
    """
    if model is None:
        model = load_smollm2(device=device)
    directory = Path(cache_dir) if cache_dir else default_cache_dir() / "activations"
    cache = load_or_create_activation_cache(spec, model, directory, show_progress=show_progress)
    return model, cache


def new_sae_and_trainer(
    runner_config: LanguageModelSAERunnerConfig[Any],
    batches: Iterator[torch.Tensor],
    statistics: tuple[float, torch.Tensor] | None,
) -> tuple[TrainingSAE[Any], SAETrainer[Any, Any]]:
    """A fresh SAE and its ``SAETrainer``, set up identically for every compared run.

    Same seed for the initial weights. Our architectures' Adam runs fused, as our runner's
    trainer runs it (:func:`~sae_lens_batchtopk.trainer.use_fused_adam`, the same update).
    With ``statistics`` (the bench preset), the decoder bias starts at the train-split mean
    (see :func:`train_statistics`) and the activation scaling factor is fixed in advance, so
    the trainer does not estimate it from (and thereby consume) batches of ``batches``.
    Without (``None``, the sae-lens-defaults preset), both are left to SAELens and the
    architecture, as a user of the library gets them.
    """
    torch.manual_seed(runner_config.seed)
    sae_class = SAE_TRAINING_CLASS_REGISTRY[runner_config.sae.architecture()][0]
    sae = sae_class(runner_config.sae).to(runner_config.device)
    trainer = SAETrainer(cfg=runner_config.to_sae_trainer_config(), sae=sae, data_provider=batches)
    if isinstance(sae, CalibratedBatchTopKTrainingSAE):
        use_fused_adam(trainer.optimizer)  # as our runner trains it; SAELens's SAEs keep theirs
    if statistics is not None:
        scaling_factor, train_mean = statistics
        with torch.no_grad():
            sae.b_dec.copy_(train_mean * scaling_factor)
        trainer.activation_scaler.scaling_factor = scaling_factor
    return sae, trainer


def train_statistics(cache: ActivationCache) -> tuple[float, torch.Tensor]:
    """SAELens's ``expected_average_only_in`` factor (sqrt(d_in) / mean norm) and the mean.

    Computed once from the train split and handed to every run, instead of letting each
    ``SAETrainer`` estimate the factor from batches it would draw (and so skip) from its data
    stream. The mean initialises every SAE's decoder bias: residual streams have a large mean,
    and a zero-initialised bias that Adam moves by about ``lr`` per step would dominate the
    error of short runs, hiding the differences between architectures.
    """
    # float32 copies of one chunk at a time
    return activation_statistics(cache.splits["train"].split(65_536))


def activation_statistics(chunks: Iterable[torch.Tensor]) -> tuple[float, torch.Tensor]:
    """:func:`train_statistics` of activations given as ``(tokens, d_in)`` chunks.

    Accumulated in float64 chunk by chunk, so a large split is never copied whole.
    """
    norm_sum, total, n_tokens = 0.0, torch.zeros((), dtype=torch.double), 0
    for chunk in chunks:
        chunk = chunk.double()
        norm_sum += float(chunk.norm(dim=-1).sum())
        total = total + chunk.sum(0)
        n_tokens += chunk.shape[0]
    d_in = total.shape[-1]
    return math.sqrt(d_in) * n_tokens / norm_sum, (total / n_tokens).float()


@torch.no_grad()
def model_preservation_scores(
    model: HookedTransformer,
    tokens: torch.Tensor,
    hook_name: str,
    saes: Mapping[str, SAE[Any]],
    *,
    special_ids: Sequence[int],
    sequences_per_forward: int = 4,
) -> dict[str, dict[str, float]]:
    """CE-loss and KL scores of each SAE spliced into ``hook_name``, on fixed sequences.

    ``CE score = (CE_zero - CE_sae) / (CE_zero - CE_clean)`` and ``KL score = 1 - KL_sae /
    KL_zero`` with ``KL = KL(clean || patched)`` per position, as in SAELens's ``run_evals``.
    Splicing (and zero-ablation) touches only non-special positions: special tokens were
    excluded from training, and the BOS residual is an outlier no SAE here reconstructs. The
    clean and zero-ablated passes run once per chunk and are shared by every SAE.
    """
    special = torch.tensor(list(special_ids))
    sums = {name: {"ce": 0.0, "kl": 0.0} for name in [*saes, "zero"]}
    clean_ce, n_positions = 0.0, 0
    for chunk in tokens.split(sequences_per_forward):
        chunk = chunk.to(model.cfg.device)
        splice_mask = ~torch.isin(chunk.cpu(), special).to(chunk.device)
        clean = model(chunk).log_softmax(-1)
        clean_ce += _next_token_nll(clean, chunk)
        n_positions += chunk[:, 1:].numel()
        for name in sums:
            sae = saes.get(name)

            def splice(
                activation: torch.Tensor,
                hook: Any,
                sae: SAE[Any] | None = sae,
                mask: torch.Tensor = splice_mask,
            ) -> torch.Tensor:
                patched = activation.clone()
                if sae is None:
                    patched[mask] = 0
                else:
                    inputs = activation[mask].to(sae.device, sae.dtype)
                    patched[mask] = sae.decode(sae.encode(inputs)).to(activation.dtype)
                return patched

            logits = model.run_with_hooks(chunk, fwd_hooks=[(hook_name, splice)])
            patched = logits.log_softmax(-1)
            sums[name]["ce"] += _next_token_nll(patched, chunk)
            kl = (clean.exp() * (clean - patched)).sum(-1)[:, :-1]
            sums[name]["kl"] += float(kl.sum())
    ce_clean = clean_ce / n_positions
    ce_zero = sums["zero"]["ce"] / n_positions
    kl_zero = sums["zero"]["kl"] / n_positions
    scores = {}
    for name in saes:
        ce = sums[name]["ce"] / n_positions
        kl = sums[name]["kl"] / n_positions
        scores[name] = {
            "ce_loss_clean": ce_clean,
            "ce_loss_zero": ce_zero,
            "ce_loss_sae": ce,
            "ce_loss_score": (ce_zero - ce) / (ce_zero - ce_clean),
            "kl_div_zero": kl_zero,
            "kl_div_sae": kl,
            "kl_div_score": 1 - kl / kl_zero,
        }
    return scores


def _next_token_nll(log_probs: torch.Tensor, tokens: torch.Tensor) -> float:
    """Summed negative log-likelihood of each next token (positions 0..n-2 predict 1..n-1)."""
    return -float(log_probs[:, :-1].gather(-1, tokens[:, 1:, None]).sum())


@contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float]]:
    """Peak memory above the starting level while the block runs, in MB.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: resident set size sampled by
    a background thread; ``ru_maxrss`` is a process-lifetime maximum, so a run that peaks below
    an earlier run would read 0, and tracemalloc does not see torch's allocations.
    """
    result = {"mb": float("nan")}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["mb"] = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        return
    baseline = _rss_bytes()
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(_RSS_SAMPLE_SECONDS):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result["mb"] = (max(peak[0], _rss_bytes()) - baseline) / 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryProbe(NamedTuple):
    """What :func:`probe_training` measured: peak memory, and which path the steps took."""

    peak_mb: float
    sparse_path: bool


def probe_peak_memory(
    runner_config: LanguageModelSAERunnerConfig[Any],
    batches: Sequence[torch.Tensor],
    statistics: tuple[float, torch.Tensor] | None,
) -> float:
    """Peak memory of training (weights, gradients, optimizer state, temporaries), in MB.

    :func:`probe_training`'s peak; see there.
    """
    return probe_training(runner_config, batches, statistics).peak_mb


def probe_training(
    runner_config: LanguageModelSAERunnerConfig[Any],
    batches: Sequence[torch.Tensor],
    statistics: tuple[float, torch.Tensor] | None,
    *,
    dead_set: torch.Tensor | None = None,
) -> MemoryProbe:
    """Peak memory of training in MB, and whether every step took the sparse path.

    Runs ``len(batches)`` training steps of a fresh SAE in a fresh (spawned) process. Measured
    inside a long-lived process the figure is wrong for every run but the first: memory an
    earlier run freed stays resident in the allocator and is reused without raising the RSS
    (a fast run after a dense one read 44 MB instead of 173 MB). Memory per step is steady
    after the first optimizer step, so a few steps give the run's peak. The path is recorded
    because a sparse run that fell back to the dense path would report the dense path's memory.
    ``dead_set``: the latents dead at every step (:func:`force_dead`), as in the timed steps.
    The child runs with this process's CPU allocator setting
    (:func:`~sae_lens_batchtopk.cpu_memory.retain_freed_cpu_memory`).
    """
    context = torch.multiprocessing.get_context("spawn")
    retain_memory = cpu_allocator_state() == RETAINED
    with context.Pool(1) as pool:
        peak_mb, sparse = pool.apply(
            _probe_in_child,
            (runner_config, torch.stack(list(batches)), statistics, dead_set, retain_memory),
        )
    return MemoryProbe(float(peak_mb), bool(sparse))


def _probe_in_child(
    runner_config: LanguageModelSAERunnerConfig[Any],
    batches: torch.Tensor,
    statistics: tuple[float, torch.Tensor] | None,
    dead_set: torch.Tensor | None,
    retain_memory: bool,
) -> tuple[float, bool]:
    if retain_memory:  # the allocator the timed steps ran with
        retain_freed_cpu_memory()
    batches = batches.clone()  # private pages, resident before the baseline
    gc.collect()
    sparse = True
    with peak_memory(runner_config.device) as peak:
        _, trainer = new_sae_and_trainer(runner_config, iter(batches), statistics)
        for batch in batches:
            if dead_set is not None:
                force_dead(trainer, dead_set)
            sparse &= took_sparse_path(trainer.step(batch))
            trainer.n_training_steps += 1
    return peak["mb"], sparse


def force_dead(trainer: SAETrainer[Any, Any], dead_set: torch.Tensor) -> None:
    """Make the trainer's ``dead_neurons`` exactly ``dead_set`` for the next step.

    Both SAELens's SAEs and ours (without an explicit ``dead_tokens_window``) take the
    trainer's mask, which counts steps since each latent fired.
    """
    counters = trainer.n_forward_passes_since_fired
    counters.zero_()
    counters[dead_set.to(counters.device)] = trainer.cfg.dead_feature_window + 1


def took_sparse_path(output: TrainStepOutput) -> bool:
    """Whether a training step ran the sparse path, read from what the step returned.

    Our sparse pass returns its feature activations as a sparse COO tensor; every dense pass
    (SAELens's built-ins and our dense reference, including a fallback the sparse path
    refused) returns a dense one. Evidence of what ran, where a config flag is only a request.
    """
    return output.feature_acts.is_sparse


def machine_info() -> dict[str, Any]:
    """CPU model, core count and GPU (if any): what a benchmark number means depends on them."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cpu_allocator": cpu_allocator_state(),
    }


def synchronize(device: str) -> None:
    """Wait for queued CUDA work, so that a clock read after it measures the work itself."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def utc_now() -> str:
    """The date every output records, in UTC to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# A table column: (title, row key or a function of the row, format of the value); a missing
# value prints "-".
Column = tuple[str, str | Callable[[Mapping[str, Any]], str], str]


L0_PERCENTILES: Column = (
    "L0 p5/p50/p95",
    lambda row: f"{row['l0_p5']:.0f}/{row['l0_p50']:.0f}/{row['l0_p95']:.0f}",
    "",
)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table, one line per row."""
    lines = [
        "| " + " | ".join(title for title, _, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = [
            key(row)
            if callable(key)
            else "-"
            if row.get(key) is None
            else template.format(row[key])
            for _, key, template in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section_header(results: Mapping[str, Any], caller: str, machine_note: str = "") -> list[str]:
    """The lines every ``BENCHMARKS.md`` section opens with: command, machine and date.

    ``caller`` names the Python function in place of a command line when there was none;
    ``machine_note`` ends the machine line (the speed benchmark's measured peak matmul).
    """
    machine = results["machine"]
    return [
        "```",
        results["command"] or f"(called from Python: {caller})",
        "```",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, GPU: {machine['gpu'] or 'none'};"
        f" torch {machine['torch']}; device `{results['settings']['device']}`{machine_note}.",
        # Results written before the allocator was recorded have no entry.
        f"- CPU allocator: {machine.get('cpu_allocator', 'not recorded')}.",
        f"- Date (UTC): {results['date']}.",
    ]


class OutputFiles(NamedTuple):
    """The files a benchmark writes into its output folder, one of each kind."""

    json: str
    markdown: str
    plot: str
    section: str

    def write(
        self,
        output: Path,
        results: Mapping[str, Any],
        *,
        markdown: str,
        section: str,
        plot: Figure,
    ) -> None:
        """The results as JSON, the Markdown table, the ``BENCHMARKS.md`` section and the plot.

        Each is written atomically, so an interrupted benchmark leaves the previous file (or
        none), never a truncated one.
        """
        output.mkdir(parents=True, exist_ok=True)
        write_json(output / self.json, results)
        write_text(output / self.markdown, markdown)
        write_text(output / self.section, section)
        save_figure(output / self.plot, plot)
