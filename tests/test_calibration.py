"""calibrate_thresholds on cases with known answers, and its refusals."""

from __future__ import annotations

import pytest
import torch
from sae_lens import JumpReLUSAE
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

from sae_lens_batchtopk import (
    CalibratedBatchTopKSAE,
    CalibratedBatchTopKSAEConfig,
    CalibratedBatchTopKTrainingSAE,
    CalibratedBatchTopKTrainingSAEConfig,
)
from sae_lens_batchtopk.calibration import (
    calibrate_thresholds,
)
from sae_lens_batchtopk.evaluation import calibrate_with_report
from sae_lens_batchtopk.selection import batch_topk, threshold_activation
from sae_lens_batchtopk.tools.report import format_calibration_report


def identity_sae(d: int, k: float) -> CalibratedBatchTopKSAE:
    """Pre-activations equal the input: thresholds are then quantiles of the data itself."""
    sae = CalibratedBatchTopKSAE(
        CalibratedBatchTopKSAEConfig(d_in=d, d_sae=d, k=k, apply_b_dec_to_input=False)
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def exponential_batches(n_batches: int, batch: int, d: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.empty(batch, d).exponential_(generator=generator) for _ in range(n_batches)]


def inference_l0(sae: CalibratedBatchTopKSAE, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return float(torch.cat([(sae.encode(b) > 0).sum(-1) for b in batches]).double().mean())


def test_global_theta_is_the_known_quantile() -> None:
    # Exp(1) entries: P(z > θ) = exp(-θ). Mean L0 = d * exp(-θ) = target -> θ = ln(d / target).
    d, target = 64, 4.0
    sae = identity_sae(d, target)
    result = calibrate_thresholds(
        sae, exponential_batches(40, 512, d, seed=0), method="l0", n_tokens=40 * 512
    )
    assert result.theta == pytest.approx(torch.log(torch.tensor(d / target)).item(), rel=0.01)
    assert result.achieved_l0 == pytest.approx(target, rel=1e-3)
    assert inference_l0(sae, exponential_batches(40, 512, d, seed=0)) == pytest.approx(
        result.achieved_l0, rel=1e-9
    )  # the reported L0 is an exact count on the calibration data
    assert inference_l0(sae, exponential_batches(20, 512, d, seed=1)) == pytest.approx(
        target, rel=0.02
    )
    assert torch.all(sae.threshold == sae.threshold[0])


def test_paper_theta_is_mean_batch_minimum() -> None:
    d, k = 16, 2.0
    sae = identity_sae(d, k)
    batches = exponential_batches(8, 64, d, seed=2)
    result = calibrate_thresholds(sae, batches, method="paper", n_tokens=8 * 64)
    expected = torch.stack([batch_topk(b, k)[batch_topk(b, k) > 0].min() for b in batches]).mean()
    assert result.theta == pytest.approx(float(expected), rel=1e-3)
    assert result.target_l0 is None


def test_per_latent_matches_batch_topk_frequencies() -> None:
    # Latent j's pre-activations are Exp(1) scaled by (1 + j): batch top-k fires the large-scale
    # latents far more often, and per-latent thresholds must reproduce those frequencies.
    d, k = 16, 2.0
    scale = torch.arange(1, d + 1, dtype=torch.float32)
    sae = identity_sae(d, k)
    batches = [b * scale for b in exponential_batches(80, 256, d, seed=3)]
    result = calibrate_thresholds(sae, batches, method="per_latent", n_tokens=80 * 256)
    topk_freq = torch.stack([(batch_topk(b, k) > 0).sum(0) for b in batches]).sum(0).double()
    with torch.no_grad():
        inference_freq = (
            torch.stack([(threshold_activation(b, sae.threshold) > 0).sum(0) for b in batches])
            .sum(0)
            .double()
        )
    fired = topk_freq > 200
    relative = (inference_freq[fired] - topk_freq[fired]).abs() / topk_freq[fired]
    assert relative.max() < 0.05
    assert result.achieved_l0 == pytest.approx(k, rel=2e-3)
    assert len(set(sae.threshold.tolist())) > 1  # genuinely per latent


def test_never_firing_latent_gets_finite_quiet_threshold() -> None:
    d, k = 8, 1.0
    sae = identity_sae(d, k)
    batches = exponential_batches(20, 256, d, seed=4)
    for batch in batches:
        batch[:, 0] = -1.0  # latent 0 never has a positive pre-activation
        batch[:, 1] *= 1e-3  # latent 1 is positive but always loses the batch top-k
    result = calibrate_thresholds(sae, batches, method="per_latent", n_tokens=20 * 256)
    assert torch.isfinite(sae.threshold).all()
    assert result.n_never_fired == 2
    maxima = torch.cat(batches).max(0).values
    assert sae.threshold[1] >= maxima[1]
    assert sae.threshold[0] >= 0
    assert inference_l0(sae, batches) == pytest.approx(result.achieved_l0)
    sae.to_jumprelu()  # export works


def test_streaming_equals_in_memory() -> None:
    d, k = 32, 3.0
    data = exponential_batches(10, 256, d, seed=5)
    results = []
    for source in (data, iter(data), (b.clone() for b in data)):
        sae = identity_sae(d, k)
        calibrate_thresholds(sae, source, method="per_latent", n_tokens=2560, chunk_tokens=64)
        results.append(sae.threshold.clone())
    one_chunk = identity_sae(d, k)
    calibrate_thresholds(one_chunk, data, method="per_latent", n_tokens=2560, chunk_tokens=4096)
    assert all(torch.equal(r, results[0]) for r in results)
    assert torch.equal(one_chunk.threshold, results[0])


def test_training_sae_exports_calibrated_thresholds(tmp_path: object) -> None:
    torch.manual_seed(0)
    sae = CalibratedBatchTopKTrainingSAE(
        CalibratedBatchTopKTrainingSAEConfig(d_in=8, d_sae=32, k=2)
    )
    batches = [torch.randn(256, 8) for _ in range(10)]
    result = calibrate_thresholds(sae, batches, method="l0", n_tokens=2560)
    assert sae.is_calibrated
    sae.save_inference_model(str(tmp_path))
    from sae_lens import SAE

    loaded = SAE.load_from_disk(str(tmp_path))
    assert torch.allclose(loaded.threshold, result.thresholds)
    assert inference_l0(loaded, batches) == pytest.approx(result.achieved_l0)


def test_repairs_builtin_batchtopk_and_its_jumprelu_export() -> None:
    torch.manual_seed(0)
    builtin = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=8, d_sae=32, k=2))
    builtin.topk_threshold.fill_(5.0)  # a badly drifted EMA
    batches = [torch.randn(256, 8) for _ in range(10)]
    with pytest.raises(TypeError, match="from_sae"):
        calibrate_thresholds(builtin, batches, n_tokens=2560)
    converted = CalibratedBatchTopKSAE.from_sae(builtin)
    assert torch.allclose(converted.threshold, torch.full((32,), 5.0))
    result = calibrate_thresholds(converted, batches, n_tokens=2560)
    assert inference_l0(converted, batches) == pytest.approx(result.achieved_l0)
    assert result.achieved_l0 == pytest.approx(2.0, rel=0.01)

    jumprelu = converted.to_jumprelu()
    jumprelu.threshold.data.fill_(5.0)
    calibrate_thresholds(jumprelu, batches, method="per_latent", n_tokens=2560)
    with torch.no_grad():
        l0 = float(torch.cat([(jumprelu.encode(b) > 0).sum(-1) for b in batches]).float().mean())
    assert l0 == pytest.approx(2.0, rel=0.01)


