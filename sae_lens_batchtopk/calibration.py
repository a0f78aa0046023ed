"""Threshold calibration: make the inference L0 equal the L0 that was asked for.

BatchTopK trains with a batch-level budget but must infer token by token, through a JumpReLU
threshold. Other libraries export an EMA of per-batch thresholds taken over weights that kept
changing, so the inference L0 drifts from ``k`` by run-dependent amounts. Here thresholds are
computed once, with the *final* weights, on tokens the training did not see:

- ``"paper"``: θ = mean over batches of the minimum positive batch-top-k activation (the
  BatchTopK paper's E_X[min{z > 0}]), one θ for every latent. A reference point.
- ``"l0"``: one global θ such that the mean inference L0 on the calibration tokens equals the
  target (the target-quantile of all pre-activations).
- ``"per_latent"``: one θ per latent, chosen so that each latent fires at inference as often as
  it fires under the training rule (batch top-k, or Feature Choice for a ``feature_choice``
  training SAE) on the same tokens, scaled so the total mean L0 is the target.
  A latent that never fired gets a finite threshold above everything it produced.

Streaming and memory: pre-activations are never stored. Each batch is encoded in chunks and
folded into integer histograms keyed by the float32 bit pattern (which is monotone for positive
floats), so a threshold is always a bin edge and the L0 it gives on the calibration data is an
exact count, not an estimate. Memory is O(d_sae x bins) for ``"per_latent"`` (about 340 MB at
d_sae 65536) plus one chunk of pre-activations, independent of the number of tokens. Results
depend only on the input order (no randomness, integer accumulation).

Several processes (``distributed=``) each stream their own tokens; the integer histograms and
counts are all-reduced (integers add exactly), so the thresholds every process sets are those
of one process calibrating on the union of their tokens, bitwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE
from sae_lens.saes.sae import SAE
from tqdm.auto import tqdm

from sae_lens_batchtopk.distributed import DistributedBatch
from sae_lens_batchtopk.finite import NonFiniteError, require_finite
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import (
    METHODS,
    CalibratedBatchTopKSAE,
    CalibratedBatchTopKTrainingSAE,
)
from sae_lens_batchtopk.saes.feature_choice_sae import FeatureChoiceTrainingSAE
from sae_lens_batchtopk.selection import batch_topk_cutoff, feature_choice_cutoffs
from sae_lens_batchtopk.validation import check_average_l0, check_choice, check_token_budget

CalibrationMethod = Literal["paper", "l0", "per_latent"]

# Global histogram: float32 bits >> 12 keeps 11 mantissa bits (bins 0.05% wide), 2^19 bins.
_GLOBAL_SHIFT = 12
_GLOBAL_BINS = 1 << (31 - _GLOBAL_SHIFT)
# Per-latent histograms: 6 mantissa bits (bins ~1.1% wide) over 2^±16 around a reference θ.
_LATENT_SHIFT = 17
_LATENT_BINADES = 32
_LATENT_BINS = _LATENT_BINADES << (23 - _LATENT_SHIFT)

_MAX_CHUNK_ENTRIES = 1 << 24
# Tokens drawn from an iterable of unknown length (an ActivationsStore never ends) when the
# caller passes no n_tokens.
DEFAULT_STREAM_TOKENS = 1_000_000
# A calibrated L0 further than this (relative) from its target means the SAE cannot reach the
# target on these tokens (too few positive pre-activations, or broken weights): refuse it.
MAX_L0_MISS = 0.05


class CalibrationError(ValueError):
    """Calibration could not reach its target; the SAE was left unchanged."""


@dataclass(frozen=True)
class CalibrationResult:
    """What calibration measured and set.

    Attributes:
        method: the calibration method.
        target_l0: the mean inference L0 aimed for (``None`` for ``"paper"``).
        theta: the global θ (``"paper"``, ``"l0"``) or the median per-latent θ.
        achieved_l0: mean inference L0 on the calibration tokens with the new thresholds.
        batch_topk_l0: mean L0 of batch top-k on the same tokens (``k`` unless fewer fired).
        n_tokens: calibration tokens used.
        n_never_fired: latents that never fired under batch top-k on the calibration tokens.
        thresholds: the per-latent thresholds that were set (length ``d_sae``).
    """

    method: str
    target_l0: float | None
    theta: float
    achieved_l0: float
    batch_topk_l0: float
    n_tokens: int
    n_never_fired: int
    thresholds: torch.Tensor

    def to_metadata(self) -> dict[str, Any]:
        """JSON-ready summary, recorded in the saved SAE config's metadata."""
        summary = asdict(self)
        del summary["thresholds"]
        return summary


