"""AuxK's decode as dense matmuls over the columns it uses, where that beats gathers.

The sparse kernels (:mod:`~sae_lens_batchtopk.sparse_codes`) read one decoder or encoder row
per selected entry: their cost is ``entries x d_in`` bytes moved. A dense matmul over the
columns the entries lie in costs ``2 x tokens x columns x d_in`` FLOPs instead, and a GPU does
hundreds of FLOPs in the time it moves a byte. The main batch top-k codes are far too sparse
for that to pay (k 32 of 65536 columns: density 1/2048), but AuxK's are not: ``k_aux`` (SAELens:
``d_in / 2``, 1152 for Gemma 2 2B) of the dead columns per token, a density of 1/14 at 16384
dead. On an H100 at d_in 2304, d_sae 65536, 25 % dead, batch 4096, bfloat16 autocast, the
sparse AuxK decode and its backward took 90 ms a step (``embedding_bag`` at 13 ms a pass); as
matmuls over the dead block (0.3 TFLOP each, under half a millisecond at the GPU's bfloat16
rate) the whole step fell from 112 to 33 ms, against 66 ms for SAELens's dense ``batchtopk``.

:func:`prefers_column_block` decides from the device, the density and the matmul dtype. On
CUDA, as above. On a CPU only where the matmul has a matrix unit for its dtype (Intel AMX for
bfloat16 or float16, read from the CPU's flags): there a bfloat16 matmul ran 5x faster than in
float32 and the block won, elsewhere the gathers do. Measured on a 2-core Xeon with AMX
(bfloat16 autocast, d_in 576, d_sae 16384, batch 4096, AuxK's 288 of 4096 dead columns per
token): the aux decode and its backward 329 ms through the gathers, 191 ms as a block; the
whole step 0.78 s -> 0.66 s. In float32 the block was no faster there (1.05 s against 1.00 s a
step, at 330 GFLOP/s); a CPU without AMX was not measured, but its bfloat16 matmul (about 400
GFLOP/s on the AMD EPYC this project also ran on) is nearer that float32 rate than AMX's.

The result equals the sparse kernels' to float rounding: same values, same gradients (to
``W_enc``, ``b_enc``, ``W_dec`` at those columns, and to ``sae_in`` or the input bias), the
decoder scale a constant.
Two differences, both bounded: under autocast the matmuls take bfloat16 operands, the upstream
gradient included, as autocast's own matmul backward does, and on a CPU return bfloat16
products, as autocast's CPU matmuls do (the sparse kernels keep float32 sums of rounded inputs;
the difference is within bfloat16 tolerance, which the tests check); and the ``tokens x
columns`` block of activations is kept for backward (134 MB in bfloat16 at the H100 shape
above, where the whole step's peak rose from 5,369 to 5,590 MB).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # sparse_step imports this module
    from sae_lens_batchtopk.sparse_step import SparseStepWeights

# Density (entries / (tokens x columns)) above which the dense block is used on CUDA, per
# matmul dtype. Break-even from the H100 measurement above: a sparse pass moves about 0.6 TB/s
# of fp32 rows, a matmul runs at about 700 TFLOP/s in bfloat16 and 50 in float32, so the
# dense block wins above a density of about 1/2300 (bfloat16) and 1/170 (float32). The
# thresholds sit 2-3x above those: near break-even the sparse pass keeps the memory saving.
REDUCED_PRECISION_MIN_DENSITY = 1 / 1024
FULL_PRECISION_MIN_DENSITY = 1 / 64
# On a CPU with a matrix unit for the matmul dtype: break-even measured at a density of about
# 1/24 (the measurement above: the block cost the same for any density, the gathers 0.28 us per
# entry); the threshold sits 1.5x above it.
CPU_MATRIX_UNIT_MIN_DENSITY = 1 / 16
# The CPU flag (Linux /proc/cpuinfo) of the matrix unit that multiplies each dtype.
_CPU_MATRIX_UNIT_FLAG = {torch.bfloat16: "amx_bf16", torch.float16: "amx_fp16"}
# Largest block (tokens x columns) decoded densely. The block and its float32 gradient are
# transient tensors the sparse kernels never make: at this size (e.g. 4096 tokens x 65536 dead
# columns) they add 1.5 GB to the step's peak in bfloat16, 2 GB in float32; beyond it, as for a
# million-latent SAE with a quarter dead, they would add several GB beside weights and Adam state
# already filling the GPU, so the sparse kernels take over.
MAX_BLOCK_ELEMENTS = 2**28


def prefers_column_block(
    device: torch.device, matmul_dtype: torch.dtype, n_entries: int, n_tokens: int, n_columns: int
) -> bool:
    """Whether to decode ``n_entries`` in ``n_columns`` as a dense block: dense enough for the
    device and dtype (:func:`min_block_density`), and no larger than :data:`MAX_BLOCK_ELEMENTS`."""
    threshold = min_block_density(device, matmul_dtype)
    if threshold is None or n_entries == 0 or n_tokens * n_columns > MAX_BLOCK_ELEMENTS:
        return False
    return n_entries >= threshold * n_tokens * n_columns


def min_block_density(device: torch.device, matmul_dtype: torch.dtype) -> float | None:
    """The density above which a block pays on ``device`` for ``matmul_dtype``'s matmuls, or
    ``None`` where none does: on CUDA, and on a CPU with a matrix unit for the dtype
    (:func:`has_cpu_matrix_unit`)."""
    if device.type == "cuda":
        reduced = matmul_dtype in (torch.bfloat16, torch.float16)
        return REDUCED_PRECISION_MIN_DENSITY if reduced else FULL_PRECISION_MIN_DENSITY
    if device.type == "cpu" and has_cpu_matrix_unit(matmul_dtype):
        return CPU_MATRIX_UNIT_MIN_DENSITY
    return None


def has_cpu_matrix_unit(matmul_dtype: torch.dtype) -> bool:
    """Whether this machine's CPU has a matrix unit (AMX) for ``matmul_dtype``'s matmuls."""
    flag = _CPU_MATRIX_UNIT_FLAG.get(matmul_dtype)
    return flag is not None and flag in cpu_flags()


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, read once from ``/proc/cpuinfo``; empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def column_block_for(
    latent_idx: torch.Tensor, matmul_dtype: torch.dtype, n_tokens: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(columns, positions)`` of the entries when :func:`prefers_column_block`, else None.

    ``columns``: the distinct latents, ascending; ``positions``: each entry's index in them.
    Where no density could qualify (a CPU without a matrix unit for the dtype) it returns at
    once, before the sort that finding the columns costs.
    """
    device = latent_idx.device
    if min_block_density(device, matmul_dtype) is None:
        return None
    columns, positions = torch.unique(latent_idx, sorted=True, return_inverse=True)
    n_entries, n_columns = latent_idx.numel(), columns.numel()
    if not prefers_column_block(device, matmul_dtype, n_entries, n_tokens, n_columns):
        return None
    return columns, positions


