"""Write the tiny foreign checkpoints that ``tests/test_importers.py`` imports.

Run with an environment that has the *peer* packages, never the project's own::

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch==2.13.0
    /tmp/peers/bin/pip install -c <(echo torch==2.13.0) dictionary-learning eai-sparsify
    /tmp/peers/bin/pip uninstall -y torchvision   # its CPU wheel breaks transformers imports
    /tmp/peers/bin/python tests/data/foreign/make_foreign_checkpoints.py

Every checkpoint comes from the packages' own trainers run for a few steps on synthetic data, so
``config.json``/``cfg.json``, the EMA threshold and the activation normalisation are exactly what
those packages write:

- ``dictionary_learning_batchtopk/``: ``trainSAE`` + ``BatchTopKTrainer`` with
  ``normalize_activations=True`` on activations of norm ~60 (so the stored biases and θ are the
  normalised-space values scaled back by ``norm_factor``), θ updated from step 6 on.
- ``dictionary_learning_matryoshka/``: ``trainSAE`` + ``MatryoshkaBatchTopKTrainer``, group
  fractions 1/4, 1/4, 1/2, no normalisation.
- ``sparsify_topk/``: sparsify's ``Trainer`` on layer 0 of a random 2-layer GPT-2 (d_model 16);
  the hookpoint folder it saved, i.e. ``cfg.json`` + ``sae.safetensors``.

Next to each checkpoint, ``reference.safetensors`` holds fixed raw inputs ``x`` and what the
foreign model itself returns for them (loaded back from disk with the package's own loader), and
its safetensors metadata records the peer versions. Nothing here is imported by the test suite.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
D_IN_DL = 12
D_SAE_DL = 48
K_DL = 4
STEPS_DL = 40
BATCH_DL = 64
N_REFERENCE = 32


def versions() -> dict[str, str]:
    names = ("dictionary-learning", "eai-sparsify", "torch", "transformers")
    return {name: importlib.metadata.version(name) for name in names}


def synthetic_activations(n_batches: int, batch: int, d_in: int, seed: int) -> list[torch.Tensor]:
    """Sparse sums of fixed directions plus a mean offset, scaled up: residual-stream-like."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(4 * d_in, d_in, generator=gen), dim=1)
    offset = 2.0 * torch.randn(d_in, generator=gen)
    batches = []
    for _ in range(n_batches):
        coeffs = torch.relu(torch.randn(batch, 4 * d_in, generator=gen) - 1.0) * 3.0
        noise = 0.1 * torch.randn(batch, d_in, generator=gen)
        batches.append(20.0 * (coeffs @ directions + offset + noise))
    return batches


def write_reference(folder: Path, tensors: dict[str, torch.Tensor], extra: dict) -> None:
    metadata = {"versions": json.dumps(versions()), **{k: json.dumps(v) for k, v in extra.items()}}
    save_file(
        {name: t.detach().contiguous() for name, t in tensors.items()},
        str(folder / "reference.safetensors"),
        metadata=metadata,
    )


def copy_checkpoint(source: Path, target: Path, names: tuple[str, ...]) -> None:
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in names:
        shutil.copy(source / name, target / name)


