"""Drop-in for SAELens users: a ``batchtopk`` config with the architecture renamed means the same.

Every field of SAELens's ``BatchTopKTrainingSAEConfig`` must be accepted with its meaning: the
field list is read from SAELens's dataclass, so a field SAELens adds fails here until someone
decides how it is honoured. The dead-latent window is SAELens's ``dead_feature_window`` unless
``dead_tokens_window`` is set, through SAELens's own trainer and runner as through ours.
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_D_MODEL, TINY_HOOK, step_input, tiny_runner_kwargs, trainer_config
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.sae_trainer import SAETrainer
from transformer_lens import HookedTransformer

import sae_lens_batchtopk
from sae_lens_batchtopk import (
    CalibratedBatchTopKSAE,
    CalibratedBatchTopKTrainingSAE,
    CalibratedBatchTopKTrainingSAEConfig,
    calibrate_thresholds,
    make_runner_config,
)
from sae_lens_batchtopk import calibration as calibration_module
from sae_lens_batchtopk.aux_losses import acts_on_dead_latents_only
from sae_lens_batchtopk.runner import CalibratingSAETrainingRunner
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import SAE_LENS_FIELDS
from sae_lens_batchtopk.tools.cli import Resources, main
from sae_lens_batchtopk.trainer import RecordingSAETrainer, use_fused_adam

# A non-default value for every field of SAELens's BatchTopKTrainingSAEConfig.
SAE_LENS_VALUES: dict[str, object] = {
    "d_in": 16,
    "d_sae": 64,
    "dtype": "float64",
    "device": "cpu",
    "apply_b_dec_to_input": False,
    "normalize_activations": "expected_average_only_in",
    "reshape_activations": "none",
    "metadata": SAEMetadata(model_name="m", hook_name="h"),
    "decoder_init_norm": 0.5,
    "k": 7.5,
    "use_sparse_activations": True,
    "aux_loss_coefficient": 2.0,
    "rescale_acts_by_decoder_norm": False,
    "topk_threshold_lr": 0.05,
}


def sae_lens_field_names() -> set[str]:
    return {f.name for f in fields(BatchTopKTrainingSAEConfig)}


def test_every_sae_lens_batchtopk_field_is_listed_and_accepted() -> None:
    assert set(SAE_LENS_VALUES) == sae_lens_field_names(), "a SAELens field is untested"
    assert set(SAE_LENS_FIELDS) == sae_lens_field_names(), "a SAELens field is undecided"
    theirs = BatchTopKTrainingSAEConfig(**SAE_LENS_VALUES)  # type: ignore[arg-type]
    ours = CalibratedBatchTopKTrainingSAEConfig(**SAE_LENS_VALUES)  # type: ignore[arg-type]
    for name in sae_lens_field_names() - {"metadata"}:
        assert getattr(ours, name) == getattr(theirs, name), name
    again = CalibratedBatchTopKTrainingSAEConfig.from_dict(ours.to_dict())
    for name in sae_lens_field_names() - {"metadata"}:
        assert getattr(again, name) == getattr(ours, name), name


def test_defaults_are_sae_lens_defaults() -> None:
    theirs = BatchTopKTrainingSAEConfig(d_in=16, d_sae=128)
    ours = CalibratedBatchTopKTrainingSAEConfig(d_in=16, d_sae=128)
    for name in sae_lens_field_names() - {"metadata"}:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.resolved_aux_losses == {"auxk": 1 / 32}  # aux_loss_coefficient 1.0
    assert ours.dead_tokens_window is None  # SAELens's dead_feature_window


@pytest.mark.parametrize("rescale", [True, False])
def test_same_init_and_selection_as_sae_lens_batchtopk(rescale: bool) -> None:
    """Same seed, same config: SAELens's init (decoder_init_norm, ...) and codes, exactly."""
    values = {**SAE_LENS_VALUES, "rescale_acts_by_decoder_norm": rescale}
    values["normalize_activations"] = "none"
    torch.manual_seed(0)
    theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**values))  # type: ignore[arg-type]
    torch.manual_seed(0)
    ours = CalibratedBatchTopKTrainingSAE(
        CalibratedBatchTopKTrainingSAEConfig(**values, b_dec_init="zeros")  # type: ignore[arg-type]
    )
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    x = torch.randn(32, 16, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(ours.encode(x), theirs.encode(x))
        assert torch.equal(ours(x), theirs(x))


def test_aux_loss_coefficient_scales_auxk_and_zero_turns_it_off() -> None:
    def resolved(**options: object) -> dict[str, float]:
        cfg = CalibratedBatchTopKTrainingSAEConfig(d_in=8, d_sae=32, k=2, **options)
        return cfg.resolved_aux_losses

    assert resolved(aux_loss_coefficient=2.0) == {"auxk": 2 / 32}
    assert resolved(aux_loss_coefficient=0.0) == {}
    assert resolved(aux_losses={"zipf": 0.5}) == {"zipf": 0.5}
    assert resolved(aux_losses={"auxk_sae_lens": 1.0}) == {"auxk_sae_lens": 1.0}


def batches(d_in: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(batch, d_in, generator=generator) + 2.0


def test_dead_set_is_sae_trainers_mask_every_step() -> None:
    """Through SAELens's SAETrainer alone (no runner): its dead_feature_window, step by step."""
    torch.manual_seed(0)
    sae = CalibratedBatchTopKTrainingSAE(
        CalibratedBatchTopKTrainingSAEConfig(d_in=8, d_sae=256, k=2)
    )
    trainer = SAETrainer(
        cfg=trainer_config(30, 64, dead_feature_window=3),
        sae=sae,
        data_provider=batches(8, 64, seed=1),
    )
    saw_dead = False
    for _ in range(30):
        expected = trainer.dead_neurons.clone()
        output = trainer.step(next(trainer.data_provider))
        trainer.n_training_steps += 1
        assert torch.equal(sae.dead_mask, expected)
        saw_dead |= bool(expected.any())
        assert (output.losses["auxk_loss"] > 0) == bool(expected.any())
    assert saw_dead


def test_explicit_dead_tokens_window_wins() -> None:
    sae = CalibratedBatchTopKTrainingSAE(
        CalibratedBatchTopKTrainingSAEConfig(d_in=8, d_sae=32, k=2, dead_tokens_window=10**9)
    )
    everything_dead = torch.ones(32, dtype=torch.bool)
    sae.training_forward_pass(step_input(sae, torch.randn(16, 8), dead_neuron_mask=everything_dead))
    assert not sae.dead_mask.any()


def trained_weights(fused: bool) -> dict[str, torch.Tensor]:
    """The weights after 6 SAETrainer steps, with SAELens's Adam as built or run fused."""
    torch.manual_seed(0)
    sae = CalibratedBatchTopKTrainingSAE(
        CalibratedBatchTopKTrainingSAEConfig(d_in=8, d_sae=64, k=2)
    )
    trainer = SAETrainer(
        cfg=trainer_config(6, 64, dead_feature_window=2), sae=sae, data_provider=batches(8, 64, 3)
    )
    if fused:
        RecordingSAETrainer.carrying_state_of(trainer).fit()
    else:
        trainer.fit()
    return {name: value.detach().clone() for name, value in sae.state_dict().items()}


def test_our_trainer_runs_sae_lens_adam_fused_with_the_same_updates() -> None:
    plain, fused = trained_weights(fused=False), trained_weights(fused=True)
    for name, value in plain.items():
        torch.testing.assert_close(fused[name], value, rtol=1e-5, atol=1e-6, equal_nan=True)
    trainer = SAETrainer(
        cfg=trainer_config(6, 64),
        sae=CalibratedBatchTopKTrainingSAE(
            CalibratedBatchTopKTrainingSAEConfig(d_in=8, d_sae=64, k=2)
        ),
        data_provider=batches(8, 64, 3),
    )
    assert not trainer.optimizer.param_groups[0]["fused"]  # SAELens's own
    groups = RecordingSAETrainer.carrying_state_of(trainer).optimizer.param_groups
    assert all(group["fused"] for group in groups)
    sgd = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    use_fused_adam(sgd)  # another optimizer is left alone
    assert sgd.param_groups[0]["fused"] is None


def synthetic_batches(seed: int, batch: int = 256) -> Iterator[torch.Tensor]:
    """Sparse sums of 128 fixed directions in 16-d around a large mean (a residual stream's)."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(128, 16, generator=generator), dim=-1)
    mean = torch.nn.functional.normalize(torch.randn(16, generator=generator), dim=0) * 5
    generator.manual_seed(seed)
    while True:
        active = torch.rand(batch, 128, generator=generator) < 4 / 128
        coefficients = active * (torch.rand(batch, 128, generator=generator) + 0.5)
        yield coefficients @ directions + mean


def train_synthetic(aux_loss_coefficient: float) -> tuple[float, float]:
    """NMSE and dead fraction after 200 steps through SAETrainer, SAELens-style init."""
    torch.manual_seed(0)
    sae = CalibratedBatchTopKTrainingSAE(
        CalibratedBatchTopKTrainingSAEConfig(
            d_in=16,
            d_sae=128,
            k=4,
            b_dec_init="zeros",  # SAELens's init: many latents die early
            aux_loss_coefficient=aux_loss_coefficient,
        )
    )
    trainer = SAETrainer(
        cfg=trainer_config(200, 256, dead_feature_window=10, lr=3e-3),
        sae=sae,
        data_provider=synthetic_batches(seed=1),
    )
    trainer.fit()
    x = torch.cat(list(itertools.islice(synthetic_batches(seed=2), 8)))
    with torch.no_grad():
        error = (sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    return float(error), float(trainer.dead_neurons.float().mean())


def test_auxk_revives_latents_with_sae_lens_dead_window() -> None:
    nmse_off, dead_off = train_synthetic(aux_loss_coefficient=0.0)
    nmse_on, dead_on = train_synthetic(aux_loss_coefficient=1.0)
    assert dead_on < dead_off - 0.05
    assert nmse_on < nmse_off * 0.95


def sae_lens_runner_dict(tmp_path: Path, **sae_options: object) -> dict[str, object]:
    """A SAELens batchtopk runner config (SAELens's SAE defaults), architecture renamed."""
    runner_options = {
        key: value
        for key, value in tiny_runner_kwargs(tmp_path).items()
        if key not in ("d_in", "d_sae", "k", "dead_tokens_window", "calibration_tokens")
        and key != "log_to_wandb"
    }
    theirs = LanguageModelSAERunnerConfig(
        sae=BatchTopKTrainingSAEConfig(d_in=TINY_D_MODEL, d_sae=512, **sae_options),
        dead_feature_window=5,
        **runner_options,  # type: ignore[arg-type]
    )
    theirs.logger.log_to_wandb = False
    as_dict = theirs.to_dict()
    as_dict["sae"]["architecture"] = "calibrated_batchtopk"
    # Our field (a tiny model has few tokens to spare; SAELens's own fields stay as they are).
    as_dict["sae"]["calibration_tokens"] = 2048
    return as_dict


def test_sae_lens_runner_config_renamed_trains_in_sae_lens_runner(
    tmp_path: Path, tiny_model: HookedTransformer, tiny_dataset: Dataset
) -> None:
    renamed = sae_lens_runner_dict(tmp_path)
    cfg = LanguageModelSAERunnerConfig.from_dict(renamed)
    assert isinstance(cfg.sae, CalibratedBatchTopKTrainingSAEConfig)
    for name in sae_lens_field_names() - {"metadata"}:
        assert getattr(cfg.sae, name) == renamed["sae"][name], name  # type: ignore[index]
    sae = LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model, override_dataset=tiny_dataset
    ).run()
    assert isinstance(sae, CalibratedBatchTopKTrainingSAE)
    assert sae.cfg.k == 100  # SAELens's default k
    saved = json.loads((Path(cfg.output_path) / "cfg.json").read_text())  # type: ignore[arg-type]
    assert saved["architecture"] == "calibrated_batchtopk"


def test_our_runner_resolves_and_saves_the_dead_window(
    tmp_path: Path, tiny_model: HookedTransformer, tiny_dataset: Dataset
) -> None:
    cfg = LanguageModelSAERunnerConfig.from_dict(sae_lens_runner_dict(tmp_path))
    CalibratingSAETrainingRunner(
        cfg, override_model=tiny_model, override_dataset=tiny_dataset
    ).run()
    saved = json.loads((Path(cfg.output_path) / "cfg.json").read_text())  # type: ignore[arg-type]
    window = saved["metadata"]["dead_latent_window"]
    assert window["tokens"] == cfg.dead_feature_window * cfg.train_batch_size_tokens == 5 * 64
    assert window["steps"] == 5


def test_a_dead_window_as_long_as_the_run_warns_that_auxk_never_acts(tmp_path: Path) -> None:
    options = tiny_runner_kwargs(tmp_path)
    del options["dead_tokens_window"]  # SAELens's window: 1000 steps x 64 tokens > 4096 tokens
    with pytest.warns(UserWarning, match=r"aux losses \['auxk'\] will never act.*dead_feature_w"):
        make_runner_config("calibrated_batchtopk", **options)

    def idle_warnings(**overrides: object) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_runner_config("calibrated_batchtopk", **{**options, **overrides})
        return [str(w.message) for w in caught if "will never act" in str(w.message)]

    assert idle_warnings(dead_feature_window=10) == []  # 640 tokens: latents can die
    assert idle_warnings(aux_losses={"zipf": 0.03}) == []  # zipf also feeds live latents
    assert "from dead_tokens_window" in idle_warnings(dead_tokens_window=4096)[0]
    assert acts_on_dead_latents_only("auxk_sae_lens") and not acts_on_dead_latents_only("zipf")


def test_yaml_and_sae_lens_cli_take_sae_lens_fields(
    tmp_path: Path, tiny_resources: Resources, capsys: pytest.CaptureFixture[str]
) -> None:
    from sae_lens.llm_sae_training_runner import _parse_cfg_args

    options = {
        "architecture": "calibrated_batchtopk",
        **tiny_runner_kwargs(tmp_path),
        "topk_threshold_lr": 0.05,
        "aux_loss_coefficient": 2.0,
        "use_sparse_activations": True,
        "decoder_init_norm": 0.2,
    }
    del options["dead_tokens_window"]
    config = tmp_path / "sae-lens-style.yaml"
    config.write_text(yaml.safe_dump(options))
    assert main(["train", str(config), "--dry-run"], tiny_resources) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)["sae"]
    assert (resolved["topk_threshold_lr"], resolved["aux_loss_coefficient"]) == (0.05, 2.0)
    assert resolved["metadata"]["dead_latent_window"]["tokens"] == 1000 * 64

    cfg = _parse_cfg_args(
        ["--architecture", "calibrated_batchtopk", "--d_in", "16", "--d_sae", "64", "--k", "4",
         "--topk_threshold_lr", "0.05", "--aux_loss_coefficient", "2.0",
         "--use_sparse_activations", "true", "--hook_name", TINY_HOOK]
    )  # fmt: skip
    assert isinstance(cfg.sae, CalibratedBatchTopKTrainingSAEConfig)
    assert (cfg.sae.topk_threshold_lr, cfg.sae.aux_loss_coefficient) == (0.05, 2.0)
    assert cfg.sae.use_sparse_activations is True


def test_train_writes_to_runs_config_name_and_dry_run_needs_no_output(
    tmp_path: Path,
    tiny_resources: Resources,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    options = tiny_runner_kwargs(tmp_path)
    del options["output_path"]
    config = tmp_path / "my-run.yaml"
    config.write_text(yaml.safe_dump(options))
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(config), "--dry-run"], tiny_resources) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output_path"] == str(Path("runs/my-run"))
    assert not (tmp_path / "runs").exists()
    assert main(["train", str(config)], tiny_resources) == 0
    assert (tmp_path / "runs" / "my-run" / "cfg.json").exists()