@dataclass(frozen=True)
class _Target:
    """How to read pre-activations from one SAE class and write thresholds back."""

    pre_activations: Callable[[torch.Tensor], torch.Tensor]
    k: float
    d_sae: int
    set_thresholds: Callable[[torch.Tensor], None]
    # Feature Choice's per-latent capacities for a batch of n tokens; None means batch top-k.
    capacities: Callable[[int], torch.Tensor] | None = None


def applicable_methods(sae: SAE[Any]) -> tuple[str, ...]:
    """The calibration methods that mean something for ``sae``'s training rule.

    A training config lists them (``calibration_methods``: Feature Choice has no ``"paper"``);
    inference forms accept every method.
    """
    return tuple(getattr(sae.cfg, "calibration_methods", METHODS))


def calibrate_thresholds(
    sae: SAE[Any],
    activations: Iterable[torch.Tensor],
    *,
    method: CalibrationMethod = "l0",
    target_l0: float | None = None,
    n_tokens: int | None = None,
    k: float | None = None,
    chunk_tokens: int = 1024,
    show_progress: bool = False,
    distributed: DistributedBatch | None = None,
) -> CalibrationResult:
    """Compute inference thresholds with the SAE's final weights and set them on the SAE.

    Args:
        sae: a ``calibrated_batchtopk`` SAE (training or inference form; on a training SAE
            ``save_inference_model`` then exports the calibrated thresholds), or a SAELens
            ``JumpReLUSAE`` exported from a BatchTopK or Matryoshka BatchTopK run (its threshold
            vector is replaced). Convert SAELens's built-in ``batchtopk`` and
            ``matryoshka_batchtopk`` training SAEs first with ``CalibratedBatchTopKSAE.from_sae``.
        activations: activation batches ``(..., d_in)``: a list, or a stream such as an
            ``ActivationsStore``. Batch boundaries matter for ``"paper"`` and ``"per_latent"``
            (batch top-k is taken per batch): pass batches of the training batch size.
        method: ``"l0"``, ``"per_latent"`` or ``"paper"`` (see the module docstring).
        target_l0: mean inference L0 to reach; defaults to ``k``.
        n_tokens: calibration tokens to use. ``None``: every token of a list or tuple (counted
            before any work), or the first :data:`DEFAULT_STREAM_TOKENS` of a stream of unknown
            length (an ``ActivationsStore`` never ends), fewer if it ends first.
        k: the SAE's training k, needed only when the SAE does not record it.
        chunk_tokens: tokens encoded at once; bounds the ``chunk x d_sae`` working memory.
        show_progress: show a progress bar.
        distributed: calibrate on the union of every process's activations; every process
            calls this with its own ``activations`` and the same ``n_tokens`` (its share, so
            the union holds ``n_tokens x world_size``). With ``scope="global"`` the processes'
            i-th batches together form the union's i-th batch (the training batch), with
            ``"local"`` each is a batch of its own. The thresholds set on every process are
            bitwise those of one process calibrating on the union, given bitwise the same
            pre-activations per token (BLAS may round a row differently in a differently
            sized chunk: let ``chunk_tokens`` divide each process's batch).

    Raises:
        TypeError: the SAE is of an architecture this cannot calibrate.
        ValueError: bad ``method``, ``target_l0``, ``n_tokens``; too few tokens for a reliable
            threshold (before any work when the count is known); the activations ran out
            before ``n_tokens``.
        NonFiniteError: the SAE's weights or the activations hold NaN or inf.
        CalibrationError: the achieved L0 misses the target by more than :data:`MAX_L0_MISS`.
        The SAE is left untouched whenever an error is raised.
    """
    require_finite(
        {name: getattr(sae, name) for name in ("W_enc", "b_enc", "W_dec", "b_dec")},
        "refusing to calibrate; the SAE was not changed",
    )
    target = _target_for(sae, k)
    check_choice("method", method, METHODS)
    if method not in applicable_methods(sae):
        raise ValueError(
            f"method={method!r} does not apply to {sae.cfg.architecture()}: use one of"
            f" {list(applicable_methods(sae))}"
        )
    if target_l0 is None:
        target_l0 = target.k
    check_average_l0("target_l0", target_l0, target.d_sae)
    available = _count_tokens(activations)
    if n_tokens is None:
        n_tokens = available if available is not None else DEFAULT_STREAM_TOKENS
        must_fill = available is not None
    else:
        must_fill = True
        if available is not None and available < n_tokens:
            raise ValueError(
                f"n_tokens={n_tokens} but the activations hold {available} tokens; lower"
                " n_tokens or pass more activations. The SAE was not changed"
            )
    n_processes = 1
    if distributed is not None:
        _check_distributed_calibration(distributed, target, n_tokens)
        n_processes = distributed.world_size
    check_token_budget(method, n_tokens * n_processes, float(target_l0), target.d_sae)
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}")

    # Cap a chunk's pre-activations at 2^24 entries (64 MB in float32) whatever d_sae is.
    chunk_tokens = max(1, min(chunk_tokens, _MAX_CHUNK_ENTRIES // target.d_sae))
    stats = _Statistics(target.d_sae, per_latent=method == "per_latent", distributed=distributed)
    with torch.no_grad():
        for batch in _take_tokens(activations, n_tokens, show_progress, must_fill=must_fill):
            stats.add_batch(batch, target, chunk_tokens)
        stats.merge_processes()
    if not must_fill:
        # A stream that ended early: its length was unknown, so the budget is checked now.
        check_token_budget(method, stats.n_tokens, float(target_l0), target.d_sae)

    thresholds, achieved = {
        "paper": stats.paper_thresholds,
        "l0": stats.global_thresholds,
        "per_latent": stats.per_latent_thresholds,
    }[method](float(target_l0))
    if method != "paper" and abs(achieved - target_l0) > MAX_L0_MISS * target_l0:
        raise CalibrationError(
            f"calibration reached L0 {achieved:.3f} on {stats.n_tokens} tokens for target"
            f" {target_l0} ({(achieved - target_l0) / target_l0:+.1%}): the SAE cannot fire"
            " that often on these activations (too few positive pre-activations). The SAE"
            " was not changed"
        )
    target.set_thresholds(thresholds)
    return CalibrationResult(
        method=method,
        target_l0=None if method == "paper" else float(target_l0),
        theta=float(thresholds.median()),
        achieved_l0=achieved,
        batch_topk_l0=stats.batch_topk_l0,
        n_tokens=stats.n_tokens,
        n_never_fired=int((stats.topk_counts == 0).sum()),
        thresholds=thresholds,
    )


def _check_distributed_calibration(
    distributed: DistributedBatch, target: _Target, n_tokens: int
) -> None:
    """Same token share everywhere (batches stay aligned), and a rule the union supports."""
    shares = distributed.gathered(torch.tensor([n_tokens])).flatten().tolist()
    if len(set(shares)) > 1:
        raise ValueError(
            f"n_tokens differs across processes ({shares}); every process must calibrate on the"
            " same number of its own tokens"
        )
    if target.capacities is not None and distributed.selects_globally:
        raise ValueError(
            "Feature Choice calibration cannot select over the union of the processes' batches;"
            " use a DistributedBatch with scope='local' (selection_scope='local')"
        )


def _count_tokens(activations: Iterable[torch.Tensor]) -> int | None:
    """Tokens in a list or tuple of batches; ``None`` for streams (unknown, maybe endless)."""
    if not isinstance(activations, (list, tuple)):
        return None
    return sum(batch.shape[:-1].numel() for batch in activations)


def _target_for(sae: SAE[Any], k: float | None) -> _Target:
    """Pre-activations from the SAE's inference form; thresholds written back to ``sae``.

    :meth:`CalibratedBatchTopKSAE.from_sae` is the one place that knows which SAEs have a
    BatchTopK inference form (and refuses the rest); its folded pre-activations are exactly
    the numbers the calibrated thresholds will be compared with at inference.
    """
    if isinstance(sae, BatchTopKTrainingSAE) and not isinstance(
        sae, CalibratedBatchTopKTrainingSAE
    ):
        raise TypeError(
            f"SAELens's built-in {sae.cfg.architecture()} training SAE stores one scalar"
            " threshold; convert it first:"
            " calibrate_thresholds(CalibratedBatchTopKSAE.from_sae(sae), ...)"
        )
    inference = CalibratedBatchTopKSAE.from_sae(sae, k=k)
    if isinstance(sae, JumpReLUSAE):

        def set_thresholds(thresholds: torch.Tensor) -> None:
            sae.threshold.data.copy_(thresholds)

    else:
        set_thresholds = sae.set_thresholds  # type: ignore[assignment]
    return _Target(
        pre_activations=inference.pre_activations,
        k=inference.cfg.k,
        d_sae=inference.cfg.d_sae,
        set_thresholds=set_thresholds,
        capacities=sae.capacities if isinstance(sae, FeatureChoiceTrainingSAE) else None,
    )


def _take_tokens(
    activations: Iterable[torch.Tensor], n_tokens: int, show_progress: bool, *, must_fill: bool
) -> Iterator[torch.Tensor]:
    """Yield ``(n, d_in)`` batches until ``n_tokens`` tokens were produced.

    With ``must_fill`` running out first is an error; without it (a stream of unknown length
    asked for no particular count) whatever it held is used.
    """
    seen = 0
    with tqdm(total=n_tokens, desc="Calibrating thresholds", disable=not show_progress) as bar:
        for batch in activations:
            flat = batch.reshape(-1, batch.shape[-1])
            if not torch.isfinite(flat).all():
                raise NonFiniteError(
                    f"calibration activations contain NaN or inf (in the batch after {seen}"
                    " tokens); the SAE was not changed"
                )
            flat = flat[: n_tokens - seen]
            seen += flat.shape[0]
            bar.update(flat.shape[0])
            yield flat
            if seen >= n_tokens:
                return
    if must_fill:
        raise ValueError(
            f"the activations ran out after {seen} tokens but n_tokens={n_tokens} were"
            " requested; lower n_tokens or provide more activations. The SAE was not changed"
        )


def _float_bits(values: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of float32 values: monotone in the value for positive floats."""
    return values.float().contiguous().view(torch.int32)


def _bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).contiguous().view(torch.float32)


def _threshold_below_key(key: torch.Tensor, shift: int) -> torch.Tensor:
    """Largest float whose key is below ``key``: then ``z > θ`` iff ``key(z) >= key``.

    Key 0 means "every positive value fires", i.e. θ = 0.
    """
    bits = (key.long() << shift) - 1
    return torch.where(key > 0, _bits_to_float(bits.clamp(min=0)), torch.zeros(()))


class _Statistics:
    """Streaming integer statistics from which every method's thresholds are exact bin edges.

    With ``distributed`` each process streams its own batches, then :meth:`merge_processes`
    turns the statistics into the union's.
    """

    def __init__(
        self, d_sae: int, *, per_latent: bool, distributed: DistributedBatch | None = None
    ) -> None:
        self.d_sae = d_sae
        self.per_latent = per_latent
        self.distributed = distributed
        self.n_tokens = 0
        self.n_selected = 0
        # The selection cut-off of every batch where something fired, in stream order.
        self.batch_thetas: list[float] = []
        self.global_hist = torch.zeros(_GLOBAL_BINS, dtype=torch.long)
        self.topk_counts = torch.zeros(d_sae, dtype=torch.long)
        self.max_pre = torch.full((d_sae,), -torch.inf)
        self.latent_hist: torch.Tensor | None = None
        self.latent_key_offset = 0

    @property
    def batch_topk_l0(self) -> float:
        return self.n_selected / max(self.n_tokens, 1)

    def add_batch(self, batch: torch.Tensor, target: _Target, chunk_tokens: int) -> None:
        """The training rule's selection threshold(s) first, then histogram every chunk."""
        chunks = batch.split(chunk_tokens)
        pre_activations = (target.pre_activations(chunk).float().cpu() for chunk in chunks)
        union = self.distributed if self.distributed and self.distributed.selects_globally else None
        if union is not None:
            theta = union.batch_topk_cutoff(pre_activations, target.k, batch.shape[0])
        elif target.capacities is None:
            theta = batch_topk_cutoff(pre_activations, target.k, batch.shape[0])
        else:
            theta = feature_choice_cutoffs(pre_activations, target.capacities(batch.shape[0]))
        selected_minimum = theta[torch.isfinite(theta) & (theta > 0)]
        batch_theta = float(selected_minimum.min()) if selected_minimum.numel() else math.inf
        if math.isfinite(batch_theta):
            self.batch_thetas.append(batch_theta)
        if self.per_latent and self.latent_hist is None:
            reference = batch_theta
            if self.distributed is not None and union is None:
                # Per-process batches: every process must bin around the same reference, the
                # one the union's stream (rank 0's batches first) meets first.
                reference = self.distributed.first_finite(batch_theta)
            if math.isfinite(reference):
                self._init_latent_hist(reference)
        for chunk in chunks:
            self._add_chunk(target.pre_activations(chunk).float().cpu(), theta)
        self.n_tokens += batch.shape[0]

    def merge_processes(self) -> None:
        """Make every process's statistics the union's: integer sums, maxima, θs in order.

        Under global selection every process computed the same batch cut-offs, so the θs are
        already the union's; under local selection the union's stream is rank 0's batches,
        then rank 1's, and so on.
        """
        if self.distributed is None:
            return
        distributed = self.distributed
        counts = distributed.summed(torch.tensor([self.n_tokens, self.n_selected]))
        self.n_tokens, self.n_selected = (int(count) for count in counts)
        self.global_hist = distributed.summed(self.global_hist)
        self.topk_counts = distributed.summed(self.topk_counts)
        self.max_pre = distributed.maximum(self.max_pre)
        if self.latent_hist is not None:
            self.latent_hist = distributed.summed(self.latent_hist)
        if not distributed.selects_globally:
            per_process = distributed.gathered_objects(self.batch_thetas)
            self.batch_thetas = [theta for thetas in per_process for theta in thetas]

    def _init_latent_hist(self, reference_theta: float) -> None:
        reference_key = int(_float_bits(torch.tensor(reference_theta))) >> _LATENT_SHIFT
        self.latent_key_offset = reference_key - _LATENT_BINS // 2
        # bin 0: positive values below the range; bin B+1: above it.
        self.latent_hist = torch.zeros(self.d_sae, _LATENT_BINS + 2, dtype=torch.int32)

    def _add_chunk(self, pre: torch.Tensor, theta: torch.Tensor) -> None:
        self.max_pre = torch.maximum(self.max_pre, pre.max(0).values)
        selected = (pre >= theta) & (pre > 0)
        self.topk_counts += selected.sum(0)
        self.n_selected += int(selected.sum())
        positive = pre > 0
        values = pre[positive]
        bits = _float_bits(values)
        self.global_hist += torch.bincount(bits >> _GLOBAL_SHIFT, minlength=_GLOBAL_BINS)
        if self.latent_hist is not None:
            row_start = torch.arange(self.d_sae) * (_LATENT_BINS + 2)
            key = (bits >> _LATENT_SHIFT) - self.latent_key_offset + 1
            flat_index = row_start.expand_as(pre)[positive] + key.clamp_(0, _LATENT_BINS + 1)
            # index_add_ into the int32 histogram: a bincount would allocate a dense int64
            # vector of d_sae x bins (over 1 GB at d_sae 65536) for every chunk.
            self.latent_hist.view(-1).index_add_(
                0, flat_index, torch.ones_like(flat_index, dtype=torch.int32)
            )

    def paper_thresholds(self, _target_l0: float) -> tuple[torch.Tensor, float]:
        if not self.batch_thetas:
            raise ValueError("no latent fired on the calibration tokens; cannot estimate θ")
        theta = sum(self.batch_thetas) / len(self.batch_thetas)
        # Snap θ to the global histogram's bin edge just above it (a 0.05% move) so that the
        # reported L0 is an exact count like the other methods'.
        key = torch.tensor(int(_float_bits(torch.tensor(theta))) >> _GLOBAL_SHIFT) + 1
        achieved = float(self.global_hist[int(key) :].sum()) / self.n_tokens
        return _threshold_below_key(key, _GLOBAL_SHIFT).expand(self.d_sae).clone(), achieved

    def global_thresholds(self, target_l0: float) -> tuple[torch.Tensor, float]:
        wanted = target_l0 * self.n_tokens
        count_at_or_above = self.global_hist.flip(0).cumsum(0).flip(0)
        key = int(torch.argmin((count_at_or_above - wanted).abs()))
        theta = _threshold_below_key(torch.tensor(key), _GLOBAL_SHIFT)
        achieved = float(count_at_or_above[key]) / self.n_tokens
        return theta.expand(self.d_sae).clone(), achieved

    def per_latent_thresholds(self, target_l0: float) -> tuple[torch.Tensor, float]:
        if self.latent_hist is None or self.n_selected == 0:
            raise ValueError("no latent fired on the calibration tokens; cannot calibrate")
        # below[j, b]: latent j's values in bins <= b. A threshold at bin e's lower edge lets
        # total_j - below[j, e - 1] values fire. int32 and no (d_sae x bins) temporaries beyond
        # this one, so memory stays near the histogram's own size at d_sae 65536.
        below = torch.cumsum(self.latent_hist, dim=1, dtype=torch.int32)
        total = below[:, -1].long()
        frequency = self.topk_counts.double() / self.n_selected  # share of all firings
        wanted_total = target_l0 * self.n_tokens
        last_edge = _LATENT_BINS + 1

        def nearest_edges(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
            allowed_below = (total - frequency * (wanted_total * scale)).clamp(min=0)
            first = torch.searchsorted(below, allowed_below.round().to(torch.int32)[:, None])
            upper = first.squeeze(1).clamp(max=last_edge)  # edge whose below-count >= target
            lower = (upper - 1).clamp(min=0)
            counts_upper = total - _below_edge(below, upper)
            counts_lower = total - _below_edge(below, lower)
            wanted = total.double() - allowed_below
            use_lower = (counts_lower - wanted).abs() < (counts_upper - wanted).abs()
            edges = torch.where(use_lower, lower, upper)
            return edges, torch.where(use_lower, counts_lower, counts_upper)

        # Rounding each latent to its nearest bin edge biases the total; a common scale on the
        # per-latent targets, found by bisection, removes that bias so the total hits the target.
        low, high = 0.25, 4.0
        edges, counts = nearest_edges(1.0)
        best = (abs(float(counts.sum()) - wanted_total), edges, counts)
        for _ in range(50):
            if best[0] <= 0.5:
                break
            scale = (low + high) / 2
            edges, counts = nearest_edges(scale)
            miss = float(counts.sum()) - wanted_total
            best = min(best, (abs(miss), edges, counts), key=lambda entry: entry[0])
            if miss > 0:
                high = scale
            else:
                low = scale
        _, edges, counts = best

        key = edges + self.latent_key_offset - 1
        thresholds = torch.where(
            edges > 0, _threshold_below_key(key.clamp(min=1), _LATENT_SHIFT), torch.zeros(())
        )
        never = self.topk_counts == 0
        if never.any():
            quiet_floor = thresholds[~never].median() if (~never).any() else torch.tensor(0.0)
            thresholds = torch.where(never, self.max_pre.clamp(min=quiet_floor), thresholds)
            counts = torch.where(never, 0, counts)
        return thresholds, float(counts.sum()) / self.n_tokens


def _below_edge(below: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Values strictly below each row's edge: ``below[j, e - 1]``, or 0 for edge 0."""
    gathered = below.gather(1, (edges - 1).clamp(min=0)[:, None]).squeeze(1).long()
    return torch.where(edges > 0, gathered, 0)
