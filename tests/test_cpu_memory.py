"""retain_freed_cpu_memory: large blocks come from the reusable heap, only when asked for, and
the user's own allocator settings win.

Each case runs in a fresh interpreter: the setting is process-wide and must not leak into the
rest of the test session.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from sae_lens_batchtopk.cpu_memory import RETAIN_VARIABLE, RETAINED, cpu_allocator_state

_LIBC, _LIBC_VERSION = platform.libc_ver()
pytestmark = pytest.mark.skipif(
    platform.system() != "Linux"
    or _LIBC != "glibc"
    or tuple(int(part) for part in _LIBC_VERSION.split(".")[:2]) < (2, 33),
    reason="the setting applies to glibc's malloc only; the probe reads mallinfo2 (glibc 2.33)",
)

# Allocates a 64 MB tensor (above glibc's largest mmap threshold) and reports how many bytes
# glibc holds in mmapped blocks while it is alive, before and after the call under test.
_PROBE = """
import ctypes, json, sys, torch
from sae_lens_batchtopk.cpu_memory import (
    cpu_allocator_state, retain_freed_cpu_memory, retain_freed_cpu_memory_if_asked)

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mmapped_while_allocated():
    before = libc.mallinfo2().hblkhd
    block = torch.ones(16 * 2**20)
    during = libc.mallinfo2().hblkhd
    del block
    return during - before

report = {"state_before": cpu_allocator_state(), "mmapped_before": mmapped_while_allocated()}
call = retain_freed_cpu_memory_if_asked if sys.argv[1] == "asked" else retain_freed_cpu_memory
report["returned"] = call()
report["again"] = call()
report["state_after"] = cpu_allocator_state()
report["mmapped_after"] = mmapped_while_allocated()
print(json.dumps(report))
"""

_BLOCK_BYTES = 64 * 2**20


def _run_probe(call: str = "direct", **environment: str) -> dict[str, object]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MALLOC_")
        and name not in ("GLIBC_TUNABLES", "LD_PRELOAD", RETAIN_VARIABLE)
    }
    env.update(environment)
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, call], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def test_large_blocks_come_from_the_heap_once_retained() -> None:
    report = _run_probe()
    assert report["mmapped_before"] >= _BLOCK_BYTES  # glibc's default: a fresh mapping
    assert report["returned"] == report["again"] == report["state_after"] == RETAINED
    assert report["state_before"].startswith("system default")
    assert report["mmapped_after"] == 0


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("MALLOC_MMAP_MAX_", "65536", "MALLOC_MMAP_MAX_=65536"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072", "GLIBC_TUNABLES"),
    ],
)
def test_the_users_malloc_settings_are_left_as_they_are(
    variable: str, value: str, named: str
) -> None:
    report = _run_probe(**{variable: value})
    assert named in report["returned"] and "left as it is" in report["returned"]
    assert report["mmapped_after"] >= _BLOCK_BYTES  # still glibc's default behaviour


@pytest.mark.parametrize(("asked", "retained"), [({}, False), ({RETAIN_VARIABLE: "1"}, True)])
def test_our_commands_retain_freed_memory_only_when_asked(
    asked: dict[str, str], retained: bool
) -> None:
    report = _run_probe("asked", **asked)
    assert (report["returned"] == RETAINED) is retained
    assert report["returned"] == report["state_after"]
    assert (report["mmapped_after"] == 0) is retained


def test_a_bad_retain_value_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sae_lens_batchtopk.tools.cli as cli
    from sae_lens_batchtopk.tools.benchmarks.harness import machine_info

    monkeypatch.setenv(RETAIN_VARIABLE, "yes")
    assert cli.main(["eval", "no-such-folder"]) == 2
    error = capsys.readouterr().err
    assert f"{RETAIN_VARIABLE}='yes'" in error and "set it to 1" in error
    assert machine_info()["cpu_allocator"] == cpu_allocator_state()