def identity_sae(d: int = 8) -> CalibratedBatchTopKSAE:
    from sae_lens_batchtopk import CalibratedBatchTopKSAEConfig

    sae = CalibratedBatchTopKSAE(CalibratedBatchTopKSAEConfig(d_in=d, d_sae=d, k=2))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    return sae


def test_calibrate_thresholds_is_exported_and_takes_finite_input_whole() -> None:
    assert sae_lens_batchtopk.calibrate_thresholds is calibration_module.calibrate_thresholds
    data = [torch.randn(300, 8).abs() for _ in range(3)]  # 900 tokens, fewer than a million
    result = calibrate_thresholds(identity_sae(), data)
    assert result.n_tokens == 900
    assert result.achieved_l0 == pytest.approx(2.0, rel=0.02)


def test_calibrate_thresholds_bounds_an_endless_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration_module, "DEFAULT_STREAM_TOKENS", 2048)

    def endless() -> Iterator[torch.Tensor]:
        while True:
            yield torch.randn(256, 8).abs()

    assert calibrate_thresholds(identity_sae(), endless()).n_tokens == 2048


def test_too_few_tokens_is_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def tripwire(*args: object, **kwargs: object) -> None:
        raise AssertionError("calibration encoded activations before refusing them")

    monkeypatch.setattr(calibration_module._Statistics, "add_batch", tripwire)
    sae = identity_sae()
    with pytest.raises(ValueError, match="n_tokens=100 is too few"):
        calibrate_thresholds(sae, [torch.randn(100, 8)])
    assert torch.all(sae.threshold == 0)