def make_dictionary_learning(kind: str) -> None:
    from dictionary_learning.training import get_norm_factor, trainSAE
    from dictionary_learning.utils import load_dictionary

    normalize = kind == "batchtopk"
    # One batch more than training uses: its first rows are the held-out reference inputs.
    *data, heldout = synthetic_activations(STEPS_DL + 1, BATCH_DL, D_IN_DL, seed=len(kind))
    config = {
        "steps": STEPS_DL,
        "activation_dim": D_IN_DL,
        "dict_size": D_SAE_DL,
        "k": K_DL,
        "layer": 0,
        "lm_name": "synthetic/tiny",
        "lr": 3e-3,
        "warmup_steps": 2,
        "threshold_start_step": 5,
        "seed": 0,
        "device": "cpu",
        "wandb_name": f"tiny_{kind}",
    }
    if normalize:
        from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer

        config["trainer"] = BatchTopKTrainer
    else:
        from dictionary_learning.trainers.matryoshka_batch_top_k import (
            MatryoshkaBatchTopKTrainer,
        )

        config["trainer"] = MatryoshkaBatchTopKTrainer
        config["group_fractions"] = [0.25, 0.25, 0.5]

    target = HERE / f"dictionary_learning_{kind}"
    with tempfile.TemporaryDirectory() as tmp:
        # trainSAE divides each batch in place by norm_factor: hand it copies.
        trainSAE(
            [batch.clone() for batch in data],
            [config],
            steps=STEPS_DL,
            save_dir=tmp,
            normalize_activations=normalize,
            device="cpu",
        )
        copy_checkpoint(Path(tmp) / "trainer_0", target, ("ae.pt", "config.json"))

    ae, _ = load_dictionary(str(target), device="cpu")
    x = heldout[:N_REFERENCE]
    extra: dict = {"threshold": float(ae.threshold)}
    with torch.no_grad():
        codes, _, post_relu = ae.encode(x, return_active=True, use_threshold=True)
        codes_batch_topk = ae.encode(x, use_threshold=False)
        tensors = {
            "x": x,
            "post_relu": post_relu,
            "codes_threshold": codes,
            "codes_batch_topk": codes_batch_topk,
            "decoded": ae.decode(codes),
            "forward": ae(x),
        }
        if normalize:
            # trainSAE trains on x / norm_factor and calls ae.scale_biases(norm_factor) before
            # saving, so ae.pt already takes raw activations. Check that against the model as
            # trained (biases and θ back in normalised units, input scaled, output unscaled).
            norm_factor = get_norm_factor(data, steps=100)
            trained = load_dictionary(str(target), device="cpu")[0]
            trained.scale_biases(1 / norm_factor)
            as_trained = trained(x / norm_factor) * norm_factor
            assert torch.allclose(as_trained, tensors["forward"], rtol=1e-4, atol=1e-3)
            tensors["forward_as_trained"] = as_trained
            extra["norm_factor"] = norm_factor
    print(f"{target.name}: threshold {float(ae.threshold):.4g}", extra)
    write_reference(target, tensors, extra)


def make_sparsify() -> None:
    from datasets import Dataset
    from sparsify import SparseCoder, SparseCoderConfig, TrainConfig, Trainer
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(
        GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    ).eval()
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (160, 16), generator=gen)
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    cfg = TrainConfig(
        SparseCoderConfig(num_latents=64, k=4),
        batch_size=8,
        layers=[0],
        log_to_wandb=False,
        save_every=10_000,
        run_name="tiny",
    )
    target = HERE / "sparsify_topk"
    with tempfile.TemporaryDirectory() as tmp:
        cfg.save_dir = tmp
        Trainer(cfg, dataset, model).fit()
        (hookpoint,) = cfg.hookpoints
        copy_checkpoint(Path(tmp) / "tiny" / hookpoint, target, ("cfg.json", "sae.safetensors"))

    sae = SparseCoder.load_from_disk(target)
    captured: list[torch.Tensor] = []

    def capture(_module, _inputs, outputs):
        captured.append((outputs[0] if isinstance(outputs, tuple) else outputs).detach())

    handle = model.h[0].register_forward_hook(capture)
    with torch.no_grad():
        model(torch.randint(0, 64, (2 + 20, 16), generator=gen))
    handle.remove()
    # 32 reference tokens with sparsify's outputs, and 320 more for the calibration test.
    x, x_calibration = captured[0].flatten(0, 1).split([32, 320])
    with torch.no_grad():
        top_acts, top_indices, pre_acts = sae.encode(x)
        tensors = {
            "x": x,
            "pre_acts": pre_acts,
            "top_acts": top_acts,
            "top_indices": top_indices,
            "decoded": sae.decode(top_acts, top_indices),
            "forward": sae(x).sae_out,
            "x_calibration": x_calibration,
        }
    print(f"{target.name}: hookpoint {hookpoint}, x shape {tuple(x.shape)}")
    write_reference(target, tensors, {"hookpoint": hookpoint})


if __name__ == "__main__":
    make_dictionary_learning("batchtopk")
    make_dictionary_learning("matryoshka")
    make_sparsify()
    print(json.dumps(versions()))
