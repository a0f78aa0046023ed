"""Importers for dictionary_learning and sparsify checkpoints, against the packages' own outputs.

The folders under ``tests/data/foreign/`` were written by ``dictionary-learning`` and
``eai-sparsify`` themselves (``tests/data/foreign/make_foreign_checkpoints.py``); each
``reference.safetensors`` holds fixed inputs and the foreign model's own outputs for them. The
peer packages are not needed here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import TINY_CONTEXT, TINY_HOOK, TINY_VOCAB, tiny_runner_kwargs
from datasets import Dataset
from sae_lens import SAE
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_lens_batchtopk.calibration import calibrate_thresholds
from sae_lens_batchtopk.importers import (
    ForeignCheckpointError,
    load_dictionary_learning,
    load_foreign_sae,
    load_sparsify,
)
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import CalibratedBatchTopKSAE
from sae_lens_batchtopk.selection import batch_topk
from sae_lens_batchtopk.tools.cli import Resources, main

FOREIGN = Path(__file__).parent / "data" / "foreign"
DL_BATCHTOPK = FOREIGN / "dictionary_learning_batchtopk"
DL_MATRYOSHKA = FOREIGN / "dictionary_learning_matryoshka"
SPARSIFY = FOREIGN / "sparsify_topk"

# Importing a SAE without a usable threshold warns; tests that care assert it explicitly.
pytestmark = pytest.mark.filterwarnings("ignore:.*until calibrate_thresholds:UserWarning")


def reference(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    with safe_open(str(folder / "reference.safetensors"), "pt") as file:
        metadata = {key: json.loads(value) for key, value in file.metadata().items()}
    return load_file(folder / "reference.safetensors"), metadata


def pre_activations(sae: CalibratedBatchTopKSAE, x: torch.Tensor) -> torch.Tensor:
    """What the imported SAE's encode thresholds, read from its own hook point."""
    _, cache = sae.run_with_cache(x, names_filter="hook_sae_acts_pre")
    return cache["hook_sae_acts_pre"]


