"""``calibrated_matryoshka_batchtopk``: SAELens's matryoshka_batchtopk fields, loss and gradients.

The reference is SAELens's own ``MatryoshkaBatchTopKTrainingSAE`` on the same weights (float64):
the sparse step (nested decodes from the selected entries only) and the dense one must give its
losses and gradients to float rounding. The per-level aux losses are checked sparse against
dense, and in SAELens's units against SAELens's ``use_matryoshka_aux_loss``. Then the SAE trains
through SAELens's trainer and runner, calibrates to k and exports; SAELens-trained Matryoshka
SAEs, their JumpReLU exports and dictionary_learning's Matryoshka import calibrate as well.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_D_MODEL, step_input, tiny_runner_kwargs, trainer_config
from datasets import Dataset
from sae_lens import (
    SAE,
    JumpReLUSAE,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    TrainingSAE,
)
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer
from test_drop_in import SAE_LENS_VALUES as BATCHTOPK_SAE_LENS_VALUES
from test_sparse_path import (
    assert_same_step,
    perturbed_sae,
    random_positions,
    saved_tensor_shapes,
    training_step,
)
from transformer_lens import HookedTransformer

from sae_lens_batchtopk import (
    CalibratedBatchTopKSAE,
    CalibratedMatryoshkaBatchTopKTrainingSAE,
    CalibratedMatryoshkaBatchTopKTrainingSAEConfig,
    calibrate_thresholds,
    make_runner_config,
)
from sae_lens_batchtopk.importers import load_dictionary_learning
from sae_lens_batchtopk.runner import CalibratingSAETrainingRunner
from sae_lens_batchtopk.saes.matryoshka_batchtopk_sae import MATRYOSHKA_SAE_LENS_FIELDS
from sae_lens_batchtopk.sparse_codes import SparseCodes
from sae_lens_batchtopk.sparse_step import (
    SparseStepWeights,
    decode_nested_dense_without_bias,
    decode_nested_without_bias,
)

ARCHITECTURE = "calibrated_matryoshka_batchtopk"
DL_MATRYOSHKA = Path(__file__).parent / "data" / "foreign" / "dictionary_learning_matryoshka"

# A non-default value for every field of SAELens's MatryoshkaBatchTopKTrainingSAEConfig: its
# BatchTopK fields (as in test_drop_in) and its own.
SAE_LENS_VALUES: dict[str, object] = {
    **BATCHTOPK_SAE_LENS_VALUES,
    "matryoshka_widths": [8, 24, 64],
    "use_matryoshka_aux_loss": True,
}


def sae_lens_field_names() -> set[str]:
    return {f.name for f in fields(MatryoshkaBatchTopKTrainingSAEConfig)}


def config(**options: Any) -> CalibratedMatryoshkaBatchTopKTrainingSAEConfig:
    return CalibratedMatryoshkaBatchTopKTrainingSAEConfig(
        **{"d_in": 8, "d_sae": 32, "k": 2, "matryoshka_widths": [4, 12, 32], **options}
    )


def test_every_sae_lens_matryoshka_field_is_listed_and_accepted() -> None:
    assert set(SAE_LENS_VALUES) == sae_lens_field_names(), "a SAELens field is untested"
    assert set(MATRYOSHKA_SAE_LENS_FIELDS) == sae_lens_field_names(), "a field is undecided"
    theirs = MatryoshkaBatchTopKTrainingSAEConfig(**copy.deepcopy(SAE_LENS_VALUES))  # type: ignore[arg-type]
    ours = CalibratedMatryoshkaBatchTopKTrainingSAEConfig(**copy.deepcopy(SAE_LENS_VALUES))  # type: ignore[arg-type]
    for name in sae_lens_field_names() - {"metadata"}:
        assert getattr(ours, name) == getattr(theirs, name), name
    again = CalibratedMatryoshkaBatchTopKTrainingSAEConfig.from_dict(ours.to_dict())
    for name in sae_lens_field_names() - {"metadata"}:
        assert getattr(again, name) == getattr(ours, name), name
    assert ours.architecture() == ARCHITECTURE
    assert ours.to_dict()["metadata"]["training_architecture_details"]["matryoshka_widths"] == [
        8,
        24,
        64,
    ]


def test_defaults_are_sae_lens_defaults() -> None:
    widths = {"d_in": 16, "d_sae": 128, "matryoshka_widths": [32, 128]}
    theirs = MatryoshkaBatchTopKTrainingSAEConfig(**widths)  # type: ignore[arg-type]
    ours = CalibratedMatryoshkaBatchTopKTrainingSAEConfig(**widths)  # type: ignore[arg-type]
    for name in sae_lens_field_names() - {"metadata"}:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.group_weights is None and ours.level_weights == [1.0, 1.0]


def test_widths_short_of_d_sae_get_d_sae_appended_as_in_sae_lens() -> None:
    with pytest.warns(UserWarning, match="does not end at d_sae=32"):
        ours = config(matryoshka_widths=[4, 12])
    with pytest.warns(UserWarning):
        theirs = MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(d_in=8, d_sae=32, matryoshka_widths=[4, 12])
        )
    assert ours.matryoshka_widths == theirs.cfg.matryoshka_widths == [4, 12, 32]
    assert ours.to_dict()["metadata"]["training_architecture_details"]["matryoshka_widths"] == [
        4,
        12,
        32,
    ]


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"matryoshka_widths": []}, ValueError, r"matryoshka_widths must list .* e\.g\. \[8, 16"),
        ({"matryoshka_widths": [0, 32]}, ValueError, "matryoshka_widths must hold positive"),
        ({"matryoshka_widths": [4.5, 32]}, ValueError, "matryoshka_widths must hold positive"),
        ({"matryoshka_widths": [12, 4, 32]}, ValueError, "strictly increasing"),
        ({"matryoshka_widths": [12, 12, 32]}, ValueError, "strictly increasing"),
        ({"matryoshka_widths": [4, 40]}, ValueError, "beyond d_sae=32.*end them at d_sae"),
        ({"group_weights": [1.0, 1.0]}, ValueError, "one weight per level: 3 for"),
        ({"group_weights": [1.0, -1.0, 1.0]}, ValueError, r"group_weights\[1\] must be in"),
        ({"group_weights": [1.0, float("nan"), 1.0]}, ValueError, r"group_weights\[1\]"),
        ({"use_matryoshka_aux_loss": "yes"}, TypeError, "use_matryoshka_aux_loss must be true"),
        (
            {"normalize_activations": "layer_norm"},
            ValueError,
            "normalize_activations='layer_norm' cannot train with aux losses",
        ),
    ],
)
def test_invalid_config_is_refused_at_construction(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        config(**options)


def test_decode_nested_matches_dense_reference() -> None:
    torch.manual_seed(0)
    n_tokens, d_in, d_sae, widths = 12, 7, 20, [3, 5, 8, 20]
    # Tokens 0, 5 and 11 select nothing; no entry falls in [3, 5) when the seed leaves it empty.
    for nnz in (0, 1, 57):
        rows, cols = random_positions(n_tokens, d_sae, nnz, skip_tokens=(0, 5, 11))
        values = torch.randn(nnz, dtype=torch.float64, requires_grad=True)
        W_dec = torch.randn(d_sae, d_in, dtype=torch.float64, requires_grad=True)
        for rescale in (True, False):
            weights = SparseStepWeights.of(
                torch.empty(0), torch.empty(0), W_dec, rescale_acts_by_decoder_norm=rescale
            )
            codes = SparseCodes(rows, cols, values, n_tokens, d_sae)
            sparse = decode_nested_without_bias(codes, weights, widths)
            # The decoder norms are a constant in the decode (the step's selected values carry
            # the same norms, so their gradients cancel there): the reference divides by them
            # detached.
            dense_acts = codes.to_dense()
            plain = weights
            if weights.decoder_scale is not None:
                dense_acts = dense_acts / weights.decoder_scale.detach()
                plain = SparseStepWeights.of(
                    torch.empty(0), torch.empty(0), W_dec, rescale_acts_by_decoder_norm=False
                )
            dense = decode_nested_dense_without_bias(dense_acts, plain, widths)
            assert sparse.shape == (len(widths), n_tokens, d_in)
            torch.testing.assert_close(sparse, dense)
            upstream = torch.randn_like(dense)
            expected = torch.autograd.grad((dense * upstream).sum(), (values, W_dec))
            actual = torch.autograd.grad((sparse * upstream).sum(), (values, W_dec))
            for got, want in zip(actual, expected, strict=True):
                torch.testing.assert_close(got, want)


def sae_pair(
    aux_losses: dict[str, float] | None = None, **options: Any
) -> tuple[MatryoshkaBatchTopKTrainingSAE, CalibratedMatryoshkaBatchTopKTrainingSAE]:
    """SAELens's matryoshka_batchtopk and ours: same SAELens options, same perturbed weights.

    Ours trains with ``aux_losses`` (none by default) in place of SAELens's AuxK.
    """
    values: dict[str, Any] = {
        "d_in": 24,
        "d_sae": 256,
        "k": 8,
        "dtype": "float64",
        "matryoshka_widths": [16, 64, 160, 256],
        **options,
    }
    torch.manual_seed(0)
    theirs = MatryoshkaBatchTopKTrainingSAE(
        MatryoshkaBatchTopKTrainingSAEConfig(**copy.deepcopy(values))
    )
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    values["aux_loss_coefficient"] = 1.0  # aux_losses sets our aux weights
    ours = CalibratedMatryoshkaBatchTopKTrainingSAE(
        CalibratedMatryoshkaBatchTopKTrainingSAEConfig(
            **values, b_dec_init="zeros", aux_losses=aux_losses or {}
        )
    )
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            ours.get_parameter(name).copy_(theirs.get_parameter(name))
    return theirs, ours


def run_step(sae: Any, step: TrainStepInput) -> dict[str, Any]:
    sae = copy.deepcopy(sae)
    output = sae.training_forward_pass(step)
    output.loss.backward()
    return {
        "loss": output.loss.detach(),
        "losses": {name: value.detach() for name, value in output.losses.items()},
        "sae_out": output.sae_out.detach(),
        "grads": {
            name: sae.get_parameter(name).grad for name in ("W_enc", "b_enc", "W_dec", "b_dec")
        },
        "sparse": output.feature_acts.is_sparse,
    }


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"rescale_acts_by_decoder_norm": False, "apply_b_dec_to_input": True},
        {"k": 3.5, "matryoshka_widths": [100, 256]},
    ],
    ids=["default", "no-rescale,b_dec-input", "float-k,two-levels"],
)
@pytest.mark.parametrize("fast", [True, False], ids=["sparse", "dense"])
def test_step_equals_sae_lens_matryoshka_loss_and_gradients(
    options: dict[str, Any], fast: bool
) -> None:
    theirs, ours = sae_pair(**options)
    ours.cfg.fast_path = fast
    x = torch.randn(128, 24, dtype=torch.float64) * 2
    step = TrainStepInput(x, {}, None, 0, False)
    expected, actual = run_step(theirs, step), run_step(ours, step)
    assert actual["sparse"] == fast
    assert expected["losses"].pop("auxiliary_reconstruction_loss") == 0
    assert (
        set(actual["losses"])
        == set(expected["losses"])
        == {
            "mse_loss",
            *(f"inner_mse_loss_{w}" for w in ours.cfg.matryoshka_widths[:-1]),
        }
    )
    for name, loss in expected["losses"].items():
        torch.testing.assert_close(actual["losses"][name], loss)
    torch.testing.assert_close(actual["loss"], expected["loss"])
    torch.testing.assert_close(actual["sae_out"], expected["sae_out"])
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(actual["grads"][name], grad)


def test_group_weights_scale_each_level_of_sae_lens_loss() -> None:
    theirs, ours = sae_pair()
    ours.cfg.group_weights = [0.5, 2.0, 0.0, 3.0]
    x = torch.randn(128, 24, dtype=torch.float64)
    step = TrainStepInput(x, {}, None, 0, False)
    expected, actual = run_step(theirs, step), run_step(ours, step)
    names = [*(f"inner_mse_loss_{w}" for w in (16, 64, 160)), "mse_loss"]
    for weight, name in zip(ours.cfg.group_weights, names, strict=True):
        torch.testing.assert_close(actual["losses"][name], weight * expected["losses"][name])


@pytest.mark.parametrize("fast", [True, False], ids=["sparse", "dense"])
def test_per_level_auxk_in_sae_lens_units_equals_sae_lens_matryoshka_aux(fast: bool) -> None:
    """auxk_sae_lens per level is SAELens's use_matryoshka_aux_loss where it decodes the same.

    SAELens also decodes negative dead pre-activations (ours, as Gao et al., only positive
    ones), so the dead latents here get positive pre-activations everywhere.
    """
    theirs, ours = sae_pair(
        {"auxk_sae_lens": 0.7}, use_matryoshka_aux_loss=True, aux_loss_coefficient=0.7
    )
    ours.cfg.fast_path = fast
    dead = torch.zeros(256, dtype=torch.bool)
    dead[[1, 5, 20, 33, 70, 100, 101, 102, 200, 201, 210, 220, 230, 240, 250]] = True
    for sae in (theirs, ours):
        with torch.no_grad():
            sae.b_enc[dead] += 20.0
    x = torch.randn(128, 24, dtype=torch.float64)
    expected = run_step(theirs, TrainStepInput(x, {}, dead, 0, False))
    actual = run_step(ours, TrainStepInput(x, {"auxk_sae_lens": 0.7}, dead, 0, False))
    torch.testing.assert_close(
        actual["losses"]["auxk_sae_lens_loss"], expected["losses"]["auxiliary_reconstruction_loss"]
    )
    assert float(actual["losses"]["auxk_sae_lens_loss"]) > 0
    torch.testing.assert_close(actual["loss"], expected["loss"])
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(actual["grads"][name], grad)


@pytest.mark.parametrize("normalize", ["layer_norm", "constant_norm_rescale"])
def test_every_level_is_denormalised_where_sae_lens_matryoshka_fails(normalize: str) -> None:
    """SAELens's output de-normalisation is single-use per batch; ours de-normalises all levels.

    The outer level must equal SAELens's batchtopk with the same normalisation (which
    de-normalises once), and the sparse step the dense one.
    """
    theirs, ours = sae_pair(normalize_activations=normalize)
    batchtopk = BatchTopKTrainingSAE(
        BatchTopKTrainingSAEConfig(
            d_in=24, d_sae=256, k=8, dtype="float64", normalize_activations=normalize
        )
    )
    batchtopk.load_state_dict(theirs.state_dict())
    x = torch.randn(128, 24, dtype=torch.float64) * 3 + 1
    step = TrainStepInput(x, {}, None, 0, False)
    reference = run_step(batchtopk, step)
    ours.cfg.fast_path = False
    dense = run_step(ours, step)
    ours.cfg.fast_path = True
    sparse = run_step(ours, step)
    torch.testing.assert_close(sparse["losses"]["mse_loss"], reference["losses"]["mse_loss"])
    torch.testing.assert_close(sparse["sae_out"], reference["sae_out"])
    for name, loss in dense["losses"].items():
        torch.testing.assert_close(sparse["losses"][name], loss)
    for name, grad in dense["grads"].items():
        torch.testing.assert_close(sparse["grads"][name], grad)


MATRYOSHKA_CASES = [
    pytest.param({"use_matryoshka_aux_loss": True}, id="auxk-per-level"),
    pytest.param({"use_matryoshka_aux_loss": False}, id="auxk-whole"),
    pytest.param(
        {"use_matryoshka_aux_loss": True, "aux_losses": {"auxk": 1.0, "zipf": 1.0}, "k": 6.5},
        id="auxk+zipf-per-level,float-k",
    ),
    pytest.param(
        {
            "use_matryoshka_aux_loss": True,
            "rescale_acts_by_decoder_norm": False,
            "group_weights": [0.25, 0.5, 1.0],
        },
        id="no-rescale,group-weights",
    ),
]


@pytest.mark.parametrize("options", MATRYOSHKA_CASES)
def test_sparse_step_equals_dense_with_per_level_aux(options: dict[str, Any]) -> None:
    sae = perturbed_sae(
        CalibratedMatryoshkaBatchTopKTrainingSAE,
        CalibratedMatryoshkaBatchTopKTrainingSAEConfig,
        **{"k": 8, "matryoshka_widths": [64, 192, 512], **options},
    )
    x = torch.randn(256, 24, dtype=torch.float64) * 2
    fast, dense = training_step(sae, x, fast=True), training_step(sae, x, fast=False)
    assert fast["losses"]["auxk_loss"] > 0
    assert_same_step(fast, dense)


def test_sparse_path_keeps_no_tokens_by_latents_tensor_for_backward() -> None:
    sae = perturbed_sae(
        CalibratedMatryoshkaBatchTopKTrainingSAE,
        CalibratedMatryoshkaBatchTopKTrainingSAEConfig,
        k=8,
        matryoshka_widths=[64, 192, 512],
        use_matryoshka_aux_loss=True,
    )
    x = torch.randn(256, 24, dtype=torch.float64)
    big = 256 * sae.cfg.d_sae
    dense_sae = copy.deepcopy(sae)
    dense_sae.cfg.fast_path = False
    assert any(torch.Size(s).numel() >= big for s in saved_tensor_shapes(dense_sae, x))
    assert all(torch.Size(s).numel() < big / 4 for s in saved_tensor_shapes(sae, x))


def synthetic_batches(d_in: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Sparse sums of fixed directions around a mean: something for the levels to learn."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(4 * d_in, d_in, generator=generator))
    mean = torch.randn(d_in, generator=generator)
    generator.manual_seed(seed)
    while True:
        active = torch.rand(batch, 4 * d_in, generator=generator) < 0.05
        yield (
            active * (torch.rand(batch, 4 * d_in, generator=generator) + 0.5)
        ) @ directions + mean


def test_trains_through_sae_trainer_calibrates_and_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sae = CalibratedMatryoshkaBatchTopKTrainingSAE(
        config(d_in=16, d_sae=64, k=3, matryoshka_widths=[8, 24, 64], use_matryoshka_aux_loss=True)
    )
    trainer = SAETrainer(
        cfg=trainer_config(60, 128, dead_feature_window=5, lr=3e-3),
        sae=sae,
        data_provider=synthetic_batches(16, 128, seed=1),
    )
    first = trainer.step(next(trainer.data_provider))
    trainer.n_training_steps += 1
    assert first.feature_acts.is_sparse
    assert {"mse_loss", "inner_mse_loss_8", "inner_mse_loss_24", "auxk_loss"} <= set(first.losses)
    trainer.fit()
    x = next(synthetic_batches(16, 128, seed=2))
    last = sae.training_forward_pass(step_input(sae, x, dead_neuron_mask=trainer.dead_neurons))
    names = ("inner_mse_loss_8", "inner_mse_loss_24", "mse_loss")
    before = [float(first.losses[name].detach()) for name in names]
    after = [float(last.losses[name].detach()) for name in names]
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)
    assert after[0] > after[1] > after[2]  # each wider level reconstructs better

    sae.save_model(tmp_path / "checkpoint")
    restored = TrainingSAE.load_from_disk(tmp_path / "checkpoint")
    assert isinstance(restored, CalibratedMatryoshkaBatchTopKTrainingSAE)
    assert restored.cfg.matryoshka_widths == [8, 24, 64]

    batches = list(itertools.islice(synthetic_batches(16, 256, seed=3), 8))
    result = calibrate_thresholds(sae, batches, method="per_latent")
    assert result.achieved_l0 == pytest.approx(3, rel=0.01)
    sae.save_inference_model(tmp_path / "inference")
    loaded = SAE.load_from_disk(tmp_path / "inference")
    assert isinstance(loaded, CalibratedBatchTopKSAE)
    assert loaded.cfg.metadata.training_architecture == ARCHITECTURE
    x = torch.cat(batches)
    jumprelu = loaded.to_jumprelu()
    with torch.no_grad():
        codes = loaded.encode(x)
        assert float((codes > 0).sum(-1).float().mean()) == pytest.approx(result.achieved_l0)
        assert torch.equal(jumprelu.encode(x), codes)
        assert torch.equal(jumprelu(x), loaded(x))


def sae_lens_matryoshka_runner_dict(tmp_path: Path) -> dict[str, Any]:
    """A SAELens matryoshka_batchtopk runner config, architecture renamed to ours."""
    runner_options = {
        key: value
        for key, value in tiny_runner_kwargs(tmp_path).items()
        if key not in ("d_in", "d_sae", "k", "dead_tokens_window", "calibration_tokens")
        and key != "log_to_wandb"
    }
    theirs = LanguageModelSAERunnerConfig(
        sae=MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=TINY_D_MODEL, d_sae=64, k=4, matryoshka_widths=[8, 32, 64]
        ),
        dead_feature_window=5,
        **runner_options,
    )
    theirs.logger.log_to_wandb = False
    as_dict = theirs.to_dict()
    as_dict["sae"]["architecture"] = ARCHITECTURE
    return as_dict


def test_sae_lens_runner_trains_a_renamed_sae_lens_matryoshka_config(
    tmp_path: Path, tiny_model: HookedTransformer, tiny_dataset: Dataset
) -> None:
    renamed = sae_lens_matryoshka_runner_dict(tmp_path)
    cfg = LanguageModelSAERunnerConfig.from_dict(renamed)
    assert isinstance(cfg.sae, CalibratedMatryoshkaBatchTopKTrainingSAEConfig)
    assert cfg.sae.matryoshka_widths == [8, 32, 64]
    sae = LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model, override_dataset=tiny_dataset
    ).run()
    assert isinstance(sae, CalibratedMatryoshkaBatchTopKTrainingSAE)
    saved = json.loads((Path(cfg.output_path) / "cfg.json").read_text())  # type: ignore[arg-type]
    assert saved["architecture"] == "calibrated_batchtopk"
    assert saved["metadata"]["training_architecture"] == ARCHITECTURE
    assert isinstance(SAE.load_from_disk(cfg.output_path), CalibratedBatchTopKSAE)  # type: ignore[arg-type]


def test_our_runner_calibrates_a_matryoshka_sae_to_k(
    tmp_path: Path, tiny_model: HookedTransformer, tiny_dataset: Dataset
) -> None:
    cfg = make_runner_config(
        ARCHITECTURE,
        **tiny_runner_kwargs(tmp_path, matryoshka_widths=[8, 32, 64], use_matryoshka_aux_loss=True),
    )
    runner = CalibratingSAETrainingRunner(
        cfg, override_model=tiny_model, override_dataset=tiny_dataset
    )
    runner.run()
    assert runner.calibration is not None
    assert runner.calibration.achieved_l0 == pytest.approx(4.0, rel=0.05)
    loaded = SAE.load_from_disk(tmp_path / "output")
    assert isinstance(loaded, CalibratedBatchTopKSAE)
    assert loaded.cfg.metadata.calibration["method"] == "l0"


def trained_sae_lens_matryoshka() -> MatryoshkaBatchTopKTrainingSAE:
    """SAELens's own matryoshka_batchtopk after a few SAETrainer steps (its EMA θ set)."""
    torch.manual_seed(0)
    sae = MatryoshkaBatchTopKTrainingSAE(
        MatryoshkaBatchTopKTrainingSAEConfig(d_in=16, d_sae=64, k=3, matryoshka_widths=[8, 24, 64])
    )
    SAETrainer(
        cfg=trainer_config(20, 128, lr=3e-3),
        sae=sae,
        data_provider=synthetic_batches(16, 128, seed=1),
    ).fit()
    return sae


