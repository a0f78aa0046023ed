"""Reconstruction and sparsity statistics of any SAE on held-out activation batches.

SAELens's ``run_evals`` needs the language model and reports L0 as a mean; calibration and the
benchmarks also need the *distribution* of per-token L0 (BatchTopK's adaptive allocation) and
normalized MSE on exactly the same cached tokens for every architecture, so this works from
activation batches alone and calls only ``encode`` and ``decode``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from sae_lens.saes.sae import SAE

from sae_lens_batchtopk.calibration import (
    CalibrationMethod,
    CalibrationResult,
    calibrate_thresholds,
)
from sae_lens_batchtopk.distributed import DistributedBatch
from sae_lens_batchtopk.saes.calibrated_batchtopk_sae import CalibratedBatchTopKSAE


class Autoencoder(Protocol):
    """What evaluation reads: an SAE, or a view of one that encodes another way."""

    @property
    def cfg(self) -> Any: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class HeldoutPass:
    """What one encode/decode pass over held-out batches measured; statistics derive from it.

    Keeping the per-token L0 lets reports plot its histogram without encoding again.
    """

    l0_per_token: torch.Tensor
    squared_error: float
    variance: float
    fired: torch.Tensor

    def stats(self, target_l0: float | None = None) -> dict[str, float]:
        """L0 mean and percentiles, normalized MSE, explained variance, dead fraction.

        Normalized MSE is ``Σ||x - x̂||² / Σ||x - mean(x)||²`` with the mean taken per batch
        (the error of predicting the batch mean), so it is 1 for an SAE that only learned the
        mean. ``dead_fraction`` is the share of latents that never fired on these tokens.
        """
        l0 = self.l0_per_token.double()
        p5, p50, p95 = torch.quantile(l0, torch.tensor([0.05, 0.5, 0.95], dtype=torch.double))
        nmse = self.squared_error / self.variance if self.variance > 0 else float("nan")
        stats = {
            "l0_mean": float(l0.mean()),
            "l0_p5": float(p5),
            "l0_p50": float(p50),
            "l0_p95": float(p95),
            "nmse": nmse,
            "explained_variance": 1.0 - nmse,
            "dead_fraction": float((~self.fired).float().mean()),
            "n_tokens": float(l0.numel()),
        }
        if target_l0 is not None:
            stats["l0_deviation"] = (stats["l0_mean"] - target_l0) / target_l0
        return stats

    def merged(self, distributed: DistributedBatch) -> HeldoutPass:
        """The pass over every process's batches: token L0s in rank order, sums, any-fired."""
        l0 = torch.cat(distributed.gathered_objects(self.l0_per_token))
        sums = distributed.summed(
            torch.tensor([self.squared_error, self.variance], dtype=torch.float64)
        )
        fired = distributed.summed(self.fired.long()) > 0
        return HeldoutPass(l0, float(sums[0]), float(sums[1]), fired)


@torch.no_grad()
def heldout_pass(
    sae: Autoencoder,
    batches: Iterable[torch.Tensor],
    distributed: DistributedBatch | None = None,
) -> HeldoutPass:
    """Encode and decode every batch as given (which matters for batch-top-k modes).

    With ``distributed`` each process passes its own batches and gets the pass over all of
    them; batch-top-k modes then select within each process's batches.
    """
    l0_per_token: list[torch.Tensor] = []
    squared_error = 0.0
    variance = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for batch in batches:
        x = batch.reshape(-1, batch.shape[-1]).to(sae.device, sae.dtype)
        codes = sae.encode(x)
        recon = sae.decode(codes)
        active = codes != 0
        l0_per_token.append(active.sum(-1).cpu())
        fired |= active.any(0).cpu()
        squared_error += float((recon - x).double().pow(2).sum())
        variance += float((x - x.mean(0)).double().pow(2).sum())
    if not l0_per_token:
        raise ValueError("no activation batches to evaluate")
    local = HeldoutPass(torch.cat(l0_per_token), squared_error, variance, fired)
    return local if distributed is None else local.merged(distributed)


def reconstruction_stats(
    sae: Autoencoder,
    batches: Iterable[torch.Tensor],
    *,
    target_l0: float | None = None,
    distributed: DistributedBatch | None = None,
) -> dict[str, float]:
    """:meth:`HeldoutPass.stats` of one pass of ``sae`` over ``batches``."""
    return heldout_pass(sae, batches, distributed).stats(target_l0)


def calibrate_with_report(
    sae: SAE[Any],
    calibration_batches: Iterable[torch.Tensor],
    heldout_batches: list[torch.Tensor],
    *,
    method: CalibrationMethod = "l0",
    target_l0: float | None = None,
    n_tokens: int | None = None,
    show_progress: bool = False,
    distributed: DistributedBatch | None = None,
) -> tuple[CalibrationResult, dict[str, dict[str, float]]]:
    """Calibrate, and measure held-out L0 and NMSE before and after, in both encode modes.

    ``heldout_batches`` must be disjoint from the calibration tokens: the report exists to show
    that the calibrated L0 holds on tokens the thresholds were not fitted to. With
    ``distributed`` every process passes its own batches and ``n_tokens`` share
    (:func:`calibrate_thresholds`), and the report covers every process's held-out tokens.
    """
    before = CalibratedBatchTopKSAE.from_sae(sae)
    target = target_l0 if target_l0 is not None else before.cfg.k
    report = {
        "threshold_before": reconstruction_stats(
            before, heldout_batches, target_l0=target, distributed=distributed
        ),
        "batch_topk": reconstruction_stats(
            before.batch_topk_view(), heldout_batches, target_l0=target, distributed=distributed
        ),
    }
    result = calibrate_thresholds(
        sae,
        calibration_batches,
        method=method,
        target_l0=target_l0,
        n_tokens=n_tokens,
        show_progress=show_progress,
        distributed=distributed,
    )
    after = CalibratedBatchTopKSAE.from_sae(sae)
    report["threshold_after"] = reconstruction_stats(
        after, heldout_batches, target_l0=target, distributed=distributed
    )
    return result, report
