"""The benchmarks' command lines, generated from their config dataclasses.

A benchmark's options are the fields of its config dataclass: simple_parsing (which SAELens
already depends on) turns each field into ``--field-name`` with the field's type, default and
docstring as help, and a ``Literal`` field into a choice, so a new option is one field, not a
field plus a parser entry plus a copy into the config. What both commands add to that lives
here: ``--quick`` (tiny settings that options given explicitly still override), finding which
options were given explicitly, validation helpers whose messages name the option at fault, and
the entry point that turns a bad setting into one ``error:`` line and exit status 2 before any
work starts.
"""

from __future__ import annotations

import itertools
import shlex
import sys
from argparse import Namespace
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, get_args

import torch
from simple_parsing import ArgumentParser, DashVariant, field

from sae_lens_batchtopk.cpu_memory import retain_freed_cpu_memory_if_asked

# Where the parsed config dataclass lands in the namespace.
CONFIG = "config"
# Where a benchmark runs: a choice on the command line; cuda is refused where it is missing.
Device = Literal["cpu", "cuda"]

Prepared = TypeVar("Prepared")


def option_name(name: str) -> str:
    """The command-line option of a config field: ``train_tokens`` -> ``--train-tokens``."""
    return "--" + name.replace("_", "-")


def one_or_more(*default: Any, **options: Any) -> Any:
    """A tuple field that takes one or more values on the command line (``--k 16 32 64``).

    simple_parsing would accept zero values, which silently means an empty tuple.
    """
    return field(default=tuple(default), nargs="+", required=False, **options)


def command_parser(
    prog: str,
    description: str,
    config_class: type,
    *,
    quick: bool = True,
    **extra_classes: type,
) -> ArgumentParser:
    """A parser with one option per field of ``config_class`` (and of each extra class).

    ``extra_classes`` map a namespace attribute to a dataclass of options that are not
    settings of one run (the quality benchmark's several ``--hook`` values). ``quick=False``
    leaves ``--quick`` out, for a command with no tiny settings (it would be a silent no-op).
    """
    parser = ArgumentParser(
        prog=prog,
        description=description,
        add_option_string_dash_variants=DashVariant.DASH,
        add_config_path_arg=False,
    )
    if quick:
        parser.add_argument(
            "--quick",
            action="store_true",
            help="tiny settings for a smoke run of a few minutes; options given explicitly"
            " still take precedence",
        )
    parser.add_arguments(config_class, dest=CONFIG)
    for dest, options_class in extra_classes.items():
        parser.add_arguments(options_class, dest=dest)
    return parser


def parse_command_line(
    build_parser: Callable[[], ArgumentParser],
    argv: Sequence[str],
    quick_settings: Callable[[Any], Mapping[str, Any]],
) -> Namespace:
    """Parse ``argv``; under ``--quick``, ``quick_settings(config)`` replace the defaults.

    Replacing defaults (rather than overwriting the parsed values) is what lets an option given
    explicitly win over ``--quick``. ``quick_settings`` sees the config parsed without them, so
    they can depend on it (the quality benchmark leaves SAELens's defaults alone under its
    ``sae-lens-defaults`` preset).
    """
    args = build_parser().parse_args(list(argv))
    if args.quick:
        # A fresh parser: simple_parsing reads the defaults when it first parses.
        parser = build_parser()
        parser.set_defaults(**{CONFIG: dict(quick_settings(getattr(args, CONFIG)))})
        args = parser.parse_args(list(argv))
    return args


def given_options(
    build_parser: Callable[[], ArgumentParser], argv: Sequence[str], fields: Iterable[str]
) -> list[str]:
    """Which of the config ``fields`` ``argv`` sets explicitly, even to their default value.

    A field left unset keeps its default, so a default replaced by a marker shows exactly
    the fields that were not given. The marker is a tuple because simple_parsing converts a
    tuple field's default with ``tuple()``, which keeps a tuple equal to itself.
    """
    unset = (object(),)
    fields = list(fields)
    parser = build_parser()
    parser.set_defaults(**{CONFIG: dict.fromkeys(fields, unset)})
    config = getattr(parser.parse_args(list(argv)), CONFIG)
    return [name for name in fields if getattr(config, name) != unset]


def require_positive(config: object, fields: Iterable[str]) -> None:
    """Refuse a zero or negative value in any of ``fields``, naming its option."""
    for name in fields:
        value = getattr(config, name)
        if value <= 0:
            raise ValueError(f"{option_name(name)} must be positive, got {value}")


def check_k(k: float, d_sae: int) -> None:
    """Batch top-k keeps k of d_sae latents per token on average: 0 < k <= d_sae."""
    if not 0 < k <= d_sae:
        raise ValueError(f"--k {k} must be in (0, --d-sae {d_sae}]")


def nested_widths(widths: Sequence[int], d_sae: int) -> list[int]:
    """A Matryoshka SAE's level widths: ``widths`` checked, ending at ``d_sae``.

    ``d_sae`` is appended when the last width is below it, as SAELens does (here without its
    warning: the option's help says so). Checked here, with the option named, rather than by
    the SAE configs at training time, after the cache has been built.
    """
    option = "--matryoshka-widths"
    if any(isinstance(width, bool) or not isinstance(width, int) for width in widths):
        raise ValueError(f"{option} must be integers, got {list(widths)}")
    if not widths or widths[0] <= 0 or any(b <= a for a, b in itertools.pairwise(widths)):
        raise ValueError(f"{option} must be positive and strictly increasing, got {list(widths)}")
    if widths[-1] > d_sae:
        raise ValueError(f"{option} {list(widths)}: the widths are prefixes of --d-sae {d_sae}")
    return list(widths) if widths[-1] == d_sae else [*widths, d_sae]


def check_device(device: str) -> None:
    """Refuse a device this machine lacks before any work."""
    if device not in get_args(Device):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")


def run_command(
    name: str,
    argv: Sequence[str] | None,
    prepare: Callable[[list[str]], Prepared],
    run: Callable[[Prepared, str], str],
) -> int:
    """The entry point of ``sae-batchtopk NAME``: prepare, then run and print what it returns.

    ``prepare(argv)`` parses and validates everything it can before any long work; a
    ``ValueError`` it raises is printed as one ``sae-batchtopk NAME: error: ...`` line and
    exits with status 2. ``run(prepared, command)`` gets the command line, which the outputs
    record.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # The runs compared in one benchmark process share the allocator setting.
        retain_freed_cpu_memory_if_asked()
        prepared = prepare(argv)
    except ValueError as error:
        print(f"sae-batchtopk {name}: error: {error}", file=sys.stderr)
        return 2
    print(run(prepared, shlex.join(["sae-batchtopk", name, *argv])))
    return 0
