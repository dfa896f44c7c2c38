"""``layerflow convert``: a task checkpoint between the original SAT layout and safetensors.

    layerflow convert SRC model.safetensors --task gen --variant rgba
    layerflow convert model.safetensors --to-sat ckpts_2b_lora/multi-layer-generation-rgba

SRC is a checkpoint folder (``latest`` + iteration) or a ``.pt``/``.safetensors`` file. Only the
network keys are kept; the safetensors file records the task and variant so that loading it for
another task fails clearly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from layerflow.cli.arguments import add_debug_option, command_parser
from layerflow.cli.exits import TOOL_ERRORS, run_command
from layerflow.tasks import Task, Variant, get_layout
from layerflow.weights.checkpoint import (
    NETWORK_PREFIX,
    read_checkpoint,
    save_safetensors,
    save_sat_checkpoint,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = command_parser("layerflow convert", __doc__.split("\n\n")[0], "example:\n" + __doc__.split("\n\n")[1])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path, nargs="?", help="the .safetensors file to write")
    parser.add_argument("--to-sat", type=Path, metavar="DIR", help="write the original layout instead")
    parser.add_argument("--task", choices=[task.value for task in Task])
    parser.add_argument("--variant", choices=[variant.value for variant in Variant])
    parser.add_argument("--iteration", type=int, default=1, help="iteration folder name for --to-sat")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    if not args.to_sat and (args.target is None or args.target.suffix != ".safetensors"):
        parser.error("give a target ending in .safetensors, or --to-sat DIR")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: run(args), user_errors=TOOL_ERRORS, prefix="layerflow convert: error", debug=args.debug)


def run(args: argparse.Namespace) -> int:
    state, metadata = read_checkpoint(args.source)
    network = {key: value for key, value in state.items() if key.startswith(NETWORK_PREFIX)}
    if not network:
        network = {NETWORK_PREFIX + key: value for key, value in state.items()}
    if args.to_sat:
        save_sat_checkpoint(network, args.to_sat, args.iteration)
        print(f"wrote {args.to_sat} ({len(network)} tensors)")
        return 0
    task = args.task or metadata.get("layerflow_task")
    variant = args.variant or metadata.get("layerflow_variant")
    layout = get_layout(task, variant) if task and variant else None
    save_safetensors(network, args.target, layout)
    print(f"wrote {args.target} ({len(network)} tensors{', ' + layout.name if layout else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
