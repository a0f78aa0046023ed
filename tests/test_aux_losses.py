"""AuxK against a hand computation; the registry's contract."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import step_input

from sae_lens_batchtopk import (
    CalibratedBatchTopKTrainingSAE,
    CalibratedBatchTopKTrainingSAEConfig,
    register_aux_loss,
    registered_aux_losses,
)
from sae_lens_batchtopk.aux_losses import AuxLossInputs, auxk_loss, get_aux_loss, zipf_loss

W_DEC = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def reconstruct_densely(
    hidden_pre: torch.Tensor, token_idx: torch.Tensor, latent_idx: torch.Tensor
) -> torch.Tensor:
    selected = hidden_pre[token_idx, latent_idx].relu()
    return torch.zeros_like(hidden_pre).index_put((token_idx, latent_idx), selected) @ W_DEC


def hand_inputs(sae_out: torch.Tensor, hidden_pre: torch.Tensor) -> AuxLossInputs:
    sae_in = torch.tensor([[1.0, 1.0], [2.0, 4.0]]) + sae_out.detach()
    return AuxLossInputs(
        sae_in=sae_in,
        sae_out=sae_out,
        hidden_pre=hidden_pre,
        feature_acts=torch.zeros_like(hidden_pre),
        dead_mask=torch.tensor([False, True, True]),
        underused_mask=torch.tensor([False, True, True]),
        k_aux=1,
        decode_directions=lambda acts: acts @ W_DEC,
        reconstruct_selected=partial(reconstruct_densely, hidden_pre),
    )


def test_auxk_matches_hand_computation() -> None:
    # residual e = [[1, 1], [2, 4]]; token 0 keeps dead latent 1 (2.0) -> ê = [0, 2];
    # token 1 keeps dead latent 2 (3.0) -> ê = [3, 3]. Squared errors 2 and 2, mean 2.
    # Residual variance: mean e = [1.5, 2.5], squared deviations 2.5 each -> 2.5. The input
    # x = e + 0 has the same variance, so the loss is 2 * 2.5 / 2.5 = 2.
    hidden_pre = torch.tensor([[5.0, 2.0, 1.0], [5.0, -1.0, 3.0]])
    loss = auxk_loss(hand_inputs(torch.zeros(2, 2), hidden_pre))
    assert loss.item() == pytest.approx(2.0)
    # Shifting x̂ (and x with it) by a constant changes neither variance; scaling the input
    # variance up 4x (x̂ moves, e stays) scales the loss 4x: main-loss units.
    shifted = auxk_loss(hand_inputs(torch.full((2, 2), 7.0), hidden_pre))
    assert shifted.item() == pytest.approx(2.0)
    spread = torch.tensor([[0.0, 0.0], [1.0, 3.0]])  # Var(x + spread) = 4 * Var(x)
    assert auxk_loss(hand_inputs(spread, hidden_pre)).item() == pytest.approx(8.0)


def test_auxk_gradient_does_not_reach_residual() -> None:
    sae_out = torch.zeros(2, 2, requires_grad=True)
    hidden_pre = torch.tensor([[5.0, 2.0, 1.0], [5.0, -1.0, 3.0]], requires_grad=True)
    auxk_loss(hand_inputs(sae_out, hidden_pre)).backward()
    assert sae_out.grad is None
    assert hidden_pre.grad is not None
    assert torch.all(hidden_pre.grad[:, 0] == 0)  # the live latent gets nothing


def test_auxk_is_zero_without_dead_latents() -> None:
    inputs = hand_inputs(torch.zeros(2, 2), torch.randn(2, 3))
    inputs = AuxLossInputs(**{**inputs.__dict__, "dead_mask": torch.zeros(3, dtype=torch.bool)})
    assert auxk_loss(inputs).item() == 0.0


def test_auxk_in_sae_touches_only_dead_decoder_rows_and_no_bias() -> None:
    torch.manual_seed(0)
    cfg = CalibratedBatchTopKTrainingSAEConfig(
        d_in=8,
        d_sae=32,
        k=2,
        aux_k=4,
        dead_tokens_window=1,
        aux_losses={"auxk": 1.0},
        apply_b_dec_to_input=False,  # so b_dec could only get gradient through the aux decode
    )
    sae = CalibratedBatchTopKTrainingSAE(cfg)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:10] = True
    sae.tokens_since_fired.copy_(torch.where(dead, 2, 0))  # more than the 1-token window
    x = torch.randn(16, 8)
    feature_acts, hidden_pre = sae.encode_with_hidden_pre(x)
    sae_out = sae.decode(feature_acts)
    step = step_input(sae, x, coefficient=1.0)
    losses = sae.calculate_aux_loss(step, feature_acts, hidden_pre, sae_out)
    assert set(losses) == {"auxk_loss"}
    losses["auxk_loss"].backward()
    assert sae.b_dec.grad is None or torch.all(sae.b_dec.grad == 0)
    assert torch.all(sae.W_dec.grad[~dead] == 0)
    assert sae.W_dec.grad[dead].abs().sum() > 0


def test_zipf_uses_underused_latents_hand_computation() -> None:
    # Latent 0 is live but under-used, latent 1 dead, latent 2 healthy: with k_aux = 1,
    # token 0 picks latent 0 (5.0) -> ê = [5, 0]; token 1 picks latent 1 (-1 -> relu 0) -> ê = 0.
    # Residual e = [[1, 1], [2, 4]]: errors 16 + 1 = 17 and 4 + 16 = 20, mean 18.5; Var(e) =
    # Var(x) = 2.5, so the loss is 18.5.
    hidden_pre = torch.tensor([[5.0, 2.0, 1.0], [-3.0, -1.0, 3.0]])
    inputs = hand_inputs(torch.zeros(2, 2), hidden_pre)
    inputs = AuxLossInputs(
        **{**inputs.__dict__, "underused_mask": torch.tensor([True, True, False])}
    )
    assert zipf_loss(inputs).item() == pytest.approx(18.5)
    assert auxk_loss(inputs).item() == pytest.approx(2.0)  # AuxK still sees only dead ones


def test_underused_mask_follows_zipf_targets() -> None:
    cfg = CalibratedBatchTopKTrainingSAEConfig(
        d_in=4, d_sae=4, k=1, zipf_exponent=1.0, underused_margin=0.5
    )
    sae = CalibratedBatchTopKTrainingSAE(cfg)
    # Zipf targets for ranks 1..4 with k = 1: 0.48, 0.24, 0.16, 0.12 (shares of 1/H_4).
    sae.firing_rate.copy_(torch.tensor([0.05, 0.5, 0.2, 0.0]))
    # ranks: latent 1 (0.5 vs 0.48), latent 2 (0.2 vs 0.24), latent 0 (0.05 vs 0.16 -> under),
    # latent 3 (dead -> under)
    assert sae.underused_mask.tolist() == [True, False, False, True]


def test_firing_rate_is_running_mean_then_windowed() -> None:
    cfg = CalibratedBatchTopKTrainingSAEConfig(d_in=4, d_sae=2, k=1, dead_tokens_window=8)
    sae = CalibratedBatchTopKTrainingSAE(cfg)
    on, off = torch.tensor([[1.0, 0.0]] * 4), torch.tensor([[0.0, 1.0]] * 4)
    sae._update_training_state(on)
    sae._update_training_state(off)
    assert torch.allclose(sae.firing_rate, torch.tensor([0.5, 0.5]))  # mean of 8 tokens
    sae._update_training_state(off)  # window full: weight 4/8
    assert torch.allclose(sae.firing_rate, torch.tensor([0.25, 0.75]))


def test_registry_lists_builtins_and_rejects_duplicates() -> None:
    assert {"auxk", "zipf"} <= set(registered_aux_losses())
    with pytest.raises(ValueError, match="already registered"):
        register_aux_loss("auxk", auxk_loss)


def test_unknown_loss_lists_registered_names() -> None:
    with pytest.raises(ValueError, match=r"registered aux losses: .*auxk"):
        get_aux_loss("nope")
    with pytest.raises(ValueError, match="unknown aux loss 'nope'"):
        CalibratedBatchTopKTrainingSAEConfig(d_in=8, d_sae=32, k=2, aux_losses={"nope": 1.0})


def test_custom_loss_trains_through_registry() -> None:
    """A registered dense-only loss is scheduled, computed every step and moves the weights."""
    register_aux_loss(
        "test_l1", lambda inputs: inputs.feature_acts.abs().sum(-1).mean(), overwrite=True
    )

    def train(coefficient: float) -> tuple[float, list[str]]:
        torch.manual_seed(0)
        cfg = CalibratedBatchTopKTrainingSAEConfig(
            d_in=8, d_sae=32, k=2, aux_losses={"test_l1": coefficient}
        )
        sae = CalibratedBatchTopKTrainingSAE(cfg)
        assert set(sae.get_coefficients()) == {"test_l1"}
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(1)
        with pytest.warns(UserWarning, match=r"dense path: aux losses \['test_l1'\]"):
            for step in range(30):
                x = torch.randn(64, 8, generator=generator)
                output = sae.training_forward_pass(step_input(sae, x, step=step))
                output.loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        with torch.no_grad():
            acts = sae.encode(torch.randn(256, 8, generator=generator))
        return float(acts.abs().sum(-1).mean()), sorted(output.losses)

    l1_without, names = train(0.0)
    l1_with, _ = train(5.0)
    assert names == ["mse_loss", "test_l1_loss"]
    assert l1_with < 0.7 * l1_without


@pytest.mark.parametrize("coefficient", [-1.0, float("nan")])
def test_bad_coefficients(coefficient: float) -> None:
    with pytest.raises(ValueError, match=r"aux_losses\['auxk'\]"):
        CalibratedBatchTopKTrainingSAEConfig(
            d_in=8, d_sae=32, k=2, aux_losses={"auxk": coefficient}
        )
