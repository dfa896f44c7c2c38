"""``layerflow compose``: a foreground over a background -> a sample folder (:mod:`layerflow.tools.compose`)."""

from __future__ import annotations

import argparse

from layerflow.cli.arguments import add_debug_option, command_parser, folder_argument
from layerflow.cli.exits import TOOL_ERRORS, run_command

COMPOSE_STAGES = {"read": "reading layers", "write": "writing files", "score": "scoring"}  # compose's on_stage


def frame_size(text: str) -> tuple[int, int]:
    """``--size WIDTHxHEIGHT`` -> (height, width); the old HEIGHTxWIDTH form is refused (one line)."""
    from layerflow.tools.compose import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run_command(lambda: run(args), user_errors=TOOL_ERRORS, prefix="layerflow compose: error", debug=args.debug)


def parse_args(argv: list[str]) -> argparse.Namespace:
    from layerflow.config import ALPHA_MODES, ALPHA_VIDEOS
    from layerflow.io.writer import MASTER_CHOICES

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
    parser.add_argument("--output", required=True, type=folder_argument, metavar="DIR", help="the new sample folder")
    parser.add_argument(
        "--frames", type=int, help="frames, taken one for one from frame 0 (default: all of --fg, at most 64)"
    )
    parser.add_argument(
        "--size", type=frame_size, default=(480, 720), metavar="WxH", help="frame size, WIDTHxHEIGHT (default 720x480)"
    )
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--alpha-mode", choices=ALPHA_MODES, default="straight", help="RGBA exports to write")
    parser.add_argument(
        "--alpha-video",
        choices=ALPHA_VIDEOS,
        default="prores",
        help="the RGBA video: ProRes 4444 .mov, VP9 .webm, both",
    )
    parser.add_argument(
        "--blend-space", choices=("display", "linear"), default="display", help="blend sRGB values or linear light"
    )
    parser.add_argument("--crf", type=int, default=25, help="H.264 quality of the layer videos (0 lossless .. 51)")
    parser.add_argument(
        "--master", choices=MASTER_CHOICES, default="none", help="also write each layer as PNGs, FFV1 or ProRes"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (shown on a terminal only)")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    args.command = ["layerflow", "compose", *argv]  # recorded in meta.json
    return args


def run(args: argparse.Namespace) -> int:
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
            command=args.command,
            blend_space=args.blend_space,
            on_stage=(lambda name: bar.stage(COMPOSE_STAGES[name])) if bar else None,
        )
    finally:
        if bar:
            bar.close()
    print(f"wrote {folder}")
    return 0