def assert_same_codes(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same latents fire (exactly) with the same values (to float32 rounding)."""
    torch.testing.assert_close(actual > 0, expected > 0, rtol=0, atol=0)
    torch.testing.assert_close(actual, expected)


def copy_checkpoint(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


def edit_ae_pt(folder: Path, **changes: torch.Tensor | None) -> None:
    state = torch.load(folder / "ae.pt", weights_only=True)
    for name, value in changes.items():
        if value is None:
            del state[name]
        else:
            state[name] = value
    torch.save(state, folder / "ae.pt")


def edit_json(file: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))


@pytest.mark.parametrize("folder", [DL_BATCHTOPK, DL_MATRYOSHKA], ids=["batchtopk", "matryoshka"])
def test_dictionary_learning_outputs_equal_the_foreign_model(folder: Path) -> None:
    sae = load_dictionary_learning(folder)
    ref, _ = reference(folder)
    x = ref["x"]
    with torch.no_grad():
        pre = pre_activations(sae, x)
        torch.testing.assert_close(pre.relu(), ref["post_relu"])
        # The foreign EMA θ is carried over: threshold mode is dictionary_learning's encode.
        assert_same_codes(sae.encode(x), ref["codes_threshold"])
        torch.testing.assert_close(sae.decode(ref["codes_threshold"]), ref["decoded"])
        torch.testing.assert_close(sae(x), ref["forward"])
        # The training rule on our pre-activations is its use_threshold=False encode.
        assert_same_codes(batch_topk(pre, sae.cfg.k), ref["codes_batch_topk"])
        # A plain SAELens JumpReLU export reproduces the foreign model too.
        assert_same_codes(sae.to_jumprelu().encode(x), ref["codes_threshold"])


def test_dictionary_learning_takes_raw_activations_of_a_normalised_run() -> None:
    """trainSAE(normalize_activations=True) already folded norm_factor into ae.pt."""
    sae = load_dictionary_learning(DL_BATCHTOPK)
    ref, metadata = reference(DL_BATCHTOPK)
    assert metadata["norm_factor"] > 100  # the run really was normalised
    with torch.no_grad():
        # norm_factor * model_as_trained(x / norm_factor), computed by the generator script.
        torch.testing.assert_close(sae(ref["x"]), ref["forward_as_trained"], rtol=1e-4, atol=1e-3)
    # dictionary_learning 0.1.0 does not write norm_factor to config.json.
    assert sae.cfg.metadata.imported_from["norm_factor"] is None


def test_dictionary_learning_metadata_records_the_foreign_model() -> None:
    batchtopk = load_dictionary_learning(DL_BATCHTOPK)
    matryoshka = load_dictionary_learning(DL_MATRYOSHKA)
    _, ref_metadata = reference(DL_MATRYOSHKA)
    info = matryoshka.cfg.metadata.imported_from
    assert matryoshka.cfg.k == 4.0
    assert (matryoshka.cfg.d_in, matryoshka.cfg.d_sae) == (12, 48)
    assert info["dict_class"] == "MatryoshkaBatchTopKSAE"
    assert info["trainer_class"] == "MatryoshkaBatchTopKTrainer"
    assert info["group_sizes"] == [12, 12, 24]
    assert info["widths"] == [12, 24, 48]
    assert info["threshold_origin"] == "dictionary_learning_ema"
    assert info["foreign_threshold"] == pytest.approx(ref_metadata["threshold"])
    assert torch.all(matryoshka.threshold == torch.tensor(ref_metadata["threshold"]))
    assert batchtopk.cfg.metadata.imported_from["group_sizes"] is None
    assert "calibration" not in batchtopk.cfg.metadata  # not calibrated yet


def test_dictionary_learning_unset_threshold_becomes_zero_with_a_warning(tmp_path: Path) -> None:
    """θ = -1 (before threshold_start_step) passes every positive value, as θ = 0 does."""
    folder = copy_checkpoint(DL_BATCHTOPK, tmp_path)
    edit_ae_pt(folder, threshold=torch.tensor(-1.0))
    with pytest.warns(UserWarning, match="threshold is -1"):
        sae = load_dictionary_learning(folder)
    ref, _ = reference(DL_BATCHTOPK)
    assert torch.all(sae.threshold == 0)
    assert sae.cfg.metadata.imported_from["threshold_origin"] == "unset"
    assert sae.cfg.metadata.imported_from["foreign_threshold"] == -1.0
    with torch.no_grad():
        # dictionary_learning's encode with θ = -1 is relu(pre-activations).
        assert_same_codes(sae.encode(ref["x"]), ref["post_relu"])


def test_dictionary_learning_recorded_norm_factor_is_not_applied_again(tmp_path: Path) -> None:
    folder = copy_checkpoint(DL_BATCHTOPK, tmp_path)
    edit_json(folder / "config.json", lambda config: config["trainer"].update(norm_factor=146.6))
    sae = load_dictionary_learning(folder)
    ref, _ = reference(DL_BATCHTOPK)
    assert sae.cfg.metadata.imported_from["norm_factor"] == 146.6
    with torch.no_grad():
        torch.testing.assert_close(sae(ref["x"]), ref["forward"])


def test_sparsify_pre_activations_top_k_and_decode_equal_the_foreign_model() -> None:
    with pytest.warns(UserWarning, match="no threshold"):
        sae = load_sparsify(SPARSIFY)
    ref, _ = reference(SPARSIFY)
    x, k = ref["x"], 4
    assert sae.cfg.k == k and sae.cfg.metadata.imported_from["selection"] == "per_token_topk"
    with torch.no_grad():
        pre = pre_activations(sae, x)
        torch.testing.assert_close(pre.relu(), ref["pre_acts"])
        # Per-token top-k of our pre-activations selects sparsify's latents and values.
        values, indices = pre.relu().topk(k, dim=-1)
        order = ref["top_indices"].argsort(dim=-1)
        torch.testing.assert_close(indices.sort(dim=-1).values, ref["top_indices"].gather(1, order))
        torch.testing.assert_close(values, ref["top_acts"].sort(dim=-1, descending=True).values)
        # Decoding sparsify's codes densely gives its decode and forward output.
        codes = torch.zeros_like(pre).scatter(1, ref["top_indices"], ref["top_acts"])
        torch.testing.assert_close(sae.decode(codes), ref["decoded"])
        torch.testing.assert_close(sae.decode(codes), ref["forward"])
        # Until calibrated, θ = 0: every positive pre-activation fires.
        assert torch.all(sae.threshold == 0)
        assert_same_codes(sae.encode(x), ref["pre_acts"])


def test_sparsify_calibrates_to_k_and_exports_to_jumprelu() -> None:
    sae = load_sparsify(SPARSIFY)
    ref, _ = reference(SPARSIFY)
    calibration_tokens = ref["x_calibration"]
    result = calibrate_thresholds(
        sae, calibration_tokens.split(64), method="l0", n_tokens=calibration_tokens.shape[0]
    )
    assert result.achieved_l0 == pytest.approx(4.0, abs=0.05)
    with torch.no_grad():
        l0 = (sae.encode(calibration_tokens) > 0).sum(-1).float().mean()
        assert float(l0) == pytest.approx(result.achieved_l0)
        jumprelu = sae.to_jumprelu()
        codes = sae.encode(ref["x"])
        torch.testing.assert_close(jumprelu.encode(ref["x"]), codes, rtol=0, atol=0)
        torch.testing.assert_close(jumprelu.decode(codes), sae.decode(codes))
    assert jumprelu.cfg.metadata.imported_from["source"] == "sparsify"


def test_load_foreign_sae_dispatches_and_rejects_unknown_sources() -> None:
    assert load_foreign_sae(DL_MATRYOSHKA, "dictionary_learning").cfg.d_sae == 48
    assert load_foreign_sae(SPARSIFY, "sparsify").cfg.d_sae == 64
    with pytest.raises(ValueError, match="source must be one of"):
        load_foreign_sae(SPARSIFY, "saelens")  # type: ignore[arg-type]
    with pytest.raises(ForeignCheckpointError, match=r"config\.json: file is missing"):
        load_foreign_sae(SPARSIFY, "dictionary_learning")
    with pytest.raises(ForeignCheckpointError, match="is not a directory"):
        load_foreign_sae(FOREIGN / "absent", "sparsify")


class _NotATensor:
    """A pickled object that ``torch.load(weights_only=True)`` must refuse to build."""


DL_BREAKAGES = {
    "missing ae.pt": (
        lambda f: (f / "ae.pt").unlink(),
        r"ae\.pt: file is missing",
    ),
    "not a BatchTopK dictionary": (
        lambda f: edit_json(f / "config.json", lambda c: c["trainer"].update(dict_class="TopK")),
        r"config\.json: trainer\.dict_class: 'TopK' is not a BatchTopK-family",
    ),
    "k disagrees": (
        lambda f: edit_ae_pt(f, k=torch.tensor(8, dtype=torch.int32)),
        r"ae\.pt: k: 8 disagrees with config\.json trainer\.k = 4",
    ),
    "shape mismatch": (
        lambda f: edit_json(f / "config.json", lambda c: c["trainer"].update(dict_size=64)),
        r"ae\.pt: encoder\.weight: has shape \(48, 12\), expected \(64, 12\)",
    ),
    "NaN weight": (
        lambda f: edit_ae_pt(f, b_dec=torch.full((12,), float("nan"))),
        r"ae\.pt: b_dec: contains NaN or inf",
    ),
    "missing tensor": (
        lambda f: edit_ae_pt(f, threshold=None),
        r"ae\.pt: threshold: tensor is missing",
    ),
    "unexpected tensor": (
        lambda f: edit_ae_pt(f, W_skip=torch.zeros(12, 12)),
        r"ae\.pt: W_skip: unexpected tensor",
    ),
    "arbitrary pickle": (
        lambda f: torch.save({"encoder.weight": _NotATensor()}, f / "ae.pt"),
        r"ae\.pt: cannot be read as a tensor state dict with weights_only=True",
    ),
    "invalid k": (
        lambda f: edit_json(f / "config.json", lambda c: c["trainer"].update(k=0)),
        r"config\.json: trainer\.k: must be a positive integer, got 0",
    ),
    "bad norm_factor": (
        lambda f: edit_json(f / "config.json", lambda c: c.update(norm_factor=-2.0)),
        r"config\.json: norm_factor: must be > 0",
    ),
}


@pytest.mark.parametrize("breakage", list(DL_BREAKAGES))
def test_dictionary_learning_malformed_folders_name_file_and_field(
    breakage: str, tmp_path: Path
) -> None:
    folder = copy_checkpoint(DL_BATCHTOPK, tmp_path)
    damage, message = DL_BREAKAGES[breakage]
    damage(folder)
    with pytest.raises(ForeignCheckpointError, match=message):
        load_dictionary_learning(folder)


def test_matryoshka_group_sizes_must_cover_the_dictionary(tmp_path: Path) -> None:
    folder = copy_checkpoint(DL_MATRYOSHKA, tmp_path)
    edit_ae_pt(folder, group_sizes=torch.tensor([12, 12, 12]))
    with pytest.raises(ForeignCheckpointError, match=r"ae\.pt: group_sizes: .* sum to 48"):
        load_dictionary_learning(folder)


def edit_safetensors(folder: Path, **changes: torch.Tensor | None) -> None:
    state = load_file(folder / "sae.safetensors")
    for name, value in changes.items():
        if value is None:
            del state[name]
        else:
            state[name] = value
    save_file(state, folder / "sae.safetensors")


SPARSIFY_BREAKAGES = {
    "transcoder": (
        lambda f: edit_json(f / "cfg.json", lambda c: c.update(transcode=True)),
        r"cfg\.json: transcode: True is not supported",
    ),
    "skip connection": (
        lambda f: edit_json(f / "cfg.json", lambda c: c.update(skip_connection=True)),
        r"cfg\.json: skip_connection: True is not supported",
    ),
    "groupmax": (
        lambda f: edit_json(f / "cfg.json", lambda c: c.update(activation="groupmax")),
        r"cfg\.json: activation: 'groupmax' is not supported",
    ),
    "signed activations": (
        lambda f: edit_json(f / "cfg.json", lambda c: c.update(signed=True)),
        r"cfg\.json: signed: True is not supported",
    ),
    "encoder-only save": (
        lambda f: edit_safetensors(f, W_dec=None),
        r"sae\.safetensors: W_dec: tensor is missing",
    ),
    "W_skip present": (
        lambda f: edit_safetensors(f, W_skip=torch.zeros(16, 16)),
        r"sae\.safetensors: W_skip: unexpected tensor",
    ),
    "inf weight": (
        lambda f: edit_safetensors(f, **{"encoder.bias": torch.full((64,), float("inf"))}),
        r"sae\.safetensors: encoder\.bias: contains NaN or inf",
    ),
    "d_in mismatch": (
        lambda f: edit_json(f / "cfg.json", lambda c: c.update(d_in=8)),
        r"sae\.safetensors: encoder\.weight: has shape \(64, 16\), expected \(64, 8\)",
    ),
    "not safetensors": (
        lambda f: (f / "sae.safetensors").write_bytes(b"not a safetensors file"),
        r"sae\.safetensors: is not a readable safetensors file",
    ),
    "missing cfg.json": (
        lambda f: (f / "cfg.json").unlink(),
        r"cfg\.json: file is missing",
    ),
    "cfg.json not JSON": (
        lambda f: (f / "cfg.json").write_text("{k: 4"),
        r"cfg\.json: is not valid JSON",
    ),
}


@pytest.mark.parametrize("breakage", list(SPARSIFY_BREAKAGES))
def test_sparsify_malformed_folders_name_file_and_field(breakage: str, tmp_path: Path) -> None:
    folder = copy_checkpoint(SPARSIFY, tmp_path)
    damage, message = SPARSIFY_BREAKAGES[breakage]
    damage(folder)
    with pytest.raises(ForeignCheckpointError, match=message):
        load_sparsify(folder)


def test_cli_imports_and_calibrates_a_foreign_checkpoint_into_a_new_folder(
    tmp_path: Path, tiny_dataset: Dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    """``calibrate DIR --from dictionary_learning``: the foreign folder is never written."""
    torch.manual_seed(0)
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=1, d_model=12, d_head=4, n_heads=3, d_mlp=24, d_vocab=TINY_VOCAB,
            n_ctx=TINY_CONTEXT, act_fn="gelu", normalization_type="LN",
        )
    )  # fmt: skip
    resources = Resources(
        model, tiny_dataset.select(range(448)), tiny_dataset.select(range(448, 512))
    )
    options = tiny_runner_kwargs(tmp_path)
    for name in ("d_in", "d_sae", "k", "output_path"):
        del options[name]
    config = tmp_path / "calibrate-on.yaml"
    config.write_text(yaml.safe_dump(options))
    before = {path.name: path.read_bytes() for path in DL_BATCHTOPK.iterdir()}
    out = tmp_path / "imported"
    argv = ["calibrate", str(DL_BATCHTOPK), "--from", "dictionary_learning", "--method", "l0",
            "--tokens", "2048", "--eval-tokens", "512", "--config", str(config)]  # fmt: skip
    assert main([*argv, "--output", str(out)], resources) == 0
    assert "threshold mode, after calibration" in capsys.readouterr().out
    assert {path.name: path.read_bytes() for path in DL_BATCHTOPK.iterdir()} == before
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["headline"]["inference_l0_heldout"] == pytest.approx(4.0, rel=0.1)
    calibrated = SAE.load_from_disk(out)
    assert calibrated.cfg.metadata.imported_from["source"] == "dictionary_learning"
    assert calibrated.cfg.metadata.calibration["method"] == "l0"
    assert json.loads((out / "runner_cfg.json").read_text())["hook_name"] == TINY_HOOK
    # A second import into the same folder needs --overwrite; a missing --config is named.
    assert main([*argv, "--output", str(out)], resources) == 2
    assert main([*argv[:-2], "--output", str(tmp_path / "x")], resources) == 2
    assert "needs --config" in capsys.readouterr().err
