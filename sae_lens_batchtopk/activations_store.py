"""An ``ActivationsStore`` whose checkpoint continues the identical activation stream.

SAELens's store checkpoints one number, ``n_dataset_processed``, and on load fast-forwards the
dataset by that many rows. A run resumed that way does not see the activations an uninterrupted
run would (SAELens 6.54):

- the mixing buffer's contents are lost: the activations kept back for mixing and the shuffled
  ones not yet served were drawn from the dataset before the checkpoint, so the resumed run
  never trains on them and refills from later rows instead;
- every shuffle is ``torch.randperm`` on torch's *global* generator, whose state a resumed
  process does not have (and which anything else in the process may also draw from).

:class:`ResumableActivationsStore` serves the same stream as SAELens's store (same buffer
arithmetic, same permutations for the same generator state) but shuffles with a generator of
its own, seeded from the runner's ``seed``, and checkpoints everything the stream depends on:
the rows kept for mixing, the rows waiting to be served, the generator state and the position
in the current dataset epoch. Loading such a checkpoint continues the stream exactly where it
stopped, bitwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, cast

import torch
from sae_lens.config import CacheActivationsRunnerConfig, HfDataset, LanguageModelSAERunnerConfig
from sae_lens.constants import ACTIVATIONS_STORE_STATE_FILENAME
from sae_lens.training.activations_store import ActivationsStore
from safetensors.torch import load_file
from transformer_lens.HookedTransformer import HookedRootModule
from typing_extensions import override

from sae_lens_batchtopk.atomic import write_safetensors

# Checkpoint entries this store writes beside SAELens's ``n_dataset_processed``.
SEQUENCES_IN_EPOCH = "sequences_in_epoch"
MIXING_RNG_STATE = "mixing_rng_state"
MIXING_KEPT = "mixing_kept"
MIXING_UNSERVED = "mixing_unserved"
CACHED_ROW = "current_row_idx"
_STREAM_KEYS = (SEQUENCES_IN_EPOCH, MIXING_RNG_STATE, MIXING_KEPT, MIXING_UNSERVED)


class ResumableMixingBuffer(Iterator[torch.Tensor]):
    """SAELens's ``mixing_buffer`` as an object whose state can be read and restored.

    SAELens's version is a generator: the buffer lives in its local variables, out of reach of
    a checkpoint. This class does the same arithmetic step for step (pull activation batches
    until ``buffer_size`` rows are held, shuffle them, keep ``int(buffer_size * mix_fraction)``
    rows for mixing, serve the rest in whole batches), so for the same generator state it
    yields the same batches, and its state is two tensors: :attr:`kept` and :attr:`unserved`.
    """

    kept: torch.Tensor | None
    """Rows held back for mixing with the next activations drawn."""
    unserved: torch.Tensor | None
    """Shuffled rows waiting to be served, in serving order (a whole number of batches)."""

    def __init__(
        self,
        buffer_size: int,
        batch_size: int,
        activations_loader: Iterator[torch.Tensor],
        mix_fraction: float,
        generator: torch.Generator,
    ) -> None:
        if buffer_size < batch_size:
            raise ValueError(
                f"the mixing buffer holds {buffer_size} activations (n_batches_in_buffer * "
                f"context_size), fewer than train_batch_size_tokens={batch_size}"
            )
        if not 0 <= mix_fraction <= 1:
            raise ValueError(f"activations_mixing_fraction must be in [0, 1], got {mix_fraction}")
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        self.activations_loader = activations_loader
        self.mix_fraction = mix_fraction
        self.generator = generator
        self.kept = None
        self.unserved = None

    def __iter__(self) -> ResumableMixingBuffer:
        return self

    @torch.no_grad()
    def __next__(self) -> torch.Tensor:
        while self.unserved is None:
            new = next(self.activations_loader)
            held = new if self.kept is None else torch.cat([self.kept, new], dim=0)
            if held.shape[0] < self.buffer_size:
                self.kept = held
                continue
            if self.mix_fraction > 0:
                # On the CPU, as SAELens's torch.randperm(n) without a device is.
                held = held[torch.randperm(held.shape[0], generator=self.generator)]
            n_kept = int(self.buffer_size * self.mix_fraction)
            n_serving = max(1, (held.shape[0] - n_kept) // self.batch_size) * self.batch_size
            self.unserved, self.kept = held[:n_serving], held[n_serving:]
        batch = self.unserved[: self.batch_size]
        rest = self.unserved[self.batch_size :]
        self.unserved = rest if rest.shape[0] > 0 else None
        return batch


class ResumableActivationsStore(ActivationsStore):
    """SAELens's ``ActivationsStore`` with a checkpoint that resumes the identical stream.

    The checkpoint (``activations_store_state.safetensors``, written atomically) holds:

    - ``n_dataset_processed``, as SAELens writes it, so SAELens's own store can still read it;
    - ``sequences_in_epoch``: sequences drawn from the current pass over the dataset, by
      training, evaluation or calibration alike. Loading replays that many sequences from the
      start of the epoch, which also restores a half-consumed text row of a dataset tokenized
      on the fly. Cost: reading (and, for text, tokenizing) up to one epoch again, as SAELens's
      own fast-forward does; no LLM forward passes;
    - ``mixing_rng_state``: the state of :attr:`mixing_generator`;
    - ``mixing_kept`` / ``mixing_unserved``: the mixing buffer's rows. Cost: up to
      ``n_batches_in_buffer * context_size + store_batch_size_prompts * context_size`` rows of
      ``d_in`` activations in the file (for 64 x 1024 buffered tokens of d_in 2048 in float32,
      about 0.5 GiB), and the same again in host memory while it is written;
    - ``current_row_idx``, only when training from cached activations: the next cached row.

    Shuffles draw from :attr:`mixing_generator` (seeded with the runner config's ``seed`` by
    :meth:`from_config`), not from torch's global generator, so the stream does not depend on
    what else in the process draws random numbers.
    """

    mixing_generator: torch.Generator
    """The generator of the mixing buffer's permutations, saved in checkpoints."""
    state_filename: str = ACTIVATIONS_STORE_STATE_FILENAME
    """This store's file in a checkpoint folder; one per process when training distributed."""
    _sequences_in_epoch: int = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Take ``ActivationsStore``'s arguments; seed shuffles from torch's initial seed.

        ``torch.initial_seed()`` keeps SAELens's behaviour for a store built directly (its
        shuffles follow ``torch.manual_seed``) without drawing from the global generator.
        """
        super().__init__(*args, **kwargs)
        self.mixing_generator = torch.Generator().manual_seed(torch.initial_seed())

    @classmethod
    @override
    def from_config(
        cls,
        model: HookedRootModule,
        cfg: LanguageModelSAERunnerConfig[Any] | CacheActivationsRunnerConfig,
        override_dataset: HfDataset | None = None,
    ) -> ResumableActivationsStore:
        """SAELens's ``from_config``, with the shuffles seeded by ``cfg.seed``."""
        store = cast(
            ResumableActivationsStore,
            super().from_config(model, cfg, override_dataset=override_dataset),
        )
        store.mixing_generator.manual_seed(cfg.seed)
        return store

    @override
    def _iterate_tokenized_sequences(self) -> Generator[torch.Tensor, None, None]:
        # A plain method, not a generator function: the count restarts when SAELens starts a
        # new epoch (creates this iterator), not when the new iterator is first advanced.
        self._sequences_in_epoch = 0
        return self._count_sequences(super()._iterate_tokenized_sequences())

    def _count_sequences(
        self, sequences: Iterator[torch.Tensor]
    ) -> Generator[torch.Tensor, None, None]:
        for sequence in sequences:
            self._sequences_in_epoch += 1
            yield sequence

    @override
    def get_data_loader(self) -> ResumableMixingBuffer:
        return ResumableMixingBuffer(
            buffer_size=self.n_batches_in_buffer * self.training_context_size,
            batch_size=self.train_batch_size_tokens,
            activations_loader=self._iterate_filtered_activations(),
            mix_fraction=self.activations_mixing_fraction,
            generator=self.mixing_generator,
        )

    def _mixing_buffer(self) -> ResumableMixingBuffer:
        if self._dataloader is None:
            self._dataloader = self.get_data_loader()
        # Only get_data_loader (above) ever sets it.
        return cast(ResumableMixingBuffer, self._dataloader)

    @override
    def state_dict(self) -> dict[str, torch.Tensor]:
        buffer = self._mixing_buffer()
        state = {
            **super().state_dict(),
            SEQUENCES_IN_EPOCH: torch.tensor(self._sequences_in_epoch),
            MIXING_RNG_STATE: self.mixing_generator.get_state(),
            MIXING_KEPT: self._rows_for_saving(buffer.kept),
            MIXING_UNSERVED: self._rows_for_saving(buffer.unserved),
        }
        if self.cached_activation_dataset is not None:
            state[CACHED_ROW] = torch.tensor(self.current_row_idx)
        return state

    def _rows_for_saving(self, rows: torch.Tensor | None) -> torch.Tensor:
        if rows is None:
            return torch.empty(0, self.d_in)
        # A copy: the kept and unserved rows are views of one tensor, and safetensors refuses
        # tensors that share memory.
        return rows.detach().to("cpu", copy=True).contiguous()

    @override
    def save_to_checkpoint(self, checkpoint_path: str | Path) -> None:
        self.save(str(Path(checkpoint_path) / self.state_filename))

    @override
    def load_from_checkpoint(self, checkpoint_path: str | Path) -> None:
        self.load(str(Path(checkpoint_path) / self.state_filename))

    @override
    def save(self, file_path: str) -> None:
        """Write the state to ``file_path`` atomically: a crash mid-write leaves the old file."""
        write_safetensors(Path(file_path), self.state_dict())

    @override
    def load(self, file_path: str) -> None:
        """Restore the stream saved by :meth:`save`.

        A checkpoint written by SAELens's own store holds only ``n_dataset_processed``; it is
        loaded as SAELens would (a dataset fast-forward), with a warning that the resumed
        stream is not the one the interrupted run would have served.
        """
        state = load_file(file_path)
        if not any(key in state for key in _STREAM_KEYS):
            warnings.warn(
                f"{file_path} was written by SAELens's ActivationsStore: only its dataset "
                "position is restored, not the mixing buffer or the shuffle state, so the "
                "resumed run will not see the activations an uninterrupted run would",
                stacklevel=2,
            )
            super().load(file_path)
            return
        required = [*_STREAM_KEYS, "n_dataset_processed"]
        if self.cached_activation_dataset is not None:
            required.append(CACHED_ROW)
        missing = [key for key in required if key not in state]
        if missing:
            raise ValueError(f"{file_path}: activations-store checkpoint lacks {missing}")
        kept = self._rows_for_loading(state, MIXING_KEPT)
        unserved = self._rows_for_loading(state, MIXING_UNSERVED)
        if unserved is not None and unserved.shape[0] % self.train_batch_size_tokens:
            raise ValueError(
                f"{file_path}: {MIXING_UNSERVED} holds {unserved.shape[0]} activations, not a "
                f"whole number of batches of train_batch_size_tokens="
                f"{self.train_batch_size_tokens}; resume with the batch size the run had"
            )

        buffer = self._mixing_buffer()
        buffer.kept, buffer.unserved = kept, unserved
        self.mixing_generator.set_state(state[MIXING_RNG_STATE])
        if self.dataset is not None:
            self._replay_sequences(int(state[SEQUENCES_IN_EPOCH]), file_path)
        if self.cached_activation_dataset is not None:
            self.current_row_idx = int(state[CACHED_ROW])
        self.n_dataset_processed = int(state["n_dataset_processed"])

    def _rows_for_loading(self, state: dict[str, torch.Tensor], key: str) -> torch.Tensor | None:
        rows = state[key]
        if rows.ndim != 2 or rows.shape[1] != self.d_in:
            raise ValueError(
                f"{key} in the activations-store checkpoint has shape {tuple(rows.shape)}; "
                f"this store has d_in={self.d_in}"
            )
        return rows.to(self.device) if rows.shape[0] > 0 else None

    def _replay_sequences(self, n_sequences: int, file_path: str) -> None:
        """Restart the current epoch and draw ``n_sequences`` from it, as the saved run had."""
        self.iterable_sequences = self._iterate_tokenized_sequences()
        for drawn in range(n_sequences):
            try:
                next(self.iterable_sequences)
            except StopIteration:
                raise ValueError(
                    f"{file_path}: {SEQUENCES_IN_EPOCH}={n_sequences}, but this dataset ends "
                    f"after {drawn} sequences; resume with the dataset the run was trained on"
                ) from None
