"""The benchmark harness keeps working: tiny end-to-end runs, cache reuse, input validation.

These are not benchmarks: shapes are tiny so that two full runs (every architecture, every
calibration method, CE/KL with the full SmolLM2) fit in well under a minute on 2 CPU cores.
The model is loaded once per module and passed in, as ``run_benchmark`` allows.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import needs_offline_assets
from transformer_lens import HookedTransformer

from sae_lens_batchtopk import bench
from sae_lens_batchtopk.calibration import METHODS

ROW_FIELDS = {
    "label",
    "architecture",
    "method",
    "k",
    "d_sae",
    "l0_mean",
    "l0_p5",
    "l0_p50",
    "l0_p95",
    "l0_deviation",
    "nmse",
    "explained_variance",
    "ce_loss_score",
    "kl_div_score",
    "dead_fraction",
    "train_tokens_per_s",
    "peak_memory_mb",
}
EXPECTED_LABELS = {
    "topk",
    "batchtopk[ema]",
    "jumprelu",
    *(f"calibrated_batchtopk/auxk[{method}]" for method in METHODS),
}


def tiny_config(tmp_path: Path, **overrides: object) -> bench.BenchConfig:
    settings: dict[str, object] = {
        "k": (4,),
        "d_sae": (64,),
        "train_tokens": 2048,
        "calibration_tokens": 1024,
        "heldout_tokens": 512,
        "eval_sequences": 1,
        "context_size": 32,
        "batch_size": 128,
        "lr": 1e-3,
        "dead_window_tokens": 512,
        "cache_dir": tmp_path / "cache",
        "output": tmp_path / "out",
        "memory_probe": False,  # a fresh process per run; one test below turns it on
    }
    settings.update(overrides)
    return bench.BenchConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def smollm2() -> HookedTransformer:
    from sae_lens_batchtopk.tools.offline import load_smollm2

    return load_smollm2()


@needs_offline_assets
def test_run_writes_every_row_and_reuses_the_cache_and_runs(
    tmp_path: Path, smollm2: HookedTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(tmp_path)
    first = bench.run_benchmark(config, model=smollm2, show_progress=False)

    assert first["cache"]["reused"] is False
    assert {row["label"] for row in first["rows"]} == EXPECTED_LABELS
    for row in first["rows"]:
        assert row.keys() >= ROW_FIELDS, ROW_FIELDS - row.keys()
        assert 0 < row["nmse"] < 2
        assert row["ce_loss_clean"] < row["ce_loss_zero"]
    calibrated = [r for r in first["rows"] if r["architecture"] == "calibrated_batchtopk"]
    assert len({r["train_tokens_per_s"] for r in calibrated}) == 1  # one training run
    for name in (bench.JSON_FILE, bench.MARKDOWN_FILE, bench.PLOT_FILE, bench.SECTION_FILE):
        assert (config.output / name).stat().st_size > 0
    assert json.loads((config.output / bench.JSON_FILE).read_text())["rows"] == first["rows"]
    section = (config.output / bench.SECTION_FILE).read_text()
    assert "Machine:" in section and "| calibrated_batchtopk/auxk[l0] |" in section

    cache_file = Path(first["cache"]["path"])
    written = cache_file.stat().st_mtime_ns
    second = bench.run_benchmark(
        dataclasses.replace(
            config, architectures=("topk",), output=tmp_path / "again", memory_probe=True
        ),
        model=smollm2,
        show_progress=False,
    )
    assert second["rows"][0]["peak_memory_mb"] > 0  # measured in a fresh process
    (run_file,) = (tmp_path / "again" / bench.RUNS_DIR).iterdir()
    assert json.loads(run_file.read_text())["memory_probe"]["peak_memory_mb"] > 0
    assert second["cache"] == {"path": str(cache_file), "reused": True}
    assert cache_file.stat().st_mtime_ns == written
    assert list(cache_file.parent.iterdir()) == [cache_file]  # no leftover temporary files
    # Same seed, same tokens: the topk run is reproduced exactly.
    assert second["rows"][0]["nmse"] == first["rows"][0]["nmse"]

    # Same settings and output: every finished run is reused, nothing retrains.
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr(bench, "_train", no_training)
    resumed = bench.run_benchmark(config, model=smollm2, show_progress=False)
    assert resumed["rows"] == first["rows"]
    assert len(list((config.output / bench.RUNS_DIR).iterdir())) == 4  # one file per run
    with pytest.raises(AssertionError, match="retrained"):
        bench.run_benchmark(
            dataclasses.replace(config, lr=2e-3), model=smollm2, show_progress=False
        )


@needs_offline_assets
def test_feature_choice_and_aux_variants(tmp_path: Path, smollm2: HookedTransformer) -> None:
    config = tiny_config(
        tmp_path,
        architectures=("calibrated_batchtopk", "feature_choice"),
        aux_variants=("none", "auxk+zipf"),
    )
    rows = bench.run_benchmark(config, model=smollm2, show_progress=False)["rows"]
    labels = {row["label"] for row in rows}
    for variant in config.aux_variants:
        assert {f"calibrated_batchtopk/{variant}[{m}]" for m in METHODS} <= labels
        assert {f"feature_choice/{variant}[{m}]" for m in ("l0", "per_latent")} <= labels
        assert f"feature_choice/{variant}[paper]" not in labels  # refused for Feature Choice
    for row in rows:
        if row["method"] in ("l0", "per_latent"):  # calibrated L0 is exact on its own tokens
            assert row["calibration_l0"] == pytest.approx(4, rel=0.02)


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"architectures": ("topk", "relu")}, "--architectures"),
        ({"k": (128,)}, "--k"),
        ({"k": (2.5,)}, "--k"),
        ({"calibration_tokens": 64}, "--calibration-tokens"),
        ({"train_tokens": 100}, "--train-tokens"),
        ({"heldout_tokens": 0}, "--heldout-tokens"),
        ({"aux_variants": ("auxk+nope",)}, "--aux-variants"),
    ],
)
def test_bad_input_fails_before_any_work(
    tmp_path: Path, overrides: dict[str, object], option: str
) -> None:
    config = tiny_config(tmp_path, **overrides)
    with pytest.raises(ValueError, match=option):
        bench.run_benchmark(config)  # no model passed: loading it would be "work"
    assert not (tmp_path / "cache").exists()


def test_main_reports_bad_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["--k", "300", "--d-sae", "256", "--output", str(tmp_path / "out")]
    assert bench.main(argv) == 2
    assert "--k" in capsys.readouterr().err


def test_quick_sets_tiny_defaults_that_explicit_options_override() -> None:
    config = bench.config_from_args(bench.parse_args(["--quick", "--epochs", "1"]))
    assert config.d_sae == (256,) and config.train_tokens == bench.QUICK_SETTINGS["train_tokens"]
    assert config.epochs == 1
    config.validate()


@needs_offline_assets
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, device="cuda", architectures=("batchtopk",), memory_probe=True)
    results = bench.run_benchmark(config, show_progress=False)
    assert results["machine"]["gpu"]
    assert results["rows"][0]["peak_memory_mb"] > 0
