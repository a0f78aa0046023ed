"""The calibrated_batchtopk configs and SAEs: validation, registration, export, folding."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from conftest import step_input
from sae_lens import SAE, JumpReLUSAE, TrainingSAE
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

import sae_lens_batchtopk
from sae_lens_batchtopk import (
    CalibratedBatchTopKSAE,
    CalibratedBatchTopKSAEConfig,
    CalibratedBatchTopKTrainingSAE,
    CalibratedBatchTopKTrainingSAEConfig,
)
from sae_lens_batchtopk.registry import register_architecture


def trained_sae(
    d_in: int = 8, d_sae: int = 32, k: float = 3.0, steps: int = 5
) -> CalibratedBatchTopKTrainingSAE:
    """A training SAE after a few optimiser steps, so norms and θ are non-trivial."""
    torch.manual_seed(0)
    sae = CalibratedBatchTopKTrainingSAE(
        CalibratedBatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dead_tokens_window=64)
    )
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step in range(steps):
        out = sae.training_forward_pass(step_input(sae, torch.randn(32, d_in), step=step))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return sae


def test_registered_in_both_registries() -> None:
    assert SAE_CLASS_REGISTRY["calibrated_batchtopk"][0] is CalibratedBatchTopKSAE
    assert SAE_TRAINING_CLASS_REGISTRY["calibrated_batchtopk"][0] is CalibratedBatchTopKTrainingSAE
    # built-ins untouched
    assert SAE_TRAINING_CLASS_REGISTRY["batchtopk"][0].__module__.startswith("sae_lens.")


def test_import_twice_is_harmless() -> None:
    before = {
        name: (SAE_CLASS_REGISTRY.get(name), SAE_TRAINING_CLASS_REGISTRY.get(name))
        for name in ("calibrated_batchtopk", "feature_choice")
    }
    importlib.reload(sae_lens_batchtopk)
    register_architecture(
        "calibrated_batchtopk",
        inference=(CalibratedBatchTopKSAE, CalibratedBatchTopKSAEConfig),
        training=(CalibratedBatchTopKTrainingSAE, CalibratedBatchTopKTrainingSAEConfig),
    )
    for name, (inference, training) in before.items():
        assert SAE_CLASS_REGISTRY.get(name) is inference, name
        assert SAE_TRAINING_CLASS_REGISTRY.get(name) is training, name


def test_refuses_to_replace_builtin() -> None:
    with pytest.raises(ValueError, match="'jumprelu' is already registered by sae_lens"):
        register_architecture(
            "jumprelu", inference=(CalibratedBatchTopKSAE, CalibratedBatchTopKSAEConfig)
        )
    with pytest.raises(ValueError, match="'batchtopk' is already registered by sae_lens"):
        register_architecture(
            "batchtopk",
            inference=(CalibratedBatchTopKSAE, CalibratedBatchTopKSAEConfig),
            training=(CalibratedBatchTopKTrainingSAE, CalibratedBatchTopKTrainingSAEConfig),
        )
    assert "batchtopk" not in SAE_CLASS_REGISTRY


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0}, ValueError, "k must be > 0"),
        ({"k": -2.0}, ValueError, "k must be > 0"),
        ({"k": 33}, ValueError, r"k must be <= d_sae \(32\)"),
        ({"k": "8"}, TypeError, "k must be a number"),
        ({"k": True}, TypeError, "k must be a number"),
        ({"dtype": "float33"}, ValueError, "dtype must name a floating-point"),
        ({"dtype": "int64"}, ValueError, "dtype must name a floating-point"),
        ({"aux_k": 0}, ValueError, "aux_k must be > 0"),
        ({"aux_k": 2.5}, TypeError, "aux_k must be an integer"),
        ({"dead_tokens_window": 0}, ValueError, "dead_tokens_window must be > 0"),
        ({"topk_threshold_lr": 0.0}, ValueError, "topk_threshold_lr must be > 0"),
        ({"topk_threshold_lr": float("nan")}, ValueError, "topk_threshold_lr must be a finite"),
        ({"calibration_target_l0": 0}, ValueError, "calibration_target_l0 must be > 0"),
        ({"calibration_tokens": 100}, ValueError, "calibration_tokens=100 is too few"),
        ({"aux_loss_coefficient": -1.0}, ValueError, r"aux_loss_coefficient must be in"),
        (
            {"aux_loss_coefficient": 2.0, "aux_losses": {"auxk": 0.1}},
            ValueError,
            "both set the AuxK weight",
        ),
        (
            {"normalize_activations": "layer_norm"},
            ValueError,
            "cannot train with aux losses",
        ),
        ({"b_dec_init": "median"}, ValueError, "b_dec_init must be"),
        ({"calibration_method": "median"}, ValueError, "calibration_method must be one of"),
        ({"calibration_target_l0": 64}, ValueError, r"calibration_target_l0 must be <= d_sae"),
        ({"aux_losses": ["auxk"]}, TypeError, "aux_losses must map"),
    ],
)
def test_training_config_rejects_bad_input(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        CalibratedBatchTopKTrainingSAEConfig(d_in=8, d_sae=32, **{"k": 4, **kwargs})


def test_unknown_option_names_the_field() -> None:
    with pytest.raises(TypeError, match="bogus"):
        CalibratedBatchTopKTrainingSAEConfig(d_in=8, d_sae=32, k=4, bogus=1)  # type: ignore[call-arg]


def test_inference_config_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="k must be <= d_sae"):
        CalibratedBatchTopKSAEConfig(d_in=8, d_sae=4, k=5)


def test_config_round_trips_through_dicts() -> None:
    cfg = CalibratedBatchTopKTrainingSAEConfig(
        d_in=8, d_sae=32, k=2.5, aux_k=3, aux_losses={"auxk": 0.1}
    )
    again = CalibratedBatchTopKTrainingSAEConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert cfg.to_dict()["architecture"] == "calibrated_batchtopk"


def test_default_aux_k_is_half_d_in() -> None:
    assert CalibratedBatchTopKTrainingSAEConfig(d_in=576, d_sae=4608, k=32).resolved_aux_k == 288


def test_running_theta_tracks_min_selected_activation() -> None:
    sae = trained_sae(steps=1)
    # one step: θ starts at the first batch's minimum selected activation, not at 0
    assert sae.running_theta > 0
    x = torch.randn(32, 8)
    with torch.no_grad():
        acts = sae.encode(x)
    before = sae.running_theta.clone()
    sae._update_training_state(acts)
    expected = 0.99 * before + 0.01 * acts[acts > 0].min()
    assert torch.allclose(sae.running_theta, expected)


def test_d_sae_zero_names_d_sae() -> None:
    for config_class in (CalibratedBatchTopKTrainingSAEConfig, CalibratedBatchTopKSAEConfig):
        with pytest.raises(ValueError, match="d_sae must be > 0"):
            config_class(d_in=8, d_sae=0, k=4)


def test_dead_latents_counted_in_tokens() -> None:
    sae = CalibratedBatchTopKTrainingSAE(
        CalibratedBatchTopKTrainingSAEConfig(d_in=4, d_sae=8, k=1, dead_tokens_window=10)
    )
    acts = torch.zeros(4, 8)
    acts[:, 0] = 1.0
    sae._update_training_state(acts)  # 4 tokens
    assert not sae.dead_mask.any()
    sae._update_training_state(acts)  # 8 tokens <= 10
    assert not sae.dead_mask.any()
    sae._update_training_state(acts)  # 12 tokens > 10
    assert sae.dead_mask.tolist() == [False] + [True] * 7
    assert sae.tokens_since_fired.tolist() == [0] + [12] * 7


def test_export_uses_running_theta_then_calibrated(tmp_path: Path) -> None:
    sae = trained_sae()
    assert not sae.is_calibrated
    sae.save_inference_model(tmp_path / "a")
    loaded = SAE.load_from_disk(tmp_path / "a")
    assert isinstance(loaded, CalibratedBatchTopKSAE)
    assert torch.allclose(loaded.threshold, sae.running_theta.expand(32))

    per_latent = torch.linspace(0.1, 0.4, 32)
    sae.set_thresholds(per_latent)
    assert sae.is_calibrated
    sae.save_inference_model(tmp_path / "b")
    assert torch.allclose(SAE.load_from_disk(tmp_path / "b").threshold, per_latent)


def test_inference_batch_mode_matches_training_selection(tmp_path: Path) -> None:
    sae = trained_sae()
    sae.save_inference_model(tmp_path)
    inference = SAE.load_from_disk(tmp_path)
    x = torch.randn(64, 8)
    view = inference.batch_topk_view()
    with torch.no_grad():
        batch_codes = view.encode(x)
        assert torch.equal(batch_codes, inference.encode(x, mode="batch_topk"))
        assert torch.allclose(view.decode(batch_codes), sae(x), atol=1e-5)
    assert torch.allclose(batch_codes, sae.encode(x).detach(), atol=1e-5)
    with pytest.raises(ValueError, match="mode must be one of"):
        inference.encode(x, mode="bogus")  # type: ignore[arg-type]


def test_threshold_mode_is_per_token() -> None:
    sae = trained_sae()
    sae.set_thresholds(sae.running_theta)
    inference = _inference_from(sae)
    x = torch.randn(16, 8)
    with torch.no_grad():
        together = inference.encode(x)
        alone = torch.cat([inference.encode(x[i : i + 1]) for i in range(16)])
    # same firing pattern; values agree up to matmul rounding (batched vs single-row GEMM)
    assert torch.equal(together > 0, alone > 0)
    assert torch.allclose(together, alone, atol=1e-6)


def _inference_from(sae: CalibratedBatchTopKTrainingSAE) -> CalibratedBatchTopKSAE:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        sae.save_inference_model(directory)
        return SAE.load_from_disk(directory)


def test_to_jumprelu_identical_outputs() -> None:
    sae = trained_sae()
    sae.set_thresholds(torch.rand(32) * 0.3)
    inference = _inference_from(sae)
    jumprelu = inference.to_jumprelu()
    assert isinstance(jumprelu, JumpReLUSAE)
    assert jumprelu.cfg.metadata.exported_from_architecture == "calibrated_batchtopk"
    x = torch.randn(64, 8)
    with torch.no_grad():
        assert torch.equal(jumprelu.encode(x), inference.encode(x))
        assert torch.equal(jumprelu(x), inference(x))


def test_fold_w_dec_norm_keeps_codes() -> None:
    inference = _inference_from(trained_sae())
    inference.set_thresholds(0.1)
    with torch.no_grad():
        inference.W_dec.mul_(torch.rand(32, 1) + 0.5)
    x = torch.randn(32, 8)
    with torch.no_grad():
        before = inference(x)
        active_before = inference.encode(x) > 0
        inference.fold_W_dec_norm()
        assert torch.equal(inference.encode(x) > 0, active_before)
        assert torch.allclose(inference(x), before, atol=1e-5)


def test_fold_activation_norm_scaling_factor_keeps_outputs() -> None:
    sae = trained_sae()
    sae.set_thresholds(sae.running_theta)
    x = torch.randn(32, 8)
    scale = 3.0
    before = _inference_from(sae)
    with torch.no_grad():
        reference = before(x * scale) / scale  # what training saw: scaled inputs
        codes_before = before.encode(x * scale) > 0
        theta = sae.running_theta.clone()
    sae.fold_activation_norm_scaling_factor(scale)
    assert torch.allclose(sae.running_theta, theta / scale)
    inference = _inference_from(sae)
    with torch.no_grad():
        assert torch.allclose(inference(x), reference, atol=1e-5)
        assert torch.equal(inference.encode(x) > 0, codes_before)


def test_set_thresholds_rejects_nan() -> None:
    inference = _inference_from(trained_sae())
    with pytest.raises(ValueError, match="finite"):
        inference.set_thresholds(torch.full((32,), float("nan")))
    with pytest.raises(ValueError, match="d_sae=32"):
        inference.set_thresholds(torch.zeros(5))


def test_training_load_from_disk_restores_state(tmp_path: Path) -> None:
    sae = trained_sae()
    sae.set_thresholds(torch.rand(32))
    sae.save_model(tmp_path)
    loaded = TrainingSAE.load_from_disk(tmp_path)
    assert isinstance(loaded, CalibratedBatchTopKTrainingSAE)
    for name in ("running_theta", "tokens_since_fired", "threshold", "W_enc"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name)), name
    assert loaded.tokens_since_fired.dtype == torch.long


def test_b_dec_starts_at_first_batch_mean_once(tmp_path: Path) -> None:
    def step(sae: CalibratedBatchTopKTrainingSAE, x: torch.Tensor) -> None:
        sae.training_forward_pass(step_input(sae, x))

    cfg = CalibratedBatchTopKTrainingSAEConfig(d_in=8, d_sae=32, k=2)
    sae = CalibratedBatchTopKTrainingSAE(cfg)
    first = torch.randn(64, 8) + 5.0
    step(sae, first)
    assert torch.allclose(sae.b_dec, first.mean(0))
    step(sae, torch.randn(64, 8) - 5.0)
    assert torch.allclose(sae.b_dec, first.mean(0))  # only the first batch ever

    sae.save_model(tmp_path)
    resumed = TrainingSAE.load_from_disk(tmp_path)
    step(resumed, torch.randn(64, 8) - 5.0)
    assert torch.allclose(resumed.b_dec, first.mean(0))  # a resume does not re-initialise

    zeros = CalibratedBatchTopKTrainingSAE(
        CalibratedBatchTopKTrainingSAEConfig(d_in=8, d_sae=32, k=2, b_dec_init="zeros")
    )
    step(zeros, first)
    assert torch.all(zeros.b_dec == 0)
