"""Command-line parsing shared by every entry point: a usage error is one line and exit status 2."""

from __future__ import annotations

import argparse
from pathlib import Path

from layerflow import __version__

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``PROG: error: ... (see PROG --help)``), exit 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
