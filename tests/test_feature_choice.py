"""Feature Choice selection and SAE; Mutual Choice is BatchTopK."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import step_input, tiny_runner_kwargs
from datasets import Dataset
from sae_lens import SAE, TrainingSAE
from transformer_lens import HookedTransformer

from sae_lens_batchtopk import (
    CalibratedBatchTopKSAE,
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    make_runner_config,
)
from sae_lens_batchtopk.calibration import calibrate_thresholds
from sae_lens_batchtopk.runner import CalibratingSAETrainingRunner
from sae_lens_batchtopk.selection import batch_topk, feature_choice, latent_capacities


def brute_force_feature_choice(hidden_pre: torch.Tensor, capacities: torch.Tensor) -> torch.Tensor:
    """Per latent, sort its positive tokens and keep the first capacity of them."""
    acts = hidden_pre.relu()
    kept = torch.zeros_like(acts)
    for latent in range(acts.shape[1]):
        column = acts[:, latent].tolist()
        order = sorted(range(len(column)), key=lambda t: -column[t])
        for token in order[: int(capacities[latent])]:
            kept[token, latent] = column[token]
    return kept


@pytest.mark.parametrize("seed", range(5))
def test_feature_choice_matches_brute_force(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    hidden_pre = torch.randn(12, 6, generator=generator)
    capacities = torch.randint(0, 14, (6,), generator=generator)
    result = feature_choice(hidden_pre, capacities)
    assert torch.equal(result, brute_force_feature_choice(hidden_pre, capacities))


def test_feature_choice_3d_and_token_counts_vary() -> None:
    hidden_pre = torch.randn(2, 8, 16)
    capacities = torch.full((16,), 2)
    result = feature_choice(hidden_pre, capacities)
    assert result.shape == hidden_pre.shape
    per_latent = (result.reshape(-1, 16) > 0).sum(0)
    assert torch.all(per_latent <= 2)
    assert (result.reshape(-1, 16) > 0).sum(-1).unique().numel() > 1  # tokens vary


def test_capacities_sum_to_budget() -> None:
    for zipf in (None, 0.5, 1.0):
        caps = latent_capacities(3.5, 100, 40, zipf_exponent=zipf, rank_order=torch.randperm(40))
        assert int(caps.sum()) == 350
        assert int(caps.max()) <= 100
    ranked = latent_capacities(4, 64, 8, zipf_exponent=1.0, rank_order=torch.arange(8).flip(0))
    assert ranked[7] == ranked.max() and ranked[0] == ranked.min()


def test_mutual_choice_is_batch_topk() -> None:
    """Mutual Choice: the k*n largest affinities over all (token, latent) pairs of the batch."""
    torch.manual_seed(0)
    hidden_pre = torch.randn(10, 7)
    k = 2.5
    pairs = sorted(
        ((float(hidden_pre[t, j]), t, j) for t in range(10) for j in range(7)), reverse=True
    )
    mutual = torch.zeros(10, 7)
    for value, t, j in pairs[: int(k * 10)]:
        mutual[t, j] = max(value, 0.0)
    assert torch.equal(batch_topk(hidden_pre, k), mutual)


def test_zipf_capacities_that_cannot_reach_l0_rejected() -> None:
    with pytest.raises(ValueError, match="Zipf capacities cannot reach L0"):
        FeatureChoiceTrainingSAEConfig(d_in=8, d_sae=16, k=8, capacity="zipf", zipf_exponent=1.0)
    with pytest.raises(ValueError, match="capacity must be"):
        FeatureChoiceTrainingSAEConfig(d_in=8, d_sae=16, k=2, capacity="pareto")  # type: ignore[arg-type]


def test_feature_choice_sae_trains_and_calibrates(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = FeatureChoiceTrainingSAEConfig(d_in=8, d_sae=32, k=2, aux_losses={"zipf": 1 / 32})
    sae = FeatureChoiceTrainingSAE(cfg)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step in range(5):
        out = sae.training_forward_pass(step_input(sae, torch.randn(64, 8), step=step))
        assert out.feature_acts.is_sparse  # the fast path's codes
        fired = out.feature_acts.to_dense() > 0
        assert fired.sum() <= 2 * 64
        assert (fired.sum(0) <= sae.capacities(64)).all()
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert "underused_latent_fraction" in out.metrics
    batches = [torch.randn(256, 8) for _ in range(20)]
    result = calibrate_thresholds(sae, batches, method="per_latent", n_tokens=5120)
    assert result.achieved_l0 == pytest.approx(result.target_l0, rel=0.01)
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, CalibratedBatchTopKSAE)
    assert loaded.cfg.metadata.training_architecture == "feature_choice"
    with torch.no_grad():
        l0 = float(torch.cat([(loaded.encode(b) > 0).sum(-1) for b in batches]).float().mean())
    assert l0 == pytest.approx(result.achieved_l0, rel=1e-4)


def test_tracking_state_survives_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = FeatureChoiceTrainingSAEConfig(d_in=8, d_sae=32, k=2, dead_tokens_window=100)
    sae = FeatureChoiceTrainingSAE(cfg)
    for _ in range(3):
        sae._update_training_state(sae.encode(torch.randn(40, 8)).detach())
    sae.save_model(tmp_path)
    restored = TrainingSAE.load_from_disk(tmp_path)
    assert isinstance(restored, FeatureChoiceTrainingSAE)
    batch = sae.encode(torch.randn(40, 8)).detach()
    sae._update_training_state(batch)
    restored._update_training_state(batch)
    for name in ("tokens_since_fired", "firing_rate", "tokens_seen", "running_theta"):
        assert torch.equal(getattr(sae, name), getattr(restored, name)), name
    assert torch.equal(sae.dead_mask, restored.dead_mask)
    assert torch.equal(sae.underused_mask, restored.underused_mask)


def test_feature_choice_through_runner(
    tmp_path: Path, tiny_model: HookedTransformer, tiny_dataset: Dataset
) -> None:
    cfg = make_runner_config(
        "feature_choice",
        **tiny_runner_kwargs(
            tmp_path, capacity="uniform", aux_losses={"auxk": 1 / 32, "zipf": 1 / 32}
        ),
    )
    runner = CalibratingSAETrainingRunner(
        cfg, override_model=tiny_model, override_dataset=tiny_dataset
    )
    runner.run()
    loaded = SAE.load_from_disk(tmp_path / "output")
    assert isinstance(loaded, CalibratedBatchTopKSAE)
    assert runner.calibration is not None
    assert loaded.cfg.metadata.calibration["method"] == "per_latent"  # Feature Choice default


def test_feature_choice_calibrates_per_latent_and_refuses_paper() -> None:
    assert FeatureChoiceTrainingSAEConfig(d_in=8, d_sae=32, k=2).calibration_method == "per_latent"
    with pytest.raises(ValueError, match="calibration_method='paper'"):
        FeatureChoiceTrainingSAEConfig(d_in=8, d_sae=32, k=2, calibration_method="paper")
    sae = FeatureChoiceTrainingSAE(FeatureChoiceTrainingSAEConfig(d_in=8, d_sae=32, k=2))
    before = sae.threshold.clone()
    with pytest.raises(ValueError, match="method='paper' does not apply"):
        calibrate_thresholds(sae, [torch.randn(256, 8)] * 4, method="paper", n_tokens=1024)
    assert torch.equal(sae.threshold.isnan(), before.isnan())  # left untouched
