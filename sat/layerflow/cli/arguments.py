"""Command-line parsing shared by every entry point: the config options, written once, and one-line usage errors.

``--base a.yaml b.yaml`` (config files merged in order) and ``--set section.key=value`` (repeatable)
describe a run's config; ``--seed N`` is ``--set sampling.seed=N``; ``--debug`` shows tracebacks.
:func:`config_overrides` turns the parsed options into the overrides :func:`layerflow.config.load_config`
takes. A usage error is one line (``PROG: error: ... (see PROG --help)``) and exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerflow import __version__
from layerflow.cli.exits import EXIT_USAGE


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``PROG: error: ... (see PROG --help)``), exit 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def command_parser(prog: str, description: str, epilog: str) -> OneLineParser:
    """The parser of one command: its name, what it does and an example (shown as written)."""
    parser = OneLineParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog
    )
    add_version(parser)
    return parser


def add_config_options(
    parser: argparse.ArgumentParser,
    base_help: str = "config files, merged in order (later files win)",
    set_example: str = "sampling.num_steps=25",
) -> None:
    """``--base YAML...`` (required) and ``--set KEY=VALUE`` (repeatable)."""
    parser.add_argument("--base", nargs="+", required=True, metavar="YAML", help=base_help)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. --set {set_example} (repeatable)",
    )


def add_seed_option(parser: argparse.ArgumentParser) -> None:
    """``--seed N``: the run seed, the same as ``--set sampling.seed=N``."""
    parser.add_argument("--seed", type=int, help="run seed (sampling.seed); each sample's seed derives from it")


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides of parsed options, then ``--seed`` as ``sampling.seed`` (so it wins)."""
    seed = getattr(args, "seed", None)
    return list(args.set) + ([f"sampling.seed={seed}"] if seed is not None else [])


def folder_argument(text: str) -> Path:
    """An output folder option: an empty value is refused, not taken as the current folder
    (``Path('')`` is ``.``), so that ``--output "$UNSET_VARIABLE"`` cannot write into the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path; give a folder ('.' for the current folder)")
    return Path(text)


def version_line() -> str:
    """What ``--version`` prints."""
    return f"layerflow {__version__}"


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: print :func:`version_line` and exit 0."""
    parser.add_argument("--version", action="version", version=version_line())
