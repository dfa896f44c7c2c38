"""``layerflow convert``: a task checkpoint between the original SAT layout and safetensors.

    layerflow convert SRC model.safetensors --task gen --variant rgba
    layerflow convert model.safetensors --to-sat ckpts_2b_lora/multi-layer-generation-rgba

SRC is a checkpoint folder (``latest`` + iteration) or a ``.pt``/``.safetensors`` file. Only the
network keys are kept. Both directions record the task and variant (the safetensors metadata, or
``layerflow_task``/``layerflow_variant`` beside ``module`` in the SAT file), taken from --task and
--variant, else from what SRC records, else from a release folder name such as
``multi-layer-generation-rgba``; loading the result for another task then fails clearly. An
existing target is replaced only with --force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from layerflow.cli.arguments import add_debug_option, command_parser
from layerflow.cli.exits import TOOL_ERRORS, run_command
from layerflow.tasks import Task, TaskLayout, Variant, get_layout
from layerflow.weights.checkpoint import (
    METADATA_TASK,
    METADATA_VARIANT,
    NETWORK_PREFIX,
    read_checkpoint,
    release_folder_layout,
    save_safetensors,
    save_sat_checkpoint,
)

PROG = "layerflow convert"


class ConvertError(ValueError):
    """A conversion that cannot be done as asked; one line naming the file or option."""


def target_layout(args: argparse.Namespace, metadata: dict[str, str]) -> TaskLayout | None:
    """The task and variant to record: the options, else the source's record, else its release folder name."""
    recorded = (metadata.get(METADATA_TASK), metadata.get(METADATA_VARIANT))
    if (args.task is None) != (args.variant is None):
        raise ConvertError("give --task and --variant together (the checkpoint records both)")
    if args.task:
        if all(recorded) and recorded != (args.task, args.variant):
            raise ConvertError(
                f"{args.source}: records {recorded[0]}_{recorded[1]}, not {args.task}_{args.variant} "
                "(leave --task/--variant out to keep what it records)"
            )
        return get_layout(args.task, args.variant)
    if all(recorded):
        return get_layout(*recorded)
    return release_folder_layout(args.source)


def check_target(target: Path, force: bool) -> None:
    """An existing target (a file, or a folder that is not empty) is replaced only with ``--force``."""
    if force or not target.exists():
        return
    if target.is_dir() and not any(target.iterdir()):
        return
    raise ConvertError(f"{target}: already exists (add --force to replace it)")


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    parser = command_parser(prog, __doc__.split("\n\n")[0], "example:\n" + __doc__.split("\n\n")[1].replace(PROG, prog))
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path, nargs="?", help="the .safetensors file to write")
    parser.add_argument("--to-sat", type=Path, metavar="DIR", help="write the original layout instead")
    parser.add_argument("--task", choices=[task.value for task in Task])
    parser.add_argument("--variant", choices=[variant.value for variant in Variant])
    parser.add_argument("--iteration", type=int, default=1, help="iteration folder name for --to-sat")
    parser.add_argument("--force", action="store_true", help="replace an existing target")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    if not args.to_sat and (args.target is None or args.target.suffix != ".safetensors"):
        parser.error("give a target ending in .safetensors, or --to-sat DIR")
    return args


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = parse_args(argv, prog)
    return run_command(lambda: run(args), user_errors=TOOL_ERRORS, prefix=f"{prog}: error", debug=args.debug)


def run(args: argparse.Namespace) -> int:
    target = args.to_sat or args.target
    check_target(target, args.force)
    state, metadata = read_checkpoint(args.source)
    layout = target_layout(args, metadata)
    network = {key: value for key, value in state.items() if key.startswith(NETWORK_PREFIX)}
    if not network:
        network = {NETWORK_PREFIX + key: value for key, value in state.items()}
    if args.to_sat:
        save_sat_checkpoint(network, args.to_sat, args.iteration, layout)
    else:
        save_safetensors(network, args.target, layout)
    recorded = layout.name if layout else "task and variant not recorded: give --task and --variant"
    print(f"wrote {target} ({len(network)} tensors, {recorded})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
