"""The fast sparse training path against the plain dense reference.

Selection: the fast exact batch top-k (and Feature Choice's index form) against the plain
``batch_topk`` / ``feature_choice``, including an input built to defeat the sampled threshold
and bfloat16 values full of ties. Kernels: ``gather_preactivations`` and ``decode_codes``
against dense autograd, with empty tokens and empty selections, and in reduced precision
(float32 accumulation). SAE: a whole training step on both paths gives the same losses,
gradients and training state, and the sparse one keeps no ``tokens x d_sae`` tensor for backward.
Reduced precision: under autocast (bfloat16, float16) and with bfloat16 weights the sparse step
matches a float32 reference, within bfloat16 rounding on random data and to float32 rounding on
an exact grid. The autocast tests run on CUDA too when it is present.
"""

from __future__ import annotations

import copy
import platform
import warnings
from dataclasses import replace
from functools import partial
from typing import Any

import pytest
import torch
from conftest import step_input
from sae_lens.saes.sae import TrainStepInput

from sae_lens_batchtopk import (
    CalibratedBatchTopKTrainingSAE,
    CalibratedBatchTopKTrainingSAEConfig,
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    column_block,
    register_aux_loss,
    sparse_step,
)
from sae_lens_batchtopk.aux_losses import auxk_loss
from sae_lens_batchtopk.column_block import decode_column_block, prefers_column_block
from sae_lens_batchtopk.selection import (
    batch_topk,
    batch_topk_indices,
    feature_choice,
    feature_choice_indices,
    per_token_topk_indices,
    threshold_sample_stride,
)
from sae_lens_batchtopk.sparse_codes import SparseCodes, decode_codes, gather_preactivations
from sae_lens_batchtopk.sparse_step import (
    SparseStepWeights,
    decode_without_bias,
    dense_forward,
    selected_codes,
    sparse_forward,
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]
REDUCED = [torch.bfloat16, torch.float16]


