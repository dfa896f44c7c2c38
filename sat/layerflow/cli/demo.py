"""``layerflow demo``: all four tasks in both variants with the tiny built-in model on CPU (no weights).

``layerflow demo OUTPUT_DIR [CONFIG...]`` (``scripts/demo.sh``) writes synthetic given-layer inputs to
``OUTPUT_DIR/inputs`` and one sample folder per configuration, ``OUTPUT_DIR/<task>_<variant>/``,
through the same command-line path a user runs (real MP4s, PNG sequences, alpha videos). A
misspelt configuration name or an output path that is a file stops it before anything is written
(one line, exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from layerflow.cli.arguments import add_debug_option, command_parser, folder_argument
from layerflow.cli.exits import EXIT_INTERRUPTED, EXIT_TERMINATED, TOOL_ERRORS, run_command
from layerflow.cli.generate import main as sample_video
from layerflow.io.synthetic import write_layered_clip
from layerflow.tasks import LAYOUTS, Layer

REPO_ROOT = Path(__file__).resolve().parents[3]
PROMPTS = {
    Layer.FG: "a red balloon drifting slowly",
    Layer.BG: "a calm lake with hills at sunrise",
    Layer.BLEND: "a red balloon drifting over a calm lake with hills at sunrise",
}


def demo_inputs(layout, inputs: dict[str, Path]) -> dict[str, str]:
    """The synthetic clip's files for the layers ``layout`` takes: RGBA PNGs where the matte is needed."""
    files = {}
    for given in layout.given_inputs:
        files[given.layer] = str(inputs["fg_rgba"] if given.needs_alpha else inputs[given.layer])
    return files


class DemoError(ValueError):
    """A demo request that cannot run: the message is one line naming what is wrong."""


def check_demo_request(output: Path, configs: list[str] | None) -> None:
    """Refuse unknown configuration names (listing the valid ones) and an output path that is not a folder."""
    names = [layout.name for layout in LAYOUTS.values()]
    unknown = [name for name in configs or () if name not in names]
    if unknown:
        raise DemoError(f"unknown config {', '.join(map(repr, unknown))}; the demo configs are {', '.join(names)}")
    for path in (output, *output.parents):
        if path.exists():
            if not path.is_dir():
                what = "is a file" if path == output else f"{path} is a file"
                raise DemoError(f"{output}: {what}, expected a folder for the demo's outputs")
            break


def run_demo(output: Path, configs: list[str] | None = None) -> int:
    output = Path(output)
    check_demo_request(output, configs)
    inputs = write_layered_clip(output / "inputs")
    status = 0
    for layout in LAYOUTS.values():
        name = layout.name
        if configs and name not in configs:
            continue
        manifest = output / "inputs" / f"{name}.jsonl"
        entry = {
            "id": name,
            "prompts": {k: PROMPTS[k] for k in layout.prompt_layers},
            "inputs": demo_inputs(layout, inputs),
            "seed": 0,
        }
        manifest.write_text(json.dumps(entry) + "\n", encoding="utf-8")
        configs_dir = REPO_ROOT / "configs"
        print(f"== {name}", flush=True)
        code = sample_video(
            [
                "--base",
                str(configs_dir / "model.yaml"),
                str(configs_dir / "tasks" / f"{name}.yaml"),
                str(configs_dir / "tiny.yaml"),
                "--manifest",
                str(manifest),
                "--output",
                str(output),
            ]
        )
        if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
            return code
        status = status or code
    return status


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = command_parser(
        "layerflow demo",
        "All four tasks in both variants with the tiny built-in model on CPU (no weights).",
        "example:\n  layerflow demo outputs/demo gen_rgba fg2bg_rgba",
    )
    parser.add_argument("output", nargs="?", type=folder_argument, default=Path("outputs/demo"), help="output folder")
    parser.add_argument("configs", nargs="*", metavar="CONFIG", help="only these, e.g. gen_rgba (default: all 8)")
    add_debug_option(parser)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run_command(
        lambda: run_demo(args.output, args.configs or None),
        user_errors=TOOL_ERRORS,
        prefix="layerflow demo: error",
        debug=args.debug,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
