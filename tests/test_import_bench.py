"""``bench-import`` measures a foreign SAE as imported and after calibration; bad input fails first.

Runs on the committed dictionary_learning BatchTopK fixture (d_in 12, d_sae 48, k 4, trained by
dictionary_learning's own trainer) with a tiny activation cache built in memory around the
fixture's held-out reference inputs and written in the cache format: no model, seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

from sae_lens_batchtopk.atomic import write_safetensors
from sae_lens_batchtopk.evaluation import reconstruction_stats
from sae_lens_batchtopk.importers import load_dictionary_learning
from sae_lens_batchtopk.tools.benchmarks import foreign
from sae_lens_batchtopk.tools.benchmarks.activation_cache import SPLITS, CacheSpec
from sae_lens_batchtopk.tools.benchmarks.foreign import BATCH_TOPK, FOREIGN_THETA, ImportConfig
from sae_lens_batchtopk.tools.cli import main as cli_main

SCRIPT = Path(foreign.__file__).with_name("train_dictionary_learning.py")

FIXTURE = Path(__file__).parent / "data" / "foreign" / "dictionary_learning_batchtopk"
SIZES = {"heldout": 512, "calibration": 1024, "train": 256}
# The fixture's held-out L0 with its own EMA θ is far from its k = 4: what bench-import shows.
FIXTURE_K = 4


def write_cache(path: Path, sizes: dict[str, int] = SIZES, d_in: int = 12) -> Path:
    """Activations around the fixture's reference inputs, as a cache file of ``sizes`` tokens."""
    x = load_file(FIXTURE / "reference.safetensors")["x"][:, :d_in]
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for split in SPLITS:
        rows = x[torch.randint(0, x.shape[0], (sizes[split],), generator=generator)]
        noise = 0.2 * x.std(0) * torch.randn(rows.shape, generator=generator)
        tensors[split] = (rows + noise).half()
    tensors["eval_tokens"] = torch.zeros(1, 16, dtype=torch.long)
    counts = (sizes["train"], sizes["calibration"], sizes["heldout"])
    spec = CacheSpec("tiny", "blocks.0.hook_resid_post", *counts, 1, 16, 0)
    write_safetensors(path, tensors, {"spec": json.dumps(asdict(spec), sort_keys=True)})
    return path


def import_config(tmp_path: Path, **overrides: object) -> ImportConfig:
    settings: dict[str, object] = {
        "checkpoint": FIXTURE,
        "cache": write_cache(tmp_path / "cache.safetensors"),
        "batch_size": 64,
        "output": tmp_path / "out",
    }
    settings.update(overrides)
    return ImportConfig(**settings)  # type: ignore[arg-type]


def test_rows_show_the_foreign_threshold_then_each_calibration(tmp_path: Path) -> None:
    config = import_config(tmp_path)
    results = foreign.run_import_benchmark(foreign.prepare(config))

    rows = {row["label"]: row for row in results["rows"]}
    assert list(rows) == [
        FOREIGN_THETA,
        BATCH_TOPK,
        *(f"calibrated [{method}]" for method in config.methods),
    ]
    # As imported: exactly what loading the checkpoint and encoding with its θ gives.
    heldout = load_file(config.cache)["heldout"].float().split(config.batch_size)
    imported = load_dictionary_learning(FIXTURE)
    expected = reconstruction_stats(imported, heldout, target_l0=FIXTURE_K)
    assert {name: rows[FOREIGN_THETA][name] for name in expected} == expected
    assert rows[FOREIGN_THETA]["theta"] == pytest.approx(float(imported.threshold[0]))
    assert abs(rows[FOREIGN_THETA]["l0_deviation"]) > 0.3  # the EMA θ misses k
    assert rows[BATCH_TOPK]["l0_mean"] == pytest.approx(FIXTURE_K)
    for method in config.methods:
        after = rows[f"calibrated [{method}]"]
        assert after["calibration_l0"] == pytest.approx(FIXTURE_K, rel=0.02)
        assert after["l0_mean"] == pytest.approx(FIXTURE_K, rel=0.1)  # held-out tokens
        assert after["nmse"] < rows[FOREIGN_THETA]["nmse"]
    assert results["foreign"]["threshold_origin"] == "dictionary_learning_ema"

    for name in foreign.FILES:
        assert (config.output / name).stat().st_size > 0
    assert json.loads((config.output / foreign.FILES.json).read_text())["rows"] == results["rows"]
    section = (config.output / foreign.FILES.section).read_text()
    assert "dictionary_learning BatchTopKTrainer, d_in 12, d_sae 48, k 4" in section
    assert f"| {FOREIGN_THETA} | {rows[FOREIGN_THETA]['l0_mean']:.2f} |" in section