def dense_from_indices(hidden_pre: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    flat = torch.zeros(hidden_pre.numel(), dtype=hidden_pre.dtype)
    flat[indices] = hidden_pre.flatten()[indices]
    return flat.view_as(hidden_pre)


@pytest.mark.parametrize(
    ("n_tokens", "d_sae", "k"),
    [(512, 1024, 8), (300, 4096, 3.5), (64, 128, 16), (1, 64, 4), (2048, 384, 30)],
)
@pytest.mark.parametrize("fast", [True, False])
def test_batch_topk_indices_match_reference(
    n_tokens: int, d_sae: int, k: float, fast: bool
) -> None:
    torch.manual_seed(n_tokens + d_sae)
    hidden_pre = torch.randn(n_tokens, d_sae) - 0.5
    indices = batch_topk_indices(hidden_pre, k, fast=fast)
    assert torch.all(indices[1:] > indices[:-1])  # ascending: grouped by token
    torch.testing.assert_close(
        dense_from_indices(hidden_pre, indices), batch_topk(hidden_pre, k), rtol=0, atol=0
    )


@pytest.mark.parametrize("shift", [-6.0, -3.0, 0.0])
def test_batch_topk_indices_with_few_or_no_positives(shift: float) -> None:
    torch.manual_seed(1)
    hidden_pre = torch.randn(600, 2048) + shift  # -6: almost no positives; budget unmet
    indices = batch_topk_indices(hidden_pre, 16)
    expected = batch_topk(hidden_pre, 16)
    torch.testing.assert_close(dense_from_indices(hidden_pre, indices), expected, rtol=0, atol=0)
    assert batch_topk_indices(-hidden_pre.abs() - 1, 16).numel() == 0


def test_batch_topk_indices_exact_when_the_sample_misleads() -> None:
    # Every sampled entry is large, every other entry small: the sampled threshold keeps no
    # candidate, so the exactness check must send the selection to the full top-k.
    n_tokens, d_sae = 256, 1024
    flat = torch.rand(n_tokens * d_sae) * 1e-3
    stride = threshold_sample_stride(flat.numel(), d_sae)
    flat[::stride] = 10.0 + torch.rand(flat[::stride].shape)
    hidden_pre = flat.view(n_tokens, d_sae)
    indices = batch_topk_indices(hidden_pre, 300)  # budget above the number of large entries
    torch.testing.assert_close(
        dense_from_indices(hidden_pre, indices), batch_topk(hidden_pre, 300), rtol=0, atol=0
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid", ["integers", "bfloat16"])
@pytest.mark.parametrize("fast", [True, False])
def test_batch_topk_indices_break_ties_as_the_reference(
    dtype: torch.dtype, grid: str, fast: bool
) -> None:
    # Integers -3..3: the cut-off value is shared by thousands of entries. bfloat16 normals:
    # 8 significant bits, so a few entries tie at the cut-off in most batches.
    generator = torch.Generator().manual_seed(3)
    if grid == "integers":
        hidden_pre = torch.randint(-3, 4, (400, 512), generator=generator).to(dtype)
    else:
        hidden_pre = (torch.randn(1024, 2048, generator=generator) * 3).bfloat16().to(dtype)
    for k in (20, 7.5):
        expected = batch_topk(hidden_pre, k).flatten().nonzero().squeeze(1)
        assert torch.equal(batch_topk_indices(hidden_pre, k, fast=fast), expected)


@pytest.mark.parametrize("n_tokens", [1, 40, 300])
def test_feature_choice_indices_match_reference(n_tokens: int) -> None:
    torch.manual_seed(n_tokens)
    hidden_pre = torch.randn(n_tokens, 96)
    capacities = torch.randint(0, 8, (96,))
    indices = feature_choice_indices(hidden_pre, capacities)
    torch.testing.assert_close(
        dense_from_indices(hidden_pre, indices),
        feature_choice(hidden_pre, capacities),
        rtol=0,
        atol=0,
    )


def random_positions(
    n_tokens: int, d_sae: int, nnz: int, *, skip_tokens: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    allowed = torch.ones(n_tokens, d_sae, dtype=torch.bool)
    allowed[list(skip_tokens)] = False
    flat = allowed.flatten().nonzero().squeeze(1)
    flat = flat[torch.randperm(flat.numel())[:nnz]].sort().values
    return flat // d_sae, flat % d_sae


@pytest.mark.parametrize("nnz", [0, 1, 57])
def test_gather_preactivations_gradients_match_dense(nnz: int) -> None:
    torch.manual_seed(nnz)
    n_tokens, d_in, d_sae = 12, 7, 20
    sae_in = torch.randn(n_tokens, d_in, dtype=torch.float64, requires_grad=True)
    W_enc = torch.randn(d_in, d_sae, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(d_sae, dtype=torch.float64, requires_grad=True)
    rows, cols = random_positions(n_tokens, d_sae, nnz, skip_tokens=(0, 5, 11))
    upstream = torch.randn(nnz, dtype=torch.float64)

    dense = (sae_in @ W_enc + b_enc)[rows, cols]
    (dense * upstream).sum().backward()
    expected = [t.grad.clone() for t in (sae_in, W_enc, b_enc)]
    for t in (sae_in, W_enc, b_enc):
        t.grad = None
    with torch.no_grad():
        values = (sae_in @ W_enc + b_enc)[rows, cols]
    sparse = gather_preactivations(sae_in, W_enc, b_enc, rows, cols, values)
    torch.testing.assert_close(sparse, dense.detach())
    (sparse * upstream).sum().backward()
    for t, grad in zip((sae_in, W_enc, b_enc), expected, strict=True):
        torch.testing.assert_close(t.grad, grad)


@pytest.mark.parametrize("nnz", [0, 1, 57])
def test_decode_codes_matches_dense(nnz: int) -> None:
    torch.manual_seed(nnz + 1)
    n_tokens, d_in, d_sae = 12, 7, 20
    rows, cols = random_positions(n_tokens, d_sae, nnz, skip_tokens=(3, 11))
    values = torch.randn(nnz, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(d_sae, d_in, dtype=torch.float64, requires_grad=True)
    codes = SparseCodes(rows, cols, values, n_tokens, d_sae)
    upstream = torch.randn(n_tokens, d_in, dtype=torch.float64)

    dense = codes.to_dense() @ W_dec
    (dense * upstream).sum().backward()
    expected = (values.grad.clone(), W_dec.grad.clone())
    values.grad = W_dec.grad = None
    sparse = decode_codes(codes, W_dec)
    torch.testing.assert_close(sparse, dense.detach())
    (sparse * upstream).sum().backward()
    torch.testing.assert_close(values.grad, expected[0])
    torch.testing.assert_close(W_dec.grad, expected[1])


@pytest.mark.parametrize("dtype", REDUCED)
def test_kernels_accumulate_reduced_precision_in_float32(dtype: torch.dtype) -> None:
    # Inputs in dtype, outputs in float32: equal to the float64 computation on the same
    # (rounded) inputs to float32 rounding. Gradients come back in each input's dtype.
    torch.manual_seed(2)
    n_tokens, d_in, d_sae = 40, 16, 300
    rows, cols = random_positions(n_tokens, d_sae, 500, skip_tokens=(4,))
    sae_in = torch.randn(n_tokens, d_in).to(dtype).requires_grad_()
    W_enc = torch.randn(d_in, d_sae).to(dtype).requires_grad_()
    b_enc = torch.randn(d_sae).to(dtype).requires_grad_()
    W_dec = torch.randn(d_sae, d_in).to(dtype).requires_grad_()
    upstream = torch.randn(n_tokens, d_in)
    leaves = (sae_in, W_enc, b_enc, W_dec)

    with torch.no_grad():
        values = (sae_in.float() @ W_enc.float() + b_enc.float())[rows, cols].to(dtype)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    pre = (exact[0] @ exact[1] + exact[2])[rows, cols]
    pre = pre + (values.double() - pre).detach()  # the rounded values, the exact gradient path
    dense = SparseCodes(rows, cols, pre, n_tokens, d_sae).to_dense() @ exact[3]
    (dense * upstream.double()).sum().backward()

    gathered = gather_preactivations(sae_in, W_enc, b_enc, rows, cols, values)
    decoded = decode_codes(SparseCodes(rows, cols, gathered, n_tokens, d_sae), W_dec)
    assert gathered.dtype == decoded.dtype == torch.float32
    torch.testing.assert_close(decoded.double(), dense.detach(), rtol=1e-6, atol=1e-6)
    (decoded * upstream).sum().backward()
    for leaf, reference in zip(leaves, exact, strict=True):
        assert leaf.grad is not None and leaf.grad.dtype == dtype
        torch.testing.assert_close(leaf.grad, reference.grad.to(dtype))


def test_gather_preactivations_sends_the_input_gradient_to_the_input_bias() -> None:
    # sae_in = x - bias: the bias gets -Σ_t ∂L/∂sae_in[t] through one matrix-vector product.
    torch.manual_seed(3)
    n_tokens, d_in, d_sae = 12, 7, 20
    x = torch.randn(n_tokens, d_in, dtype=torch.float64)
    bias = torch.randn(d_in, dtype=torch.float64, requires_grad=True)
    W_enc = torch.randn(d_in, d_sae, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(d_sae, dtype=torch.float64, requires_grad=True)
    rows, cols = random_positions(n_tokens, d_sae, 57, skip_tokens=(2,))
    upstream = torch.randn(57, dtype=torch.float64)
    sae_in = x - bias

    ((sae_in @ W_enc + b_enc)[rows, cols] * upstream).sum().backward()
    expected = [t.grad.clone() for t in (bias, W_enc, b_enc)]
    for t in (bias, W_enc, b_enc):
        t.grad = None
    values = (sae_in @ W_enc + b_enc).detach()[rows, cols]
    sparse = gather_preactivations(sae_in, W_enc, b_enc, rows, cols, values, input_bias=bias)
    (sparse * upstream).sum().backward()
    for t, grad in zip((bias, W_enc, b_enc), expected, strict=True):
        torch.testing.assert_close(t.grad, grad)


def reference_weights(device: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    torch.manual_seed(4)
    params = {
        "W_enc": torch.randn(64, 2048, device=device) * 0.1,
        "b_enc": torch.randn(2048, device=device) * 0.1,
        "W_dec": torch.randn(2048, 64, device=device) * 0.1,
        "b_dec": torch.randn(64, device=device) * 0.1,
    }
    return {name: p.requires_grad_() for name, p in params.items()}, torch.randn(
        512, 64, device=device
    ) * 2


def step_loss(
    reconstruction: torch.Tensor, aux: torch.Tensor, x: torch.Tensor, b_dec: torch.Tensor
) -> torch.Tensor:
    return ((reconstruction + b_dec - x) ** 2).sum(-1).mean() + (aux**2).sum(-1).mean() / 32


def use_column_block(monkeypatch: pytest.MonkeyPatch, use: bool) -> None:
    """Send the aux entries through the column block (on any device), or never."""

    def column_block_for(latent_idx: torch.Tensor, *args: object) -> object:
        return torch.unique(latent_idx, sorted=True, return_inverse=True) if use else None

    monkeypatch.setattr(sparse_step, "column_block_for", column_block_for)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("block", [False, True], ids=["sparse-aux", "column-block-aux"])
def test_sparse_forward_under_autocast_matches_float32_reference(
    device: str, dtype: torch.dtype, block: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reduced-precision encoder matmul selects on rounded values; the float32 reference is
    # given the same selections (batch top-k and an AuxK-style per-token top-k), so the
    # losses and gradients differ by the rounding of the matmul alone (and, through the
    # column block, by its matmuls' rounding, as autocast's own).
    use_column_block(monkeypatch, block)
    params, x = reference_weights(device)
    weights = SparseStepWeights.of(
        params["W_enc"],
        params["b_enc"],
        params["W_dec"],
        rescale_acts_by_decoder_norm=True,
        input_bias=params["b_dec"],
    )
    dead = torch.arange(0, 2048, 3, device=device)
    with torch.autocast(device, dtype=dtype):
        forward = sparse_forward(x - params["b_dec"], weights, partial(batch_topk_indices, k=8))
        aux_tokens, aux_latents = per_token_topk_indices(forward.hidden_pre, dead, 16)
        aux = forward.reconstruct_selected(aux_tokens, aux_latents)
        loss = step_loss(forward.reconstruction, aux, x, params["b_dec"])
    assert forward.hidden_pre.dtype == dtype
    assert forward.reconstruction.dtype == aux.dtype == loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, list(params.values()))

    codes = forward.codes
    kept = torch.zeros(512, 2048, dtype=torch.bool, device=device)
    kept[codes.token_idx, codes.latent_idx] = True
    reference = dense_forward(x - params["b_dec"], weights, lambda h: torch.where(kept, h, 0))
    reference_aux = reference.reconstruct_selected(aux_tokens, aux_latents)
    reference_loss = step_loss(reference.reconstruction, reference_aux, x, params["b_dec"])
    reference_grads = torch.autograd.grad(reference_loss, list(params.values()))

    # Relative rounding of the matmul: 2^-8 in bfloat16, 2^-11 in float16.
    tolerance = {"rtol": 1e-2 if dtype == torch.bfloat16 else 2e-3, "atol": 1e-3}
    torch.testing.assert_close(loss, reference_loss, **tolerance)
    torch.testing.assert_close(codes.values, reference.feature_acts[kept], **tolerance)
    bound = 4e-3 if dtype == torch.bfloat16 else 5e-4
    for grad, expected in zip(grads, reference_grads, strict=True):
        assert (grad - expected).norm() <= bound * expected.norm()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "no-rescale"])
@pytest.mark.parametrize("input_bias", [True, False], ids=["input-bias", "input-grad"])
def test_column_block_decode_matches_the_sparse_kernels(
    device: str, rescale: bool, input_bias: bool
) -> None:
    # AuxK-dense entries (16 per token in 683 dead columns) decoded both ways: same values,
    # same gradients to every weight and to the input (or the bias subtracted from it).
    dtype = torch.float64 if device == "cpu" else torch.float32
    params, x = reference_weights(device)
    params = {name: p.detach().to(dtype).requires_grad_() for name, p in params.items()}
    x = x.to(dtype).requires_grad_()
    bias = params["b_dec"] if input_bias else None
    weights = SparseStepWeights.of(
        params["W_enc"],
        params["b_enc"],
        params["W_dec"],
        rescale_acts_by_decoder_norm=rescale,
        input_bias=bias,
    )
    sae_in = x - bias if bias is not None else x
    forward = sparse_forward(sae_in, weights, partial(batch_topk_indices, k=8))
    dead = torch.arange(0, 2048, 3, device=device)
    tokens, latents = per_token_topk_indices(forward.hidden_pre, dead, 16)
    codes = selected_codes(forward.sae_in, weights, forward.hidden_pre, tokens, latents)
    sparse = decode_without_bias(replace(codes, values=codes.values.relu()), weights)
    columns, positions = torch.unique(latents, sorted=True, return_inverse=True)
    pre = forward.hidden_pre.reshape(-1)[tokens * 2048 + latents].to(dtype)
    if weights.decoder_scale is not None:
        pre = pre / weights.decoder_scale.detach()[latents]
    block = decode_column_block(forward.sae_in, weights, pre, tokens, columns, positions, dtype)

    upstream = torch.randn_like(sparse)
    inputs = [params["W_enc"], params["b_enc"], params["W_dec"], bias if input_bias else x]
    expected = torch.autograd.grad((sparse * upstream).sum(), inputs)
    grads = torch.autograd.grad((block * upstream).sum(), inputs)
    tolerance = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {}
    torch.testing.assert_close(block, sparse, **tolerance)
    for grad, reference in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, reference, **tolerance)


def test_the_column_block_is_chosen_on_cuda_for_auxk_density_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(column_block, "cpu_flags", lambda: frozenset({"avx512f"}))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # AuxK at Gemma 2 2B width: k_aux 1152 of 16384 dead columns; the main codes: 32 of 65536.
    auxk, main = (4096 * 1152, 4096, 16384), (4096 * 32, 4096, 65536)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert prefers_column_block(cuda, dtype, *auxk)
        assert not prefers_column_block(cuda, dtype, *main)
        assert not prefers_column_block(cpu, dtype, *auxk)
    # Between the two break-evens: a block for a bfloat16 matmul, gathers in float32.
    between = (4096 * 16, 4096, 2048)
    assert prefers_column_block(cuda, torch.bfloat16, *between)
    assert not prefers_column_block(cuda, torch.float32, *between)
    assert not prefers_column_block(cuda, torch.bfloat16, 0, 4096, 16384)
    # A million-latent SAE with a quarter dead: dense enough, but too large a block to hold.
    assert not prefers_column_block(cuda, torch.bfloat16, 4096 * 1152, 4096, 2**18)
    assert prefers_column_block(cuda, torch.bfloat16, 4096 * 1152, 4096, 2**16)


def test_a_cpu_with_amx_decodes_auxk_as_a_block_in_its_dtype_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(column_block, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    # AuxK at the bench shape: 288 of 4096 dead columns per token (1/14); the main codes: 1/512.
    auxk, main = (4096 * 288, 4096, 4096), (4096 * 32, 4096, 16384)
    assert prefers_column_block(cpu, torch.bfloat16, *auxk)
    assert not prefers_column_block(cpu, torch.bfloat16, *main)
    # Below the CPU's break-even (1/24 measured) though above CUDA's: the gathers.
    assert not prefers_column_block(cpu, torch.bfloat16, 4096 * 128, 4096, 4096)
    assert not prefers_column_block(cpu, torch.float16, *auxk)  # AMX-BF16 has no float16
    assert not prefers_column_block(cpu, torch.float32, *auxk)
    assert not prefers_column_block(cpu, torch.bfloat16, 4096 * 1152, 4096, 2**18)
    # The dispatch reads the entries' columns only where a block can be chosen.
    dead = torch.arange(0, 4096, 2)
    latents = dead[torch.randint(0, dead.numel(), (64, 256))].sort(1).values.flatten()
    columns, positions = column_block.column_block_for(latents, torch.bfloat16, 64)
    assert torch.equal(columns[positions], latents)
    assert column_block.column_block_for(latents, torch.float32, 64) is None
    monkeypatch.setattr(column_block, "cpu_flags", lambda: frozenset({"avx512f"}))
    assert column_block.column_block_for(latents, torch.bfloat16, 64) is None


def test_cpu_flags_are_read_from_the_cpu() -> None:
    flags = column_block.cpu_flags()
    assert isinstance(flags, frozenset)
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        assert "sse2" in flags  # every x86-64 CPU has it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auxk_on_cuda_decodes_through_the_column_block(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def spy(*args: Any) -> torch.Tensor:
        calls.append(args)
        return decode_column_block(*args)

    monkeypatch.setattr(sparse_step, "decode_column_block", spy)
    sae = perturbed_sae(
        CalibratedBatchTopKTrainingSAE, CalibratedBatchTopKTrainingSAEConfig, k=8, dtype="float32"
    ).to("cuda")
    x = torch.randn(2048, 24, device="cuda") * 2
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "training on the dense path")
        fast = training_step(sae, x, fast=True)
    assert len(calls) == 1 and fast["sparse"]  # AuxK's 12 of ~170 dead per token: dense enough
    assert_same_step(fast, training_step(sae, x, fast=False), rtol=1e-4, atol=1e-5)


def perturbed_sae(sae_class: type, config_class: type, **options: Any) -> Any:
    torch.manual_seed(0)
    options.setdefault("dead_tokens_window", 1024)
    cfg = config_class(d_in=24, d_sae=512, dtype=options.pop("dtype", "float64"), **options)
    sae = sae_class(cfg)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    sae.tokens_since_fired[::3] = cfg.dead_tokens_window + 1  # a third of the latents are dead
    sae.firing_rate.uniform_(0, 0.05)
    sae._b_dec_init_checked = True
    return sae


def step_input_for(sae: Any, x: torch.Tensor) -> TrainStepInput:
    return step_input(sae, x, coefficient=0.5)


def training_step(
    sae: Any, x: torch.Tensor, *, fast: bool, autocast: torch.dtype | None = None
) -> dict[str, Any]:
    sae = copy.deepcopy(sae)
    sae.cfg.fast_path = fast
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        output = sae.training_forward_pass(step_input_for(sae, x))
    output.loss.backward()
    acts = output.feature_acts
    return {
        "sparse": acts.is_sparse,
        "losses": {name: value.detach() for name, value in output.losses.items()},
        "sae_out": output.sae_out.detach(),
        "acts": acts.to_dense() if acts.is_sparse else acts.detach(),
        "grads": {name: p.grad for name, p in sae.named_parameters()},
        "state": {
            name: getattr(sae, name).clone()
            for name in ("running_theta", "tokens_since_fired", "firing_rate", "tokens_seen")
        },
    }


def assert_same_step(
    fast: dict[str, Any],
    dense: dict[str, Any],
    grad_tolerance: dict[str, float] | None = None,
    **tolerance: float,
) -> None:
    assert fast["sparse"] and not dense["sparse"]
    assert fast["losses"].keys() == dense["losses"].keys()
    for name in dense["losses"]:
        torch.testing.assert_close(fast["losses"][name], dense["losses"][name], **tolerance)
    torch.testing.assert_close(fast["sae_out"], dense["sae_out"], **tolerance)
    torch.testing.assert_close(fast["acts"], dense["acts"], **tolerance)
    for name, grad in dense["grads"].items():
        torch.testing.assert_close(
            fast["grads"][name].to(grad.dtype), grad, **(grad_tolerance or tolerance)
        )
    for name, value in dense["state"].items():
        torch.testing.assert_close(fast["state"][name], value, **tolerance)


CASES = [
    pytest.param(
        CalibratedBatchTopKTrainingSAE, CalibratedBatchTopKTrainingSAEConfig, {}, id="auxk"
    ),
    pytest.param(
        CalibratedBatchTopKTrainingSAE,
        CalibratedBatchTopKTrainingSAEConfig,
        {"aux_losses": {"auxk": 1.0, "zipf": 1.0}, "k": 6.5},
        id="auxk+zipf,float-k",
    ),
    pytest.param(
        CalibratedBatchTopKTrainingSAE,
        CalibratedBatchTopKTrainingSAEConfig,
        {"rescale_acts_by_decoder_norm": False, "apply_b_dec_to_input": False},
        id="no-rescale,no-b_dec-input",
    ),
    pytest.param(
        CalibratedBatchTopKTrainingSAE,
        CalibratedBatchTopKTrainingSAEConfig,
        {"aux_losses": {}},
        id="no-aux",
    ),
    pytest.param(FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig, {}, id="feature-choice"),
    pytest.param(
        FeatureChoiceTrainingSAE,
        FeatureChoiceTrainingSAEConfig,
        {"capacity": "zipf", "k": 2},
        id="fc-zipf",
    ),
]


@pytest.mark.parametrize(("sae_class", "config_class", "options"), CASES)
def test_sparse_step_matches_dense_float64(
    sae_class: type, config_class: type, options: dict[str, Any]
) -> None:
    sae = perturbed_sae(sae_class, config_class, **{"k": 8, **options})
    x = torch.randn(256, 24, dtype=torch.float64) * 2
    assert_same_step(training_step(sae, x, fast=True), training_step(sae, x, fast=False))


def test_sparse_step_matches_dense_float32() -> None:
    sae = perturbed_sae(
        CalibratedBatchTopKTrainingSAE, CalibratedBatchTopKTrainingSAEConfig, k=8, dtype="float32"
    )
    x = torch.randn(256, 24) * 2
    fast, dense = training_step(sae, x, fast=True), training_step(sae, x, fast=False)
    assert_same_step(fast, dense, rtol=1e-4, atol=1e-5)


def exact_grid_sae(device: str) -> Any:
    """An SAE whose pre-activations are exact in bfloat16 and float16, ties and all.

    Inputs, biases and encoder weights are multiples of 1/4 and 1/16 small enough that every
    pre-activation is a multiple of 1/16 below 8 (8 significant bits suffice), and each
    decoder row has four entries of ±1/2 (norm exactly 1, so the rescaled pre-activations are
    the same numbers). A reduced-precision step then selects exactly what the float32 step
    selects, on a grid full of ties, and the two must agree to float32 rounding.
    """
    generator = torch.Generator().manual_seed(5)
    d_in, d_sae = 16, 512
    cfg = CalibratedBatchTopKTrainingSAEConfig(
        d_in=d_in, d_sae=d_sae, k=6, dead_tokens_window=1024, dtype="float32"
    )
    sae = CalibratedBatchTopKTrainingSAE(cfg)
    decoder = torch.zeros(d_sae, d_in)
    columns = torch.rand(d_sae, d_in, generator=generator).argsort(1)[:, :4]
    signs = torch.randint(0, 2, (d_sae, 4), generator=generator) * 2 - 1
    decoder.scatter_(1, columns, signs * 0.5)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randint(-1, 2, (d_in, d_sae), generator=generator) / 4)
        sae.b_enc.copy_(torch.randint(-4, 5, (d_sae,), generator=generator) / 16)
        sae.W_dec.copy_(decoder)
        sae.b_dec.copy_(torch.randint(-1, 2, (d_in,), generator=generator) / 4)
    sae.tokens_since_fired[::3] = cfg.dead_tokens_window + 1
    sae._b_dec_init_checked = True
    return sae.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["autocast-bfloat16", "autocast-float16", "bfloat16-weights"])
def test_reduced_precision_step_matches_float32_on_an_exact_grid(
    device: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sparse kernels' promise: reduced precision rounds the inputs, never the sums. (On
    # CUDA AuxK's entries would go through the column block, whose matmuls round gradients
    # to the matmul dtype as autocast does: checked within bfloat16 tolerance elsewhere.)
    monkeypatch.setattr(sparse_step, "column_block_for", lambda *args: None)
    sae = exact_grid_sae(device)
    generator = torch.Generator().manual_seed(6)
    x = (torch.randint(-5, 6, (256, 16), generator=generator) / 4).to(device)
    dense = training_step(sae, x, fast=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "training on the dense path")
        if mode == "bfloat16-weights":
            fast = training_step(sae.to(torch.bfloat16), x.bfloat16(), fast=True)
        else:
            dtype = torch.bfloat16 if mode == "autocast-bfloat16" else torch.float16
            fast = training_step(sae, x, fast=True, autocast=dtype)
    assert dense["acts"].count_nonzero() == 6 * 256  # the exact budget, despite the ties
    assert dense["losses"]["auxk_loss"] > 0
    # bfloat16 weights get bfloat16 gradients: one rounding of a float32 sum.
    grad_tolerance = {"rtol": 1e-2, "atol": 1e-3} if mode == "bfloat16-weights" else None
    assert_same_step(fast, dense, grad_tolerance, rtol=1e-5, atol=1e-5)


def test_sparse_step_matches_dense_when_nothing_fires() -> None:
    sae = perturbed_sae(CalibratedBatchTopKTrainingSAE, CalibratedBatchTopKTrainingSAEConfig, k=8)
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)  # no positive pre-activation anywhere
    for x in (torch.zeros(64, 24, dtype=torch.float64), torch.randn(64, 24, dtype=torch.float64)):
        fast, dense = training_step(sae, x, fast=True), training_step(sae, x, fast=False)
        assert fast["acts"].count_nonzero() == 0
        assert_same_step(fast, dense)


def saved_tensor_shapes(sae: Any, x: torch.Tensor) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        sae.training_forward_pass(step_input_for(sae, x)).loss.backward()
    return shapes


@pytest.mark.parametrize("autocast", [False, True])
def test_sparse_path_keeps_no_tokens_by_latents_tensor_for_backward(
    autocast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sparse kernels' promise, so as on a CPU without AMX (with it, under autocast, AuxK's
    # entries may go through the column block, which keeps its tokens x columns block).
    monkeypatch.setattr(column_block, "cpu_flags", lambda: frozenset())
    sae = perturbed_sae(
        CalibratedBatchTopKTrainingSAE, CalibratedBatchTopKTrainingSAEConfig, k=8, dtype="float32"
    )
    x = torch.randn(256, 24)
    big = 256 * sae.cfg.d_sae
    dense_sae = copy.deepcopy(sae)
    dense_sae.cfg.fast_path = False
    assert any(torch.Size(s).numel() >= big for s in saved_tensor_shapes(dense_sae, x))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert all(torch.Size(s).numel() < big / 4 for s in saved_tensor_shapes(sae, x))


def test_dense_fallbacks_are_explained() -> None:
    sae = perturbed_sae(CalibratedBatchTopKTrainingSAE, CalibratedBatchTopKTrainingSAEConfig, k=8)
    x = torch.randn(16, 24, dtype=torch.float64)
    assert sae.sparse_path_blocker(x) is None
    assert sae.sparse_path_blocker(x[None]) is not None  # 3-D batch

    hooked = copy.deepcopy(sae)
    hooked.hook_sae_acts_post.add_hook(lambda acts, hook: acts)
    assert "hook" in str(hooked.sparse_path_blocker(x))
    with pytest.warns(UserWarning, match="dense path: a hook"):
        training_step(hooked, x, fast=True)

    register_aux_loss("test_dense_only", auxk_loss, overwrite=True)
    custom = perturbed_sae(
        CalibratedBatchTopKTrainingSAE,
        CalibratedBatchTopKTrainingSAEConfig,
        k=8,
        aux_losses={"test_dense_only": 1.0},
    )
    assert "sparse_ready" in str(custom.sparse_path_blocker(x))

    # Reduced precision is no reason for the dense path.
    bf16 = perturbed_sae(
        CalibratedBatchTopKTrainingSAE, CalibratedBatchTopKTrainingSAEConfig, k=8, dtype="bfloat16"
    )
    assert bf16.sparse_path_blocker(x.bfloat16()) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sae.sparse_path_blocker(x) is None

    off = copy.deepcopy(sae)
    off.cfg.fast_path = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off on purpose: no warning
        assert not training_step(off, x, fast=False)["sparse"]


def test_fast_path_config_is_validated() -> None:
    with pytest.raises(TypeError, match="fast_path"):
        CalibratedBatchTopKTrainingSAEConfig(d_in=8, d_sae=32, k=2, fast_path="yes")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_step_matches_dense_on_cuda() -> None:
    sae = perturbed_sae(
        CalibratedBatchTopKTrainingSAE, CalibratedBatchTopKTrainingSAEConfig, k=8, dtype="float32"
    ).to("cuda")
    x = torch.randn(2048, 24, device="cuda") * 2
    fast, dense = training_step(sae, x, fast=True), training_step(sae, x, fast=False)
    assert_same_step(fast, dense, rtol=1e-4, atol=1e-5)
