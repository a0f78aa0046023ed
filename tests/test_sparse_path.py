"""The fast sparse training path against the plain dense reference.

Selection: the fast exact batch top-k (and Feature Choice's index form) against the plain
``batch_topk`` / ``feature_choice``, including an input built to defeat the sampled threshold.
Kernels: ``gather_preactivations`` and ``decode_codes`` against dense autograd, with empty
tokens and empty selections. SAE: a whole training step on both paths gives the same losses,
gradients and training state, and the sparse one keeps no ``tokens x d_sae`` tensor for backward.
"""

from __future__ import annotations

import copy
import warnings
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
    register_aux_loss,
)
from sae_lens_batchtopk.aux_losses import auxk_loss
from sae_lens_batchtopk.selection import (
    batch_topk,
    batch_topk_indices,
    feature_choice,
    feature_choice_indices,
    threshold_sample_stride,
)
from sae_lens_batchtopk.sparse_codes import SparseCodes, decode_codes, gather_preactivations


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


def test_batch_topk_indices_keep_tied_values() -> None:
    hidden_pre = torch.randint(-3, 4, (400, 512)).float()
    indices = batch_topk_indices(hidden_pre, 20)
    kept = hidden_pre.flatten()[indices].sort().values
    reference = batch_topk(hidden_pre, 20).flatten()
    assert torch.equal(kept, reference[reference > 0].sort().values)


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


def training_step(sae: Any, x: torch.Tensor, *, fast: bool) -> dict[str, Any]:
    sae = copy.deepcopy(sae)
    sae.cfg.fast_path = fast
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


def assert_same_step(fast: dict[str, Any], dense: dict[str, Any], **tolerance: float) -> None:
    assert fast["sparse"] and not dense["sparse"]
    assert fast["losses"].keys() == dense["losses"].keys()
    for name in dense["losses"]:
        torch.testing.assert_close(fast["losses"][name], dense["losses"][name], **tolerance)
    torch.testing.assert_close(fast["sae_out"], dense["sae_out"], **tolerance)
    torch.testing.assert_close(fast["acts"], dense["acts"], **tolerance)
    for name, grad in dense["grads"].items():
        torch.testing.assert_close(fast["grads"][name], grad, **tolerance)
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


def test_sparse_path_keeps_no_tokens_by_latents_tensor_for_backward() -> None:
    sae = perturbed_sae(CalibratedBatchTopKTrainingSAE, CalibratedBatchTopKTrainingSAEConfig, k=8)
    x = torch.randn(256, 24, dtype=torch.float64)
    big = 256 * sae.cfg.d_sae
    dense_sae = copy.deepcopy(sae)
    dense_sae.cfg.fast_path = False
    assert any(torch.Size(s).numel() >= big for s in saved_tensor_shapes(dense_sae, x))
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

    bf16 = perturbed_sae(
        CalibratedBatchTopKTrainingSAE, CalibratedBatchTopKTrainingSAEConfig, k=8, dtype="bfloat16"
    )
    assert "float32" in str(bf16.sparse_path_blocker(x.bfloat16()))

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
