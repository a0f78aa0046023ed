"""The speed benchmark keeps working on tiny shapes; its inputs are checked before any work.

Not a benchmark: the figures it prints here mean nothing. What is checked is that every run
trains through SAELens's trainer, the fast path's MSE curve equals the dense reference's, and
the outputs are written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import needs_offline_assets
from transformer_lens import HookedTransformer

from sae_lens_batchtopk.tools.benchmarks import speed as speed_bench
from sae_lens_batchtopk.tools.benchmarks.speed_report import FILES
from sae_lens_batchtopk.tools.cli import main as cli_main


@pytest.fixture(scope="module")
def smollm2() -> HookedTransformer:
    from sae_lens_batchtopk.tools.offline import load_smollm2

    return load_smollm2()


@needs_offline_assets
def test_quick_speed_run(tmp_path: Path, smollm2: HookedTransformer) -> None:
    config = speed_bench.SpeedConfig(
        d_sae=256,
        k=4.0,
        batch_size=128,
        steps=3,
        warmup_steps=1,
        cache_dir=tmp_path / "cache",
        output=tmp_path / "out",
    )
    results = speed_bench.run_speed_benchmark(config, model=smollm2, show_progress=False)

    runs = results["runs"]
    assert list(runs) == list(speed_bench.RUNS)
    assert runs["calibrated_batchtopk"]["fast_path"] is True
    assert runs["calibrated_batchtopk/dense"]["fast_path"] is False
    assert runs["batchtopk"]["speedup"] == 1.0
    for run in runs.values():
        assert len(run["mse_loss"]) == 4
        assert run["tokens_per_s"] > 0 and run["fraction_of_peak"] > 0
    assert results["curve_match"]["max_relative_difference"] < 1e-4
    assert results["selection"]["same_selection"] is True
    for name in FILES:
        assert (config.output / name).stat().st_size > 0
    assert json.loads((config.output / FILES.json).read_text())["runs"] == runs
    assert "| calibrated_batchtopk | sparse |" in (config.output / FILES.section).read_text()


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
    assert option in capsys.readouterr().err
