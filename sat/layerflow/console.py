"""The ``layerflow`` command: every tool of the project as one command with subcommands.

    layerflow generate ...     run a task (exactly ``python sat/sample_video.py ...``)
    layerflow convert ...      convert a task checkpoint (``python -m layerflow.convert``)
    layerflow demo [DIR]       all tasks with the tiny built-in model on CPU
    layerflow compose ...      a foreground over a background -> blend MP4 and layer files
    layerflow score DIR...     layer consistency of sample folders -> scores.json and a table
    layerflow inspect DIR      what made a sample folder and the command that makes it again

``layerflow SUBCOMMAND --help`` shows each one's options and an example; ``layerflow --version``
the version. Errors are one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from layerflow.arguments import OneLineParser, add_version, folder_argument, version_line

EXIT_USAGE = 2
COMPOSE_STAGES = {"read": "reading layers", "write": "writing files", "score": "scoring"}  # compose's on_stage


def _parser(name: str, description: str, example: str) -> OneLineParser:
    parser = OneLineParser(
        prog=f"layerflow {name}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"example:\n  {example}",
    )
    add_version(parser)
    return parser


def _size(text: str) -> tuple[int, int]:
    """``--size WIDTHxHEIGHT`` -> (height, width); the old HEIGHTxWIDTH form is refused (one line)."""
    from layerflow.tools.compose import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run_generate(argv: list[str]) -> int:
    from layerflow.cli import main

    return main(argv, prog="layerflow generate")


def run_convert(argv: list[str]) -> int:
    from layerflow.convert import main

    return main(argv, prog="layerflow convert")


def run_demo(argv: list[str]) -> int:
    parser = _parser(
        "demo",
        "All four tasks in both variants with the tiny built-in model on CPU (no weights).",
        "layerflow demo outputs/demo gen_rgba fg2bg_rgba",
    )
    parser.add_argument("output", nargs="?", type=folder_argument, default=Path("outputs/demo"), help="output folder")
    parser.add_argument("configs", nargs="*", metavar="CONFIG", help="only these, e.g. gen_rgba (default: all 8)")
    args = parser.parse_args(argv)
    from layerflow.demo import run_demo as demo

    return demo(args.output, args.configs or None)


def run_compose(argv: list[str]) -> int:
    from layerflow.config import ALPHA_MODES
    from layerflow.io.writer import MASTER_CHOICES

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
    parser.add_argument("--output", required=True, type=folder_argument, metavar="DIR", help="the new sample folder")
    parser.add_argument(
        "--frames", type=int, help="frames, taken one for one from frame 0 (default: all of --fg, at most 64)"
    )
    parser.add_argument(
        "--size", type=_size, default=(480, 720), metavar="WxH", help="frame size, WIDTHxHEIGHT (default 720x480)"
    )
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--alpha-mode", choices=ALPHA_MODES, default="straight", help="RGBA exports to write")
    parser.add_argument("--alpha-video", choices=("prores", "vp9", "none"), default="prores")
    parser.add_argument(
        "--blend-space", choices=("display", "linear"), default="display", help="blend sRGB values or linear light"
    )
    parser.add_argument("--crf", type=int, default=25, help="H.264 quality of the layer videos (0 lossless .. 51)")
    parser.add_argument(
        "--master", choices=MASTER_CHOICES, default="none", help="also write each layer as PNGs, FFV1 or ProRes"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (shown on a terminal only)")
    args = parser.parse_args(argv)
    from layerflow.batch.progress import StageBar
    from layerflow.config import OutputSection
    from layerflow.tools.compose import compose

    settings = OutputSection(
        fps=args.fps, alpha_video=args.alpha_video, alpha_mode=args.alpha_mode, crf=args.crf, master=args.master
    )
    bar = StageBar.for_terminal(len(COMPOSE_STAGES), "compose", enabled=not args.no_progress)
    try:
        folder = compose(
            args.fg,
            args.bg,
            args.output,
            mask=args.mask,
            num_frames=args.frames,
            size=args.size,
            settings=settings,
            command=["layerflow", "compose", *argv],
            blend_space=args.blend_space,
            on_stage=(lambda name: bar.stage(COMPOSE_STAGES[name])) if bar else None,
        )
    finally:
        if bar:
            bar.close()
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (shown on a terminal only)")
    args = parser.parse_args(argv)
    from layerflow.batch.progress import StageBar
    from layerflow.io.sample_files import read_meta
    from layerflow.tools.score import format_table, score_folder, write_scores

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
    except (ValueError, OSError, RuntimeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"layerflow {name}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