def decode_column_block(
    sae_in: torch.Tensor,
    weights: SparseStepWeights,
    preactivations: torch.Tensor,
    token_idx: torch.Tensor,
    columns: torch.Tensor,
    positions: torch.Tensor,
    matmul_dtype: torch.dtype,
) -> torch.Tensor:
    """Decode ``relu(pre-activation)`` at the entries through the block of their columns.

    Entry ``i`` is at token ``token_idx[i]`` and latent ``columns[positions[i]]``
    (``columns``: the distinct latents, ascending). ``preactivations`` are the entries'
    ``sae_in @ W_enc + b_enc`` (decoder scale divided out), detached. Returns ``(n_tokens,
    d_in)`` in the accumulation dtype; gradients reach ``sae_in`` (or ``weights.input_bias``,
    see :func:`~sae_lens_batchtopk.sparse_codes.gather_preactivations`), and ``W_enc``,
    ``b_enc`` and ``W_dec`` at those columns. The matmuls take ``matmul_dtype`` operands
    (autocast's bfloat16, or the weights' dtype) and accumulate in float32.
    """
    acts = preactivations.new_zeros(sae_in.shape[0], columns.numel(), dtype=matmul_dtype)
    acts[token_idx, positions] = preactivations.relu().to(matmul_dtype)
    if weights.input_bias is not None:
        sae_in = sae_in.detach()
    return _ColumnBlockDecode.apply(
        sae_in, weights.W_enc, weights.b_enc, weights.W_dec, weights.input_bias, acts, columns
    )


class _ColumnBlockDecode(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        sae_in: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        input_bias: torch.Tensor | None,
        acts: torch.Tensor,
        columns: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(sae_in, W_enc, W_dec, acts, columns)
        return _matmul(acts, W_dec.index_select(0, columns).to(acts.dtype))

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        sae_in, W_enc, W_dec, acts, columns = ctx.saved_tensors
        dtype = acts.dtype
        grad_out = grad.to(dtype)
        grad_sae_in = grad_W_enc = grad_b_enc = grad_W_dec = grad_input_bias = None
        if ctx.needs_input_grad[3]:
            block = _matmul(acts.t(), grad_out)
            grad_W_dec = _scatter(block, 0, columns, W_dec.shape[0]).to(W_dec.dtype)
        # The relu's derivative: only entries with a positive activation pass gradient.
        grad_pre = _matmul(grad_out, W_dec.index_select(0, columns).to(dtype).t())
        grad_pre = grad_pre.masked_fill_(acts <= 0, 0)
        per_latent = grad_pre.sum(0)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[4]:
            W_enc_block = W_enc.index_select(1, columns)
        if ctx.needs_input_grad[1]:
            block = _matmul(sae_in.to(dtype).t(), grad_pre.to(dtype))
            grad_W_enc = _scatter(block, 1, columns, W_enc.shape[1]).to(W_enc.dtype)
        if ctx.needs_input_grad[2]:
            grad_b_enc = _scatter(per_latent, 0, columns, W_enc.shape[1]).to(W_enc.dtype)
        if ctx.needs_input_grad[0]:
            grad_sae_in = _matmul(grad_pre.to(dtype), W_enc_block.to(dtype).t())
            grad_sae_in = grad_sae_in.to(sae_in.dtype)
        if ctx.needs_input_grad[4]:
            with torch.autocast(W_enc.device.type, enabled=False):
                bias_grad = torch.mv(W_enc_block.to(per_latent.dtype), per_latent)
            grad_input_bias = bias_grad.neg().to(W_enc.dtype)
        return grad_sae_in, grad_W_enc, grad_b_enc, grad_W_dec, grad_input_bias, None, None


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in float32 (float64 for float64 operands).

    On CUDA, reduced-precision operands go straight to a float32 output (cuBLAS accumulates
    in float32 anyway); elsewhere the product is rounded to the operands' dtype, then widened.
    """
    out_dtype = torch.promote_types(a.dtype, torch.float32)
    with torch.autocast(a.device.type, enabled=False):
        if a.device.type == "cuda" and a.dtype != out_dtype:
            return torch.mm(a, b, out_dtype=out_dtype)
        return torch.mm(a, b).to(out_dtype)


def _scatter(block: torch.Tensor, dim: int, index: torch.Tensor, size: int) -> torch.Tensor:
    """A zero tensor, ``size`` long along ``dim``, holding ``block`` at ``index`` (distinct)."""
    shape = list(block.shape)
    shape[dim] = size
    return block.new_zeros(shape).index_copy_(dim, index, block)
