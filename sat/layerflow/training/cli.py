"""``train_video.py``: prepare the encoded dataset, then train a stage, from YAML configs.

Examples::

    # content LoRA of RGBA multi-layer generation, continuing the released checkpoint
    torchrun --nproc_per_node=8 sat/train_video.py --base configs/model.yaml \\
        configs/tasks/gen_rgba.yaml configs/train/content_lora.yaml \\
        --set training.manifest=data/train.jsonl --set training.save=checkpoints/gen_rgba_content

    # only encode the dataset (VAE + T5) into training.cache
    python sat/train_video.py --base ... --prepare-only

Rerunning the same command resumes from the last checkpoint in ``training.save``.
Exit status: 0 done, 2 usage, config, data or checkpoint error (one line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from layerflow.arguments import OneLineParser
from layerflow.config import ConfigError
from layerflow.io.log_file import LogFileHandler
from layerflow.runtime import distributed
from layerflow.training.cache import CacheError, prepare_cache
from layerflow.training.checkpointing import WHERE, latest_step, write_sample_config
from layerflow.training.config import TrainConfig, load_train_config
from layerflow.training.dataset import SampleError, read_manifest
from layerflow.training.params import describe_trainable
from layerflow.weights.checkpoint import CheckpointError
from layerflow.weights.resolve import MissingWeightsError, Weights, resolve_weights

EXIT_USAGE = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="train_video.py",
        description="LayerFlow training: LoRA / layer embedding / full fine-tuning on layered clips.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1],
    )
    parser.add_argument(
        "--base",
        nargs="+",
        required=True,
        metavar="YAML",
        help="config files, merged in order (later files win): model, task, training stage",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.steps=500 (repeatable)",
    )
    parser.add_argument("--prepare-only", action="store_true", help="encode the dataset into the cache and stop")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def _checked_config(args: argparse.Namespace) -> tuple[TrainConfig, Weights]:
    config = load_train_config(args.base, args.set)
    if not config.training.manifest:
        raise ConfigError("training.manifest is not set (a JSONL of layered samples; see the README, 'Training')")
    resuming = latest_step(Path(config.training.save)) is not None
    cached = resuming and Path(config.training.cache_dir / "index.json").is_file()
    return config, resolve_weights(config, check=not cached)  # builds a tiny T5, or names missing files


def _setup_logging(save: Path) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for handler in logging.root.handlers:
        handler.setLevel(logging.WARNING)
    handler = LogFileHandler(save, Path("logs") / f"rank{distributed.rank()}.log", WHERE)  # never through a link
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    package = logging.getLogger("layerflow")
    package.addHandler(handler)
    package.setLevel(logging.INFO)


def export_random_vae(config: TrainConfig, folder: Path) -> str:
    """The tiny model's seeded VAE as a ``3d-vae.pt``-style file, so the checkpoint samples like a real one."""
    import torch

    from layerflow.io.atomic import atomic_path, save_torch
    from layerflow.training.cache import build_vae

    path = folder / "random-vae.pt"
    state = build_vae(config, torch.device("cpu"), torch.float32).state_dict()
    size = sum(value.numel() * value.element_size() for value in state.values())  # for a full disk's message
    with atomic_path(path, where=WHERE, expected_bytes=size) as tmp:
        save_torch({"state_dict": state}, tmp)
    return str(path.resolve())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config, weights = _checked_config(args)
        layout = config.layout
        samples = read_manifest(config.training.manifest, layout)
    except (ConfigError, MissingWeightsError, CheckpointError, SampleError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    save = Path(config.training.save)
    try:
        _setup_logging(save)
        distributed.ensure_model_parallel()
        prepare_cache(config, samples, show_progress=not args.no_progress and distributed.is_main_process())
        if args.prepare_only:
            if distributed.is_main_process():
                print(f"prepared {len(samples)} samples in {config.training.cache_dir}")
            return 0
        from layerflow.training.trainer import Trainer

        trainer = Trainer(config, samples, show_progress=not args.no_progress)
        if distributed.is_main_process():  # written first, so that every checkpoint of the run can be sampled
            vae_path = export_random_vae(config, save) if weights.random else None
            sample_config = write_sample_config(config, save, vae_path)
            print(
                f"{layout.name}: {len(samples)} samples, from step {trainer.start_step} to {config.training.steps}; "
                f"trainable {describe_trainable(trainer.network, config.training.trainable)}; "
                f"logs in {save / 'logs'}"
                + (f", TensorBoard in {save / 'tensorboard'}" if config.training.tensorboard else "")
            )
        history = trainer.run()
        if distributed.is_main_process():
            last = f", last loss {history[-1]['loss']:.4f}" if history else " (already complete)"
            print(f"trained {config.training.steps} steps{last} -> {save} (sample with --base {sample_config})")
    except (SampleError, CacheError, CheckpointError, ConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
