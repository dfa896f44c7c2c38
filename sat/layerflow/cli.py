"""``sample_video.py``: run a LayerFlow task from YAML configs, prompt files and given-layer videos.

Examples::

    python sat/sample_video.py --base configs/model_rgba.yaml configs/tasks/gen_rgba.yaml \\
        --prompt fg=prompts/fg.txt --prompt bg=prompts/bg.txt --prompt blend=prompts/blend.txt

    torchrun --nproc_per_node=8 sat/sample_video.py --base configs/model_rgb.yaml \\
        configs/tasks/seg_rgb.yaml --manifest jobs.jsonl --output outputs/seg

Exit status: 0 when every sample succeeded (or was already complete), 1 when some failed,
2 for a usage or configuration error (one line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import distributed, parallel
from .batch import ManifestError, Sample, samples_from_manifest, samples_from_prompt_files
from .checkpoint import CheckpointError
from .config import ConfigError, LayerFlowConfig, load_config
from .weights import MissingWeightsError, check_weights, prepare_random_weights

EXIT_FAILED_SAMPLES = 1
EXIT_USAGE = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sample_video.py",
        description="LayerFlow: layer-aware video generation (foreground, background, blend).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1],
    )
    parser.add_argument("--base", nargs="+", required=True, metavar="YAML",
                        help="config files, merged in order (later files win)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set sampling.num_steps=25 (repeatable)")
    parser.add_argument("--prompt", action="append", default=[], metavar="LAYER=FILE",
                        help="per-layer prompt file (fg, bg, blend); line i of each file is sample i")
    parser.add_argument("--prompt-dir", type=Path, metavar="DIR",
                        help="folder with fg.txt, bg.txt (and blend.txt) prompt files")
    parser.add_argument("--input", action="append", default=[], metavar="LAYER=PATH",
                        help="given layer for conditional tasks: fg, bg or blend as an MP4 or a folder of "
                             "frames (RGBA PNGs for an RGBA foreground), and mask=PATH for RGB + mask")
    parser.add_argument("--manifest", type=Path, metavar="JSONL",
                        help="many samples: one JSON object per line with prompts, inputs, id, seed")
    parser.add_argument("--output", type=Path, metavar="DIR", help="output folder (default outputs/<task>_<variant>)")
    parser.add_argument("--seed", type=int, help="run seed (sampling.seed); each sample's seed derives from it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
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
        return samples_from_manifest(args.manifest, layout)
    files = {layer: Path(path) for layer, path in _pairs(args.prompt, "--prompt").items()}
    if args.prompt_dir:
        for layer in layout.prompt_layers:
            files.setdefault(layer, args.prompt_dir / f"{layer}.txt")
    if not files:
        raise ConfigError(f"no prompts: give --prompt LAYER=FILE for {list(layout.prompt_layers)}, "
                          f"--prompt-dir or --manifest")
    return samples_from_prompt_files(files, _pairs(args.input, "--input"), layout)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for handler in logging.root.handlers:
        handler.setLevel(logging.WARNING)  # INFO goes to the per-rank log files only
    try:
        overrides = list(args.set) + ([f"sampling.seed={args.seed}"] if args.seed is not None else [])
        config = load_config(args.base, overrides)
        parallel.check_layout(config, distributed.world_size())
        samples = collect_samples(args, config)
        output = args.output or Path("outputs") / config.layout.name
        if config.model.weights == "random":
            config = prepare_random_weights(config)
        else:
            check_weights(config)
    except (ConfigError, ManifestError, MissingWeightsError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE

    from .pipeline import LayerFlowPipeline
    from .runner import merge_failures, run_samples

    try:
        distributed.ensure_model_parallel()  # collective: every rank, even one with nothing left to run
        parallel.setup(config.runtime.parallel)  # collective too: the groups that share one video
        summary = run_samples(config, samples, output, LayerFlowPipeline, show_progress=not args.no_progress)
    except (CheckpointError, ConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    failed_anywhere = _all_ranks_failed_count(len(summary.failed) if parallel.current().is_leader else 0)
    if distributed.is_main_process():
        failures = merge_failures(output, distributed.world_size())
        seconds = sorted(summary.seconds.values())
        per_sample = f", {sum(seconds) / len(seconds):.1f} s per sample on rank 0" if seconds else ""
        print(f"rank 0: {len(summary.done)} done, {len(summary.skipped)} skipped (already complete), "
              f"{len(summary.failed)} failed{per_sample}; all ranks: {failed_anywhere} failed -> {output}")
        for failure in failures:
            print(f"failed: {failure['id']}: {failure['error']}", file=sys.stderr)
    return EXIT_FAILED_SAMPLES if failed_anywhere else 0


def _all_ranks_failed_count(local: int) -> int:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    total = torch.tensor([local], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        total = total.cuda()
    dist.all_reduce(total)
    return int(total.item())


if __name__ == "__main__":
    sys.exit(main())
