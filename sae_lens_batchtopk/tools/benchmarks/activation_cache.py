"""Real language-model activations, cached once and split into train / calibration / held-out.

Benchmarks compare several SAE architectures on *the same* tokens. Running the language model
inside every training loop would make each run pay for the model again and would let runs see
different tokens, so the activations are computed once per (model, hook, token counts, seed,
context size), written to disk and reused by every later run with the same key.

Layout and guarantees:

- Sequences come from the offline Wikipedia leads, tokenized to ``context_size`` and shuffled
  with ``seed``. They fill the held-out split first, then calibration, then train; a sequence
  never contributes to two splits (its surplus tokens are dropped), so the splits are disjoint
  at the sequence level, not merely at the token level.
- Special tokens (SmolLM2's BOS/separator, id 0, and every other special id) are excluded:
  their residual norms are outliers no SAE is meant to reconstruct.
- The first ``eval_sequences`` held-out sequences are also kept as token ids, for CE/KL
  evaluation with the full model; none of their tokens is in the train or calibration split.
- Each split is shuffled across sequences once at creation, so a batch mixes documents like
  SAELens's shuffled activation buffer does.
- Storage is float16 (half the disk and memory of float32; residual activations of non-special
  tokens are far inside its range, and the bench upcasts each batch to float32, so the SAEs
  train and evaluate in float32). ``storage_dtype="float32"`` keeps full precision; a float16
  overflow raises rather than silently storing ``inf``.
- The file is written under a temporary name and renamed into place, so an interrupted or
  concurrent run never leaves a partial cache that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_lens_batchtopk.atomic import write_safetensors
from sae_lens_batchtopk.tools.offline import (
    load_wikipedia_leads,
    special_token_ids,
    tokenize_dataset,
)

SPLITS: tuple[str, ...] = ("heldout", "calibration", "train")
_STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# Sequences run through the model at once while caching; bounds the forward-pass memory.
_SEQUENCES_PER_FORWARD = 16
# Wikipedia leads average ~110 tokens; tokenizing this many documents per wanted token (with
# margin) avoids tokenizing the whole corpus for small caches. Falls back to all documents.
_DOCS_PER_TOKEN = 1 / 40


@dataclass(frozen=True)
class CacheSpec:
    """Everything the cached activations depend on; its hash names the cache file.

    Attributes:
        model_name: a label for the model (part of the key; the model itself is passed in).
        hook_name: TransformerLens hook whose activations are cached.
        train_tokens / calibration_tokens / heldout_tokens: non-special tokens per split.
        eval_sequences: held-out token sequences kept for CE/KL evaluation.
        context_size: tokens per sequence (each starts with BOS, which is excluded).
        seed: shuffles sequences into splits and tokens within splits.
        storage_dtype: ``"float16"`` or ``"float32"``.
    """

    model_name: str
    hook_name: str
    train_tokens: int
    calibration_tokens: int
    heldout_tokens: int
    eval_sequences: int
    context_size: int
    seed: int
    storage_dtype: str = "float16"

    def __post_init__(self) -> None:
        for name in ("train_tokens", "calibration_tokens", "heldout_tokens", "eval_sequences"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.context_size < 2:
            raise ValueError(
                f"context_size must be >= 2 (BOS and a token), got {self.context_size}"
            )
        if self.storage_dtype not in _STORAGE_DTYPES:
            raise ValueError(
                f"storage_dtype: be one of {sorted(_STORAGE_DTYPES)}, got {self.storage_dtype!r}"
            )

    def split_tokens(self, split: str) -> int:
        return int(getattr(self, f"{split}_tokens"))

    def file_name(self) -> str:
        """Readable prefix plus a hash of every field, so any change selects another file."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        model = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.model_name)
        total = sum(self.split_tokens(s) for s in SPLITS)
        return (
            f"{model}-{self.hook_name}-{total}tok-ctx{self.context_size}-seed{self.seed}"
            f"-{digest[:12]}.safetensors"
        )


