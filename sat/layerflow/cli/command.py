"""The ``layerflow`` command: every tool of the project as one command with subcommands.

    layerflow generate ...     run a task (exactly ``python sat/sample_video.py ...``)
    layerflow convert ...      convert a task checkpoint (``python -m layerflow.convert``)
    layerflow demo [DIR]       all tasks with the tiny built-in model on CPU
    layerflow compose ...      a foreground over a background -> blend MP4 and layer files
    layerflow score DIR...     layer consistency of sample folders -> scores.json and a table
    layerflow inspect DIR      what made a sample folder and the command that makes it again

``layerflow SUBCOMMAND --help`` shows each one's options and an example. Errors are one line
on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from layerflow.cli.arguments import OneLineParser

EXIT_USAGE = 2


def _parser(name: str, description: str, example: str) -> OneLineParser:
    return OneLineParser(
        prog=f"layerflow {name}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"example:\n  {example}",
    )


def _size(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    if not sep or not height.isdigit() or not width.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH, e.g. 480x720")
    return int(height), int(width)


def run_generate(argv: list[str]) -> int:
    from layerflow.cli.generate import main

    return main(argv)


def run_convert(argv: list[str]) -> int:
    from layerflow.cli.convert import main

    return main(argv)


def run_demo(argv: list[str]) -> int:
    parser = _parser(
        "demo",
        "All four tasks in both variants with the tiny built-in model on CPU (no weights).",
        "layerflow demo outputs/demo gen_rgba fg2bg_rgba",
    )
    parser.add_argument("output", nargs="?", type=Path, default=Path("outputs/demo"), help="output folder")
    parser.add_argument("configs", nargs="*", metavar="CONFIG", help="only these, e.g. gen_rgba (default: all 8)")
    args = parser.parse_args(argv)
    from layerflow.cli.demo import run_demo as demo

    return demo(args.output, args.configs or None)


def run_compose(argv: list[str]) -> int:
    from layerflow.config import ALPHA_MODES

    parser = _parser(
        "compose",
        "Composite a foreground over a background into a sample folder (blend.mp4, the "
        "layer videos, RGBA exports, preview, contact sheet, scores).",
        "layerflow compose --fg outputs/gen/0000-abc --bg beach.mp4 --output outputs/beach",
    )
    parser.add_argument(
        "--fg",
        required=True,
        metavar="PATH",
        help="RGBA PNG folder, alpha video (ProRes 4444, VP9), RGB frames/video with --mask, or a sample folder",
    )
    parser.add_argument("--mask", metavar="PATH", help="matte video or frame folder for an RGB --fg")
    parser.add_argument(
        "--bg",
        required=True,
        metavar="PATH|COLOUR",
        help="video, frame folder, still image, sample folder or a colour ('#204080', 'white')",
    )
    parser.add_argument("--output", required=True, type=Path, metavar="DIR", help="the new sample folder")
    parser.add_argument("--frames", type=int, default=16, help="frames (picked from the first 64 as in sampling)")
    parser.add_argument("--size", type=_size, default=(480, 720), metavar="HxW", help="frame size (default 480x720)")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--alpha-mode", choices=ALPHA_MODES, default="straight", help="RGBA exports to write")
    parser.add_argument("--alpha-video", choices=("prores", "vp9", "none"), default="prores")
    args = parser.parse_args(argv)
    from layerflow.config import OutputSection
    from layerflow.tools.compose import compose

    settings = OutputSection(fps=args.fps, alpha_video=args.alpha_video, alpha_mode=args.alpha_mode)
    folder = compose(
        args.fg,
        args.bg,
        args.output,
        mask=args.mask,
        num_frames=args.frames,
        size=args.size,
        settings=settings,
        command=["layerflow", "compose", *argv],
    )
    print(f"wrote {folder}")
    return 0


def run_score(argv: list[str]) -> int:
    parser = _parser(
        "score",
        "Layer consistency of RGBA sample folders: PSNR/SSIM of the blend against "
        "a*fg + (1-a)*bg (whole frame and alpha edge band) and alpha temporal change. Writes "
        "scores.json into each folder and prints a table.",
        "layerflow score outputs/demo/gen_rgba outputs/demo/seg_rgba",
    )
    parser.add_argument("folders", nargs="+", type=Path, metavar="SAMPLE_DIR")
    args = parser.parse_args(argv)
    from layerflow.io.sample_files import read_meta
    from layerflow.scores import format_table, score_folder, write_scores

    for folder in args.folders:
        read_meta(folder)  # every folder must be a sample folder before anything is written
    results = [(folder, score_folder(folder)) for folder in args.folders]
    for folder, scores in results:
        write_scores(folder, scores)
    print(format_table([(str(folder), scores) for folder, scores in results]))
    return 0


def run_inspect(argv: list[str]) -> int:
    from layerflow.tools.inspect_sample import DEFAULT_REPRODUCE_OUTPUT

    parser = _parser(
        "inspect",
        "Prompts, task, seed, checkpoint, given-layer sources and scores of a sample "
        "folder, and the shell command that generates it again (identical frames).",
        "layerflow inspect outputs/demo/gen_rgba",
    )
    parser.add_argument("folder", type=Path, metavar="SAMPLE_DIR")
    parser.add_argument(
        "--output",
        default=DEFAULT_REPRODUCE_OUTPUT,
        metavar="DIR",
        help=f"where the printed command writes (default {DEFAULT_REPRODUCE_OUTPUT})",
    )
    args = parser.parse_args(argv)
    from layerflow.tools.inspect_sample import describe

    print(describe(args.folder, args.output))
    return 0


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "generate": run_generate,
    "convert": run_convert,
    "demo": run_demo,
    "compose": run_compose,
    "score": run_score,
    "inspect": run_inspect,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else EXIT_USAGE
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
    except (ValueError, OSError, RuntimeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"layerflow {name}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
