"""Keep freed CPU memory for the next training step instead of returning it to the kernel.

glibc's ``malloc`` serves every block above its mmap threshold (32 MB at most) with a fresh
``mmap`` and unmaps it on ``free``. A training step allocates its large temporaries anew
every step (the encoder and decoder gradients, the aux loss's dead-column gather, the gradient
sums autograd forms), so on a CPU each of them is page-faulted in and zeroed by the kernel on
every step: adding two 576 x 16384 float32 matrices into a fresh tensor takes 20 ms, into
reused memory 3-5 ms, and at d_sae 16384 with AuxK the whole step spends 0.1-0.2 s (10-15 %)
this way. Turning ``mmap`` off for new blocks and raising the trim threshold keeps freed
blocks in the heap, where the next step's allocations of the same sizes reuse them.

It is opt-in: ``SAE_BATCHTOPK_RETAIN_FREED_MEMORY=1`` for this package's commands, or
:func:`retain_freed_cpu_memory` in a script. A heap that never unmaps also fragments: blocks of
varying sizes leave holes that a larger request cannot use, so the peak can grow well beyond
the allocator's default. Our sparse step peaked 2-12 % higher at d_sae 16384 and 23 % higher at
d_sae 65536; SAELens's dense ``batchtopk`` step at d_in 2304, d_sae 65536, which peaks at 14.4
GB, had reached 19.8 GB when the kernel killed it (24 GB machine, other jobs running).
PyTorch's CPU performance guide recommends jemalloc or tcmalloc, which reuse memory without
that cost, for the same reason. A process that preloads another allocator, or sets glibc's
malloc tunables itself, is left as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform
from functools import cache

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free memory at the heap's top beyond this is returned to the kernel; mallopt takes an int.
_TRIM_THRESHOLD_BYTES = 2**31 - 1
# Environment that means the user chose the allocator's behaviour.
_MALLOC_ENVIRONMENT = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

RETAINED = "glibc malloc: freed memory retained (mmap off, trim threshold 2 GiB)"
# Set to 1 to have this package's commands call retain_freed_cpu_memory.
RETAIN_VARIABLE = "SAE_BATCHTOPK_RETAIN_FREED_MEMORY"


@cache
def retain_freed_cpu_memory() -> str:
    """Make glibc keep freed blocks for reuse (see the module docstring); idempotent.

    Returns what the process's CPU allocator now does, for logs and benchmark reports:
    :data:`RETAINED` when this call (or an earlier one) changed it, otherwise why it was left
    as it is (not glibc, another allocator preloaded, malloc tunables set by the user).
    """
    reason = _reason_to_leave_allocator()
    if reason is not None:
        return reason
    libc = ctypes.CDLL(None)
    if not (
        libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    ):
        return "glibc malloc: unchanged (mallopt refused the settings)"
    return RETAINED


def retain_freed_cpu_memory_if_asked() -> str:
    """:func:`retain_freed_cpu_memory` when ``SAE_BATCHTOPK_RETAIN_FREED_MEMORY=1``.

    What our commands call first. Returns :func:`cpu_allocator_state`; raises ``ValueError``
    naming the variable for any value but ``0``/``1``, before any work.
    """
    value = os.environ.get(RETAIN_VARIABLE, "0")
    if value not in ("0", "1"):
        raise ValueError(
            f"{RETAIN_VARIABLE}={value!r}: set it to 1 to keep freed CPU memory for reuse"
            " (faster CPU steps, higher peak memory) or 0 (default) for glibc's defaults"
        )
    if value == "1":
        retain_freed_cpu_memory()
    return cpu_allocator_state()


def cpu_allocator_state() -> str:
    """What :func:`retain_freed_cpu_memory` did in this process, or that it was not called."""
    if retain_freed_cpu_memory.cache_info().currsize:
        return retain_freed_cpu_memory()
    return f"system default ({RETAIN_VARIABLE} not set)"


def _reason_to_leave_allocator() -> str | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"system default ({platform.system()}, not glibc)"
    preloaded = os.environ.get("LD_PRELOAD", "")
    for allocator in _OTHER_ALLOCATORS:
        if allocator in preloaded:
            return f"{allocator} (LD_PRELOAD), left as it is"
    for name in _MALLOC_ENVIRONMENT:
        if name in os.environ:
            return f"glibc malloc as set by {name}={os.environ[name]}, left as it is"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "glibc malloc as set by GLIBC_TUNABLES, left as it is"
    return None