def test_from_sae_and_calibrate_accept_sae_lens_matryoshka_and_its_jumprelu_export(
    tmp_path: Path,
) -> None:
    trained = trained_sae_lens_matryoshka()
    trained.save_inference_model(tmp_path)
    exported = SAE.load_from_disk(tmp_path)
    assert isinstance(exported, JumpReLUSAE)
    batches = list(itertools.islice(synthetic_batches(16, 256, seed=3), 8))
    x = torch.cat(batches)

    converted = CalibratedBatchTopKSAE.from_sae(trained)
    from_export = CalibratedBatchTopKSAE.from_sae(exported)
    with torch.no_grad():
        # Before calibration both carry SAELens's EMA θ and encode as its JumpReLU export does.
        assert torch.equal(converted.encode(x), exported.encode(x))
        torch.testing.assert_close(from_export(x), exported(x))
    with pytest.raises(TypeError, match=r"CalibratedBatchTopKSAE\.from_sae"):
        calibrate_thresholds(trained, batches)

    for sae in (converted, exported):
        result = calibrate_thresholds(sae, batches, method="l0")
        assert result.achieved_l0 == pytest.approx(3, rel=0.01)
        with torch.no_grad():
            assert float((sae.encode(x) > 0).sum(-1).float().mean()) == pytest.approx(
                result.achieved_l0
            )
    assert torch.equal(converted.threshold, exported.threshold)


@pytest.mark.filterwarnings("ignore:.*until calibrate_thresholds:UserWarning")
def test_dictionary_learning_matryoshka_import_calibrates_and_exports() -> None:
    from safetensors.torch import load_file

    sae = load_dictionary_learning(DL_MATRYOSHKA)
    x = load_file(DL_MATRYOSHKA / "reference.safetensors")["x"]
    generator = torch.Generator().manual_seed(0)
    # Around the held-out reference activations: 320 tokens for 4 x 320 > 1000 events.
    tokens = x.repeat(10, 1)
    tokens = tokens + 0.2 * x.std(0) * torch.randn(tokens.shape, generator=generator)
    result = calibrate_thresholds(sae, tokens.split(64), method="l0")
    assert result.achieved_l0 == pytest.approx(4.0, rel=0.02)
    with torch.no_grad():
        codes = sae.encode(tokens)
        assert torch.equal(sae.to_jumprelu().encode(tokens), codes)
