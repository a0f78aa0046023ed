"""One way to write a file: into a temporary sibling, then renamed onto its name.

A crash, an interruption or a full disk mid-write then leaves the previous file (or none),
never a truncated one that a later run would trust: a half-written checkpoint, activation
cache or report. Every writer in the package goes through :func:`write_atomically`.
"""

from __future__ import annotations

import json
import os
import shutil
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


def write_folder_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(temporary_folder)`` beside ``path``, then move its files into ``path``.

    A new ``path`` appears complete or not at all (one rename). Into an existing folder each
    written file is renamed over its old version, so every file is whole, and other files
    there are kept. For writers that produce several files (SAELens's ``save_model``, trainer
    state) and cannot be pointed at :func:`write_atomically` one file at a time.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(temporary)
        if not path.exists():
            os.replace(temporary, path)
            return
        for entry in temporary.iterdir():
            if entry.is_dir():
                raise IsADirectoryError(
                    f"{entry.name}: only files can be moved into the existing folder {path}"
                )
            os.replace(entry, path / entry.name)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


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
