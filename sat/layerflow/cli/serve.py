"""``layerflow serve``: a local web page that runs the tasks and shows the layers (:mod:`layerflow.serve`).

Prints ``layerflow serve: http://HOST:PORT/`` once it listens; Ctrl-C or SIGTERM stops it (queued jobs
are dropped, the running one's unfinished folder is removed; exit status 130 or 143). A bad option,
config or output folder is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from layerflow.cli.arguments import add_debug_option, command_parser, folder_argument
from layerflow.cli.exits import run_command
from layerflow.config import ConfigError
from layerflow.io.atomic import NotWritableError
from layerflow.io.output_folder import OutputFolderError
from layerflow.weights.resolve import MissingWeightsError

USER_ERRORS = (ConfigError, OutputFolderError, NotWritableError, MissingWeightsError, ValueError, OSError)
INTERRUPTED = "layerflow serve: stopped (queued jobs dropped; the running job's unfinished folder was removed)"
MODELS = {"auto": None, "tiny": True, "checkpoint": False}


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of megabytes") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of megabytes above 0")
    return value


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return int(text)


def _steps(text: str) -> int:
    if not text.isdigit() or not 2 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer from 2 to 1000 (sampling.num_steps' range)")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a port from 0 (any free one) to 65535")
    return int(text)


def _size(text: str) -> tuple[int, int]:
    from layerflow.serve.catalog import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    from layerflow.serve.catalog import MAX_STEPS
    from layerflow.serve.server import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_UPLOAD_MB

    parser = command_parser(
        "layerflow serve",
        "A local web page: pick a task, type the prompts, upload a given layer, watch the steps, and see the "
        "foreground over a checkerboard, the alpha, the background and the blend side by side.",
        "example:\n  layerflow serve --port 0 --output outputs/page --set runtime.device=cuda\n"
        "  (then open the address it prints; without weights it runs the tiny built-in model)",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 opens it to the network)",
    )
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)")
    parser.add_argument(
        "--output",
        type=folder_argument,
        default=Path("outputs/serve"),
        metavar="DIR",
        help="everything the server writes goes here: uploads/, samples/<job>/, composes/, zips/ "
        "(default outputs/serve)",
    )
    parser.add_argument(
        "--config",
        nargs="+",
        action="extend",
        default=[],
        metavar="YAML",
        help="config files merged after each task's (e.g. configs/memory_24gb.yaml)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key of every job, e.g. --set runtime.device=cuda (repeatable)",
    )
    parser.add_argument(
        "--model",
        choices=tuple(MODELS),
        default="auto",
        help="auto (default): the release checkpoints when present, else the tiny built-in model; tiny; checkpoint",
    )
    parser.add_argument(
        "--size",
        action="append",
        type=_size,
        default=[],
        metavar="WxH",
        help="a frame size the page offers (repeatable; the first is the default; default: the config's, "
        "and twice it for the tiny model)",
    )
    parser.add_argument(
        "--max-upload-mb",
        type=_positive_number,
        default=DEFAULT_UPLOAD_MB,
        metavar="N",
        help=f"largest upload accepted, in MiB (default {DEFAULT_UPLOAD_MB})",
    )
    parser.add_argument(
        "--queue-size", type=_at_least_one, default=8, metavar="N", help="jobs that may wait (default 8)"
    )
    parser.add_argument(
        "--max-steps",
        type=_steps,
        default=MAX_STEPS,
        metavar="N",
        help=f"most sampler steps a job may ask for (default {MAX_STEPS})",
    )
    parser.add_argument(
        "--cached-models",
        type=_at_least_one,
        metavar="N",
        help="built pipelines kept between jobs (default: all 8 tasks for the tiny model, 1 otherwise)",
    )
    add_debug_option(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from layerflow.serve.server import ServeSettings, is_loopback, start

    settings = ServeSettings(
        output=args.output,
        host=args.host,
        port=args.port,
        configs=tuple(args.config),
        overrides=tuple(args.set),
        tiny=MODELS[args.model],
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        queue_size=args.queue_size,
        sizes=tuple(args.size),
        max_steps=args.max_steps,
        cached_models=args.cached_models or 0,
    )
    if not is_loopback(args.host):
        print(
            f"layerflow serve: warning: listening on {args.host}: anyone who can reach this machine can run jobs "
            f"and read {args.output}",
            file=sys.stderr,
        )
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar per job's T5 load would fill the server's terminal
    try:
        server = start(settings)
    except OSError as error:
        if isinstance(error, OutputFolderError) or error.filename:
            raise
        raise ConfigError(f"--host {args.host} --port {args.port}: cannot listen there ({error.strerror})") from None
    try:
        print(f"layerflow serve: {server.url}", flush=True)
        server.serve_forever()
    finally:
        server.server_close()
        server.app.close()
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run_command(
        lambda: run(args),
        user_errors=USER_ERRORS,
        prefix="layerflow serve: error",
        debug=args.debug,
        interrupted=INTERRUPTED,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