def test_command_line_writes_the_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = write_cache(tmp_path / "cache.safetensors")
    argv = ["bench-import", str(FIXTURE), "--from", "dictionary_learning", "--cache", str(cache)]
    argv += ["--methods", "l0", "--k", "3", "--batch-size", "64", "--output", str(tmp_path / "o")]
    assert cli_main(argv) == 0
    assert "| calibrated [l0] |" in capsys.readouterr().out
    written = json.loads((tmp_path / "o" / foreign.FILES.json).read_text())
    assert written["settings"]["target_l0"] == 3
    assert written["rows"][-1]["calibration_l0"] == pytest.approx(3, rel=0.02)
    assert written["command"].startswith("sae-batchtopk bench-import")


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--methods", "nope"], "--methods"),
        (["--batch-size", "0"], "--batch-size"),
        (["--k", "100"], "--k"),
        (["--cache", "missing.safetensors"], "--cache"),
        (["--cache", "narrow"], "--cache"),  # activations of width 8, not 12
        (["--cache", "short"], "--methods paper: the cache's calibration_tokens=64"),
        (["--from", "sparsify"], str(FIXTURE / "cfg.json")),
    ],
)
def test_bad_options_fail_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], option: str
) -> None:
    caches = {
        "narrow": write_cache(tmp_path / "narrow.safetensors", d_in=8),
        "short": write_cache(tmp_path / "short.safetensors", {**SIZES, "calibration": 64}),
    }
    argv = [caches.get(arg, arg) for arg in argv]  # type: ignore[misc]
    if "--cache" not in argv:
        argv += ["--cache", str(write_cache(tmp_path / "cache.safetensors"))]
    output = tmp_path / "out"
    assert cli_main(["bench-import", str(FIXTURE), *map(str, argv), "--output", str(output)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"sae-batchtopk bench-import: error: {option}"), line
    assert not output.exists()


def training_script() -> ModuleType:
    """The training script, loaded as a file (it imports dictionary_learning only to train)."""
    spec = importlib.util.spec_from_file_location("train_dictionary_learning", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--k", "0"], "--k must be positive"),
        (["--k", "64"], "--k 64 exceeds --dict-size 48"),
        (["--batch-size", "512"], "--batch-size 512 exceeds the 256-token train split"),
        (["--warmup-steps", "8"], "--warmup-steps must be in [0, 8)"),
        (["--threshold-start-step", "9"], "--threshold-start-step must be in [0, 8)"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
    ],
)
def test_training_script_refuses_bad_options_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    cache = write_cache(tmp_path / "cache.safetensors")
    base = [str(cache), str(tmp_path / "dl"), "--dict-size", "48", "--batch-size", "64"]
    # 256 train tokens in batches of 64, 2 epochs: 8 steps.
    assert training_script().main([*base, "--epochs", "2", *argv]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"train_dictionary_learning.py: error: {message}"), line
    assert not (tmp_path / "dl").exists()


PEERS_PYTHON = os.environ.get("SAE_BATCHTOPK_PEERS_PYTHON")


@pytest.mark.slow
@pytest.mark.skipif(
    PEERS_PYTHON is None,
    reason="set SAE_BATCHTOPK_PEERS_PYTHON to a Python with dictionary-learning installed",
)
def test_training_script_writes_what_bench_import_reads(tmp_path: Path) -> None:
    """dictionary_learning's own trainer, on a tiny cache, then bench-import on its folder."""
    cache = write_cache(tmp_path / "cache.safetensors")
    output = tmp_path / "dl"
    argv = [str(cache), str(output), "--k", "4", "--dict-size", "48", "--batch-size", "64"]
    subprocess.run([PEERS_PYTHON, str(SCRIPT), *argv, "--epochs", "4"], check=True)

    trainer = json.loads((output / "trainer_0" / "config.json").read_text())
    assert trainer["trainer"]["trainer_class"] == "BatchTopKTrainer"
    assert trainer["buffer"]["split"] == "train" and trainer["buffer"]["cache"] == str(cache)
    config = ImportConfig(output / "trainer_0", cache, batch_size=64, output=tmp_path / "out")
    rows = foreign.run_import_benchmark(foreign.prepare(config))["rows"]
    assert rows[0]["label"] == FOREIGN_THETA and rows[0]["theta"] > 0  # θ was estimated
    assert rows[-1]["calibration_l0"] == pytest.approx(4, rel=0.02)
