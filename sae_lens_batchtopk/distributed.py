"""One training batch spread over many processes (torch.distributed): global selection and state.

BatchTopK's budget is over the whole batch. Under plain data parallelism each process would
keep the top ``int(k * n)`` of its own ``n`` tokens, which silently trains BatchTopK on a
``world_size`` times smaller batch. A :class:`DistributedBatch` instead describes the batch as
the union of every process's rows, and offers what a training step needs over that union:

- the exact batch top-k of the union (:meth:`DistributedBatch.batch_topk_indices`), agreed
  through small all-reduced counts, never by gathering pre-activations; among entries equal to
  the cut-off the lowest (rank, flat index) are kept, which is the lowest flat index of the
  rows concatenated in rank order, so the result is deterministic;
- reductions for state that must stay identical on every process (dead-latent counters, firing
  rates, θ, calibration histograms), for batch statistics (means, variances), and for
  gradients;
- a check that every process was launched with the same settings, and errors that say which
  process and what to do when a collective fails or times out instead of hanging.

Processes are launched by ``torchrun`` (or any launcher that sets torch.distributed's
environment); :func:`init_process_group` joins the group with a timeout, gloo on CPU and NCCL on
GPU. This module knows nothing about SAEs, trainers or runners: they call it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

from sae_lens_batchtopk.selection import (
    indices_above,
    largest_values,
    n_selected,
    sampled_floor,
)
from sae_lens_batchtopk.validation import check_choice

SelectionScope = Literal["global", "local"]
SELECTION_SCOPES: tuple[str, ...] = ("global", "local")

# How long a process waits in a collective for the others before it fails. Long enough for a
# rank-0-only phase (a checkpoint write, a wandb evaluation) while the others wait at the next
# collective; short enough that a dead process stops the run within the hour.
DEFAULT_TIMEOUT_S = 1800

# Radix select: bits of the value's bit pattern decided per all-reduce (256-bin histograms).
_RADIX_BITS = 8
_KEY_DTYPES = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A collective operation failed: another process died, timed out, or diverged."""


def init_process_group(
    *,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> None:
    """Join the process group the launcher describes; a collective waits at most ``timeout_s``.

    Without arguments this reads torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``...), so multi-node runs use torchrun's own rendezvous options. ``backend``
    defaults to NCCL when CUDA is available, else gloo; with NCCL the current CUDA device is set
    to ``LOCAL_RANK``, so ``device="cuda"`` in a config means this process's GPU.
    """
    if timeout_s <= 0 or not math.isfinite(timeout_s):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    options: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)}
    if init_method is not None:
        options["init_method"] = init_method
    if rank is not None:
        options["rank"] = rank
    if world_size is not None:
        options["world_size"] = world_size
    dist.init_process_group(backend, **options)


# Wall time this process has spent inside collectives (every DistributedBatch's).
_COMMUNICATION_CLOCK = [0.0]


def communication_seconds() -> float:
    """Seconds this process has spent inside collectives so far.

    gloo's collectives block, so on CPUs this is the communication share of the training
    time; NCCL's return once launched, so on GPUs it only counts their launch.
    """
    return _COMMUNICATION_CLOCK[0]


