"""Import BatchTopK-family SAEs trained by other libraries into the calibrated inference form.

Published BatchTopK and Matryoshka SAEs (SAEBench's suites, many research releases) are
`dictionary_learning <https://github.com/saprmarks/dictionary_learning>`_ checkpoints that carry
an uncalibrated EMA θ; `sparsify <https://github.com/EleutherAI/sparsify>`_ trains per-token TopK
SAEs, which have no threshold at all. The loaders here turn either into a
:class:`~sae_lens_batchtopk.saes.calibrated_batchtopk_sae.CalibratedBatchTopKSAE` that takes raw
activations, ready for :func:`~sae_lens_batchtopk.calibrate_thresholds` and ``to_jumprelu()``.

Formats (read from ``dictionary-learning`` 0.1.0 and ``eai-sparsify`` 1.3.3):

- dictionary_learning folder (``trainer_<i>/``): ``config.json`` = ``{"trainer": {"dict_class",
  "trainer_class", "activation_dim", "dict_size", "k", ...}, "buffer": ...}`` and ``ae.pt``, a
  ``torch.save``'d state dict. ``BatchTopKSAE``: ``encoder.weight [d_sae, d_in]``,
  ``encoder.bias``, ``decoder.weight [d_in, d_sae]``, ``b_dec``, ``k``, ``threshold``.
  ``MatryoshkaBatchTopKSAE``: ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``,
  ``b_dec``, ``k``, ``threshold``, ``group_sizes``. Both encode
  ``f = relu((x - b_dec) W_enc + b_enc)`` and, at inference, keep ``f * (f > threshold)``; θ is a
  scalar EMA (β 0.999) of batch minima, and ``-1`` until ``threshold_start_step`` ("not
  estimated": every positive value passes).
- sparsify hookpoint folder: ``cfg.json`` = ``{"activation", "k", "num_latents",
  "expansion_factor", "d_in", "transcode", "skip_connection", "multi_topk", ...}`` and
  ``sae.safetensors``: ``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``W_dec [d_sae,
  d_in]``, ``b_dec``. Encode ``relu((x - b_dec) W_enc + b_enc)`` then top-``k`` per token.

Activation normalisation: dictionary_learning's ``trainSAE(normalize_activations=True)`` trains on
``x / norm_factor`` but calls ``ae.scale_biases(norm_factor)`` (biases and a set θ times the
factor) *before* saving, so ``ae.pt`` already maps raw activations to raw reconstructions: the
saved model on raw ``x`` equals the trained model applied as ``norm_factor * ae(x / norm_factor)``
(``tests/data/foreign/make_foreign_checkpoints.py`` checks this on a real run). Nothing is left
to fold; applying the factor again would double-scale. ``norm_factor`` is not even written to
``config.json`` by 0.1.0 (its trainer ``config`` is a property, so the assignment is lost); when a
config does carry one it is recorded in the metadata, never applied. sparsify does not normalise.

What the imported SAE's threshold is until calibrated (``metadata.imported_from.threshold_origin``):

- ``"dictionary_learning_ema"``: the foreign θ, broadcast to every latent. Threshold-mode encode
  then equals dictionary_learning's own ``encode(x, use_threshold=True)`` exactly.
- ``"unset"`` (foreign θ was ``-1``) and ``"none"`` (sparsify): θ = 0, i.e. every positive
  pre-activation fires, which is what the foreign model does with no threshold (for sparsify:
  its pre-activations before the top-k). Dense codes are a visible failure, unlike a guessed θ
  that would look plausible; a ``UserWarning`` says so at import.

Either way the SAE is not calibrated: ``metadata.calibration`` (which the CLI and the runner
write after calibrating) is absent. For a sparsify SAE prefer ``method="l0"``: ``"per_latent"``
matches firing rates under *batch* top-k, which is not sparsify's per-token training rule.
"""

from __future__ import annotations

import itertools
import json
import math
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from sae_lens.saes.sae import SAEMetadata
from safetensors import SafetensorError
from safetensors.torch import load_file

