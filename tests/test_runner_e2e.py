"""End to end through SAELens's own entry points, on a tiny random model and local data.

Reloads happen in fresh subprocesses: that is the only honest way to show that a saved SAE
loads from its files alone (plugin imported) and that the JumpReLU export loads in a process
that never imports the plugin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_D_MODEL, tiny_model_config, tiny_runner_kwargs
from datasets import Dataset
from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, TrainingSAE
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer

from sae_lens_batchtopk import (
    CalibratedBatchTopKSAE,
    CalibratedBatchTopKTrainingSAE,
    CalibratedBatchTopKTrainingSAEConfig,
    make_runner_config,
)
from sae_lens_batchtopk.runner import check_activation_buffer


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    """Run ``code`` in a fresh interpreter and return its stdout (fail with its stderr)."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def trained_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: HookedTransformer, tiny_dataset: Dataset
) -> tuple[Path, CalibratedBatchTopKTrainingSAE, LanguageModelSAERunnerConfig]:
    tmp = tmp_path_factory.mktemp("run")
    cfg = make_runner_config(**tiny_runner_kwargs(tmp, n_checkpoints=1))
    sae = LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model, override_dataset=tiny_dataset
    ).run()
    return tmp, sae, cfg


def test_runner_trains_and_saves_inference_form(trained_run: tuple) -> None:
    tmp, sae, _ = trained_run
    assert isinstance(sae, CalibratedBatchTopKTrainingSAE)
    assert sae.running_theta > 0
    saved = json.loads((tmp / "output" / "cfg.json").read_text())
    assert saved["architecture"] == "calibrated_batchtopk"
    assert saved["metadata"]["sae_lens_version"]
    assert set(load_file(tmp / "output" / "sae_weights.safetensors")) == {
        "W_enc",
        "b_enc",
        "W_dec",
        "b_dec",
        "threshold",
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runner_trains_on_cuda_under_autocast_and_reloads_there(
    tmp_path: Path, tiny_dataset: Dataset
) -> None:
    """The GPU run a user makes: SAELens's runner on CUDA with autocast, our SAE on its sparse
    path (no dense-fallback warning), calibrated, saved, and reloaded on CUDA."""
    torch.manual_seed(0)
    model = HookedTransformer(tiny_model_config()).to("cuda")
    cfg = make_runner_config(**tiny_runner_kwargs(tmp_path, device="cuda", autocast=True))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "training on the dense path")
        sae = LanguageModelSAETrainingRunner(
            cfg, override_model=model, override_dataset=tiny_dataset
        ).run()
    assert sae.W_enc.device.type == "cuda" and sae.running_theta > 0
    loaded = SAE.load_from_disk(tmp_path / "output", device="cuda")
    x = torch.randn(256, TINY_D_MODEL, device="cuda")
    with torch.no_grad():
        codes = loaded.encode(x)
        out = loaded.decode(codes)
    assert codes.device.type == "cuda" and torch.isfinite(out).all()
    assert 0 < (codes > 0).sum(-1).float().mean() < loaded.cfg.d_sae


def test_reload_in_fresh_process_gives_identical_outputs(trained_run: tuple) -> None:
    tmp, _, _ = trained_run
    x = torch.randn(64, TINY_D_MODEL)
    save_file({"x": x}, tmp / "x.safetensors")
    local = SAE.load_from_disk(tmp / "output")
    assert isinstance(local, CalibratedBatchTopKSAE)
    with torch.no_grad():
        expected = local(x)
    run_python(f"""
        import sae_lens_batchtopk, torch
        from safetensors.torch import load_file, save_file
        from sae_lens import SAE
        sae = SAE.load_from_disk({str(tmp / "output")!r})
        assert type(sae).__name__ == "CalibratedBatchTopKSAE"
        with torch.no_grad():
            save_file({{"y": sae(load_file({str(tmp / "x.safetensors")!r})["x"])}},
                      {str(tmp / "y.safetensors")!r})
    """)
    assert torch.equal(load_file(tmp / "y.safetensors")["y"], expected)


def test_jumprelu_export_loads_without_plugin(trained_run: tuple) -> None:
    tmp, _, _ = trained_run
    local = SAE.load_from_disk(tmp / "output")
    local.to_jumprelu().save_model(tmp / "jumprelu")
    x = torch.randn(64, TINY_D_MODEL)
    save_file({"x": x}, tmp / "xj.safetensors")
    with torch.no_grad():
        expected = local(x)
    run_python(f"""
        import sys, torch
        from safetensors.torch import load_file, save_file
        from sae_lens import SAE
        sae = SAE.load_from_disk({str(tmp / "jumprelu")!r})
        assert type(sae).__name__ == "JumpReLUSAE", type(sae)
        with torch.no_grad():
            y = sae(load_file({str(tmp / "xj.safetensors")!r})["x"])
        save_file({{"y": y}}, {str(tmp / "yj.safetensors")!r})
        assert not any(m.startswith("sae_lens_batchtopk") for m in sys.modules)
    """)
    assert torch.equal(load_file(tmp / "yj.safetensors")["y"], expected)


