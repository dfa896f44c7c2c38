"""``layerflow score``: layer consistency of sample folders -> ``scores.json`` in each and a table.

The scores are computed by :mod:`layerflow.scores`, as ``generate`` records them in ``meta.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerflow.cli.arguments import add_debug_option, command_parser
from layerflow.cli.exits import TOOL_ERRORS, run_command


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run_command(lambda: run(args), user_errors=TOOL_ERRORS, prefix="layerflow score: error", debug=args.debug)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = command_parser(
        "layerflow score",
        "Layer consistency of RGBA sample folders: PSNR/SSIM of the blend against "
        "a*fg + (1-a)*bg (whole frame and alpha edge band) and alpha temporal change. Writes "
        "scores.json into each folder and prints a table.",
        "example:\n  layerflow score outputs/demo/gen_rgba outputs/demo/seg_rgba",
    )
    parser.add_argument("folders", nargs="+", type=Path, metavar="SAMPLE_DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (shown on a terminal only)")
    add_debug_option(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from layerflow.batch.progress import StageBar
    from layerflow.io.sample_files import read_meta
    from layerflow.scores import format_table, score_folder, write_scores

    for folder in args.folders:
        read_meta(folder)  # every folder must be a sample folder before anything is written
    bar = StageBar.for_terminal(len(args.folders), "score", enabled=not args.no_progress)
    results = []
    try:
        for folder in args.folders:
            if bar:
                bar.stage(folder.name)
            results.append((folder, score_folder(folder)))
    finally:
        if bar:
            bar.close()
    for folder, scores in results:
        write_scores(folder, scores)
    print(format_table([(str(folder), scores) for folder, scores in results]))
    return 0
