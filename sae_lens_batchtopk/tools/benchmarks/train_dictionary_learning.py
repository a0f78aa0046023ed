"""Train dictionary_learning's own BatchTopK SAE on the train split of one of our activation caches.

The foreign SAE that ``sae-batchtopk bench-import`` imports and recalibrates. It sits beside the
benchmarks but is run as a file, never imported by the package: it needs ``dictionary-learning``,
which ``sae-lens-batchtopk`` does not depend on, and nothing else but torch and safetensors (not
this package), so run it in an environment of its own::

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch==2.13.0 safetensors
    /tmp/peers/bin/pip install -c <(echo torch==2.13.0) dictionary-learning==0.1.0
    /tmp/peers/bin/python sae_lens_batchtopk/tools/benchmarks/train_dictionary_learning.py \
        CACHE.safetensors OUTPUT --epochs 3
    sae-batchtopk bench-import OUTPUT/trainer_0 --cache CACHE.safetensors --output runs/import

``CACHE.safetensors`` is a file written by ``sae-batchtopk bench`` or ``bench-speed`` (under
``~/.cache/sae_lens_batchtopk/activations/``; format in
``sae_lens_batchtopk/tools/benchmarks/activation_cache.py``: float16 splits ``train``,
``calibration`` and ``heldout`` and the spec as JSON in the metadata). Only ``train`` is read, so
the calibration and held-out splits stay unseen for ``bench-import``.

Training is dictionary_learning's ``trainSAE`` with its ``BatchTopKTrainer`` and that trainer's
defaults: learning rate ``2e-4 / sqrt(dict_size / 2**14)``, Adam (0.9, 0.999), linear warm-up, no
decay, AuxK with alpha 1/32 on ``d_in // 2`` latents after its 10M-token dead window, decoder rows
kept unit-norm, ``b_dec`` initialised at the first batch's geometric median, θ an EMA (beta 0.999)
of each batch's smallest kept activation. Two of its defaults are step counts sized for runs of
100k+ steps: ``warmup_steps`` and ``threshold_start_step``, both 1000, so θ starts when warm-up
ends. A run of a few hundred steps (2.1M tokens at batch 4096 is 512 steps) would fail its
scheduler's ``warmup_steps < steps`` check and never estimate θ, so both default here to
``min(1000, steps // 10)``, keeping that relation. Activations are normalised
(``normalize_activations=True``, which trainSAE's docstring recommends for hyperparameter
transfer); dictionary_learning folds the factor back into the saved weights.

The batches are each epoch's seeded permutation of the train split, ``--batch-size`` tokens each
(a partial last batch is dropped), as the benchmarks here draw theirs. ``OUTPUT`` must not exist;
it appears complete or not at all (written under a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

PROG = "train_dictionary_learning.py"
# dictionary_learning's BatchTopKTrainer defaults for warmup_steps and threshold_start_step.
DEFAULT_STEP_COUNT = 1000


class TrainBatches:
    """Float32 training batches: one seeded permutation of the train split per epoch.

    An iterable, not an iterator: ``trainSAE`` reads the data twice (``get_norm_factor`` takes
    the first 101 batches, then training starts again from the first), and both passes must
    see the same batches. ``config`` is what ``trainSAE`` saves as the ``buffer`` entry of
    ``config.json``: where the activations came from.
    """

    def __init__(self, train: torch.Tensor, batch_size: int, epochs: int, seed: int) -> None:
        self.train = train
        self.batch_size = batch_size
        self.per_epoch = train.shape[0] // batch_size
        self.steps = self.per_epoch * epochs
        self.seed = seed
        self.config: dict[str, Any] = {}

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = torch.empty(0, dtype=torch.long)
        for step in range(self.steps):
            epoch, index = divmod(step, self.per_epoch)
            if index == 0:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(self.train.shape[0], generator=generator)
            batch = order[index * self.batch_size : (index + 1) * self.batch_size]
            yield self.train[batch].float()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", type=Path, help="activation cache file (.safetensors)")
    parser.add_argument("output", type=Path, help="new folder; the SAE lands in OUTPUT/trainer_0")
    parser.add_argument("--k", type=int, default=32, help="BatchTopK's k (default 32)")
    parser.add_argument(
        "--dict-size", type=int, default=4608, help="latents (default 4608, bench's d_sae)"
    )
    parser.add_argument("--batch-size", type=int, default=4096, help="tokens per step")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the train split")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        help=f"linear warm-up steps (default min({DEFAULT_STEP_COUNT}, steps // 10))",
    )
    parser.add_argument(
        "--threshold-start-step",
        type=int,
        help="first step that updates the EMA θ (default: --warmup-steps')",
    )
    parser.add_argument("--lr", type=float, help="default: dictionary_learning's scaling law")
    parser.add_argument("--seed", type=int, default=42, help="initial weights and batch order")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    return parser


def read_train_split(cache: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """The cache's train split (float16, as stored) and its spec."""
    with safe_open(str(cache), "pt") as cache_file:
        metadata, names = cache_file.metadata() or {}, cache_file.keys()
        if "train" not in names or "spec" not in metadata:
            raise ValueError(f"cache: {cache} is not an activation cache (no train split or spec)")
        return cache_file.get_tensor("train"), json.loads(metadata["spec"])


