"""Nothing lost, nothing silent: NaN guards, safe folders, early validation, exact state.

Each test is one way a realistic user lost work or got a silently wrong SAE before: a NaN
batch that poisoned the weights and was saved over a good run, a ``calibrate`` that deleted the
user's files, errors that surfaced only after training, NaN thresholds that loaded silently,
a running θ frozen by bfloat16 rounding, and encode modes leaking between threads.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from conftest import step_input, tiny_runner_kwargs, trainer_config
from sae_lens import SAE
from sae_lens.training.sae_trainer import SAETrainer
from transformer_lens import HookedTransformer

from sae_lens_batchtopk import (
    CalibratedBatchTopKSAE,
    CalibratedBatchTopKSAEConfig,
    CalibratedBatchTopKTrainingSAE,
    CalibratedBatchTopKTrainingSAEConfig,
    CalibrationError,
    NonFiniteError,
    calibrate_thresholds,
)
from sae_lens_batchtopk.tools.cli import Resources, main, staged_folder


def new_sae(**options: object) -> CalibratedBatchTopKTrainingSAE:
    torch.manual_seed(0)
    settings: dict[str, object] = {"d_in": 8, "d_sae": 32, "k": 2, **options}
    return CalibratedBatchTopKTrainingSAE(CalibratedBatchTopKTrainingSAEConfig(**settings))


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one ``error:`` message (an unfinished progress bar may share its line)."""
    err = capsys.readouterr().err
    lines = [line[line.index("error: ") :] for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1, err
    return lines[0]


# --- 1. NaN in training -------------------------------------------------------------------


def batches_with_nan_at(step: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    for index in range(10**6):
        batch = torch.randn(64, 8, generator=generator)
        if index == step:
            batch[3, 5] = torch.nan
        yield batch


def test_nan_batch_stops_training_before_the_optimizer_step() -> None:
    sae = new_sae()
    trainer = SAETrainer(cfg=trainer_config(10, 64), sae=sae, data_provider=batches_with_nan_at(4))
    for _ in range(4):
        trainer.step(next(trainer.data_provider))
        trainer.n_training_steps += 1
    before = copy.deepcopy(sae.state_dict())
    with pytest.raises(NonFiniteError, match=r"training step 4: .*input batch \(1 of 512"):
        trainer.step(next(trainer.data_provider))
    for name, value in sae.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True)


def test_nan_loss_is_named() -> None:
    sae = new_sae()
    sae.training_forward_pass(step_input(sae, torch.randn(16, 8)))  # b_dec initialised
    with torch.no_grad():
        sae.b_dec[0] = torch.inf
    with pytest.raises(NonFiniteError, match="training step 0: non-finite values in mse_loss"):
        sae.training_forward_pass(step_input(sae, torch.randn(16, 8)))


def test_nan_first_batch_never_becomes_the_decoder_bias() -> None:
    sae = new_sae()
    batch = torch.randn(16, 8)
    batch[0, 0] = torch.nan
    with pytest.raises(NonFiniteError):
        sae.training_forward_pass(step_input(sae, batch))
    assert torch.isfinite(sae.b_dec).all()
    good = torch.randn(16, 8) + 3.0
    sae.training_forward_pass(step_input(sae, good))
    assert torch.allclose(sae.b_dec, good.mean(0))  # the first good batch initialises it


def test_empty_and_too_small_batches_are_errors() -> None:
    sae = new_sae()
    with pytest.raises(ValueError, match="empty activation batch"):
        sae.training_forward_pass(step_input(sae, torch.zeros(0, 8)))
    tiny_k = new_sae(k=0.001, calibration_method="none")
    with pytest.raises(ValueError, match=r"int\(k x 64 tokens\) = 0"):
        tiny_k.training_forward_pass(step_input(tiny_k, torch.randn(64, 8)))
    assert torch.isfinite(sae.b_dec).all() and torch.isfinite(sae.firing_rate).all()


def test_non_finite_weights_are_never_saved(tmp_path: Path) -> None:
    sae = new_sae()
    with torch.no_grad():
        sae.W_enc[1, 2] = torch.nan
    with pytest.raises(NonFiniteError, match="W_enc"):
        sae.save_model(tmp_path / "checkpoint")
    with pytest.raises(NonFiniteError, match="W_enc"):
        sae.save_inference_model(tmp_path / "inference")
    assert not (tmp_path / "checkpoint" / "sae_weights.safetensors").exists()


def calibration_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(512, 8, generator=generator) for _ in range(4)]


def test_calibration_refuses_nan_weights_and_unreachable_targets() -> None:
    sae = new_sae()
    with torch.no_grad():
        sae.b_enc[0] = torch.nan
    with pytest.raises(NonFiniteError, match="b_enc"):
        calibrate_thresholds(sae, calibration_batches())
    assert not sae.is_calibrated

    sae = new_sae()
    with torch.no_grad():
        sae.b_enc.fill_(-10.0)  # almost nothing is positive: L0 2 cannot be reached
    with pytest.raises(CalibrationError, match="target 2"):
        calibrate_thresholds(sae, calibration_batches())
    assert not sae.is_calibrated


