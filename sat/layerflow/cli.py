"""``sample_video.py``: run a LayerFlow task from YAML configs, prompt files and given-layer videos.

Examples::

    python sat/sample_video.py --base configs/model.yaml configs/tasks/gen_rgba.yaml \\
        --prompt fg=prompts/fg.txt --prompt bg=prompts/bg.txt --prompt blend=prompts/blend.txt

    torchrun --nproc_per_node=8 sat/sample_video.py --base configs/model.yaml \\
        configs/tasks/seg_rgb.yaml --manifest jobs.jsonl --output outputs/seg

Exit status: 0 when every sample succeeded (or was already complete), 1 when some failed,
2 for a usage, configuration or input error (one line on stderr, found before any model loads
where possible; --validate-only stops there), 3 for an internal error (rerun with --debug for the
traceback) or, under torchrun, a video partner that died or hung, 130 when interrupted with
Ctrl-C and 143 when stopped with SIGTERM (nothing half-written is left).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from layerflow.arguments import OneLineParser
from layerflow.batch.manifest import ManifestError, Sample, samples_from_manifest, samples_from_prompt_files
from layerflow.config import ConfigError, LayerFlowConfig, load_config
from layerflow.io.atomic import NotWritableError
from layerflow.io.output_folder import OutputFolder, OutputFolderError, check_output_path
from layerflow.io.pixels import LayerSourceError
from layerflow.models.text_encoder import TextEncoderFilesError
from layerflow.models.vae import VAECheckpointError
from layerflow.runtime import distributed, parallel
from layerflow.runtime.devices import cpu_threads, resolve_placement, resolve_speed
from layerflow.runtime.parallel.agreement import GroupLost
from layerflow.weights.checkpoint import CheckpointError
from layerflow.weights.resolve import MissingWeightsError, resolve_weights

EXIT_FAILED_SAMPLES = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

# Errors caused by what the user gave (files, keys, values, folders): one line, exit status 2.
USER_ERRORS = (
    ConfigError,
    ManifestError,
    MissingWeightsError,
    CheckpointError,
    VAECheckpointError,
    TextEncoderFilesError,
    LayerSourceError,
    OutputFolderError,
    NotWritableError,
    OSError,
)

log = logging.getLogger("layerflow")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster scheduler stopping the job), handled like Ctrl-C."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="sample_video.py",
        description="LayerFlow: layer-aware video generation (foreground, background, blend).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1],
    )
    parser.add_argument(
        "--base", nargs="+", required=True, metavar="YAML", help="config files, merged in order (later files win)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set sampling.num_steps=25 (repeatable)",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="LAYER=FILE",
        help="per-layer prompt file (fg, bg, blend); line i of each file is sample i",
    )
    parser.add_argument(
        "--prompt-dir", type=Path, metavar="DIR", help="folder with fg.txt, bg.txt (and blend.txt) prompt files"
    )
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="LAYER=PATH",
        help="given layer for conditional tasks: fg, bg or blend as an MP4 or a folder of "
        "frames (RGBA PNGs for an RGBA foreground), and mask=PATH for RGB + mask",
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        metavar="JSONL",
        help="many samples: one JSON object per line with prompts, inputs, id, seed",
    )
    parser.add_argument("--output", type=Path, metavar="DIR", help="output folder (default outputs/<task>_<variant>)")
    parser.add_argument("--seed", type=int, help="run seed (sampling.seed); each sample's seed derives from it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument(
        "--validate-only",
        action="store_true",
        help="check configs, prompts, inputs, manifest, weights and the output path, then stop before "
        "any model loads (the scripts do this in one process before starting the ranks)",
    )
    return parser.parse_args(argv)


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, path = value.partition("=")
        if not sep or not key or not path:
            raise ConfigError(f"{flag} {value!r}: expected LAYER=PATH")
        pairs[key.strip()] = path.strip()
    return pairs


def collect_samples(args: argparse.Namespace, config: LayerFlowConfig) -> list[Sample]:
    layout = config.layout
    if args.manifest:
        if args.prompt or args.prompt_dir or args.input:
            raise ConfigError("--manifest carries prompts and inputs; do not combine it with --prompt/--input")
        return samples_from_manifest(args.manifest, layout, config.sampling)
    files = {layer: Path(path) for layer, path in _pairs(args.prompt, "--prompt").items()}
    if args.prompt_dir:
        for layer in layout.prompt_layers:
            files.setdefault(layer, args.prompt_dir / f"{layer}.txt")
    if not files:
        raise ConfigError(
            f"no prompts: give --prompt LAYER=FILE for {list(layout.prompt_layers)}, --prompt-dir or --manifest"
        )
    return samples_from_prompt_files(files, _pairs(args.input, "--input"), layout)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _configure_logging(args.debug, args.no_progress)
    try:
        with _sigterm_as_interrupt():
            distributed.stop_with_launcher()
            return _end(_run(args))
    except KeyboardInterrupt as stop:
        return _end(
            EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED,
            "interrupted: stopped cleanly (unfinished samples were discarded); rerun the same command to resume",
        )
    except USER_ERRORS as error:
        if args.debug:
            logging.getLogger("layerflow").exception("details")
        return _end(EXIT_USAGE, f"error: {_one_line(error)}")
    except GroupLost as error:  # a video partner died or hung: this rank cannot go on
        return _end(EXIT_INTERNAL, f"error: {error}", partner_lost=True)
    except Exception as error:
        if args.debug:
            raise
        log.error("internal error", exc_info=True, extra={"file_only": True})  # the traceback, in the rank log
        where = f"rank {distributed.rank()}: " if distributed.world_size() > 1 else ""
        return _end(
            EXIT_INTERNAL,
            f"error: {where}internal error ({type(error).__name__}: {_one_line(error)}); "
            f"rerun with --debug for the traceback",
        )


def _end(code: int, line: str = "", **facts) -> int:
    """The run's last word: ``line`` on stderr, or under ``layerflow.launch`` to the launcher, which
    prints one line for all ranks (:func:`layerflow.runtime.distributed.tell_launcher`)."""
    told = distributed.tell_launcher(exit=code, error=line, **facts)
    if line and not told:
        print(line, file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    """Validate everything, take the output folder, run this rank's samples and report."""
    overrides = list(args.set) + ([f"sampling.seed={args.seed}"] if args.seed is not None else [])
    config = load_config(args.base, overrides)
    parallel.check_layout(config, distributed.world_size())
    try:
        placement = resolve_placement(config.runtime)
        resolve_speed(config.runtime, placement, config.network.head_dim)  # a named kernel must run here
    except ValueError as error:
        raise ConfigError(str(error)) from None
    samples = collect_samples(args, config)
    output = args.output or Path("outputs") / config.layout.name
    weights = resolve_weights(config)
    check_output_path(output)

    from layerflow.batch.given import check_given_layers
    from layerflow.batch.runner import merge_failures, run_samples

    if not args.manifest and config.layout.given_layers:
        check_given_layers(samples[0], config)  # --input files are shared by every sample: a bad one stops the run
    if args.validate_only:
        world = distributed.world_size()
        print(f"ok: {len(samples)} samples of {config.layout.name} on {world} process{'es' * (world > 1)} -> {output}")
        return 0

    distributed.init_process_group()
    folder = OutputFolder(output)
    problem, cleaned = "", []
    if distributed.is_main_process():
        try:
            cleaned = folder.acquire().clean_stale()
        except OutputFolderError as error:
            problem = str(error)
    problem = distributed.share_from_main(problem)  # every rank stops if the folder is not ours to use
    if problem:
        raise OutputFolderError(problem)

    from layerflow.pipeline import InputError, LayerFlowPipeline

    try:
        with cpu_threads(config.runtime.cpu_threads):
            distributed.ensure_model_parallel()  # collective: every rank, even one with nothing left to run
            parallel.setup(config.runtime.parallel)  # collective too: the groups that share one video
            pipeline = functools.partial(LayerFlowPipeline, weights=weights)
            summary = run_samples(config, samples, output, pipeline, show_progress=not args.no_progress)
    except (*USER_ERRORS, InputError):
        if distributed.is_main_process():
            folder.discard_created()
        raise
    finally:
        folder.release()
    if cleaned:
        log.info("removed %d leftovers of interrupted runs: %s", len(cleaned), ", ".join(cleaned))
    failed_anywhere = distributed.sum_over_ranks(len(summary.failed) if parallel.current().is_leader else 0)
    if distributed.is_main_process():
        failures = merge_failures(output, distributed.world_size())
        seconds = sorted(summary.seconds.values())
        per_sample = f", {sum(seconds) / len(seconds):.1f} s per sample on rank 0" if seconds else ""
        print(
            f"rank 0: {len(summary.done)} done, {len(summary.skipped)} skipped (already complete), "
            f"{len(summary.failed)} failed{per_sample}; all ranks: {failed_anywhere} failed -> {output}"
        )
        for failure in failures:
            print(f"failed: {failure['id']}: {failure['error']}", file=sys.stderr)
    distributed.share_from_main("")  # no rank ends (and has torchrun stop the others) before rank 0 reported
    return EXIT_FAILED_SAMPLES if failed_anywhere else 0


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, OSError) and error.filename and error.strerror and text.startswith("["):
        return f"{error.filename}: {error.strerror.lower()}"  # not Python's "[Errno 2] ..." form
    return text.splitlines()[0] if text else type(error).__name__


def _for_terminal(record: logging.LogRecord) -> bool:
    """Records marked ``file_only`` (a sample's failure, shown by the progress and the summary) stay in the logs."""
    return not getattr(record, "file_only", False)


class _MessageOnly(logging.Formatter):
    """``warning: text`` on the terminal: one line per record, no traceback (those go to the rank logs)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


_TERMINAL = logging.StreamHandler()


def _configure_logging(debug: bool, no_progress: bool) -> None:
    """Warnings and errors as single lines on stderr (full detail with --debug); INFO only in the rank logs."""
    _TERMINAL.stream = sys.stderr
    _TERMINAL.setLevel(logging.DEBUG if debug else logging.WARNING)
    _TERMINAL.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s") if debug else _MessageOnly())
    if _TERMINAL not in logging.root.handlers:
        _TERMINAL.addFilter(_for_terminal)
        logging.root.addHandler(_TERMINAL)
    logging.root.setLevel(logging.WARNING)
    for noisy in ("transformers", "sat", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if no_progress or not sys.stderr.isatty():  # a bar in a log file is a stream of \r fragments
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C for the duration of the run (main thread only; restored afterwards)."""

    def stop(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