def check(args: argparse.Namespace, n_train: int) -> int:
    """Refuse bad settings before training, naming the option; return the number of steps."""
    for name in ("k", "dict_size", "batch_size", "epochs"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.k > args.dict_size:
        raise ValueError(f"--k {args.k} exceeds --dict-size {args.dict_size}")
    if args.batch_size > n_train:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {n_train}-token train split")
    steps = n_train // args.batch_size * args.epochs
    if args.warmup_steps is None:
        args.warmup_steps = min(DEFAULT_STEP_COUNT, steps // 10)
    if not 0 <= args.warmup_steps < steps:
        raise ValueError(f"--warmup-steps must be in [0, {steps}) for a run of {steps} steps")
    if args.threshold_start_step is None:
        args.threshold_start_step = args.warmup_steps
    if not 0 <= args.threshold_start_step < steps:
        raise ValueError(
            f"--threshold-start-step must be in [0, {steps}): θ would never be estimated"
        )
    if args.lr is not None and not args.lr > 0:
        raise ValueError("--lr must be positive")
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.output.exists():
        raise ValueError(f"output: {args.output} exists; choose a new folder")
    return steps


def train(args: argparse.Namespace, train_split: torch.Tensor, spec: dict[str, Any]) -> Path:
    """Run ``trainSAE`` into a temporary folder beside ``output``, then rename it into place."""
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.training import trainSAE

    data = TrainBatches(train_split, args.batch_size, args.epochs, args.seed)
    data.config = {
        "cache": str(args.cache.resolve()),
        "spec": spec,
        "split": "train",
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "seed": args.seed,
    }
    layer = re.match(r"blocks\.(\d+)\.", spec["hook_name"])
    trainer = {
        "trainer": BatchTopKTrainer,
        "steps": data.steps,
        "activation_dim": train_split.shape[-1],
        "dict_size": args.dict_size,
        "k": args.k,
        "layer": int(layer.group(1)) if layer else -1,
        "lm_name": spec["model_name"],
        "submodule_name": spec["hook_name"],
        "warmup_steps": args.warmup_steps,
        "threshold_start_step": args.threshold_start_step,
        "seed": args.seed,
        "device": args.device,
        "wandb_name": "BatchTopKSAE",
        **({"lr": args.lr} if args.lr is not None else {}),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.output.name}.", dir=args.output.parent))
    try:
        trainSAE(
            data,
            [trainer],
            steps=data.steps,
            save_dir=str(staging),
            normalize_activations=True,
            device=args.device,
        )
        os.replace(staging, args.output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return args.output / "trainer_0"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.cache.is_file():
            raise ValueError(f"cache: {args.cache} is not a file")
        train_split, spec = read_train_split(args.cache)
        steps = check(args, train_split.shape[0])
    except ValueError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(
        f"{steps} steps of {args.batch_size} tokens (k {args.k}, dict_size {args.dict_size},"
        f" warm-up {args.warmup_steps}, θ from step {args.threshold_start_step})"
    )
    folder = train(args, train_split, spec)
    threshold = float(torch.load(folder / "ae.pt", weights_only=True)["threshold"])
    print(f"wrote {folder} (θ {threshold:.4g}); next:")
    print(f"  sae-batchtopk bench-import {folder} --cache {args.cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
