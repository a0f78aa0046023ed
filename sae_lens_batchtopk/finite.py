"""Guards against non-finite numbers: one NaN must stop the work, never spread silently.

A single NaN activation turns every weight into NaN after one optimizer step, and a NaN SAE
"calibrates" to L0 0 and saves without complaint. These checks run where a NaN can enter or
leave: the training batch and loss (before the optimizer step), the weights before any save or
calibration. Each names where the problem is, so the user can find the bad data.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class NonFiniteError(ValueError):
    """A NaN or infinite value where the work cannot go on; nothing was written or changed."""


def count_non_finite(tensor: torch.Tensor) -> int:
    """Number of NaN or infinite entries (0 for integer tensors)."""
    if not tensor.is_floating_point():
        return 0
    return int((~torch.isfinite(tensor)).sum())


def require_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise :class:`NonFiniteError` naming every tensor of ``tensors`` with NaN or inf entries.

    ``where`` says what was being done ("saving the SAE", "calibrating"), for the message.
    """
    bad = {name: count_non_finite(tensor) for name, tensor in tensors.items()}
    bad = {name: count for name, count in bad.items() if count}
    if bad:
        listing = ", ".join(f"{name} ({count} non-finite)" for name, count in bad.items())
        raise NonFiniteError(f"{where}: non-finite values in {listing}")
