"""The ``layerflow`` command: every tool of the project as one command with subcommands.

    layerflow generate ...     run a task (exactly ``python sat/sample_video.py ...``)
    layerflow convert ...      convert a task checkpoint between the release layout and safetensors
    layerflow demo [DIR]       all tasks with the tiny built-in model on CPU
    layerflow compose ...      a foreground over a background -> blend MP4 and layer files
    layerflow score DIR...     layer consistency of sample folders -> scores.json and a table
    layerflow inspect DIR      what made a sample folder and the command that makes it again
    layerflow serve            a local web page: run the tasks, see and download the layers

``layerflow SUBCOMMAND --help`` shows each one's options and an example; ``layerflow --version``
the version. Errors are one line on stderr with exit status 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from layerflow.cli.arguments import version_line
from layerflow.cli.exits import EXIT_USAGE


def _subcommand(name: str) -> Callable[[list[str]], int]:
    """``layerflow.cli.<name>.main``, imported when it runs (``layerflow --help`` loads no model code)."""

    def run(argv: list[str]) -> int:
        main = importlib.import_module(f"layerflow.cli.{name}").main
        # generate is also sat/sample_video.py: its help and errors name the command typed
        return main(argv, prog="layerflow generate") if name == "generate" else main(argv)

    return run


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    name: _subcommand(name) for name in ("generate", "convert", "demo", "compose", "score", "inspect", "serve")
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else EXIT_USAGE
    if argv[0] == "--version":
        print(version_line())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(
            f"layerflow: error: unknown subcommand {name!r}; expected one of {', '.join(SUBCOMMANDS)} "
            f"(see layerflow --help)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        return SUBCOMMANDS[name](rest)
    except SystemExit as stop:  # argparse after --help or a usage error
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE if stop.code else 0


if __name__ == "__main__":
    sys.exit(main())