@dataclass
class ActivationCache:
    """Cached activations of one :class:`CacheSpec`, held in memory in the storage dtype.

    Attributes:
        created: ``True`` when this call generated the activations, ``False`` when it reused
            an existing file (what benchmarks record to show the cache was reused).
    """

    spec: CacheSpec
    path: Path
    splits: dict[str, torch.Tensor]
    eval_tokens: torch.Tensor
    created: bool = field(default=False)

    @property
    def d_in(self) -> int:
        return int(self.splits["train"].shape[-1])

    def batches(self, split: str, batch_size: int) -> list[torch.Tensor]:
        """A split in stored order as float32 batches (the last one may be smaller).

        A fixed order matters: calibration and batch-top-k evaluation depend on which tokens
        share a batch, so every SAE must see the same batches.
        """
        return [chunk.float() for chunk in self.splits[split].split(batch_size)]

    def train_batches(self, batch_size: int, *, seed: int) -> Iterator[torch.Tensor]:
        """Endless float32 training batches: each epoch is a fresh permutation, seeded.

        The permutation of epoch ``e`` depends only on ``(seed, e)``, so runs with the same seed
        see identical batches in identical order however many epochs they take. A partial last
        batch is dropped so every step has ``batch_size`` tokens (batch top-k's budget).
        """
        train = self.splits["train"]
        n_full = train.shape[0] // batch_size
        if n_full == 0:
            raise ValueError(
                f"train split has {train.shape[0]} tokens, fewer than one batch of {batch_size}"
            )
        epoch = 0
        while True:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(train.shape[0], generator=generator)
            for index in order[: n_full * batch_size].view(n_full, batch_size):
                yield train[index].float()
            epoch += 1


def load_or_create_activation_cache(
    spec: CacheSpec,
    model: HookedTransformer,
    cache_dir: Path,
    *,
    show_progress: bool = True,
) -> ActivationCache:
    """Load the cache file for ``spec`` from ``cache_dir``, generating it first if absent.

    Raises:
        ValueError: the hook does not exist in the model, the corpus has too few tokens for
            the requested splits, or a float16 cache would overflow.
    """
    if spec.hook_name not in model.hook_dict:
        raise ValueError(f"hook {spec.hook_name!r} is not a hook of the model")
    path = Path(cache_dir) / spec.file_name()
    created = False
    if not path.is_file():
        _generate(spec, model, path, show_progress=show_progress)
        created = True
    return _load(path, spec, created)


