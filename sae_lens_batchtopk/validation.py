"""Checks of single configuration values, shared by every config, the CLI and the benchmarks.

Each check raises at construction time, before any model is loaded or any token trained on,
with a message that names the field and says how to fix it. One implementation per rule keeps
the SAE configs, the runner validation and the command-line parsers from drifting apart.
"""

from __future__ import annotations

import math
import numbers

import torch
from sae_lens.util import str_to_dtype

# Minimum statistics behind a calibrated threshold: the target quantile must rest on this many
# firing events in total (one global θ), or on this many per latent on average (per-latent θ).
MIN_EVENTS_GLOBAL = 1000
MIN_EVENTS_PER_LATENT = 10


def check_positive_int(name: str, value: object, *, allow_zero: bool = False) -> None:
    """``value`` must be an ``int`` (not a bool) and > 0 (>= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {name}={value}")


def check_finite_number(
    name: str, value: object, *, low: float | None = None, high: float | None = None
) -> None:
    """``value`` must be a finite real number in ``[low, high]`` (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {name}={value}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{name} must be in {bounds}, got {name}={value}")


def check_average_l0(name: str, value: object, d_sae: int) -> None:
    """An average number of latents per token: a number in ``(0, d_sae]``.

    ``name`` is the field being checked (``k``, ``calibration_target_l0``, ...), so the message
    points at the value the user actually wrote.
    """
    check_finite_number(name, value)
    if value <= 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be > 0 (average latents per token), got {name}={value}")
    if value > d_sae:  # type: ignore[operator]
        raise ValueError(
            f"{name} must be <= d_sae ({d_sae}), got {name}={value}; lower {name} or raise d_sae"
        )


def check_float_dtype(dtype: object) -> None:
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


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """``value`` must be one of ``choices`` (the string options typed as ``Literal``)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {name}={value!r}")


def check_token_budget(
    method: str, n_tokens: int, target_l0: float, d_sae: int, *, field: str = "n_tokens"
) -> None:
    """Refuse, before any work, a token count too small for a reliable threshold.

    ``field`` names the option the count came from (``calibration_tokens`` in a config,
    ``--tokens`` on the command line), so the message points at what to change.
    """
    check_positive_int(field, n_tokens)
    needed = min_calibration_tokens(method, target_l0, d_sae)
    if n_tokens < needed:
        reason = (
            f"{MIN_EVENTS_PER_LATENT} firings per latent on average"
            if method == "per_latent"
            else f"{MIN_EVENTS_GLOBAL} firing events"
        )
        raise ValueError(
            f"{field}={n_tokens} is too few for calibration method {method!r} at target L0"
            f" {target_l0}: a reliable threshold needs {reason}; set {field} >= {needed}"
        )


def min_calibration_tokens(method: str, target_l0: float, d_sae: int) -> int:
    """Fewest calibration tokens :func:`check_token_budget` accepts."""
    if method == "per_latent":
        return math.ceil(MIN_EVENTS_PER_LATENT * d_sae / target_l0)
    return math.ceil(MIN_EVENTS_GLOBAL / target_l0)