def test_report_before_and_after() -> None:
    torch.manual_seed(0)
    sae = CalibratedBatchTopKTrainingSAE(
        CalibratedBatchTopKTrainingSAEConfig(d_in=8, d_sae=32, k=2)
    )
    sae.running_theta.fill_(0.01)  # a stale estimate: far too many latents fire
    calibration = [torch.randn(256, 8) for _ in range(10)]
    heldout = [torch.randn(256, 8) for _ in range(4)]
    result, report = calibrate_with_report(sae, calibration, heldout, n_tokens=2560)
    assert report["threshold_before"]["l0_mean"] > 4
    assert report["batch_topk"]["l0_mean"] == pytest.approx(2.0)
    assert report["threshold_after"]["l0_mean"] == pytest.approx(2.0, rel=0.1)
    assert "threshold mode, after calibration" in format_calibration_report(result, report)


def sae_and_data() -> tuple[CalibratedBatchTopKSAE, list[torch.Tensor]]:
    return identity_sae(16, 2.0), exponential_batches(4, 256, 16, seed=6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target_l0": 0}, ValueError, r"target_l0 must be > 0"),
        ({"target_l0": 17}, ValueError, r"target_l0 must be <= d_sae \(16\)"),
        ({"method": "median"}, ValueError, "method must be one of"),
        ({"n_tokens": 100}, ValueError, "n_tokens=100 is too few"),
        ({"method": "per_latent", "n_tokens": 50}, ValueError, "10 firings per latent"),
        ({"n_tokens": 5000}, ValueError, "the activations hold 1024 tokens"),
    ],
)
def test_bad_input_leaves_sae_untouched(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    sae, data = sae_and_data()
    sae.set_thresholds(0.25)
    with pytest.raises(error, match=match):
        calibrate_thresholds(sae, data, **{"n_tokens": 1024, **kwargs})
    assert torch.all(sae.threshold == 0.25)


def test_nan_activations_rejected_sae_untouched() -> None:
    sae, data = sae_and_data()
    sae.set_thresholds(0.25)
    data[2][5, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        calibrate_thresholds(sae, data, n_tokens=1024)
    assert torch.all(sae.threshold == 0.25)


def test_unsupported_architecture() -> None:
    topk = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=2))
    with pytest.raises(TypeError, match="architecture 'topk' has no calibrated BatchTopK form"):
        calibrate_thresholds(topk, [torch.randn(8, 8)], n_tokens=8)
    plain = JumpReLUSAE(JumpReLUSAEConfig(d_in=8, d_sae=16))
    with pytest.raises(ValueError, match="pass k="):
        calibrate_thresholds(plain, [torch.randn(8, 8)], n_tokens=8)