@pytest.fixture
def nan_resources(tiny_resources: Resources) -> Resources:
    """The tiny model, with a NaN written into the hooked activations of some forward passes."""
    model = HookedTransformer(tiny_resources.model.cfg)
    model.load_state_dict(tiny_resources.model.state_dict())
    calls = {"n": 0}

    def poison(activation: torch.Tensor, hook: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            activation[0, 5, 2] = torch.nan
        return activation

    model.add_hook("blocks.0.hook_resid_post", poison)  # type: ignore[arg-type]
    return Resources(model, tiny_resources.train_dataset, tiny_resources.eval_dataset)


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def trained_run(tmp_path: Path, tiny_resources: Resources) -> tuple[Path, Path]:
    """A finished CLI run (and its config) with a user's note and export folder inside."""
    options = tiny_runner_kwargs(tmp_path, eval_tokens=512, ce_eval_batches=1)
    del options["output_path"]
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(options))
    run = tmp_path / "run"
    assert main(["train", str(config), "--output", str(run)], tiny_resources) == 0
    (run / "notes.md").write_text("my notes\n")
    (run / "export").mkdir()
    (run / "export" / "jumprelu.json").write_text("{}")
    return config, run


def no_stray_folders(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".staging-" in p.name or ".old-" in p.name]