def test_from_pretrained_through_offline_hub_cache(trained_run: tuple) -> None:
    tmp, _, _ = trained_run
    repo, sae_id, commit = "local-user/tiny-batchtopk", "blocks.0.hook_resid_post", "a" * 40
    repo_dir = tmp / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit / sae_id
    snapshot.mkdir(parents=True)
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
        (snapshot / name).write_bytes((tmp / "output" / name).read_bytes())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    out = run_python(
        f"""
        import warnings, torch, sae_lens_batchtopk
        from sae_lens import SAE
        warnings.simplefilter("ignore")
        sae = SAE.from_pretrained({repo!r}, {sae_id!r})
        local = SAE.load_from_disk({str(tmp / "output")!r})
        x = torch.randn(8, sae.cfg.d_in)
        assert torch.equal(sae.threshold, local.threshold)
        print(type(sae).__name__, bool(torch.equal(sae(x), local(x))))
    """,
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp / "hub")},
    )
    assert out.split() == ["CalibratedBatchTopKSAE", "True"]


def test_checkpoint_loads_as_training_sae(trained_run: tuple) -> None:
    """Checkpoints keep the training form and its state (exact resume: test_resume.py)."""
    _, sae, cfg = trained_run
    checkpoints = sorted(Path(cfg.checkpoint_path).iterdir())
    assert checkpoints, "n_checkpoints=1 should have written a checkpoint"
    checkpoint = checkpoints[0]
    restored = TrainingSAE.load_from_disk(checkpoint)
    assert isinstance(restored, CalibratedBatchTopKTrainingSAE)
    saved = load_file(checkpoint / "sae_weights.safetensors")
    for name in ("tokens_since_fired", "tokens_seen", "running_theta", "firing_rate", "W_enc"):
        assert torch.equal(getattr(restored, name), saved[name].to(getattr(restored, name)))
    assert restored.running_theta > 0
    assert not torch.equal(restored.W_enc, sae.W_enc)  # mid-run weights, not the final ones


def test_runner_config_from_dict_round_trip(trained_run: tuple) -> None:
    tmp, _, cfg = trained_run
    saved = json.loads((tmp / "output" / "runner_cfg.json").read_text())
    again = LanguageModelSAERunnerConfig.from_dict(saved)
    assert isinstance(again.sae, CalibratedBatchTopKTrainingSAEConfig)
    assert again.sae.k == cfg.sae.k and again.sae.aux_losses == cfg.sae.aux_losses


def test_sae_lens_cli_knows_the_architecture() -> None:
    from sae_lens.llm_sae_training_runner import _parse_cfg_args

    cfg = _parse_cfg_args(
        [
            "--architecture",
            "calibrated_batchtopk",
            "--k",
            "8.5",
            "--d_in",
            "16",
            "--d_sae",
            "64",
            "--aux_losses",
            '{"auxk": 0.5}',
            "--hook_name",
            "blocks.0.hook_resid_post",
        ]
    )
    assert isinstance(cfg.sae, CalibratedBatchTopKTrainingSAEConfig)
    assert (cfg.sae.k, cfg.sae.aux_losses) == (8.5, {"auxk": 0.5})


def test_make_runner_config_splits_and_validates() -> None:
    # SAELens's default buffer (20 x 128 tokens) is smaller than its default 4096-token batch,
    # which its mixing buffer refuses once the model has loaded; our runner refuses it first.
    with pytest.raises(ValueError, match="raise n_batches_in_buffer"):
        check_activation_buffer(make_runner_config(d_in=16, d_sae=64, k=4))
    cfg = make_runner_config(
        d_in=16,
        d_sae=64,
        k=4,
        lr=1e-3,
        log_to_wandb=False,
        device="cpu",
        dtype="float32",
        wandb_project="p",
    )
    assert (cfg.sae.k, cfg.lr, cfg.logger.log_to_wandb, cfg.logger.wandb_project) == (
        4,
        1e-3,
        False,
        "p",
    )
    assert cfg.sae.device == cfg.device == "cpu"
    builtin = make_runner_config("topk", d_in=16, d_sae=64, k=4, log_to_wandb=False)
    assert builtin.sae.architecture() == "topk"
    with pytest.raises(ValueError, match=r"(?s)unknown option.*kk.*SAE \(calibrated_batchtopk\)"):
        make_runner_config(d_in=16, d_sae=64, kk=4)
    with pytest.raises(ValueError, match=r"unknown architecture .nope.*calibrated_batchtopk"):
        make_runner_config("nope", d_in=16, d_sae=64)
