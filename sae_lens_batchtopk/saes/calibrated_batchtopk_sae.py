"""The ``calibrated_batchtopk`` architecture: BatchTopK training, threshold inference.

Training (:class:`CalibratedBatchTopKTrainingSAE`) keeps the top ``int(k * n_tokens)``
activations of each batch (Bussmann et al. 2024). At inference a token's code must not depend
on the rest of its batch, so :class:`CalibratedBatchTopKSAE` applies a JumpReLU threshold per
latent instead; :func:`sae_lens_batchtopk.calibrate_thresholds` chooses those thresholds with
the final weights so that the inference L0 is the ``k`` that was asked for. Until an SAE is
calibrated, export uses the running θ estimate kept during training.

Threshold units: the training SAE selects on pre-activations multiplied by the decoder row
norms (``rescale_acts_by_decoder_norm``, as SAELens's TopK does). The inference form has those
norms folded into the encoder, so its plain pre-activations are the same numbers and the
thresholds carry over unchanged.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any, Literal

import torch
from sae_lens.config import dict_field
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import (
    SAE,
    SAEConfig,
    SAEMetadata,
    TrainCoefficientConfig,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from sae_lens.saes.topk_sae import TopKTrainingSAE, act_times_W_dec
from sae_lens.util import str_to_dtype
from torch import nn
from typing_extensions import override

from sae_lens_batchtopk.aux_losses import AuxLossInputs, get_aux_loss, is_sparse_ready
from sae_lens_batchtopk.selection import (
    batch_topk,
    batch_topk_indices,
    min_positive,
    threshold_activation,
    zipf_weights,
)
from sae_lens_batchtopk.sparse_codes import SparseCodes, decode_codes, gather_preactivations

ARCHITECTURE = "calibrated_batchtopk"

EncodeMode = Literal["threshold", "batch_topk"]


def _check_k(k: object, d_sae: int) -> None:
    """Reject a k that cannot be an average L0 for this dictionary, naming the field."""
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"k must be a number (average latents per token), got {k!r}")
    if not math.isfinite(k) or k <= 0:
        raise ValueError(f"k must be > 0, got k={k}")
    if k > d_sae:
        raise ValueError(f"k must be <= d_sae ({d_sae}), got k={k}; lower k or raise d_sae")


def _check_dtype(dtype: object) -> None:
    """Fail at construction, not deep inside the first forward pass, on an unknown dtype."""
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a string such as 'float32', got {dtype!r}")
    try:
        resolved = str_to_dtype(dtype)
    except (ValueError, KeyError, AttributeError):
        resolved = None
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(
            f"dtype must name a floating-point torch dtype ('float32', 'bfloat16', ...),"
            f" got dtype={dtype!r}"
        )


class _CalibratedBatchTopKConfigRules:
    """What the training and inference configs share: the architecture name and k/dtype rules.

    Placed before the SAELens base in each config's bases, so its ``__post_init__`` runs
    SAELens's checks first, then these, at construction time (before any work starts).
    """

    k: float
    d_sae: int
    dtype: str

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        _check_k(self.k, self.d_sae)
        _check_dtype(self.dtype)


@dataclass
class CalibratedBatchTopKSAEConfig(_CalibratedBatchTopKConfigRules, SAEConfig):
    """Inference config for a BatchTopK SAE that encodes with per-latent thresholds.

    Args:
        k: the average number of latents per token the SAE was trained (and calibrated) for.
            Threshold mode does not read it; batch-top-k mode keeps ``int(k * n_tokens)``.
    """

    k: float = 32.0


class CalibratedBatchTopKSAE(SAE[CalibratedBatchTopKSAEConfig]):
    """Inference BatchTopK SAE: ``relu(z) * (z > threshold)`` with one threshold per latent.

    The threshold vector has length ``d_sae``: a single calibrated θ broadcast to every latent,
    or per-latent values. ``encode_mode = "batch_topk"`` (or the :meth:`batch_topk_mode`
    context) switches to the exact training-time selection for comparisons; that mode makes
    each token's code depend on its batch. :meth:`to_jumprelu` gives a plain SAELens
    ``JumpReLUSAE`` with identical outputs for consumers that do not have this plugin.
    """

    b_enc: nn.Parameter
    threshold: torch.Tensor

    def __init__(self, cfg: CalibratedBatchTopKSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.encode_mode: EncodeMode = "threshold"

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))
        self.register_buffer(
            "threshold", torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device)
        )

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        if self.encode_mode == "batch_topk":
            acts = batch_topk(hidden_pre, self.cfg.k)
        else:
            acts = threshold_activation(hidden_pre, self.threshold)
        return self.hook_sae_acts_post(acts)

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        sae_out_pre = feature_acts @ self.W_dec + self.b_dec
        sae_out_pre = self.hook_sae_recons(sae_out_pre)
        sae_out_pre = self.run_time_activation_norm_fn_out(sae_out_pre)
        return self.reshape_fn_out(sae_out_pre, self.d_head)

    @contextmanager
    def batch_topk_mode(self) -> Iterator[None]:
        """Temporarily encode with exact batch top-k (the training rule) instead of thresholds."""
        previous = self.encode_mode
        self.encode_mode = "batch_topk"
        try:
            yield
        finally:
            self.encode_mode = previous

    @torch.no_grad()
    def set_thresholds(self, threshold: torch.Tensor | float) -> None:
        """Set the inference thresholds (a scalar is broadcast to every latent)."""
        self.threshold.copy_(_as_threshold_vector(threshold, self.cfg.d_sae))

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        # Scaling a latent's encoder column by its decoder norm scales its pre-activation by
        # the same factor, so the threshold must follow or the firing pattern changes.
        norms = self.fold_and_get_W_dec_norm()
        self.threshold.mul_(norms)

    @torch.no_grad()
    def to_jumprelu(self) -> JumpReLUSAE:
        """A plain SAELens ``JumpReLUSAE`` with the same weights, thresholds and outputs.

        Saved with ``save_model``, it loads in any SAELens 6 install, plugin or not.
        """
        base_fields = {f.name for f in fields(JumpReLUSAEConfig)}
        cfg_dict = {name: getattr(self.cfg, name) for name in base_fields if name != "metadata"}
        metadata = self.cfg.metadata.to_dict()
        metadata["exported_from_architecture"] = ARCHITECTURE
        metadata["k"] = self.cfg.k
        cfg = JumpReLUSAEConfig(**cfg_dict)
        cfg.metadata = SAEMetadata(**metadata)
        jumprelu = JumpReLUSAE(cfg)
        jumprelu.load_state_dict(
            {
                "W_enc": self.W_enc.detach().clone(),
                "W_dec": self.W_dec.detach().clone(),
                "b_enc": self.b_enc.detach().clone(),
                "b_dec": self.b_dec.detach().clone(),
                "threshold": self.threshold.detach().clone(),
            }
        )
        return jumprelu

    @classmethod
    @torch.no_grad()
    def from_sae(cls, sae: SAE[Any], *, k: float | None = None) -> CalibratedBatchTopKSAE:
        """Convert a BatchTopK SAE trained elsewhere into this inference form, to calibrate it.

        Accepts SAELens's built-in ``batchtopk`` training SAE (its export folds decoder norms and
        broadcasts its EMA threshold), a ``JumpReLUSAE`` exported from a BatchTopK run, or a
        ``calibrated_batchtopk`` SAE of either form. ``k`` defaults to the one the SAE records.
        """
        if isinstance(sae, (BatchTopKTrainingSAE, CalibratedBatchTopKTrainingSAE)):
            state = sae.state_dict()
            sae.process_state_dict_for_saving_inference(state)
            cfg_dict = sae.cfg.get_inference_sae_cfg_dict()
        elif isinstance(sae, (JumpReLUSAE, CalibratedBatchTopKSAE)):
            state = sae.state_dict()
            cfg_dict = sae.cfg.to_dict()
        else:
            raise TypeError(
                f"cannot convert an SAE of architecture {sae.cfg.architecture()!r}; expected"
                " batchtopk, jumprelu (exported from batchtopk) or calibrated_batchtopk"
            )
        k = k if k is not None else recorded_k(sae)
        if k is None:
            raise ValueError("this SAE does not record the k it was trained with; pass k=...")
        base = {f.name for f in fields(SAEConfig)} - {"metadata"}
        cfg = CalibratedBatchTopKSAEConfig(**{name: cfg_dict[name] for name in base}, k=k)
        cfg.metadata = SAEMetadata(**cfg_dict["metadata"])
        converted = cls(cfg)
        names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
        converted.load_state_dict({name: state[name].detach().clone() for name in names})
        return converted


def recorded_k(sae: SAE[Any]) -> float | None:
    """The training k an SAE records: in its config, its metadata, or its training details."""
    metadata = sae.cfg.metadata
    details = metadata.get("training_architecture_details") or {}
    for value in (getattr(sae.cfg, "k", None), metadata.get("k"), details.get("k")):
        if value is not None:
            return float(value)
    return None


def _as_threshold_vector(threshold: torch.Tensor | float, d_sae: int) -> torch.Tensor:
    """Broadcast and validate thresholds; NaN or infinite values would break every export."""
    vector = torch.as_tensor(threshold, dtype=torch.float64).flatten()
    if vector.numel() == 1:
        vector = vector.expand(d_sae)
    if vector.numel() != d_sae:
        raise ValueError(f"threshold must be a scalar or have d_sae={d_sae} entries")
    if not torch.isfinite(vector).all():
        raise ValueError("threshold must be finite for every latent (found NaN or inf)")
    return vector


@dataclass
class CalibratedBatchTopKTrainingSAEConfig(_CalibratedBatchTopKConfigRules, TrainingSAEConfig):
    """Training config for ``calibrated_batchtopk``.

    Args:
        k: average latents per token; batch top-k keeps ``int(k * n_tokens)`` per batch.
            A float is allowed.
        b_dec_init: ``"mean"`` sets the decoder bias to the mean of the first training batch
            (as the SAE sees it, after activation scaling) before the first step; ``"zeros"``
            keeps SAELens's zero init. Residual streams have a large mean: from a zero bias,
            Adam needs thousands of steps to learn it, and meanwhile the few latents aligned
            with the mean win every selection while the rest die.
        rescale_acts_by_decoder_norm: select on pre-activations times the decoder row norms,
            as SAELens's TopK does, so decoder-norm drift cannot change the selection; folded
            into the weights at export.
        aux_losses: auxiliary losses by registered name and coefficient. The default is Gao et
            al.'s AuxK with their coefficient 1/32. ``{}`` trains without any.
        aux_loss_warm_up_steps: linear warm-up of every aux coefficient (SAELens's scheduler).
        aux_k: dead latents per token AuxK may use; ``None`` means ``d_in // 2``.
        dead_tokens_window: a latent is dead after not firing for this many training tokens
            (Gao et al.: 10M). Counted in tokens, kept in the SAE state, so checkpoints resume it.
        zipf_exponent: exponent ``s`` of the Zipf law ``r^-s`` that defines under-used latents
            (and Feature Choice's Zipf capacities).
        underused_margin: a latent is under-used when it fires less than this fraction of the
            Zipf target for its frequency rank (see ``aux_losses.zipf_loss``).
        theta_ema_rate: rate of the running θ estimate (EMA of each batch's minimum selected
            activation, started at the first batch's value rather than at 0).
        calibration_method: how the runner calibrates thresholds after training: ``"l0"``,
            ``"per_latent"``, ``"paper"``, or ``"none"`` to export the running θ.
        calibration_target_l0: the inference L0 to calibrate to; ``None`` means ``k``.
        calibration_tokens: tokens the runner draws (after training, unseen by it) to calibrate.
        fast_path: train on the sparse path (:mod:`sae_lens_batchtopk.sparse_codes`): exact
            fast selection, sparse decode and sparse encoder backward, no ``tokens x d_sae``
            tensor kept for the backward pass. Same losses and gradients as the dense path to
            float rounding. Used whenever it applies (float32/float64 without autocast, 2-D
            batches, ``reshape_activations="none"``, no hooks on the activation hook points,
            sparse-ready aux losses); otherwise the dense path runs, with a warning once.
            ``False`` always trains densely.
    """

    k: float = 32.0
    b_dec_init: str = "mean"
    rescale_acts_by_decoder_norm: bool = True
    # dict_field builds a fresh dict per instance and parses JSON on SAELens's CLI.
    aux_losses: dict[str, float] = dict_field(default={"auxk": 1 / 32})  # noqa: RUF009
    aux_loss_warm_up_steps: int = 0
    aux_k: int | None = None
    dead_tokens_window: int = 10_000_000
    zipf_exponent: float = 1.0
    underused_margin: float = 0.5
    theta_ema_rate: float = 0.01
    calibration_method: str = "l0"
    calibration_target_l0: float | None = None
    calibration_tokens: int = 1_000_000
    fast_path: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.fast_path, bool):
            raise TypeError(f"fast_path must be true or false, got {self.fast_path!r}")
        self._check_init_fields()
        self._check_aux_fields()
        self._check_calibration_fields()

    def _check_aux_fields(self) -> None:
        if not isinstance(self.aux_losses, dict):
            raise TypeError(
                f"aux_losses must map loss names to coefficients, e.g. {{'auxk': 0.03125}},"
                f" got {self.aux_losses!r}"
            )
        for name, coefficient in self.aux_losses.items():
            get_aux_loss(name)
            if isinstance(coefficient, bool) or not isinstance(coefficient, numbers.Real):
                raise TypeError(f"aux_losses[{name!r}] must be a number, got {coefficient!r}")
            if not math.isfinite(coefficient) or coefficient < 0:
                raise ValueError(f"aux_losses[{name!r}] must be >= 0, got {coefficient}")
        _check_positive_int("aux_loss_warm_up_steps", self.aux_loss_warm_up_steps, allow_zero=True)
        if self.aux_k is not None:
            _check_positive_int("aux_k", self.aux_k)
        _check_positive_int("dead_tokens_window", self.dead_tokens_window)
        if not (isinstance(self.zipf_exponent, (int, float)) and self.zipf_exponent >= 0):
            raise ValueError(f"zipf_exponent must be >= 0, got {self.zipf_exponent!r}")
        if not (isinstance(self.underused_margin, (int, float)) and self.underused_margin >= 0):
            raise ValueError(f"underused_margin must be >= 0, got {self.underused_margin!r}")
        if not 0 < self.theta_ema_rate <= 1:
            raise ValueError(f"theta_ema_rate must be in (0, 1], got {self.theta_ema_rate}")

    def _check_init_fields(self) -> None:
        if self.b_dec_init not in ("mean", "zeros"):
            raise ValueError(f"b_dec_init must be 'mean' or 'zeros', got {self.b_dec_init!r}")

    def _check_calibration_fields(self) -> None:
        methods = ("l0", "per_latent", "paper", "none")
        if self.calibration_method not in methods:
            raise ValueError(
                f"calibration_method must be one of {methods}, got {self.calibration_method!r}"
            )
        if self.calibration_target_l0 is not None:
            _check_k(self.calibration_target_l0, self.d_sae)
        _check_positive_int("calibration_tokens", self.calibration_tokens)

    @property
    def resolved_aux_k(self) -> int:
        """``aux_k``, or ``d_in // 2`` (Gao et al.'s heuristic, as in sparsify) when unset."""
        return self.aux_k if self.aux_k is not None else max(self.d_in // 2, 1)


def _check_positive_int(name: str, value: object, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


class CalibratedBatchTopKTrainingSAE(TopKTrainingSAE):
    """BatchTopK training SAE with registered aux losses, token-counted dead latents and θ.

    Subclasses SAELens's ``TopKTrainingSAE`` for its decoder, decoder-norm rescaling and the
    norm folding at export; replaces the per-token TopK with batch top-k. State beyond the
    weights lives in persistent buffers so checkpoints save and resume it:

    - ``running_theta``: EMA of the per-batch minimum selected activation (the paper's θ);
    - ``tokens_since_fired``: per latent, training tokens since it last fired (int64);
    - ``firing_rate``: per latent, fraction of training tokens it fired on, a running mean
      over the last ``dead_tokens_window`` tokens (``tokens_seen`` counts up to that window);
    - ``threshold``: calibrated per-latent thresholds, NaN until calibration sets them.

    ``encode`` uses batch top-k (the training rule); the exported inference SAE uses the
    calibrated thresholds, or ``running_theta`` for every latent if never calibrated.

    Training takes the sparse path when ``cfg.fast_path`` allows it (see the config). There the
    step output's ``feature_acts`` and ``hidden_pre`` are sparse COO tensors holding the
    selected entries only; SAELens's trainer reads them as it reads its own sparse TopK codes.
    """

    cfg: CalibratedBatchTopKTrainingSAEConfig  # type: ignore[assignment]
    running_theta: torch.Tensor
    tokens_since_fired: torch.Tensor
    firing_rate: torch.Tensor
    tokens_seen: torch.Tensor
    threshold: torch.Tensor

    def __init__(self, cfg: CalibratedBatchTopKTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)  # type: ignore[arg-type]
        device = self.W_dec.device
        self.register_buffer("running_theta", torch.zeros((), dtype=self.dtype, device=device))
        self.register_buffer(
            "tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long, device=device)
        )
        self.register_buffer(
            "firing_rate", torch.zeros(cfg.d_sae, dtype=torch.float32, device=device)
        )
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long, device=device))
        # tokens_seen > 0 after a resume, so the first-batch init runs once per SAE, not per
        # process; this flag only saves re-checking it (a host sync) on every step.
        self._b_dec_init_checked = False
        self._dense_fallback_warned = False
        self.register_buffer(
            "threshold", torch.full((cfg.d_sae,), torch.nan, dtype=self.dtype, device=device)
        )

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return partial(batch_topk, k=self.cfg.k)

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {
            name: TrainCoefficientConfig(value=value, warm_up_steps=self.cfg.aux_loss_warm_up_steps)
            for name, value in self.cfg.aux_losses.items()
        }

    @property
    def dead_mask(self) -> torch.Tensor:
        """Latents that have not fired for ``dead_tokens_window`` training tokens."""
        return self.tokens_since_fired >= self.cfg.dead_tokens_window

    @property
    def underused_mask(self) -> torch.Tensor:
        """Latents firing below ``underused_margin`` x the Zipf target for their rank."""
        targets_by_rank = (self.cfg.k * zipf_weights(self.cfg.d_sae, self.cfg.zipf_exponent)).clamp(
            max=1.0
        )
        order = torch.argsort(self.firing_rate, descending=True, stable=True)
        target = torch.empty_like(self.firing_rate)
        target[order] = targets_by_rank.to(target)
        return self.firing_rate < self.cfg.underused_margin * target

    @property
    def is_calibrated(self) -> bool:
        return bool(torch.isfinite(self.threshold).all())

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return self._aux_losses(
            step_input,
            feature_acts,
            hidden_pre,
            sae_out,
            partial(self._reconstruct_dense, hidden_pre),
        )

    def _aux_losses(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
        reconstruct_selected: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        if not self.cfg.aux_losses:
            return {}
        inputs = AuxLossInputs(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            hidden_pre=hidden_pre,
            feature_acts=feature_acts,
            dead_mask=self.dead_mask,
            underused_mask=self.underused_mask,
            k_aux=self.cfg.resolved_aux_k,
            decode_directions=self.decode_directions,
            reconstruct_selected=reconstruct_selected,
        )
        return {
            f"{name}_loss": step_input.coefficients[name] * get_aux_loss(name)(inputs)
            for name in self.cfg.aux_losses
        }

    def decode_directions(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Decode without the decoder bias (what aux losses reconstruct the residual with)."""
        recons = act_times_W_dec(feature_acts, self.W_dec, self.cfg.rescale_acts_by_decoder_norm)
        return self.reshape_fn_out(recons, self.d_head)

    def _reconstruct_dense(
        self, hidden_pre: torch.Tensor, token_idx: torch.Tensor, latent_idx: torch.Tensor
    ) -> torch.Tensor:
        """Dense-path ``AuxLossInputs.reconstruct_selected``: scatter, then decode densely."""
        flat = hidden_pre.reshape(-1, hidden_pre.shape[-1])
        selected = flat[token_idx, latent_idx].relu()
        acts = torch.zeros_like(flat).index_put((token_idx, latent_idx), selected)
        return self.decode_directions(acts).reshape(flat.shape[0], -1)

    def select_indices(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """The sparse path's selection: flat indices of the kept entries of a 2-D batch."""
        return batch_topk_indices(hidden_pre, self.cfg.k)

    def sparse_path_blocker(self, sae_in: torch.Tensor) -> str | None:
        """Why this batch must train on the dense path, or ``None`` if the sparse one applies."""
        if not self.cfg.fast_path:
            return "fast_path=False"
        if sae_in.ndim != 2 or self.cfg.reshape_activations != "none":
            return "the sparse path takes 2-D batches with reshape_activations='none'"
        if self.W_enc.dtype not in (torch.float32, torch.float64):
            return f"the sparse path runs in float32/float64, not {self.W_enc.dtype}"
        if torch.is_autocast_enabled(sae_in.device.type):
            return "autocast is on"
        for hook in (self.hook_sae_acts_pre, self.hook_sae_acts_post):
            if hook._forward_hooks or hook._backward_hooks:
                return f"a hook is attached to {hook.name or 'an activation hook point'}"
        dense_only = [name for name in self.cfg.aux_losses if not is_sparse_ready(name)]
        if dense_only:
            return f"aux losses {dense_only} are not registered as sparse_ready"
        return None

    def _sparse_training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """The dense training pass's losses, computed on the selected entries only.

        The encoder forward stays dense (every pre-activation competes in the selection) but
        runs without gradient; :func:`gather_preactivations` re-attaches the gradient at the
        selected entries, so the dense pre-activations are freed before the backward pass.
        """
        sae_in = self.process_sae_in(step_input.sae_in).contiguous()
        scale = self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
        with torch.no_grad():
            if scale is None:
                hidden_pre = torch.addmm(self.b_enc, sae_in, self.W_enc)
            else:
                # Scaling W_enc's columns is cheaper than scaling tokens x d_sae outputs.
                hidden_pre = torch.addmm(self.b_enc * scale, sae_in, self.W_enc * scale)
            flat_idx = self.select_indices(hidden_pre)
        d_sae = self.cfg.d_sae
        codes = self._codes_at(sae_in, hidden_pre, flat_idx // d_sae, flat_idx % d_sae, scale)
        sae_out = self._decode_sparse(codes, scale) + self.b_dec
        sae_out = self.hook_sae_recons(sae_out)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        sae_out = self.reshape_fn_out(sae_out, self.d_head)
        mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
        feature_acts = codes.to_sparse_coo()
        aux_losses = self._aux_losses(
            step_input,
            feature_acts,
            hidden_pre,
            sae_out,
            partial(self._reconstruct_sparse, sae_in, hidden_pre, scale),
        )
        return TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=feature_acts,
            loss=mse_loss + sum(aux_losses.values()),
            losses={"mse_loss": mse_loss, **aux_losses},
        )

    def _codes_at(
        self,
        sae_in: torch.Tensor,
        hidden_pre: torch.Tensor,
        token_idx: torch.Tensor,
        latent_idx: torch.Tensor,
        scale: torch.Tensor | None,
    ) -> SparseCodes:
        """Differentiable (rescaled) pre-activations at the given positions of ``hidden_pre``."""
        selected = hidden_pre[token_idx, latent_idx]
        if scale is None:
            values = gather_preactivations(
                sae_in, self.W_enc, self.b_enc, token_idx, latent_idx, selected
            )
        else:
            latent_scale = scale[latent_idx]
            raw = gather_preactivations(
                sae_in,
                self.W_enc,
                self.b_enc,
                token_idx,
                latent_idx,
                selected / latent_scale.detach(),
            )
            values = raw * latent_scale
        return SparseCodes(token_idx, latent_idx, values, sae_in.shape[0], self.cfg.d_sae)

    def _decode_sparse(self, codes: SparseCodes, scale: torch.Tensor | None) -> torch.Tensor:
        """``act_times_W_dec`` of the codes, without the bias, through the selected rows only."""
        if scale is not None:
            codes = replace(codes, values=codes.values * scale.reciprocal()[codes.latent_idx])
        return decode_codes(codes, self.W_dec)

    def _reconstruct_sparse(
        self,
        sae_in: torch.Tensor,
        hidden_pre: torch.Tensor,
        scale: torch.Tensor | None,
        token_idx: torch.Tensor,
        latent_idx: torch.Tensor,
    ) -> torch.Tensor:
        """Sparse-path ``AuxLossInputs.reconstruct_selected``."""
        codes = self._codes_at(sae_in, hidden_pre, token_idx, latent_idx, scale)
        return self._decode_sparse(replace(codes, values=codes.values.relu()), scale)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if not self._b_dec_init_checked:
            self._init_b_dec(step_input.sae_in)
        blocker = self.sparse_path_blocker(step_input.sae_in)
        if blocker is None:
            output = self._sparse_training_forward_pass(step_input)
        else:
            if self.cfg.fast_path and not self._dense_fallback_warned:
                self._dense_fallback_warned = True
                warnings.warn(f"training on the dense path: {blocker}", stacklevel=2)
            output = super().training_forward_pass(step_input)
        self._update_training_state(output.feature_acts)
        output.metrics["running_theta"] = self.running_theta.detach()
        output.metrics["dead_latent_fraction"] = self.dead_mask.float().mean()
        output.metrics["underused_latent_fraction"] = self.underused_mask.float().mean()
        return output

    @torch.no_grad()
    def _init_b_dec(self, sae_in: torch.Tensor) -> None:
        """Before the first training step ever (not on resume), b_dec <- the batch mean."""
        self._b_dec_init_checked = True
        if self.cfg.b_dec_init == "mean" and int(self.tokens_seen) == 0:
            self.b_dec.copy_(sae_in.reshape(-1, sae_in.shape[-1]).mean(0))

    @torch.no_grad()
    def _update_training_state(self, feature_acts: torch.Tensor) -> None:
        """Advance the dead-latent counters and the θ estimate; no host sync.

        ``feature_acts`` is dense, or sparse COO ``(n_tokens, d_sae)`` from the sparse path.
        """
        n_tokens = feature_acts.shape[:-1].numel()
        if feature_acts.is_sparse:
            values = feature_acts._values()
            latents = feature_acts._indices()[-1][values > 0]
            fired_count = torch.bincount(latents, minlength=self.cfg.d_sae)
        else:
            values = feature_acts.detach().reshape(-1, feature_acts.shape[-1])
            fired_count = (values > 0).sum(0)
        window = self.cfg.dead_tokens_window
        advanced = (self.tokens_since_fired + n_tokens).clamp_(max=window)
        self.tokens_since_fired.copy_(torch.where(fired_count > 0, 0, advanced))
        # Running mean over the first window, then an EMA with the window as its horizon.
        self.tokens_seen.copy_((self.tokens_seen + n_tokens).clamp(max=window))
        weight = n_tokens / self.tokens_seen.float()
        self.firing_rate.lerp_(fired_count.float() / n_tokens, weight)

        batch_theta = min_positive(values).to(self.running_theta.dtype)
        rate = self.cfg.theta_ema_rate
        ema = (1 - rate) * self.running_theta + rate * batch_theta
        updated = torch.where(self.running_theta > 0, ema, batch_theta)
        fired_any = torch.isfinite(batch_theta)
        self.running_theta.copy_(torch.where(fired_any, updated, self.running_theta))

    @torch.no_grad()
    def set_thresholds(self, threshold: torch.Tensor | float) -> None:
        """Set calibrated thresholds (scalar broadcast); ``save_inference_model`` exports them."""
        self.threshold.copy_(_as_threshold_vector(threshold, self.cfg.d_sae))

    @torch.no_grad()
    def inference_thresholds(self) -> torch.Tensor:
        """What the inference form will use: calibrated thresholds, else running θ everywhere."""
        if self.is_calibrated:
            return self.threshold.detach().clone()
        return self.running_theta.detach().expand(self.cfg.d_sae).clone()

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        if self.cfg.rescale_acts_by_decoder_norm:
            # Selection runs on pre-activations times decoder norms; the fold divided W_dec by
            # the scaling factor, so thresholds in those units shrink by the same factor.
            self.running_theta /= scaling_factor
            self.threshold /= scaling_factor

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        # SAELens's disk loaders cast every tensor to the config dtype; restore the counters'
        # integer type and the rate's float32 (a bf16 config must not quantise them).
        for name in ("tokens_since_fired", "tokens_seen"):
            if name in state_dict:
                state_dict[name] = state_dict[name].round().long()
        if "firing_rate" in state_dict:
            state_dict["firing_rate"] = state_dict["firing_rate"].float()

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        for name in ("running_theta", "tokens_since_fired", "firing_rate", "tokens_seen"):
            state_dict.pop(name)
        state_dict.pop("threshold")
        state_dict["threshold"] = self.inference_thresholds().to(self.dtype)
