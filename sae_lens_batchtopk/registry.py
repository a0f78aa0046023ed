"""Registration of this plugin's architectures in SAELens's two registries.

SAELens has no unregister and raises on duplicate names, so registration must be idempotent
(importing the package twice, or reloading it, must not fail) without ever replacing an
architecture that belongs to SAELens or to another plugin.
"""

from __future__ import annotations

from typing import Any

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

_PACKAGE = __name__.split(".")[0]


def _owned_by_us(entry: tuple[type[Any], type[Any]]) -> bool:
    return entry[0].__module__.split(".")[0] == _PACKAGE


def register_architecture(
    name: str,
    *,
    inference: tuple[type[Any], type[Any]] | None = None,
    training: tuple[type[Any], type[Any]] | None = None,
) -> None:
    """Register ``(class, config class)`` pairs under ``name``, once.

    ``inference`` goes to SAELens's inference registry, ``training`` to its training registry;
    a training-only architecture (one that exports to another architecture's inference form)
    passes ``training`` alone. A name already registered by this package is left alone; a name
    owned by anyone else is an error rather than a silent override, raised before anything is
    written so a refusal leaves both registries untouched.
    """
    pending = [
        (table, register, entry)
        for table, register, entry in (
            (SAE_CLASS_REGISTRY, register_sae_class, inference),
            (SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class, training),
        )
        if entry is not None
    ]
    for table, _, _ in pending:
        if name in table and not _owned_by_us(table[name]):
            raise ValueError(
                f"SAE architecture {name!r} is already registered by "
                f"{table[name][0].__module__}; {_PACKAGE} will not replace it"
            )
    for table, register, (cls, cfg_cls) in pending:
        if name not in table:
            register(name, cls, cfg_cls)
