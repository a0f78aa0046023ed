"""The speed benchmark reports what it measures; its inputs are checked before any work.

Not a benchmark: the figures it prints here mean nothing. What is checked is how they are
derived: throughput and speed-ups from the timed steps (warm-up excluded), the fast path's MSE
curve against the dense reference's, a selection check that does fail on a wrong selection,
and outputs that hold the results.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import needs_offline_assets
from transformer_lens import HookedTransformer

from sae_lens_batchtopk.tools.benchmarks import speed, speed_report
from sae_lens_batchtopk.tools.benchmarks.speed import BASELINE, DENSE, FAST, SpeedConfig
from sae_lens_batchtopk.tools.cli import main as cli_main

# Seconds every (fake) timed training step of a run takes; the warm-up step takes WARMUP_SECONDS.
STEP_SECONDS = {BASELINE: 0.1, DENSE: 0.2, FAST: 0.04}
WARMUP_SECONDS = 10.0


@pytest.fixture(scope="module")
def smollm2() -> HookedTransformer:
    from sae_lens_batchtopk.tools.offline import load_smollm2

    return load_smollm2()


def random_batches(config: SpeedConfig, d_in: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(config.batch_size, d_in, generator=generator) + 1.0
        for _ in range(config.total_steps)
    ]


def test_throughput_and_speed_ups_come_from_the_timed_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each run's steps take a known time: tokens/s, median and speed-up follow from them."""
    config = SpeedConfig(d_sae=64, k=4.0, batch_size=32, steps=3, warmup_steps=1)
    seconds: Iterator[float] = iter(())

    def fake_timed(device: str, call: Callable[[], object]) -> tuple[object, float]:
        return call(), next(seconds)

    monkeypatch.setattr(speed, "_timed", fake_timed)
    monkeypatch.setattr(speed, "probe_peak_memory", lambda *args: 0.0)  # a process per run
    batches = random_batches(config)
    train_stats = (1.0, batches[0].mean(0))
    runs = {}
    for name, step in STEP_SECONDS.items():
        seconds = iter([WARMUP_SECONDS] + [step] * config.steps)
        runs[name] = speed.time_training_steps(name, config, batches, train_stats)
        assert next(seconds, None) is None  # every step, and only the steps, was timed

    for name, step in STEP_SECONDS.items():
        # The warm-up step counts in neither figure.
        assert runs[name]["tokens_per_s"] == pytest.approx(config.batch_size / step)
        assert runs[name]["median_step_s"] == step
    assert speed.speed_ups(runs) == pytest.approx({BASELINE: 1.0, DENSE: 0.5, FAST: 2.5})
    assert speed.speed_ups({FAST: runs[FAST]}) == {}  # no baseline, no speed-up

    # Same weights, same batches: the sparse path trains exactly like the dense reference...
    assert runs[FAST]["fast_path"] and not runs[DENSE]["fast_path"]
    assert runs[FAST]["mse_loss"] == pytest.approx(runs[DENSE]["mse_loss"], rel=1e-5)
    match = speed.curve_match(runs)
    assert match is not None and match["max_relative_difference"] < 1e-5
    # ... while training moves the loss far more than that, so a difference would show.
    assert match["step_to_step_change"] > 1e-3


def test_selection_check_fails_on_a_different_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    config = SpeedConfig(d_sae=64, k=4.0)
    sae_in = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    assert speed.time_selection(config, sae_in, repeats=1)["same_selection"] is True

    exact = speed.batch_topk_indices

    def fast_path_drops_an_entry(
        hidden_pre: torch.Tensor, k: float, *, fast: bool = True
    ) -> torch.Tensor:
        chosen = exact(hidden_pre, k, fast=fast)
        return chosen[1:] if fast else chosen

    monkeypatch.setattr(speed, "batch_topk_indices", fast_path_drops_an_entry)
    assert speed.time_selection(config, sae_in, repeats=1)["same_selection"] is False


@needs_offline_assets
def test_quick_speed_run(tmp_path: Path, smollm2: HookedTransformer) -> None:
    config = SpeedConfig(
        d_sae=256,
        k=4.0,
        batch_size=128,
        steps=3,
        warmup_steps=1,
        cache_dir=tmp_path / "cache",
        output=tmp_path / "out",
    )
    results = speed.run_speed_benchmark(config, model=smollm2, show_progress=False)

    runs = results["runs"]
    assert list(runs) == list(speed.RUNS)
    baseline = runs[BASELINE]["tokens_per_s"]
    for run in runs.values():
        assert len(run["mse_loss"]) == config.total_steps
        assert run["speedup"] == pytest.approx(run["tokens_per_s"] / baseline)
        peak_fraction = run["required_flops_per_s"] / results["peak_matmul_flops"]
        assert run["fraction_of_peak"] == pytest.approx(peak_fraction)
    fast, dense = runs[FAST]["mse_loss"], runs[DENSE]["mse_loss"]
    assert fast == pytest.approx(dense, rel=1e-4)
    assert results["curve_match"] == speed.curve_match(runs)
    assert results["selection"]["same_selection"] is True

    for name in speed_report.FILES:
        assert (config.output / name).stat().st_size > 0
    written = json.loads((config.output / speed_report.FILES.json).read_text())
    assert (written["runs"], written["curve_match"]) == (runs, results["curve_match"])
    section = (config.output / speed_report.FILES.section).read_text()
    assert "| calibrated_batchtopk | sparse |" in section and "| batchtopk | dense |" in section


def test_quick_sets_tiny_defaults_that_explicit_options_override() -> None:
    config = speed.parse_command(["--quick", "--steps", "3", "--hook", "blocks.1.hook_resid_post"])
    assert (config.d_sae, config.batch_size, config.steps) == (512, 256, 3)
    assert config.hook_name == "blocks.1.hook_resid_post"  # --hook, as before: hook_name's alias


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--runs", "nope"], "--runs"),
        (["--steps", "0"], "--steps"),
        (["--k", "0"], "--k"),
        (["--warmup-steps", "-1"], "--warmup-steps"),
    ],
)
def test_bad_options_fail_before_work(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["bench-speed", *argv]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"sae-batchtopk bench-speed: error: {option}")