def read_cache_header(path: Path) -> tuple[CacheSpec, int]:
    """The spec a cache file was written for and its d_in, from its header alone.

    Lets a command that takes a cache file (``bench-import --cache``) refuse a wrong file
    before reading a gigabyte of activations.

    Raises:
        ValueError: the file is missing, is not a safetensors file, or lacks a split or spec.
    """
    if not Path(path).is_file():
        raise ValueError(f"{path} is not a file")
    try:
        with safe_open(str(path), "pt") as cache_file:
            metadata = cache_file.metadata() or {}
            names = set(cache_file.keys())
            d_in = cache_file.get_slice("train").get_shape()[-1] if "train" in names else 0
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    missing = sorted({*SPLITS, "eval_tokens"} - names)
    if missing or "spec" not in metadata:
        raise ValueError(
            f"{path} is not an activation cache: no {missing or ['spec']} (write one with"
            " sae-batchtopk bench or bench-speed)"
        )
    try:
        return CacheSpec(**json.loads(metadata["spec"])), d_in
    except (TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable cache spec ({error})") from None


def load_activation_cache(path: Path) -> ActivationCache:
    """An existing cache file, whatever its spec (read from the file): no model needed."""
    return _load(Path(path), read_cache_header(path)[0], created=False)


def _load(path: Path, spec: CacheSpec, created: bool) -> ActivationCache:
    tensors = load_file(str(path))
    return ActivationCache(
        spec=spec,
        path=path,
        splits={split: tensors[split] for split in SPLITS},
        eval_tokens=tensors["eval_tokens"],
        created=created,
    )


def _generate(
    spec: CacheSpec, model: HookedTransformer, path: Path, *, show_progress: bool
) -> None:
    sequences = _shuffled_sequences(spec, model)
    special = torch.tensor(special_token_ids(model.tokenizer))
    stop_at_layer = _stop_at_layer(spec.hook_name)
    dtype = _STORAGE_DTYPES[spec.storage_dtype]
    outputs: dict[str, torch.Tensor] = {}
    split_index, filled = 0, 0
    total = sum(spec.split_tokens(s) for s in SPLITS)
    progress = tqdm(total=total, desc="Caching activations", disable=not show_progress)
    with torch.no_grad():
        for chunk in sequences.split(_SEQUENCES_PER_FORWARD):
            _, cache = model.run_with_cache(
                chunk.to(model.cfg.device),
                names_filter=spec.hook_name,
                stop_at_layer=stop_at_layer,
            )
            acts = cache[spec.hook_name]
            if not outputs:
                d_in = acts.shape[-1]
                outputs = {s: torch.empty(spec.split_tokens(s), d_in, dtype=dtype) for s in SPLITS}
            keep = ~torch.isin(chunk, special)
            for sequence_acts, sequence_keep in zip(acts, keep, strict=True):
                split = SPLITS[split_index]
                wanted = spec.split_tokens(split) - filled
                rows = sequence_acts[sequence_keep.to(sequence_acts.device)][:wanted].cpu()
                stored = rows.to(dtype)
                if not torch.isfinite(stored).all():
                    raise ValueError(
                        f"activations at {spec.hook_name} overflow {spec.storage_dtype}; "
                        "use storage_dtype='float32'"
                    )
                outputs[split][filled : filled + rows.shape[0]] = stored
                filled += rows.shape[0]
                progress.update(rows.shape[0])
                if filled == spec.split_tokens(split):
                    split_index, filled = split_index + 1, 0
                    if split_index == len(SPLITS):
                        break
            if split_index == len(SPLITS):
                break
    progress.close()
    if split_index < len(SPLITS):
        raise ValueError(
            f"the corpus ran out after {sum(spec.split_tokens(s) for s in SPLITS[:split_index])}"
            f" + {filled} tokens; lower the train, calibration or held-out token counts"
        )
    generator = torch.Generator().manual_seed(spec.seed)
    tensors = {
        split: tensor[torch.randperm(tensor.shape[0], generator=generator)].contiguous()
        for split, tensor in outputs.items()
    }
    tensors["eval_tokens"] = sequences[: spec.eval_sequences].contiguous()
    write_safetensors(path, tensors, {"spec": json.dumps(asdict(spec), sort_keys=True)})


def _shuffled_sequences(spec: CacheSpec, model: HookedTransformer) -> torch.Tensor:
    """Tokenized Wikipedia sequences in seeded random order, enough for every split."""
    total = sum(spec.split_tokens(s) for s in SPLITS)
    special = torch.tensor(special_token_ids(model.tokenizer))
    max_docs = int(total * _DOCS_PER_TOKEN) + 4 * spec.eval_sequences + 64
    while True:
        dataset = load_wikipedia_leads(max_docs=max_docs)
        tokenized = tokenize_dataset(dataset, model.tokenizer, spec.context_size)
        sequences = tokenized.with_format("torch")[:]["input_ids"].long()
        usable = int((~torch.isin(sequences, special)).sum())
        # Surplus: each split boundary may drop the rest of one sequence.
        if usable >= total + len(SPLITS) * spec.context_size or len(dataset) < max_docs:
            break
        max_docs *= 4
    if sequences.shape[0] <= spec.eval_sequences:
        raise ValueError(f"eval_sequences={spec.eval_sequences} exceeds the corpus sequences")
    generator = torch.Generator().manual_seed(spec.seed)
    return sequences[torch.randperm(sequences.shape[0], generator=generator)]


def _stop_at_layer(hook_name: str) -> int | None:
    """Run only the blocks up to the hook's (``blocks.L.*`` -> ``L + 1``); ``None`` runs all."""
    match = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(match.group(1)) + 1 if match else None