def is_distributed() -> bool:
    """Whether this process belongs to an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass(frozen=True)
class DistributedBatch:
    """The training batch is the union of the rows every process of ``group`` holds.

    Args:
        scope: ``"global"``: selection rules (batch top-k) apply to the union, as if one process
            held the rows concatenated in rank order; ``"local"``: each process selects within
            its own rows (per-process batch top-k). Either way gradients and training state are
            reduced over every process, so the replicas stay identical.
        group: the process group; ``None`` is the default (world) group.
    """

    scope: SelectionScope = "global"
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        check_choice("selection_scope", self.scope, SELECTION_SCOPES)
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "torch.distributed is not initialized: launch with torchrun and call"
                " sae_lens_batchtopk.distributed.init_process_group() first"
            )

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def selects_globally(self) -> bool:
        return self.scope == "global"

    @property
    def device(self) -> torch.device:
        """Where collectives' tensors must live: the current GPU for NCCL, else the CPU."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # -- collectives -------------------------------------------------------------------------

    def _run(self, operation: str, call: Callable[[], T]) -> T:
        """Run one collective, timed; a failure names it and says what usually causes it."""
        start = time.perf_counter()
        try:
            return call()
        except RuntimeError as error:  # gloo and NCCL failures and timeouts
            raise DistributedError(
                f"process {self.rank} of {self.world_size}: {operation} failed ({error}). Another"
                " process has most likely died, is stuck, or was launched with different"
                " settings; see its own error. Collectives wait at most the process group's"
                " timeout (init_process_group(timeout_s=...))"
            ) from error
        finally:
            _COMMUNICATION_CLOCK[0] += time.perf_counter() - start

    def _reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType, name: str) -> torch.Tensor:
        """A reduced copy of ``tensor`` on its own device (moved through the comm device)."""
        buffer = tensor.detach().to(self.device, copy=True)
        self._run(name, lambda: dist.all_reduce(buffer, op=op, group=self.group))
        return buffer.to(tensor.device)

    def summed(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over every process (exact for integer tensors)."""
        return self._reduce(tensor, dist.ReduceOp.SUM, "all-reduce (sum)")

    def minimum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise minimum over every process."""
        return self._reduce(tensor, dist.ReduceOp.MIN, "all-reduce (min)")

    def maximum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over every process."""
        return self._reduce(tensor, dist.ReduceOp.MAX, "all-reduce (max)")

    def gathered(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(world_size, *tensor.shape)``: every process's tensor, in rank order."""
        buffer = tensor.detach().to(self.device).contiguous()
        parts = [torch.empty_like(buffer) for _ in range(self.world_size)]
        self._run("all-gather", lambda: dist.all_gather(parts, buffer, group=self.group))
        return torch.stack(parts).to(tensor.device)

    def gathered_objects(self, value: T) -> list[T]:
        """Every process's (picklable) ``value``, in rank order."""
        values: list[Any] = [None] * self.world_size
        self._run(
            "all-gather of objects", lambda: dist.all_gather_object(values, value, group=self.group)
        )
        return values

    def gathered_on_first(self, value: T) -> list[T] | None:
        """Every process's ``value`` in rank order on process 0; ``None`` on the others."""
        values: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        self._run(
            "gather to process 0",
            lambda: dist.gather_object(
                value,
                values,
                dst=dist.get_global_rank(self.group, 0) if self.group else 0,
                group=self.group,
            ),
        )
        return values

    def barrier(self) -> None:
        """Wait until every process gets here (the others wait while process 0 writes)."""
        self._run("barrier", lambda: dist.barrier(group=self.group))

    @torch.no_grad()
    def broadcast_state(self, module: torch.nn.Module) -> None:
        """Give every process process 0's parameters and buffers (identical replicas)."""
        source = dist.get_global_rank(self.group, 0) if self.group else 0
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            buffer = tensor.detach().to(self.device, copy=True)
            self._run(
                f"broadcast of {name}",
                lambda buffer=buffer: dist.broadcast(buffer, src=source, group=self.group),
            )
            tensor.copy_(buffer.to(tensor.device))

    @torch.no_grad()
    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over processes, in one fixed parameter order.

        Every process's loss is a mean over its own rows; with equal row counts the mean of
        the processes' gradients is the gradient of the loss over the union. A parameter
        without a gradient here counts as zero (another process may have one).
        """
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            grad = parameter.grad
            # In place where the gradient already lives on the comm device (no extra copy of
            # a 600 MB encoder gradient).
            buffer = grad if grad.device == self.device else grad.to(self.device)
            self._run(
                "gradient all-reduce",
                lambda buffer=buffer: dist.all_reduce(buffer, group=self.group),
            )
            buffer.div_(self.world_size)
            if buffer is not grad:
                grad.copy_(buffer)

    # -- settings ----------------------------------------------------------------------------

    def check_same_settings(self, settings: Mapping[str, object], what: str) -> None:
        """Raise on every process if any of ``settings`` differs between processes.

        Values are compared as JSON text. The error names each differing setting with every
        process's value, so a launch with mismatched configs fails before any work.
        """
        mine = {
            name: json.dumps(value, sort_keys=True, default=str) for name, value in settings.items()
        }
        everyone = self.gathered_objects(mine)
        names = sorted(set().union(*everyone))
        differing = [n for n in names if len({values.get(n) for values in everyone}) > 1]
        if differing:
            details = "; ".join(
                f"{name}: "
                + ", ".join(
                    f"process {rank} has {values.get(name, '<unset>')}"
                    for rank, values in enumerate(everyone)
                )
                for name in differing
            )
            raise ValueError(
                f"{what} differ across the {self.world_size} processes ({details}); launch every"
                " process with the same configuration"
            )

    # -- batch statistics --------------------------------------------------------------------

    def row_mean(self, rows: torch.Tensor) -> torch.Tensor:
        """Mean of the rows ``(n, d)`` of every process."""
        totals = self.summed(
            torch.cat([rows.detach().double().sum(0), rows.new_full((1,), rows.shape[0]).double()])
        )
        return (totals[:-1] / totals[-1]).to(rows.dtype)

    def total_variance(self, rows: torch.Tensor) -> torch.Tensor:
        """``mean_t ||v_t - mean(v)||²`` over every process's rows ``(n, d)``; two passes.

        The same statistic as on one process holding the union (the mean is the global one),
        so a loss normalised by it is the single-process loss on the concatenated batch.
        """
        mean = self.row_mean(rows)
        squares = (rows.detach() - mean).pow(2).sum().double()
        totals = self.summed(torch.stack([squares, squares.new_tensor(float(rows.shape[0]))]))
        return (totals[0] / totals[1]).to(rows.dtype)

    # -- training state ----------------------------------------------------------------------

    def reduce_step_counts(
        self, n_tokens: int, fired_count: torch.Tensor, batch_theta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Union-wide ``(n_tokens, fired_count per latent, batch θ)`` of one training step.

        Counts add exactly. θ is the minimum selected activation: of the union under global
        selection (the minimum over processes); under local selection each process's batch is
        one sample of the paper's E_X[min], so θ is their mean over the processes where
        anything fired. ``inf`` when nothing fired anywhere. Two collectives, no host sync.
        """
        counts = self.summed(
            torch.cat([fired_count.long(), fired_count.new_full((1,), n_tokens).long()])
        )
        if self.selects_globally:
            theta = self.minimum(batch_theta.reshape(1)).squeeze(0)
        else:
            finite = torch.isfinite(batch_theta)
            pair = torch.stack([torch.where(finite, batch_theta, 0.0), finite.to(batch_theta)])
            total, n_finite = self.summed(pair)
            theta = torch.where(n_finite > 0, total / n_finite.clamp(min=1), torch.inf)
        return counts[-1], counts[:-1], theta

    def first_finite(self, value: float) -> float:
        """The first finite ``value`` in rank order (``inf`` if none): one agreed reference."""
        values = self.gathered(torch.tensor([value], dtype=torch.float64)).flatten()
        finite = values[torch.isfinite(values)]
        return float(finite[0]) if finite.numel() else math.inf

    # -- global batch top-k ------------------------------------------------------------------

    def batch_topk_indices(self, hidden_pre: torch.Tensor, k: float) -> torch.Tensor:
        """This process's part of the batch top-k of the union: ascending flat indices.

        Keeps the ``int(k * N)`` largest positive entries of every process's
        ``(n_r, d_sae)`` pre-activations together (``N = Σ n_r``), and among entries equal to
        the cut-off the lowest (rank, flat index). Exact, like the single-process fast path:
        each process proposes a floor from a sample of its own entries, the processes agree on
        the lowest, count the entries above it (all-reduce), and if together they hold the
        budget, find the exact cut-off among those candidates by radix select over all-reduced
        256-bin histograms of their bit patterns; if they do not, every positive entry is a
        candidate. Communication does not grow with the batch: a few kilobytes per step.
        """
        flat = hidden_pre.detach().reshape(-1)
        d_sae = hidden_pre.shape[-1]
        n_local = hidden_pre.shape[:-1].numel()
        local_budget = min(n_selected(k, n_local), flat.numel())
        floor = sampled_floor(flat, local_budget, d_sae) if local_budget > 0 else None
        shares = self.gathered(
            torch.tensor([float(n_local), 0.0 if floor is None else floor], dtype=torch.float64)
        )
        n_total = int(shares[:, 0].sum())
        n_keep = min(n_selected(k, n_total), n_total * d_sae)
        if n_keep == 0:
            return torch.zeros(0, dtype=torch.long, device=flat.device)
        # A process without a floor of its own proposes 0: every positive entry.
        agreed_floor = float(shares[:, 1].min())
        rows = flat.view(-1, d_sae)
        candidates = indices_above(rows, agreed_floor)
        n_candidates = int(self.summed(torch.tensor([candidates.numel()])))
        if n_candidates < n_keep and agreed_floor > 0:
            candidates = indices_above(rows, 0.0)
            n_candidates = int(self.summed(torch.tensor([candidates.numel()])))
        if n_candidates <= n_keep:
            return candidates
        keys = _bit_keys(flat[candidates])
        cutoff, n_above, n_equal = self._kth_largest_key(keys, n_keep, _key_bits(flat.dtype))
        above = candidates[keys > cutoff]
        equal = candidates[keys == cutoff]
        n_wanted = n_keep - n_above
        if n_wanted < n_equal:
            counts = self.gathered(torch.tensor([equal.numel()])).flatten()
            before = int(counts[: self.rank].sum())
            equal = equal[: max(0, min(n_wanted - before, equal.numel()))]
        return torch.cat([above, equal]).sort().values

    def batch_topk(self, hidden_pre: torch.Tensor, k: float) -> torch.Tensor:
        """Dense form of :meth:`batch_topk_indices`: kept entries, zeros elsewhere.

        Gradients flow to the kept entries only, as with :func:`~.selection.batch_topk`.
        """
        flat = hidden_pre.reshape(-1)
        kept = self.batch_topk_indices(hidden_pre.contiguous(), k)
        return torch.zeros_like(flat).scatter(0, kept, flat[kept]).view_as(hidden_pre)

    def batch_topk_cutoff(
        self, pre_activation_chunks: Iterable[torch.Tensor], k: float, n_tokens: int
    ) -> torch.Tensor:
        """:func:`~.selection.batch_topk_cutoff` of the union of every process's batch.

        This process passes its own ``n_tokens`` rows; the result, the smallest value batch
        top-k keeps from all of them together (``inf`` if nothing positive), is the same
        float on every process and bitwise the single-process value on the concatenation.
        """
        n_total = int(self.summed(torch.tensor([n_tokens])))
        n_keep = n_selected(k, n_total)
        top = largest_values(pre_activation_chunks, n_keep)
        positives = top[top > 0]
        n_positive = int(self.summed(torch.tensor([positives.numel()])))
        if n_keep == 0 or n_positive == 0:
            return torch.full((1,), math.inf)
        if n_positive <= n_keep:
            smallest = positives.min() if positives.numel() else torch.tensor(math.inf)
            return self.minimum(smallest.reshape(1).to(top.dtype))
        cutoff, _, _ = self._kth_largest_key(_bit_keys(positives), n_keep, _key_bits(top.dtype))
        return _from_bit_key(cutoff, top.dtype).reshape(1)

    def _kth_largest_key(self, keys: torch.Tensor, kth: int, n_bits: int) -> tuple[int, int, int]:
        """Radix select over every process's non-negative ``keys``: the ``kth`` largest.

        Returns ``(key, how many keys are larger, how many equal it)``, counted over all
        processes. Each pass all-reduces one histogram of the next 8 bits among the keys that
        share the bits decided so far; ``n_bits / 8`` passes in all.
        """
        prefix_keys = keys
        remaining = kth
        key = 0
        n_equal = 0
        for shift in range(n_bits - _RADIX_BITS, -1, -_RADIX_BITS):
            digits = (prefix_keys >> shift) & ((1 << _RADIX_BITS) - 1)
            histogram = self.summed(torch.bincount(digits, minlength=1 << _RADIX_BITS)).cpu()
            at_or_above = histogram.flip(0).cumsum(0).flip(0)
            digit = int((at_or_above >= remaining).nonzero().max())
            remaining -= int(at_or_above[digit] - histogram[digit])
            prefix_keys = prefix_keys[digits == digit]
            key |= digit << shift
            n_equal = int(histogram[digit])
        return key, kth - remaining, n_equal


def _key_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits


def _bit_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 bit patterns of non-negative floats, ordered as the values are."""
    if values.dtype not in _KEY_DTYPES:
        raise TypeError(
            f"global batch top-k takes floating-point pre-activations, not {values.dtype}"
        )
    return values.contiguous().view(_KEY_DTYPES[values.dtype]).long()


def _from_bit_key(key: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([key], dtype=torch.int64).to(_KEY_DTYPES[dtype]).view(dtype).squeeze(0)