from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import (
    CalibratedBatchTopKSAE,
    CalibratedBatchTopKSAEConfig,
)

ForeignSource = Literal["dictionary_learning", "sparsify"]
FOREIGN_SOURCES: tuple[str, ...] = ("dictionary_learning", "sparsify")

DL_CONFIG = "config.json"
DL_WEIGHTS = "ae.pt"
SPARSIFY_CONFIG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"

_DL_BATCHTOPK = "BatchTopKSAE"
_DL_MATRYOSHKA = "MatryoshkaBatchTopKSAE"
# sparsify config fields that change what the model computes, and the only value this
# inference form reproduces: "groupmax" (one latent per group), transcoders (no b_dec
# subtraction, a different target), skip connections (W_skip), ``signed`` (older sparsify
# releases) and the ``embed_skip``/``gram_lookup`` inputs of newer development versions.
_SPARSIFY_REQUIRED = {
    "activation": "topk",
    "transcode": False,
    "skip_connection": False,
    "signed": False,
    "embed_skip": False,
    "gram_lookup": False,
}


class ForeignCheckpointError(ValueError):
    """A foreign checkpoint this importer cannot read faithfully; names the file and field."""

    def __init__(self, file: Path, field: str | None, problem: str) -> None:
        location = f"{file}" if field is None else f"{file}: {field}"
        super().__init__(f"{location}: {problem}")


