"""``layerflow export --to diffusers``: one task checkpoint -> a folder diffusers loads (LayerFlowPipeline).

  layerflow export --to diffusers gen_rgba.safetensors exported/gen_rgba --task gen --variant rgba

CKPT_OR_SAFETENSORS is a release folder (``latest`` + iteration), a ``.pt`` or a ``.safetensors`` file
(``layerflow convert``). The config is configs/model.yaml and the task's file, then any ``--base`` files
and ``--set`` overrides (the tiny built-in model: ``--base configs/tiny.yaml``); the VAE and T5 come from
its files as for ``layerflow generate``. Needs the optional extra: ``pip install '.[diffusers]'``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from layerflow.cli.arguments import add_debug_option, command_parser, folder_argument
from layerflow.cli.exits import TOOL_ERRORS, run_command
from layerflow.tasks import Task, Variant

PROG = "layerflow export"
REPO_ROOT = Path(__file__).resolve().parents[3]
CONFIGS = REPO_ROOT / "configs"
MISSING_EXTRA = "layerflow export needs the optional diffusers extra: pip install '.[diffusers]'"
DTYPES = ("float32", "bfloat16", "float16")


class ExportUnavailableError(RuntimeError):
    """diffusers or peft is not installed."""


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    summary, example = __doc__.split("\n\n")[:2]
    parser = command_parser(prog, summary, "example:\n" + example)
    parser.add_argument("--to", required=True, choices=["diffusers"], help="the format to write")
    parser.add_argument("checkpoint", type=Path, metavar="CKPT_OR_SAFETENSORS")
    parser.add_argument("output", type=folder_argument, metavar="OUT_DIR", help="a new or empty folder")
    parser.add_argument("--task", required=True, choices=[task.value for task in Task])
    parser.add_argument("--variant", required=True, choices=[variant.value for variant in Variant])
    parser.add_argument("--base", nargs="+", default=[], metavar="YAML", help="more config files, merged last")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="precision of the written weights")
    add_debug_option(parser)
    return parser.parse_args(argv)


EXTRA_PACKAGES = ("diffusers", "peft")


def run(args: argparse.Namespace) -> int:
    import torch

    from layerflow.config import load_config

    try:
        from layerflow.for_diffusers.export import export_to_diffusers
    except ImportError as error:
        if (error.name or "").split(".")[0] in EXTRA_PACKAGES:
            raise ExportUnavailableError(MISSING_EXTRA) from None
        raise

    name = f"{args.task}_{args.variant}"
    config = load_config([CONFIGS / "model.yaml", CONFIGS / "tasks" / f"{name}.yaml", *args.base], args.set)
    folder = export_to_diffusers(config, args.checkpoint, args.output, getattr(torch, args.dtype))
    print(f"wrote {folder} ({name}, {args.dtype}): load it with LayerFlowPipeline.from_pretrained")
    return 0


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = parse_args(argv, prog)
    return run_command(lambda: run(args), user_errors=TOOL_ERRORS, prefix=f"{prog}: error", debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
