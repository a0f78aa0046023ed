"""One way to write a file: into a temporary sibling, then renamed onto its name.

A crash, an interruption or a full disk mid-write then leaves the previous file (or none),
never a truncated one that a later run would trust: a half-written checkpoint, activation
cache or report. Every writer in the package goes through :func:`write_atomically`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(temporary_path)`` next to ``path``, then rename it onto ``path``.

    The parent folder is created if needed; the temporary file is removed on any failure.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(descriptor)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """``text``, atomically."""
    write_atomically(path, lambda temporary: temporary.write_text(text))


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """A safetensors file, atomically."""
    write_atomically(
        path,
        lambda temporary: save_file(
            dict(tensors), str(temporary), metadata=dict(metadata) if metadata else None
        ),
    )