@dataclass(frozen=True)
class _ImportedWeights:
    """Weights in SAELens layout (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``)."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor
    k: int
    imported_from: dict[str, Any]


def load_foreign_sae(
    path: str | Path,
    source: ForeignSource,
    *,
    dtype: str = "float32",
    device: str = "cpu",
) -> CalibratedBatchTopKSAE:
    """Import a foreign checkpoint folder; the entry point for ``--from {source}`` in the CLI.

    Args:
        path: the checkpoint folder (dictionary_learning's ``trainer_<i>/``, or sparsify's
            hookpoint folder).
        source: ``"dictionary_learning"`` or ``"sparsify"``.
        dtype: dtype of the imported SAE (the foreign weights are cast to it).
        device: device of the imported SAE.

    Raises:
        ValueError: unknown ``source``.
        ForeignCheckpointError: a missing file, an unsupported architecture or flag, a shape
            mismatch or non-finite weights, named by file and field.
    """
    if source == "dictionary_learning":
        return load_dictionary_learning(path, dtype=dtype, device=device)
    if source == "sparsify":
        return load_sparsify(path, dtype=dtype, device=device)
    raise ValueError(f"source must be one of {FOREIGN_SOURCES}, got source={source!r}")


def load_dictionary_learning(
    path: str | Path, *, dtype: str = "float32", device: str = "cpu"
) -> CalibratedBatchTopKSAE:
    """Import a dictionary_learning ``BatchTopKSAE`` or ``MatryoshkaBatchTopKSAE`` folder.

    The imported SAE takes raw activations and, in threshold mode, returns exactly what
    dictionary_learning's ``encode(x, use_threshold=True)`` / ``decode`` return (see the module
    docstring for θ = -1 and for ``norm_factor``). Matryoshka group sizes only shape the training
    loss: inference is the same encoder and decoder, so they are recorded, not needed.
    ``ae.pt`` is read with ``torch.load(weights_only=True)``: tensors only, never arbitrary pickle.
    """
    folder = _existing_folder(path)
    config_file, weights_file = folder / DL_CONFIG, folder / DL_WEIGHTS
    config = _read_json_object(config_file)
    trainer = config.get("trainer")
    if not isinstance(trainer, dict):
        raise ForeignCheckpointError(config_file, "trainer", "missing or not an object")
    dict_class = _dl_dict_class(config_file, trainer)
    d_in = _positive_int(trainer, "activation_dim", config_file, "trainer.")
    d_sae = _positive_int(trainer, "dict_size", config_file, "trainer.")
    k = _positive_int(trainer, "k", config_file, "trainer.")
    if k > d_sae:
        raise ForeignCheckpointError(config_file, "trainer.k", f"{k} exceeds dict_size {d_sae}")
    norm_factor = _dl_norm_factor(config_file, config, trainer)

    state = _torch_load_tensors(weights_file)
    if dict_class == _DL_BATCHTOPK:
        names = ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold")
        _check_keys(weights_file, state, names)
        W_enc = _tensor(weights_file, state, "encoder.weight", (d_sae, d_in)).T
        b_enc = _tensor(weights_file, state, "encoder.bias", (d_sae,))
        W_dec = _tensor(weights_file, state, "decoder.weight", (d_in, d_sae)).T
        group_sizes = None
    else:
        names = ("W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes")
        _check_keys(weights_file, state, names)
        W_enc = _tensor(weights_file, state, "W_enc", (d_in, d_sae))
        b_enc = _tensor(weights_file, state, "b_enc", (d_sae,))
        W_dec = _tensor(weights_file, state, "W_dec", (d_sae, d_in))
        group_sizes = _dl_group_sizes(weights_file, state, config_file, trainer, d_sae)
    b_dec = _tensor(weights_file, state, "b_dec", (d_in,))
    stored_k = _integer_scalar(weights_file, state, "k")
    if stored_k != k:
        raise ForeignCheckpointError(
            weights_file, "k", f"{stored_k} disagrees with {config_file.name} trainer.k = {k}"
        )
    foreign_threshold = _dl_threshold(weights_file, state, d_sae)

    # The foreign rule keeps f * (f > θ) with f = relu(z): for θ >= 0 exactly our
    # relu(z) * (z > θ). The -1 sentinel ("not estimated") passes every positive value, as θ = 0
    # does; store 0 so that no meaningless negative threshold reaches reports or exports.
    threshold = foreign_threshold.clamp(min=0.0)
    unset = bool((foreign_threshold < 0).all())
    imported_from = {
        "source": "dictionary_learning",
        "path": str(folder.resolve()),
        "dict_class": dict_class,
        "trainer_class": trainer.get("trainer_class"),
        "k": k,
        "selection": "batch_topk",
        "group_sizes": group_sizes,
        "widths": None if group_sizes is None else list(itertools.accumulate(group_sizes)),
        "threshold_origin": "unset" if unset else "dictionary_learning_ema",
        "foreign_threshold": _json_number_or_list(foreign_threshold),
        "norm_factor": norm_factor,
        "lm_name": trainer.get("lm_name"),
        "layer": trainer.get("layer"),
        "submodule_name": trainer.get("submodule_name"),
        "weights_dtype": str(b_dec.dtype).removeprefix("torch."),
    }
    weights = _ImportedWeights(W_enc, b_enc, W_dec, b_dec, threshold, k, imported_from)
    if unset:
        _warn_no_threshold(folder, "its threshold is -1 (never estimated)")
    return _build(weights, dtype, device)


def load_sparsify(
    path: str | Path, *, dtype: str = "float32", device: str = "cpu"
) -> CalibratedBatchTopKSAE:
    """Import a sparsify per-token TopK SAE folder (``cfg.json`` + ``sae.safetensors``).

    Pre-activations and decoding equal sparsify's (``relu`` of ours is sparsify's ``pre_acts``;
    decoding its top-k codes gives its ``decode``). sparsify selects the top ``k`` per token and
    has no threshold, so the imported SAE carries θ = 0 (every positive pre-activation fires)
    until :func:`~sae_lens_batchtopk.calibrate_thresholds` sets one; ``cfg.k`` is the per-token
    ``k``, the natural L0 target. Transcoders, skip connections, ``groupmax`` and the other
    flags in ``_SPARSIFY_REQUIRED`` are refused: this inference form cannot compute them.
    """
    folder = _existing_folder(path)
    config_file, weights_file = folder / SPARSIFY_CONFIG, folder / SPARSIFY_WEIGHTS
    cfg = _read_json_object(config_file)
    for field, supported in _SPARSIFY_REQUIRED.items():
        value = cfg.get(field, supported)
        if value != supported:
            raise ForeignCheckpointError(
                config_file, field, f"{value!r} is not supported (only {supported!r})"
            )
    d_in = _positive_int(cfg, "d_in", config_file)
    k = _positive_int(cfg, "k", config_file)
    if cfg.get("num_latents"):
        d_sae = _positive_int(cfg, "num_latents", config_file)
    else:
        d_sae = d_in * _positive_int(cfg, "expansion_factor", config_file)
    if k > d_sae:
        raise ForeignCheckpointError(config_file, "k", f"{k} exceeds the {d_sae} latents")

    state = _safetensors_load(weights_file)
    _check_keys(weights_file, state, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
    W_enc = _tensor(weights_file, state, "encoder.weight", (d_sae, d_in)).T
    b_enc = _tensor(weights_file, state, "encoder.bias", (d_sae,))
    W_dec = _tensor(weights_file, state, "W_dec", (d_sae, d_in))
    b_dec = _tensor(weights_file, state, "b_dec", (d_in,))
    imported_from = {
        "source": "sparsify",
        "path": str(folder.resolve()),
        "activation": "topk",
        "k": k,
        "selection": "per_token_topk",
        "threshold_origin": "none",
        "multi_topk": cfg.get("multi_topk"),
        "normalize_decoder": cfg.get("normalize_decoder"),
        "weights_dtype": str(b_dec.dtype).removeprefix("torch."),
    }
    threshold = torch.zeros(d_sae)
    weights = _ImportedWeights(W_enc, b_enc, W_dec, b_dec, threshold, k, imported_from)
    _warn_no_threshold(folder, "sparsify selects the top k per token and has no threshold")
    return _build(weights, dtype, device)


def _build(weights: _ImportedWeights, dtype: str, device: str) -> CalibratedBatchTopKSAE:
    d_sae, d_in = weights.W_dec.shape
    cfg = CalibratedBatchTopKSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        k=float(weights.k),
        dtype=dtype,
        device=device,
        apply_b_dec_to_input=True,  # both libraries encode x - b_dec
        normalize_activations="none",  # raw activations in, raw reconstructions out
    )
    cfg.metadata = SAEMetadata(imported_from=weights.imported_from)
    sae = CalibratedBatchTopKSAE(cfg)
    sae.load_state_dict(
        {
            "W_enc": weights.W_enc.contiguous(),
            "b_enc": weights.b_enc,
            "W_dec": weights.W_dec.contiguous(),
            "b_dec": weights.b_dec,
            "threshold": weights.threshold.expand(d_sae).contiguous(),
        }
    )
    return sae


def _warn_no_threshold(folder: Path, why: str) -> None:
    warnings.warn(
        f"{folder}: {why}; the imported SAE encodes with threshold 0 (every positive"
        " pre-activation fires) until calibrate_thresholds sets its thresholds",
        UserWarning,
        stacklevel=3,
    )


def _existing_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise ForeignCheckpointError(folder, None, "is not a directory")
    return folder


def _read_json_object(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise ForeignCheckpointError(file, None, "file is missing")
    try:
        value = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ForeignCheckpointError(file, None, f"is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ForeignCheckpointError(file, None, "must hold a JSON object")
    return value


def _dl_dict_class(config_file: Path, trainer: dict[str, Any]) -> str:
    """The dictionary class decides the weight layout and encode, as in dictionary_learning's
    own ``load_dictionary``; the trainer class is only recorded."""
    dict_class = trainer.get("dict_class")
    if dict_class not in (_DL_BATCHTOPK, _DL_MATRYOSHKA):
        raise ForeignCheckpointError(
            config_file,
            "trainer.dict_class",
            f"{dict_class!r} is not a BatchTopK-family dictionary (expected {_DL_BATCHTOPK!r}"
            f" or {_DL_MATRYOSHKA!r})",
        )
    return dict_class


def _dl_norm_factor(
    config_file: Path, config: dict[str, Any], trainer: dict[str, Any]
) -> float | None:
    """The recorded activation normalisation factor, if any (already folded into ae.pt)."""
    for field, holder in (("trainer.norm_factor", trainer), ("norm_factor", config)):
        value = holder.get("norm_factor")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ForeignCheckpointError(config_file, field, f"must be a number, got {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise ForeignCheckpointError(config_file, field, f"must be > 0, got {value}")
        return float(value)
    return None


def _dl_group_sizes(
    weights_file: Path,
    state: dict[str, torch.Tensor],
    config_file: Path,
    trainer: dict[str, Any],
    d_sae: int,
) -> list[int]:
    sizes_tensor = state["group_sizes"]
    if sizes_tensor.ndim != 1 or sizes_tensor.dtype.is_floating_point:
        raise ForeignCheckpointError(weights_file, "group_sizes", "must be a 1-D integer tensor")
    sizes = [int(size) for size in sizes_tensor]
    if not sizes or min(sizes) <= 0 or sum(sizes) != d_sae:
        raise ForeignCheckpointError(
            weights_file, "group_sizes", f"{sizes} must be positive and sum to {d_sae}"
        )
    recorded = trainer.get("group_sizes")
    if recorded is not None and recorded != sizes:
        raise ForeignCheckpointError(
            config_file, "trainer.group_sizes", f"{recorded} disagrees with ae.pt's {sizes}"
        )
    return sizes


def _dl_threshold(weights_file: Path, state: dict[str, torch.Tensor], d_sae: int) -> torch.Tensor:
    """The foreign θ as a float vector: a scalar (0.1.0) or one value per latent."""
    threshold = state["threshold"]
    if not threshold.dtype.is_floating_point or threshold.numel() not in (1, d_sae):
        raise ForeignCheckpointError(
            weights_file, "threshold", f"must be a float scalar or have {d_sae} entries"
        )
    if not torch.isfinite(threshold).all():
        raise ForeignCheckpointError(weights_file, "threshold", "contains NaN or inf")
    return threshold.float().flatten()


def _torch_load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise ForeignCheckpointError(file, None, "file is missing")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ForeignCheckpointError(
            file, None, f"cannot be read as a tensor state dict with weights_only=True ({exc})"
        ) from exc
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise ForeignCheckpointError(file, None, "must hold a state dict of named tensors")
    return state


def _safetensors_load(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise ForeignCheckpointError(file, None, "file is missing")
    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ForeignCheckpointError(
            file, None, f"is not a readable safetensors file ({exc})"
        ) from exc


def _check_keys(file: Path, state: dict[str, torch.Tensor], names: tuple[str, ...]) -> None:
    """Exactly these tensors: an extra one may change the computation (a skip connection...)."""
    missing = [name for name in names if name not in state]
    if missing:
        raise ForeignCheckpointError(file, missing[0], "tensor is missing")
    unexpected = sorted(set(state) - set(names))
    if unexpected:
        raise ForeignCheckpointError(
            file, unexpected[0], f"unexpected tensor (expected exactly {list(names)})"
        )


def _tensor(
    file: Path, state: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]
) -> torch.Tensor:
    tensor = state[name]
    if tuple(tensor.shape) != shape:
        raise ForeignCheckpointError(
            file, name, f"has shape {tuple(tensor.shape)}, expected {shape} from the config"
        )
    if not tensor.dtype.is_floating_point:
        raise ForeignCheckpointError(file, name, f"must be floating point, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ForeignCheckpointError(file, name, "contains NaN or inf")
    return tensor


def _integer_scalar(file: Path, state: dict[str, torch.Tensor], name: str) -> int:
    tensor = state[name]
    if tensor.numel() != 1 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ForeignCheckpointError(file, name, "must be an integer scalar")
    return int(tensor)


def _positive_int(mapping: dict[str, Any], field: str, file: Path, prefix: str = "") -> int:
    value = mapping.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ForeignCheckpointError(
            file, f"{prefix}{field}", f"must be a positive integer, got {value!r}"
        )
    return value


def _json_number_or_list(values: torch.Tensor) -> float | list[float]:
    return float(values[0]) if values.numel() == 1 else values.tolist()
