"""The ``sae-batchtopk`` command: validation before work, and the full train/eval/calibrate path.

Validation tests go through ``main`` exactly as the console script does and check the one-line
``error:`` messages. The end-to-end test runs the default config itself on the offline
SmolLM2 with a tiny budget: the reduced version of the command CI cannot afford at full size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import (
    DEFAULT_CONFIG,
    TINY_D_MODEL,
    TINY_HOOK,
    needs_offline_assets,
    reduced_default_run_argv,
    tiny_runner_kwargs,
)
from sae_lens import SAE

from sae_lens_batchtopk import CalibratedBatchTopKSAE
from sae_lens_batchtopk.tools.cli import Resources, main

CONFIGS = Path(__file__).parent.parent / "configs"

OUTPUT_FILES = {
    "cfg.json",
    "sae_weights.safetensors",
    "runner_cfg.json",
    "sparsity.safetensors",
    "metrics.json",
    "report.md",
    "training_curves.json",
    "l0_per_token.png",
    "latent_density.png",
    "training_curves.png",
}


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    return err[-1]


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    options = tiny_runner_kwargs(tmp_path, eval_tokens=512, ce_eval_batches=2)
    del options["output_path"]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(options))
    return path


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_dry_run_validates_every_shipped_config(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", str(config), "--dry-run", "--output", str(tmp_path / "out")]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["sae"]["architecture"] == "calibrated_batchtopk"
    assert resolved["output_path"] == str(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dry_run_resolves_all_special_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", str(DEFAULT_CONFIG), "--dry-run", "--output", str(tmp_path)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["exclude_special_tokens"] == list(range(17))


def test_unknown_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", str(DEFAULT_CONFIG), "--dry-run", "--output", str(tmp_path), "--set"]
    assert main([*argv, "lr_typo=1e-3"]) == 2
    assert "unknown option(s) ['lr_typo']" in error_line(capsys)


def test_bad_value_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", str(DEFAULT_CONFIG), "--dry-run", "--output", str(tmp_path), "--set"]
    assert main([*argv, "k=0"]) == 2
    assert "k must be > 0" in error_line(capsys)


def test_bad_hook_lists_valid_hooks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", str(DEFAULT_CONFIG), "--dry-run", "--output", str(tmp_path), "--set"]
    assert main([*argv, "hook_name=blocks.40.hook_resid_post"]) == 2
    line = error_line(capsys)
    assert "'blocks.40.hook_resid_post' is not a hook of smollm2-135m" in line
    assert "blocks.N.hook_resid_post (N = 0..29)" in line


def test_d_in_mismatch_names_d_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", str(DEFAULT_CONFIG), "--dry-run", "--output", str(tmp_path), "--set"]
    assert main([*argv, "d_in=768"]) == 2
    assert "d_in=768 does not match d_model=576" in error_line(capsys)


def test_hub_config_checks_hooks_without_weights(capsys: pytest.CaptureFixture[str]) -> None:
    config = CONFIGS / "gemma-2-2b-l12.yaml"
    assert main(["train", str(config), "--dry-run", "--set", "d_in=768"]) == 2
    assert "d_in=768 does not match d_model=2304" in error_line(capsys)


def test_existing_output_needs_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "cfg.json").write_text("{}")
    assert main(["train", str(DEFAULT_CONFIG), "--dry-run", "--output", str(tmp_path)]) == 2
    assert "--overwrite" in error_line(capsys)


def test_train_eval_calibrate_on_tiny_model(
    tiny_config: Path, tiny_resources: Resources, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    assert main(["train", str(tiny_config), "--output", str(out)], tiny_resources) == 0
    assert {p.name for p in out.iterdir()} >= OUTPUT_FILES
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["calibration"]["method"] == "l0"
    assert metrics["training_throughput"]["tokens"] == 4096
    assert metrics["headline"]["inference_l0_heldout"] > 0

    assert main(["calibrate", str(out), "--method", "per_latent", "--tokens", "4096",
                 "--eval-tokens", "512"], tiny_resources) == 0  # fmt: skip
    recalibrated = SAE.load_from_disk(out)
    assert isinstance(recalibrated, CalibratedBatchTopKSAE)
    assert recalibrated.cfg.metadata.calibration["method"] == "per_latent"
    assert recalibrated.cfg.metadata.calibration["n_tokens"] == 4096
    assert (out / "training_curves.png").exists()

    assert main(["eval", str(out), "--tokens", "512"], tiny_resources) == 0
    assert json.loads((out / "metrics.json").read_text())["calibration"]["method"] == "per_latent"

    # A second training run into the same folder replaces it only with --overwrite.
    assert main(["train", str(tiny_config), "--output", str(out)], tiny_resources) == 2
    assert main(["train", str(tiny_config), "--output", str(out), "--overwrite"],
                tiny_resources) == 0  # fmt: skip
    assert SAE.load_from_disk(out).cfg.metadata.calibration["method"] == "l0"


def test_injected_model_checks_hook(
    tiny_config: Path, tiny_resources: Resources, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", str(tiny_config), "--output", str(tmp_path / "o"), "--set", "d_in=32"]
    assert main(argv, tiny_resources) == 2
    assert f"d_model={TINY_D_MODEL} of tiny-random at {TINY_HOOK}" in error_line(capsys)


@needs_offline_assets
@pytest.mark.slow
def test_default_config_reduced_run_on_smollm2(tmp_path: Path) -> None:
    out = tmp_path / "smollm2"
    argv = reduced_default_run_argv(out)
    assert main(argv) == 0
    assert {p.name for p in out.iterdir()} >= OUTPUT_FILES
    headline = json.loads((out / "metrics.json").read_text())["headline"]
    # 4096 training tokens teach little; the point is that every stage ran and measured.
    assert 0 < headline["l0"] < 256
    assert all(math.isfinite(value) for value in headline.values())
    assert SAE.load_from_disk(out).cfg.metadata.exclude_special_tokens == list(range(17))


def test_sae_lens_delegation_knows_the_architecture(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sae-lens", "--architecture", "calibrated_batchtopk", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "calibrated_batchtopk" in help_text
    assert "--calibration_method" in help_text
