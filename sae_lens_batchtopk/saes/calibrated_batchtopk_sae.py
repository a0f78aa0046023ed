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

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, ClassVar, Literal

import torch
from sae_lens.config import dict_field
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import (
    SAE,
    SAEConfig,
    SAEMetadata,
    TrainCoefficientConfig,
    TrainStepInput,
    TrainStepOutput,
)
from sae_lens.saes.topk_sae import TopKTrainingSAE, act_times_W_dec
from torch import nn
from typing_extensions import override

from sae_lens_batchtopk.aux_losses import (
    AuxLossInputs,
    batch_variance,
    get_aux_loss,
    is_sparse_ready,
)
from sae_lens_batchtopk.distributed import (
    SELECTION_SCOPES,
    DistributedBatch,
    SelectionScope,
    is_distributed,
)
from sae_lens_batchtopk.finite import NonFiniteError, count_non_finite, require_finite
from sae_lens_batchtopk.selection import (
    batch_topk,
    batch_topk_indices,
    min_positive,
    n_selected,
    threshold_activation,
    zipf_weights,
)
from sae_lens_batchtopk.sparse_step import (
    SparseStepWeights,
    matmul_dtype,
    reconstruct_dense,
    sparse_forward,
)
from sae_lens_batchtopk.validation import (
    check_average_l0,
    check_choice,
    check_finite_number,
    check_float_dtype,
    check_positive_int,
    check_token_budget,
)

ARCHITECTURE = "calibrated_batchtopk"

EncodeMode = Literal["threshold", "batch_topk"]
ENCODE_MODES: tuple[str, ...] = ("threshold", "batch_topk")
BDecInit = Literal["mean", "zeros"]
CalibrationMethodOption = Literal["l0", "per_latent", "paper", "none"]
# Every calibration method; an architecture may support fewer (``calibration_methods``).
METHODS: tuple[str, ...] = ("paper", "l0", "per_latent")

# Gao et al.'s AuxK coefficient, in main-loss units; what aux_loss_coefficient=1.0 means here.
AUXK_DEFAULT_COEFFICIENT = 1 / 32
# Firing rates average over the dead window; with SAELens's step-counted mask, over this many.
FIRING_RATE_HORIZON_TOKENS = 10_000_000
# Activation normalisations under which an aux reconstruction and the residual differ in units.
NORMALIZATIONS_WITHOUT_AUX = frozenset({"constant_norm_rescale", "layer_norm"})
# Training state that stays float32 whatever the SAE's dtype (see CalibratedBatchTopKTrainingSAE).
_EXACT_FLOAT_STATE = ("running_theta", "firing_rate")


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
        check_positive_int("d_sae", self.d_sae)
        check_average_l0("k", self.k, self.d_sae)
        check_float_dtype(self.dtype)


@dataclass
class CalibratedBatchTopKSAEConfig(_CalibratedBatchTopKConfigRules, SAEConfig):
    """Inference config for a BatchTopK SAE that encodes with per-latent thresholds.

    Args:
        k: the average number of latents per token the SAE was trained (and calibrated) for.
            Threshold encoding does not read it; batch-top-k encoding keeps ``int(k * n)``.
            The default is SAELens's ``batchtopk`` default.
    """

    k: float = 100.0


class _Thresholds:
    """The per-latent threshold vector both forms carry, and its one validated setter."""

    threshold: torch.Tensor
    cfg: Any

    @torch.no_grad()
    def set_thresholds(self, threshold: torch.Tensor | float) -> None:
        """Set the inference thresholds; a scalar is broadcast to every latent.

        On a training SAE, ``save_inference_model`` then exports them instead of the running θ.
        """
        self.threshold.copy_(_as_threshold_vector(threshold, self.cfg.d_sae))