def test_nan_in_cli_training_keeps_the_previous_output(
    trained_run: tuple[Path, Path],
    nan_resources: Resources,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, run = trained_run
    before = folder_digest(run)
    argv = ["train", str(config), "--output", str(run), "--overwrite"]
    assert main(argv, nan_resources) == 1
    assert "non-finite values" in error_line(capsys)
    assert folder_digest(run) == before
    assert no_stray_folders(run.parent)


def test_commands_keep_files_they_do_not_own(
    trained_run: tuple[Path, Path], tiny_resources: Resources
) -> None:
    config, run = trained_run
    argv = ["calibrate", str(run), "--method", "per_latent", "--tokens", "2048"]
    assert main([*argv, "--eval-tokens", "512"], tiny_resources) == 0
    assert SAE.load_from_disk(run).cfg.metadata.calibration["method"] == "per_latent"
    assert main(["eval", str(run), "--tokens", "512"], tiny_resources) == 0
    overwrite = ["train", str(config), "--output", str(run), "--overwrite"]
    assert main(overwrite, tiny_resources) == 0
    assert (run / "notes.md").read_text() == "my notes\n"
    assert (run / "export" / "jumprelu.json").read_text() == "{}"
    assert (run / "training_curves.png").exists()
    assert no_stray_folders(run.parent)


def test_interrupted_update_leaves_the_folder_as_it_was(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "cfg.json").write_text("old")
    (folder / "notes.md").write_text("mine")
    before = folder_digest(folder)
    with (
        pytest.raises(KeyboardInterrupt),
        staged_folder(folder, owned=frozenset({"cfg.json"})) as stage,
    ):
        (stage / "cfg.json").write_text("new")
        raise KeyboardInterrupt
    assert folder_digest(folder) == before
    assert no_stray_folders(tmp_path)


# --- 3. errors before any work ------------------------------------------------------------


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("calibration_tokens=100", "calibration_tokens=100 is too few"),
        ("k=0.001", "calibration_tokens=512 is too few"),
        ("calibration_method=none k=0.001", "int(0.001 x 64) = 0"),
        ("lr=.nan", "lr must be a finite number"),
        ("train_batch_size_tokens=0", "train_batch_size_tokens must be > 0"),
        ("lr_scheduler_name=bogus", "lr_scheduler_name"),
        ("calibration_target_l0=0", "calibration_target_l0 must be > 0"),
        ("adam_beta2=1.5", "adam_beta2 must be < 1"),
    ],
)
def test_late_errors_now_come_from_dry_run(
    tmp_path: Path,
    tiny_resources: Resources,
    capsys: pytest.CaptureFixture[str],
    assignment: str,
    message: str,
) -> None:
    options = tiny_runner_kwargs(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(options))
    overrides = [arg for pair in assignment.split() for arg in ("--set", pair)]
    assert main(["train", str(config), "--dry-run", *overrides], tiny_resources) == 2
    assert message in error_line(capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["calibrate", "RUN", "--method", "l0", "--tokens", "0"], "--tokens: must be a positive"),
        (["calibrate", "RUN", "--method", "l0", "--tokens", "-5"], "--tokens: must be a positive"),
        (["calibrate", "RUN", "--method", "l0", "--target", "0"], "--target: must be a positive"),
        (["calibrate", "RUN", "--method", "l0", "--target", "1000"], "--target must be <= d_sae"),
        (["calibrate", "RUN", "--method", "l0", "--tokens", "10"], "--tokens=10 is too few"),
        (["eval", "RUN", "--tokens", "-3"], "--tokens: must be a positive"),
    ],
)
def test_cli_numbers_are_range_checked_before_work(
    trained_run: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    _, run = trained_run
    before = folder_digest(run)
    code = None
    try:
        code = main([str(run) if arg == "RUN" else arg for arg in argv])
    except SystemExit as exit_info:  # argparse's own error exit
        code = exit_info.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert folder_digest(run) == before


# --- 4. loading ----------------------------------------------------------------------------


def saved_inference(tmp_path: Path) -> Path:
    sae = new_sae()
    sae.set_thresholds(0.5)
    sae.save_inference_model(tmp_path / "sae")
    return tmp_path / "sae"


def test_nan_thresholds_refuse_to_load(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = saved_inference(tmp_path)
    weights = load_file(folder / "sae_weights.safetensors")
    weights["threshold"][3] = torch.nan
    save_file(weights, folder / "sae_weights.safetensors")
    with pytest.raises(NonFiniteError, match="threshold has 1 NaN/inf entries of 32"):
        SAE.load_from_disk(folder)


def test_thresholds_of_another_length_refuse_to_load(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = saved_inference(tmp_path)
    weights = load_file(folder / "sae_weights.safetensors")
    weights["threshold"] = weights["threshold"][:10].clone()
    save_file(weights, folder / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"threshold has shape \(10,\), expected \(32,\)"):
        SAE.load_from_disk(folder)


def test_malformed_cfg_json_is_named(
    trained_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, run = trained_run
    text = (run / "cfg.json").read_text()
    (run / "cfg.json").write_text(text[: len(text) // 2])
    assert main(["eval", str(run)]) == 2
    assert f"'{run / 'cfg.json'}' is not valid JSON" in error_line(capsys)


# --- 5. exact state under bfloat16 ---------------------------------------------------------


def test_bf16_running_theta_follows_the_ema() -> None:
    sae = new_sae(dtype="bfloat16", topk_threshold_lr=0.01)
    sae.to(torch.bfloat16)
    assert sae.running_theta.dtype == sae.firing_rate.dtype == torch.float32
    expected = None
    for scale in [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]:
        acts = torch.zeros(16, 32, dtype=torch.bfloat16)
        acts[0, 0] = scale
        sae._update_training_state(acts)
        value = torch.tensor(scale, dtype=torch.bfloat16).double()
        expected = value if expected is None else 0.99 * expected + 0.01 * value
    # In bfloat16 the 1 % steps would round away: θ would stay at the first batch's 1.0.
    assert float(sae.running_theta) == pytest.approx(float(expected), rel=1e-6)
    assert float(sae.running_theta) > 1.02


# --- 7. encode modes are arguments, not shared state ---------------------------------------


def test_two_threads_encode_in_different_modes() -> None:
    torch.manual_seed(0)
    sae = CalibratedBatchTopKSAE(CalibratedBatchTopKSAEConfig(d_in=8, d_sae=32, k=2))
    sae.set_thresholds(0.05)
    x = torch.randn(64, 8)
    with torch.no_grad():
        expected = {"threshold": sae.encode(x), "batch_topk": sae.encode(x, mode="batch_topk")}
    assert not torch.equal(expected["threshold"], expected["batch_topk"])
    view = sae.batch_topk_view()
    mismatches: list[str] = []

    def encode_many(mode: str) -> None:
        with torch.no_grad():
            for _ in range(300):
                codes = view.encode(x) if mode == "batch_topk" else sae.encode(x)
                if not torch.equal(codes, expected[mode]):
                    mismatches.append(mode)

    threads = [threading.Thread(target=encode_many, args=(m,)) for m in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mismatches == []


def test_calibrated_run_metadata_survives_json(trained_run: tuple[Path, Path]) -> None:
    _, run = trained_run
    saved = json.loads((run / "cfg.json").read_text())
    assert saved["metadata"]["dead_latent_window"]["tokens"] == 256  # tiny config's window


def test_failed_calibration_after_training_keeps_the_trained_sae(
    trained_run: tuple[Path, Path],
    tiny_resources: Resources,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, run = trained_run
    before = folder_digest(run)
    argv = ["train", str(config), "--output", str(run), "--overwrite", "--set"]
    # L0 60 of 64 latents: more than the SAE's positive pre-activations can give.
    assert main([*argv, "calibration_target_l0=60"], tiny_resources) == 1
    message = error_line(capsys)
    assert "calibration reached L0" in message and "kept uncalibrated in" in message
    assert folder_digest(run) == before
    (rescued,) = run.parent.glob("run.uncalibrated-*")
    assert message.split("kept uncalibrated in ")[1].startswith(str(rescued))
    sae = SAE.load_from_disk(rescued)
    assert "error" in sae.cfg.metadata.calibration
    assert json.loads((rescued / "runner_cfg.json").read_text())["output_path"] == str(rescued)
    assert no_stray_folders(run.parent)
