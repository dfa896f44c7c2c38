"""``layerflow generate`` (``sat/sample_video.py``): run a LayerFlow task from YAML configs, prompt files
and given-layer videos.

Examples::

    python sat/sample_video.py --base configs/model.yaml configs/tasks/gen_rgba.yaml \\
        --prompt fg=prompts/fg.txt --prompt bg=prompts/bg.txt --prompt blend=prompts/blend.txt

    python sat/sample_video.py --base configs/model.yaml configs/tasks/gen_rgb.yaml \\
        --prompt fg="a red balloon" --prompt bg="a calm lake" --prompt blend="a red balloon over a lake"

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
import functools
import logging
import sys
from pathlib import Path

from layerflow.batch.manifest import (
    ManifestError,
    Sample,
    inline_prompt,
    prompt_source,
    samples_from_manifest,
    samples_from_prompt_files,
)
from layerflow.cli.arguments import (
    add_config_options,
    add_debug_option,
    add_seed_option,
    command_parser,
    config_overrides,
    folder_argument,
)
from layerflow.cli.exits import EXIT_FAILED_SAMPLES, run_command
from layerflow.config import ConfigError, LayerFlowConfig, load_config
from layerflow.io.atomic import NotWritableError
from layerflow.io.output_folder import OutputFolder, OutputFolderError, check_output_path
from layerflow.io.pixels import LayerSourceError
from layerflow.models.text_encoder import TextEncoderFilesError
from layerflow.runtime import distributed, parallel
from layerflow.runtime.devices import cpu_threads, resolve_placement, resolve_speed
from layerflow.runtime.parallel.agreement import GroupLost
from layerflow.weights.checkpoint import CheckpointError
from layerflow.weights.resolve import MissingWeightsError, resolve_weights
from layerflow.weights.vae import VAECheckpointError

SCRIPT_PROG = "sample_video.py"

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
INTERRUPTED = "interrupted: stopped cleanly (unfinished samples were discarded); rerun the same command to resume"


def parse_args(argv: list[str] | None = None, prog: str = SCRIPT_PROG) -> argparse.Namespace:
    """Parse the options; ``prog`` is the command the user typed (``layerflow generate`` or the script)."""
    parser = command_parser(
        prog,
        "LayerFlow: layer-aware video generation (foreground, background, blend).",
        examples_for(prog),
    )
    add_config_options(parser)
    parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="LAYER=FILE|TEXT",
        help="a layer's prompts (fg, bg, blend): a file when that path exists (line i is sample i), else the "
        "prompt text itself, used for every sample; a file name that does not exist (e.g. ends in .txt) is refused",
    )
    parser.add_argument(
        "--prompt-text",
        action="append",
        default=[],
        metavar="LAYER=TEXT",
        help="a layer's prompt as text, never read as a file (repeatable)",
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
    parser.add_argument(
        "--output", type=folder_argument, metavar="DIR", help="output folder (default outputs/<task>_<variant>)"
    )
    add_seed_option(parser)
    parser.add_argument(
        "--redo-changed",
        action="store_true",
        help="make again the finished samples in --output that were made with other settings or inputs "
        "(without it such a run stops before any model loads)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_debug_option(parser)
    parser.add_argument(
        "--validate-only",
        action="store_true",
        help="check configs, prompts, inputs, manifest, weights and the output path, then stop before "
        "any model loads (the scripts do this in one process before starting the ranks)",
    )
    return parser.parse_args(argv)


def examples_for(prog: str) -> str:
    """The examples of the module docstring, written with the command the user typed."""
    examples = __doc__.split("Examples::", 1)[1]
    return examples if prog == SCRIPT_PROG else examples.replace(f"python sat/{SCRIPT_PROG}", prog)


def _pairs(values: list[str], flag: str, form: str = "LAYER=PATH") -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, path = value.partition("=")
        if not sep or not key or not path:
            raise ConfigError(f"{flag} {value!r}: expected {form}")
        pairs[key.strip()] = path.strip()
    return pairs


def collect_samples(args: argparse.Namespace, config: LayerFlowConfig) -> list[Sample]:
    layout = config.layout
    if args.manifest:
        if args.prompt or args.prompt_text or args.prompt_dir or args.input:
            raise ConfigError("--manifest carries prompts and inputs; do not combine it with --prompt/--input")
        return samples_from_manifest(args.manifest, layout, config.sampling)
    files = {
        layer: prompt_source(layer, value)
        for layer, value in _pairs(args.prompt, "--prompt", "LAYER=FILE or LAYER=TEXT").items()
    }
    for layer, text in _pairs(args.prompt_text, "--prompt-text", "LAYER=TEXT").items():
        if layer in files:
            raise ConfigError(f"--prompt-text {layer}: the {layer} prompt is given twice (--prompt and --prompt-text)")
        files[layer] = inline_prompt(layer, text)
    if args.prompt_dir:
        for layer in layout.prompt_layers:
            files.setdefault(layer, args.prompt_dir / f"{layer}.txt")
    if not files:
        raise ConfigError(
            f"no prompts: give --prompt LAYER=FILE|TEXT for {list(layout.prompt_layers)}, --prompt-dir or --manifest"
        )
    return samples_from_prompt_files(files, _pairs(args.input, "--input"), layout)


def main(argv: list[str] | None = None, prog: str = SCRIPT_PROG) -> int:
    args = parse_args(argv, prog)
    _configure_logging(args.debug, args.no_progress)
    try:
        return run_command(
            lambda: _run(args),
            user_errors=USER_ERRORS,
            debug=args.debug,
            interrupted=INTERRUPTED,
            partner_lost=(GroupLost,),
            log_traceback=True,
        )
    finally:
        distributed.detach_rank_log()  # the next run in this process (the demo's next config) logs afresh


def _run(args: argparse.Namespace) -> int:
    """Validate everything, take the output folder, run this rank's samples and report."""
    config = load_config(args.base, config_overrides(args))
    parallel.check_layout(config, distributed.world_size())
    try:
        placement = resolve_placement(config.runtime)
        speed = resolve_speed(config.runtime, placement, config.network.head_dim)  # a named kernel must run here
    except ValueError as error:
        raise ConfigError(str(error)) from None
    samples = collect_samples(args, config)
    output = args.output or Path("outputs") / config.layout.name
    weights = resolve_weights(config)
    check_output_path(output)

    from layerflow.batch.given import check_given_layers
    from layerflow.batch.runner import merge_failures, run_samples

    checked: set = set()  # given-layer files checked so far: each is checked, and warned about, once
    if not args.manifest and config.layout.given_layers:
        # --input files are shared by every sample: a bad one stops the run
        check_given_layers(samples[0], config, checked)
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
            pipeline = functools.partial(LayerFlowPipeline, placement=placement, weights=weights, speed=speed)
            summary = run_samples(
                config,
                samples,
                output,
                pipeline,
                show_progress=not args.no_progress,
                checked=checked,
                weights=weights,
                redo_changed=args.redo_changed,
            )
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


if __name__ == "__main__":
    sys.exit(main())
