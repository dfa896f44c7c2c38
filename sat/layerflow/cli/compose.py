"""``layerflow compose``: a foreground over a background -> a sample folder (:mod:`layerflow.tools.compose`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from layerflow.cli.arguments import add_debug_option, command_parser
from layerflow.cli.exits import TOOL_ERRORS, run_command


def frame_size(text: str) -> tuple[int, int]:
    """``HEIGHTxWIDTH`` -> (height, width)."""
    height, sep, width = text.lower().partition("x")
    if not sep or not height.isdigit() or not width.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH, e.g. 480x720")
    return int(height), int(width)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run_command(lambda: run(args), user_errors=TOOL_ERRORS, prefix="layerflow compose: error", debug=args.debug)


def parse_args(argv: list[str]) -> argparse.Namespace:
    from layerflow.config import ALPHA_MODES

    parser = command_parser(
        "layerflow compose",
        "Composite a foreground over a background into a sample folder (blend.mp4, the "
        "layer videos, RGBA exports, preview, contact sheet, scores).",
        "example:\n  layerflow compose --fg outputs/gen/0000-abc --bg beach.mp4 --output outputs/beach",
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
    parser.add_argument(
        "--size", type=frame_size, default=(480, 720), metavar="HxW", help="frame size (default 480x720)"
    )
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--alpha-mode", choices=ALPHA_MODES, default="straight", help="RGBA exports to write")
    parser.add_argument("--alpha-video", choices=("prores", "vp9", "none"), default="prores")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    args.command = ["layerflow", "compose", *argv]  # recorded in meta.json
    return args


def run(args: argparse.Namespace) -> int:
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
        command=args.command,
    )
    print(f"wrote {folder}")
    return 0
