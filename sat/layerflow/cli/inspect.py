"""``layerflow inspect``: what made a sample folder, and the command that makes it again.

The description and the command come from :mod:`layerflow.tools.inspect_sample`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerflow.cli.arguments import add_debug_option, command_parser
from layerflow.cli.exits import TOOL_ERRORS, run_command


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run_command(lambda: run(args), user_errors=TOOL_ERRORS, prefix="layerflow inspect: error", debug=args.debug)


def parse_args(argv: list[str]) -> argparse.Namespace:
    from layerflow.tools.inspect_sample import DEFAULT_REPRODUCE_OUTPUT

    parser = command_parser(
        "layerflow inspect",
        "Prompts, task, seed, checkpoint, given-layer sources and scores of a sample "
        "folder, and the shell command that generates it again (identical frames).",
        "example:\n  layerflow inspect outputs/demo/gen_rgba",
    )
    parser.add_argument("folder", type=Path, metavar="SAMPLE_DIR")
    parser.add_argument(
        "--output",
        default=DEFAULT_REPRODUCE_OUTPUT,
        metavar="DIR",
        help=f"where the printed command writes (default {DEFAULT_REPRODUCE_OUTPUT})",
    )
    add_debug_option(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from layerflow.tools.inspect_sample import describe

    print(describe(args.folder, args.output))
    return 0