class CalibratedBatchTopKSAE(_Thresholds, SAE[CalibratedBatchTopKSAEConfig]):
    """Inference BatchTopK SAE: ``relu(z) * (z > threshold)`` with one threshold per latent.

    The threshold vector has length ``d_sae``: a single calibrated θ broadcast to every latent,
    or per-latent values. ``encode(x, mode="batch_topk")``, or the object
    :meth:`batch_topk_view` returns, applies the exact training-time selection instead (each
    token's code then depends on its batch). The mode is an argument, never state stored on
    the SAE, so concurrent users of one SAE cannot change each other's codes.
    :meth:`to_jumprelu` gives a plain SAELens ``JumpReLUSAE`` with identical outputs for
    consumers that do not have this plugin.
    """

    b_enc: nn.Parameter
    threshold: torch.Tensor

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))
        self.register_buffer(
            "threshold", torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device)
        )

    @override
    def encode(self, x: torch.Tensor, *, mode: EncodeMode = "threshold") -> torch.Tensor:
        """Codes of ``x``: per-latent thresholds (``"threshold"``), or the training rule."""
        check_choice("mode", mode, ENCODE_MODES)
        hidden_pre = self.hook_sae_acts_pre(self.pre_activations(x))
        if mode == "batch_topk":
            acts = batch_topk(hidden_pre, self.cfg.k)
        else:
            acts = threshold_activation(hidden_pre, self.threshold)
        return self.hook_sae_acts_post(acts)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``process_sae_in(x) @ W_enc + b_enc``: what the thresholds are compared with."""
        return self.process_sae_in(x) @ self.W_enc + self.b_enc

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        sae_out_pre = feature_acts @ self.W_dec + self.b_dec
        sae_out_pre = self.hook_sae_recons(sae_out_pre)
        sae_out_pre = self.run_time_activation_norm_fn_out(sae_out_pre)
        return self.reshape_fn_out(sae_out_pre, self.d_head)

    def batch_topk_view(self) -> BatchTopKView:
        """This SAE encoding with exact batch top-k, for code that calls ``encode(x)``."""
        return BatchTopKView(self)

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

        Accepts SAELens's built-in ``batchtopk`` and ``matryoshka_batchtopk`` training SAEs
        (their export folds decoder norms and broadcasts the EMA threshold; Matryoshka's levels
        shape only its training loss), a ``JumpReLUSAE`` exported from either, or a
        ``calibrated_batchtopk`` SAE of either form (training SAEs of ``feature_choice`` and
        ``calibrated_matryoshka_batchtopk`` included). ``k`` defaults to the one the SAE records.
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
                f"an SAE of architecture {sae.cfg.architecture()!r} has no calibrated BatchTopK"
                " form; supported: calibrated_batchtopk, feature_choice and"
                " calibrated_matryoshka_batchtopk (training or inference), SAELens's batchtopk"
                " and matryoshka_batchtopk, and jumprelu exported from those"
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

    @override
    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving(state_dict)
        require_finite(state_dict, "refusing to save the SAE")

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        # NaN thresholds would load silently and their latents never fire (L0 0).
        threshold = state_dict.get("threshold")
        if threshold is not None:
            if threshold.shape != (self.cfg.d_sae,):
                raise ValueError(
                    f"the saved threshold has shape {tuple(threshold.shape)}, expected"
                    f" ({self.cfg.d_sae},) = (d_sae,): the weights do not belong to this config"
                )
            if count_non_finite(threshold):
                raise NonFiniteError(
                    f"the saved threshold has {count_non_finite(threshold)} NaN/inf entries of"
                    f" {self.cfg.d_sae}: the SAE was saved uncalibrated or is corrupted;"
                    " recalibrate it (calibrate_thresholds) from its training form"
                )
        super().process_state_dict_for_loading(state_dict)


class BatchTopKView:
    """A calibrated SAE that encodes with exact batch top-k: the training rule, for comparisons.

    A separate object rather than a mode flag on the SAE: a flag is shared state, so another
    thread (or hook) encoding with the same SAE at the same time would get this mode's codes.
    It shares the SAE's weights and holds nothing else; ``encode``/``decode``, ``cfg``,
    ``device`` and ``dtype`` are what evaluation code reads.
    """

    def __init__(self, sae: CalibratedBatchTopKSAE) -> None:
        self.sae = sae

    @property
    def cfg(self) -> CalibratedBatchTopKSAEConfig:
        return self.sae.cfg

    @property
    def device(self) -> torch.device:
        return self.sae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.sae.dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x, mode="batch_topk")

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(feature_acts)


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
class CalibratedBatchTopKTrainingSAEConfig(
    _CalibratedBatchTopKConfigRules, BatchTopKTrainingSAEConfig
):
    """Training config for ``calibrated_batchtopk``: SAELens's ``batchtopk`` config, plus ours.

    Every field of SAELens's ``BatchTopKTrainingSAEConfig`` is inherited and means what it means
    there (:data:`SAE_LENS_FIELDS` says how each is honoured), so a SAELens config trains
    unchanged with only the architecture renamed. The fields below are this plugin's.

    Args:
        k: average latents per token; batch top-k keeps ``int(k * n_tokens)`` per batch. A
            float is allowed. SAELens's default (100).
        aux_loss_coefficient: SAELens's AuxK weight. Here it scales this plugin's AuxK (see
            ``aux_losses``) relative to its default: 1.0 (SAELens's default) gives Gao et al.'s
            1/32 in main-loss units, 0 turns AuxK off. Leave it at 1.0 when setting
            ``aux_losses`` explicitly.
        topk_threshold_lr: SAELens's rate of the running θ (EMA of each batch's minimum
            selected activation). Unlike SAELens, the EMA starts at the first batch's value
            rather than at 0, and is kept in float32 whatever the SAE's dtype.
        b_dec_init: ``"mean"`` sets the decoder bias to the mean of the first training batch
            (as the SAE sees it, after activation scaling) before the first step; ``"zeros"``
            keeps SAELens's zero init. Residual streams have a large mean: from a zero bias,
            Adam needs thousands of steps to learn it, and meanwhile the few latents aligned
            with the mean win every selection while the rest die.
        aux_losses: auxiliary losses by registered name and coefficient, e.g.
            ``{"auxk": 1/32, "zipf": 1/32}``; ``{}`` trains without any. ``None`` (default)
            means ``{"auxk": aux_loss_coefficient / 32}``.
        aux_loss_warm_up_steps: linear warm-up of every aux coefficient (SAELens's scheduler).
        aux_k: dead latents per token AuxK may use; ``None`` means ``d_in // 2`` (as SAELens).
        dead_tokens_window: a latent is dead once it has not fired for more than this many
            training tokens (kept in the SAE state, so checkpoints resume it exactly). ``None``
            (default) uses SAELens's definition: the trainer's ``dead_neuron_mask``, i.e.
            ``dead_feature_window`` steps of ``train_batch_size_tokens`` tokens.
        zipf_exponent: exponent ``s`` of the Zipf law ``r^-s`` that defines under-used latents
            (and Feature Choice's Zipf capacities).
        underused_margin: a latent is under-used when it fires less than this fraction of the
            Zipf target for its frequency rank (see ``aux_losses.zipf_loss``).
        calibration_method: how the runner calibrates thresholds after training: ``"l0"``,
            ``"per_latent"``, ``"paper"``, or ``"none"`` to export the running θ.
        calibration_target_l0: the inference L0 to calibrate to; ``None`` means ``k``.
        calibration_tokens: tokens the runner draws (after training, unseen by it) to calibrate.
        fast_path: train on the sparse path (:mod:`sae_lens_batchtopk.sparse_codes`): exact
            fast selection, sparse decode and sparse encoder backward, no ``tokens x d_sae``
            tensor kept for the backward pass. Same losses and gradients as the dense path to
            float rounding. Any float dtype and autocast: the encoder matmul runs in the
            weights' or the autocast dtype (SAELens's ``autocast=True``: bfloat16), the rest
            accumulates in float32. Used whenever it applies (2-D batches,
            ``reshape_activations="none"``, no hooks on the activation hook points,
            sparse-ready aux losses); otherwise the dense path runs, with a warning once.
            ``False`` always trains densely.
        selection_scope: when training on several processes (torch.distributed), which batch
            the top-k budget is over. ``"global"`` (default): the whole distributed batch, so
            training equals one process training on all the processes' rows concatenated.
            ``"local"``: each process keeps the top ``int(k * n)`` of its own ``n`` rows, i.e.
            BatchTopK on a ``world_size`` times smaller batch (no selection collectives; a
            different training rule). Gradients, dead-latent counters, firing rates and θ are
            reduced over every process either way. Ignored on one process.
    """

    # Calibration methods that mean something for this architecture's training rule.
    calibration_methods: ClassVar[tuple[str, ...]] = ("l0", "per_latent", "paper")

    b_dec_init: BDecInit = "mean"
    # dict_field parses JSON on SAELens's CLI; None resolves through aux_loss_coefficient.
    aux_losses: dict[str, float] | None = dict_field(default=None)  # noqa: RUF009
    aux_loss_warm_up_steps: int = 0
    aux_k: int | None = None
    dead_tokens_window: int | None = None
    zipf_exponent: float = 1.0
    underused_margin: float = 0.5
    calibration_method: CalibrationMethodOption = "l0"
    calibration_target_l0: float | None = None
    calibration_tokens: int = 1_000_000
    fast_path: bool = True
    selection_scope: SelectionScope = "global"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.fast_path, bool):
            raise TypeError(f"fast_path must be true or false, got {self.fast_path!r}")
        check_choice("selection_scope", self.selection_scope, SELECTION_SCOPES)
        check_choice("b_dec_init", self.b_dec_init, ("mean", "zeros"))
        check_finite_number("topk_threshold_lr", self.topk_threshold_lr, low=0.0, high=1.0)
        if self.topk_threshold_lr == 0:
            raise ValueError("topk_threshold_lr must be > 0 (the running θ would never move)")
        self._check_aux_fields()
        self._check_calibration_fields()

    def _check_aux_fields(self) -> None:
        check_finite_number("aux_loss_coefficient", self.aux_loss_coefficient, low=0.0)
        if self.aux_losses is not None:
            if not isinstance(self.aux_losses, dict):
                raise TypeError(
                    f"aux_losses must map loss names to coefficients, e.g. {{'auxk': 0.03125}},"
                    f" got {self.aux_losses!r}"
                )
            if self.aux_loss_coefficient != 1.0:
                raise ValueError(
                    f"aux_loss_coefficient={self.aux_loss_coefficient} and aux_losses="
                    f"{self.aux_losses} both set the AuxK weight; set only aux_losses (e.g."
                    " {'auxk': 0.03125}) or only aux_loss_coefficient"
                )
        for name, coefficient in self.resolved_aux_losses.items():
            get_aux_loss(name)
            check_finite_number(f"aux_losses[{name!r}]", coefficient, low=0.0)
        check_positive_int("aux_loss_warm_up_steps", self.aux_loss_warm_up_steps, allow_zero=True)
        if self.aux_k is not None:
            check_positive_int("aux_k", self.aux_k)
        if self.dead_tokens_window is not None:
            check_positive_int("dead_tokens_window", self.dead_tokens_window)
        check_finite_number("zipf_exponent", self.zipf_exponent, low=0.0)
        check_finite_number("underused_margin", self.underused_margin, low=0.0)
        if self.normalize_activations in NORMALIZATIONS_WITHOUT_AUX and self.resolved_aux_losses:
            # Aux losses reconstruct the residual in normalised space while the residual is in
            # the original one (SAELens's TopK refuses the same, but only once a latent dies).
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r} cannot train with aux"
                f" losses {sorted(self.resolved_aux_losses)}; use 'expected_average_only_in'"
                " or 'none', or set aux_losses={} (or aux_loss_coefficient=0)"
            )

    def _check_calibration_fields(self) -> None:
        check_choice("calibration_method", self.calibration_method, (*METHODS, "none"))
        if self.calibration_method not in (*self.calibration_methods, "none"):
            raise ValueError(
                f"calibration_method={self.calibration_method!r} does not apply to"
                f" {self.architecture()}: use one of {[*self.calibration_methods, 'none']}"
            )
        if self.calibration_target_l0 is not None:
            check_average_l0("calibration_target_l0", self.calibration_target_l0, self.d_sae)
        check_positive_int("calibration_tokens", self.calibration_tokens)
        if self.calibration_method != "none":
            check_token_budget(
                self.calibration_method,
                self.calibration_tokens,
                float(self.calibration_target_l0 or self.k),
                self.d_sae,
                field="calibration_tokens",
            )

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        # SAELens's batchtopk exports to JumpReLU; ours exports to its calibrated form.
        return CalibratedBatchTopKSAEConfig

    @property
    def resolved_aux_losses(self) -> dict[str, float]:
        """The aux losses training uses: ``aux_losses``, or AuxK scaled by SAELens's knob."""
        if self.aux_losses is not None:
            return dict(self.aux_losses)
        if self.aux_loss_coefficient == 0:
            return {}
        return {"auxk": self.aux_loss_coefficient * AUXK_DEFAULT_COEFFICIENT}

    @property
    def resolved_aux_k(self) -> int:
        """``aux_k``, or ``d_in // 2`` (Gao et al.'s heuristic, as SAELens and sparsify)."""
        return self.aux_k if self.aux_k is not None else max(self.d_in // 2, 1)


# How each field of SAELens's BatchTopKTrainingSAEConfig is honoured here; the test suite checks
# that every SAELens field is listed, so a field SAELens adds fails a test until it is decided.
SAE_LENS_FIELDS: dict[str, str] = {
    "d_in": "same",
    "d_sae": "same",
    "dtype": "same; bf16/fp16 weights train on the sparse path, accumulating in float32",
    "device": "same",
    "apply_b_dec_to_input": "same",
    "normalize_activations": "same; layer_norm / constant_norm_rescale refused with aux losses",
    "reshape_activations": "same; hook_z trains on the dense path",
    "metadata": "same",
    "decoder_init_norm": "same",
    "k": "same (float allowed)",
    "use_sparse_activations": "accepted; training always keeps sparse codes on the fast path",
    "aux_loss_coefficient": "scales our AuxK: 1.0 = Gao et al.'s 1/32 in main-loss units",
    "rescale_acts_by_decoder_norm": "same",
    "topk_threshold_lr": "same EMA rate; θ starts at the first batch's value, not 0",
}


class CalibratedBatchTopKTrainingSAE(_Thresholds, TopKTrainingSAE):
    """BatchTopK training SAE with registered aux losses, dead-latent tracking and θ.

    Subclasses SAELens's ``TopKTrainingSAE`` for its decoder, decoder-norm rescaling and the
    norm folding at export; replaces the per-token TopK with batch top-k. State beyond the
    weights lives in persistent buffers so checkpoints save and resume it, in float32 or int64
    whatever the SAE's dtype (a 1 % EMA step is below bfloat16's resolution):

    - ``running_theta``: EMA of the per-batch minimum selected activation (the paper's θ);
    - ``tokens_since_fired``: per latent, training tokens since it last fired;
    - ``firing_rate``: per latent, fraction of training tokens it fired on, a running mean
      over the last ``dead_tokens_window`` tokens (10M when that is unset; ``tokens_seen``
      counts up to that horizon);
    - ``threshold``: calibrated per-latent thresholds, NaN until calibration sets them.

    ``encode`` uses batch top-k (the training rule); the exported inference SAE uses the
    calibrated thresholds, or ``running_theta`` for every latent if never calibrated.

    Every step checks its input and losses: a NaN or inf stops training with
    :class:`~sae_lens_batchtopk.finite.NonFiniteError` before the optimizer step, and
    non-finite weights are never saved.

    Training takes the sparse path when ``cfg.fast_path`` allows it (see the config). There the
    step output's ``feature_acts`` and ``hidden_pre`` are sparse COO tensors holding the
    selected entries only; SAELens's trainer reads them as it reads its own sparse TopK codes.

    On several processes, :meth:`set_distributed` (called by
    :class:`~sae_lens_batchtopk.trainer.DistributedSAETrainer`) makes every training step
    span the whole distributed batch: selection (per ``selection_scope``), the decoder-bias
    init, the aux losses' batch variance, the NaN guard and the training state. Encoding
    outside a training step (evaluations) stays local to the process.
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
        self.register_buffer("running_theta", torch.zeros((), dtype=torch.float32, device=device))
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
        self._no_dead_mask_warned = False
        # SAELens's trainer mask of the last step (dead_tokens_window=None); not state: the
        # trainer saves and resumes its own counters.
        self._trainer_dead_mask: torch.Tensor | None = None
        # The processes this SAE trains with (None: this one only), and, during a training step
        # with global selection, the batch the selection spans.
        self.distributed: DistributedBatch | None = None
        self._selection_batch: DistributedBatch | None = None
        self._undistributed_warned = False
        self._preactivations: torch.Tensor | None = None  # see _preactivation_buffer
        self.register_buffer(
            "threshold", torch.full((cfg.d_sae,), torch.nan, dtype=self.dtype, device=device)
        )

    @override
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        # nn.Module.to(dtype) casts every floating buffer; θ and the firing rates must stay
        # float32 (an EMA step of 1% is below bfloat16's resolution), so they only move device.
        exact = {
            name: self._buffers.pop(name) for name in _EXACT_FLOAT_STATE if name in self._buffers
        }
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, tensor in exact.items():
                assert tensor is not None
                self._buffers[name] = tensor.to(fn(tensor.new_empty(0)).device)

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.select_dense

    def select_dense(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """Batch top-k of a dense batch: across processes inside a globally selecting step."""
        if self._selection_batch is not None:
            return self._selection_batch.batch_topk(hidden_pre, self.cfg.k)
        return batch_topk(hidden_pre, self.cfg.k)

    def set_distributed(self, batch: DistributedBatch | None) -> None:
        """Train as one replica of several: ``batch`` names the process group (``None``: alone).

        The selection scope is this SAE's ``selection_scope``, whatever ``batch.scope`` says.
        """
        if batch is not None:
            batch = DistributedBatch(scope=self.cfg.selection_scope, group=batch.group)
        self.distributed = batch

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {
            name: TrainCoefficientConfig(value=value, warm_up_steps=self.cfg.aux_loss_warm_up_steps)
            for name, value in self.cfg.resolved_aux_losses.items()
        }

    @property
    def dead_mask(self) -> torch.Tensor:
        """Latents currently counted as dead (what AuxK revives).

        With ``dead_tokens_window`` set: no firing for more than that many tokens. Otherwise
        SAELens's trainer mask of the last step (``dead_feature_window`` steps); no latent is
        dead before the first step or when the step input carried no mask.
        """
        if self.cfg.dead_tokens_window is not None:
            return self.tokens_since_fired > self.cfg.dead_tokens_window
        if self._trainer_dead_mask is None:
            return torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=self.W_dec.device)
        return self._trainer_dead_mask

    def _take_trainer_dead_mask(self, step_input: TrainStepInput) -> None:
        """Adopt SAELens's dead-latent mask for this step when no token window is set."""
        if self.cfg.dead_tokens_window is not None:
            return
        mask = step_input.dead_neuron_mask
        if mask is None:
            if self.cfg.resolved_aux_losses and not self._no_dead_mask_warned:
                self._no_dead_mask_warned = True
                warnings.warn(
                    "the training step carries no dead_neuron_mask (not SAELens's SAETrainer)"
                    " and dead_tokens_window is unset, so no latent counts as dead and the aux"
                    " losses see none; set dead_tokens_window",
                    stacklevel=3,
                )
            self._trainer_dead_mask = None
            return
        self._trainer_dead_mask = mask.to(device=self.W_dec.device, dtype=torch.bool)

    @property
    def firing_rate_horizon(self) -> int:
        """Tokens the firing rates average over: the dead window, or 10M when that is unset."""
        return self.cfg.dead_tokens_window or FIRING_RATE_HORIZON_TOKENS

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
            partial(reconstruct_dense, hidden_pre, self.step_weights()),
        )

    def _aux_losses(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
        reconstruct_selected: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        if not self.cfg.resolved_aux_losses:
            return {}
        inputs = self.aux_loss_inputs(
            step_input, feature_acts, hidden_pre, sae_out, reconstruct_selected
        )
        return self.weighted_aux_losses(step_input, [inputs])

    def aux_loss_inputs(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
        reconstruct_selected: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> AuxLossInputs:
        """What every aux loss sees this step: the whole SAE's residual and latent masks."""
        union = self._selection_batch
        return AuxLossInputs(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            hidden_pre=hidden_pre,
            feature_acts=feature_acts,
            dead_mask=self.dead_mask,
            underused_mask=self.underused_mask,
            k_aux=self.cfg.resolved_aux_k,
            decode_directions=self.decode_directions,
            reconstruct_selected=reconstruct_selected,
            variance=batch_variance if union is None else union.total_variance,
        )

    def weighted_aux_losses(
        self, step_input: TrainStepInput, parts: Sequence[AuxLossInputs]
    ) -> dict[str, torch.Tensor]:
        """Each configured aux loss summed over ``parts``, times its scheduled coefficient.

        One part is the whole SAE; Matryoshka's per-level aux loss passes one per level.
        """
        return {
            f"{name}_loss": step_input.coefficients[name]
            * sum(get_aux_loss(name)(part) for part in parts)
            for name in self.cfg.resolved_aux_losses
        }

    def decode_directions(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Decode without the decoder bias (what aux losses reconstruct the residual with)."""
        recons = act_times_W_dec(feature_acts, self.W_dec, self.cfg.rescale_acts_by_decoder_norm)
        return self.reshape_fn_out(recons, self.d_head)

    def step_weights(self) -> SparseStepWeights:
        """The weights as the training step reads them (decoder norms in selection units).

        ``b_dec`` is the input bias when ``process_sae_in`` subtracts it: it is the only
        parameter the processed input depends on (a ``hook_sae_input`` hook mixing in other
        trainable tensors would lose their gradient), so the sparse step takes that input as a
        constant and gives ``b_dec`` its encoder gradient through one matrix-vector product.
        """
        return SparseStepWeights.of(
            self.W_enc,
            self.b_enc,
            self.W_dec,
            rescale_acts_by_decoder_norm=self.cfg.rescale_acts_by_decoder_norm,
            input_bias=self.b_dec if self.cfg.apply_b_dec_to_input else None,
        )

    def select_indices(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """The sparse path's selection: flat indices of the kept entries of a 2-D batch."""
        if self._selection_batch is not None:
            return self._selection_batch.batch_topk_indices(hidden_pre, self.cfg.k)
        return batch_topk_indices(hidden_pre, self.cfg.k)

    def sparse_path_blocker(self, sae_in: torch.Tensor) -> str | None:
        """Why this batch must train on the dense path, or ``None`` if the sparse one applies."""
        if not self.cfg.fast_path:
            return "fast_path=False"
        if sae_in.ndim != 2 or self.cfg.reshape_activations != "none":
            return "the sparse path takes 2-D batches with reshape_activations='none'"
        for hook in (self.hook_sae_acts_pre, self.hook_sae_acts_post):
            if hook._forward_hooks or hook._backward_hooks:
                return f"a hook is attached to {hook.name or 'an activation hook point'}"
        dense_only = [name for name in self.cfg.resolved_aux_losses if not is_sparse_ready(name)]
        if dense_only:
            return f"aux losses {dense_only} are not registered as sparse_ready"
        return None

    def _preactivation_buffer(
        self, sae_in: torch.Tensor, weights: SparseStepWeights
    ) -> torch.Tensor | None:
        """The ``tokens x d_sae`` tensor the sparse step writes its pre-activations into.

        Kept between steps on a CPU, where a fresh allocation of that size is page-faulted in
        on every step; the pre-activations are only read during the forward pass, so the next
        step may overwrite them. ``None`` elsewhere (CUDA's caching allocator reuses memory).
        """
        if sae_in.device.type != "cpu":
            return None
        shape = (sae_in.shape[0], self.cfg.d_sae)
        dtype = matmul_dtype(sae_in, weights)
        buffer = self._preactivations
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = self._preactivations = torch.empty(shape, dtype=dtype)
        return buffer

    def reconstruction_mse_loss(self, sae_out: torch.Tensor, sae_in: torch.Tensor) -> torch.Tensor:
        """SAELens's MSE loss (summed over d_in, mean over tokens) of a reconstruction.

        The target, which carries no gradient, is widened to the output's dtype: the sparse
        decode is float32 even for bfloat16 weights, and CUDA's ``mse_loss`` backward refuses
        mixed dtypes (on the dense path the dtypes already agree).
        """
        return self.mse_loss_fn(sae_out, sae_in.to(sae_out.dtype)).sum(dim=-1).mean()

    def _sparse_training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """The dense training pass's losses, computed on the selected entries only.

        :func:`~sae_lens_batchtopk.sparse_step.sparse_forward` runs the dense encoder forward
        without gradient (every pre-activation competes in the selection) and re-attaches the
        gradient at the selected entries, so no ``tokens x d_sae`` tensor is kept for backward.
        """
        # A constant: its one parameter, b_dec, is the step weights' input bias (step_weights).
        sae_in = self.process_sae_in(step_input.sae_in).detach()
        weights = self.step_weights()
        forward = sparse_forward(
            sae_in, weights, self.select_indices, out=self._preactivation_buffer(sae_in, weights)
        )
        sae_out = self.hook_sae_recons(forward.reconstruction + self.b_dec)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        sae_out = self.reshape_fn_out(sae_out, self.d_head)
        mse_loss = self.reconstruction_mse_loss(sae_out, step_input.sae_in)
        feature_acts = forward.codes.to_sparse_coo()
        aux_losses = self._aux_losses(
            step_input, feature_acts, forward.hidden_pre, sae_out, forward.reconstruct_selected
        )
        return TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=feature_acts,
            loss=mse_loss + sum(aux_losses.values()),
            losses={"mse_loss": mse_loss, **aux_losses},
        )

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        self._check_batch_shape(step_input)
        self._warn_if_undistributed()
        distributed = self.distributed
        if distributed is not None and distributed.selects_globally:
            self._selection_batch = distributed
        try:
            output = self._training_forward_pass(step_input)
        finally:
            self._selection_batch = None
        return output

    def _training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if not self._b_dec_init_checked:
            self._init_b_dec(step_input.sae_in)
        self._take_trainer_dead_mask(step_input)
        blocker = self.sparse_path_blocker(step_input.sae_in)
        if blocker is None:
            output = self._sparse_training_forward_pass(step_input)
        else:
            if self.cfg.fast_path and not self._dense_fallback_warned:
                self._dense_fallback_warned = True
                warnings.warn(f"training on the dense path: {blocker}", stacklevel=2)
            output = self._dense_training_forward_pass(step_input)
        # One host sync: the input and every loss, before the state update and the optimizer
        # step, so a bad batch leaves the SAE's state and weights as they were.
        self._check_step_finite(step_input, output)
        self._update_training_state(output.feature_acts)
        output.metrics["running_theta"] = self.running_theta.detach()
        output.metrics["dead_latent_fraction"] = self.dead_mask.float().mean()
        output.metrics["underused_latent_fraction"] = self.underused_mask.float().mean()
        return output

    def _dense_training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """SAELens's dense training pass: the reference the sparse pass equals."""
        return super().training_forward_pass(step_input)

    def _check_step_finite(self, step_input: TrainStepInput, output: TrainStepOutput) -> None:
        """Raise :class:`NonFiniteError` on every process if any process's step is non-finite.

        All processes raise together, before the gradient all-reduce, so none is left waiting.
        """
        finite = torch.isfinite(step_input.sae_in).all() & torch.isfinite(output.loss)
        if self.distributed is None:
            if not bool(finite):
                raise NonFiniteError(_non_finite_step_message(step_input, output))
            return
        bad = torch.zeros(self.distributed.world_size, dtype=torch.long)
        bad[self.distributed.rank] = int(not bool(finite))
        bad_ranks = self.distributed.summed(bad).nonzero().flatten().tolist()
        if self.distributed.rank in bad_ranks:
            raise NonFiniteError(
                f"process {self.distributed.rank}: {_non_finite_step_message(step_input, output)}"
            )
        if bad_ranks:
            raise NonFiniteError(
                f"training step {step_input.n_training_steps}: non-finite values on process(es)"
                f" {bad_ranks} (see their errors); every process stopped before the optimizer"
                " step, the weights are unchanged and nothing was saved"
            )

    def _warn_if_undistributed(self) -> None:
        """Several processes, but this SAE trains alone: each would select within its own batch."""
        if self.distributed is None and not self._undistributed_warned and is_distributed():
            self._undistributed_warned = True
            warnings.warn(
                "torch.distributed runs several processes but this SAE was not given them"
                " (set_distributed, done by DistributedSAETrainer): every process trains its own"
                " replica on its own batch, not one SAE on the whole distributed batch",
                stacklevel=3,
            )

    def _check_batch_shape(self, step_input: TrainStepInput) -> None:
        """An empty batch, or one too small for a single selected activation, is an error."""
        n_tokens = step_input.sae_in.shape[:-1].numel()
        if n_tokens == 0:
            raise ValueError(
                f"training step {step_input.n_training_steps}: empty activation batch (shape"
                f" {tuple(step_input.sae_in.shape)}); the data provider yielded no tokens"
            )
        if n_selected(self.cfg.k, n_tokens) == 0:
            raise ValueError(
                f"k={self.cfg.k} keeps int(k x {n_tokens} tokens) = 0 activations of this"
                " batch: raise k or train_batch_size_tokens so that int(k x batch) >= 1"
            )

    @torch.no_grad()
    def _init_b_dec(self, sae_in: torch.Tensor) -> None:
        """Before the first training step ever (not on resume), b_dec <- the batch mean."""
        self._b_dec_init_checked = True
        if self.cfg.b_dec_init == "mean" and int(self.tokens_seen) == 0:
            rows = sae_in.reshape(-1, sae_in.shape[-1])
            # The replicas must stay identical: every process adopts the union's mean.
            mean = self.distributed.row_mean(rows) if self.distributed else rows.mean(0)
            # A NaN first batch is reported by the step's finiteness check; never adopt it.
            if bool(torch.isfinite(mean).all()):
                self.b_dec.copy_(mean)
            else:
                self._b_dec_init_checked = False

    @torch.no_grad()
    def _update_training_state(self, feature_acts: torch.Tensor) -> None:
        """Advance the dead-latent counters, firing rates and the θ estimate; no host sync.

        ``feature_acts`` is dense, or sparse COO ``(n_tokens, d_sae)`` from the sparse path.
        The arithmetic is float32 whatever the SAE's dtype. On several processes the counts
        and θ are the union's (:meth:`DistributedBatch.reduce_step_counts`), so every replica
        holds the same state.
        """
        n_tokens: int | torch.Tensor = feature_acts.shape[:-1].numel()  # a tensor when reduced
        if feature_acts.is_sparse:
            values = feature_acts._values()
            latents = feature_acts._indices()[-1][values > 0]
            fired_count = torch.bincount(latents, minlength=self.cfg.d_sae)
        else:
            values = feature_acts.detach().reshape(-1, feature_acts.shape[-1])
            fired_count = (values > 0).sum(0)
        batch_theta = min_positive(values).float()
        if self.distributed is not None:
            n_tokens, fired_count, batch_theta = self.distributed.reduce_step_counts(
                feature_acts.shape[:-1].numel(), fired_count, batch_theta
            )
        self.tokens_since_fired.copy_(
            torch.where(fired_count > 0, 0, self.tokens_since_fired + n_tokens)
        )
        # Running mean over the first horizon, then an EMA with the horizon as its time scale.
        self.tokens_seen.copy_((self.tokens_seen + n_tokens).clamp(max=self.firing_rate_horizon))
        weight = n_tokens / self.tokens_seen.float()
        self.firing_rate.lerp_(fired_count.float() / n_tokens, weight)

        rate = self.cfg.topk_threshold_lr
        ema = (1 - rate) * self.running_theta + rate * batch_theta
        updated = torch.where(self.running_theta > 0, ema, batch_theta)
        fired_any = torch.isfinite(batch_theta)
        self.running_theta.copy_(torch.where(fired_any, updated, self.running_theta))

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
        # integer type and the float32 of θ and the rates (the runner's resume path loads
        # without that cast, so it restores them exactly).
        for name in ("tokens_since_fired", "tokens_seen"):
            if name in state_dict:
                state_dict[name] = state_dict[name].round().long()
        for name in _EXACT_FLOAT_STATE:
            if name in state_dict:
                state_dict[name] = state_dict[name].float()

    @override
    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving(state_dict)
        # NaN thresholds mean "not calibrated yet"; everything else must be finite.
        require_finite(
            {name: value for name, value in state_dict.items() if name != "threshold"},
            "refusing to save the SAE",
        )

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        for name in ("running_theta", "tokens_since_fired", "firing_rate", "tokens_seen"):
            state_dict.pop(name)
        state_dict.pop("threshold")
        state_dict["threshold"] = self.inference_thresholds().to(self.dtype)
        require_finite(state_dict, "refusing to export the SAE")


def _non_finite_step_message(step_input: TrainStepInput, output: TrainStepOutput) -> str:
    """Say which of the step's input and losses hold NaN/inf (computed on failure only)."""
    found = []
    if bad := count_non_finite(step_input.sae_in):
        found.append(f"the input batch ({bad} of {step_input.sae_in.numel()} values)")
    found += [name for name, loss in output.losses.items() if count_non_finite(loss)]
    if not found:
        found.append("the total loss")
    return (
        f"training step {step_input.n_training_steps}: non-finite values in "
        f"{', '.join(found)}; training stopped before the optimizer step, the weights are"
        " unchanged and nothing was saved"
    )
