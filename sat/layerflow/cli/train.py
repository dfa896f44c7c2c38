"""``train_video.py``: prepare the encoded dataset, then train a stage, from YAML configs.

Examples::

    # content LoRA of RGBA multi-layer generation, continuing the released checkpoint
    torchrun --nproc_per_node=8 sat/train_video.py --base configs/model.yaml \\
        configs/tasks/gen_rgba.yaml configs/train/content_lora.yaml \\
        --set training.manifest=data/train.jsonl --set training.save=checkpoints/gen_rgba_content

    # only encode the dataset (VAE + T5) into training.cache
    python sat/train_video.py --base ... --prepare-only

Rerunning the same command resumes from the last checkpoint in ``training.save``.
Exit status (:mod:`layerflow.cli.exits`): 0 done, 2 usage, config, data or checkpoint error (one line
on stderr), 3 internal error (``--debug`` shows the traceback), 130 Ctrl-C, 143 SIGTERM (the last
checkpoint is left intact).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from layerflow.cli.arguments import add_config_options, add_debug_option, command_parser, config_overrides
from layerflow.cli.exits import run_command
from layerflow.config import ConfigError
from layerflow.runtime import distributed
from layerflow.training.cache import CacheError, prepare_cache
from layerflow.training.checkpointing import WHERE, latest_step, write_sample_config
from layerflow.training.config import TrainConfig, load_train_config
from layerflow.training.dataset import SampleError, read_manifest
from layerflow.training.params import describe_trainable
from layerflow.weights.checkpoint import CheckpointError
from layerflow.weights.resolve import MissingWeightsError, Weights, resolve_weights

# Errors caused by what the user gave (configs, data, checkpoints, folders): one line, exit status 2.
USER_ERRORS = (SampleError, CacheError, CheckpointError, ConfigError, MissingWeightsError, OSError)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = command_parser(
        "train_video.py",
        "LayerFlow training: LoRA / layer embedding / full fine-tuning on layered clips.",
        __doc__.split("Examples::", 1)[1],
    )
    add_config_options(
        parser,
        base_help="config files, merged in order (later files win): model, task, training stage",
        set_example="training.steps=500",
    )
    parser.add_argument("--prepare-only", action="store_true", help="encode the dataset into the cache and stop")
    parser.add_argument(
        "--validate-only", action="store_true", help="check configs, manifest and weights, then stop (nothing written)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_debug_option(parser)
    return parser.parse_args(argv)


def _checked_config(args: argparse.Namespace) -> tuple[TrainConfig, Weights]:
    config = load_train_config(args.base, config_overrides(args))
    if not config.training.manifest:
        raise ConfigError("training.manifest is not set (a JSONL of layered samples; see the README, 'Training')")
    resuming = latest_step(Path(config.training.save)) is not None
    cached = resuming and Path(config.training.cache_dir / "index.json").is_file()
    return config, resolve_weights(config, check=not cached)  # builds a tiny T5, or names missing files


def _setup_logging(save: Path) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for handler in logging.root.handlers:
        handler.setLevel(logging.WARNING)
    distributed.attach_rank_log(save, Path("logs") / f"rank{distributed.rank()}.log", WHERE)  # never through a link


def export_random_vae(config: TrainConfig, folder: Path) -> str:
    """The tiny model's seeded VAE as a ``3d-vae.pt``-style file, so the checkpoint samples like a real one."""
    import torch

    from layerflow.io.atomic import atomic_path, save_torch
    from layerflow.weights.build import build_vae

    path = folder / "random-vae.pt"
    state = build_vae(config, torch.device("cpu"), torch.float32).state_dict()
    size = sum(value.numel() * value.element_size() for value in state.values())  # for a full disk's message
    with atomic_path(path, where=WHERE, expected_bytes=size) as tmp:
        save_torch({"state_dict": state}, tmp)
    return str(path.resolve())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.no_progress:  # nor the text encoder's loading bar
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    save: list[Path] = []  # known once the config is read

    def interrupted() -> str:
        if not distributed.is_main_process():
            return ""
        return f"interrupted: stopped cleanly; {_resume_hint(save[0] if save else None)}"

    try:
        return run_command(lambda: _run(args, save), user_errors=USER_ERRORS, debug=args.debug, interrupted=interrupted)
    finally:
        distributed.detach_rank_log()  # a next run in this process logs into its own folder


def _resume_hint(save: Path | None) -> str:
    """Where a rerun of the same command continues from (one clause)."""
    try:
        step = latest_step(save) if save is not None else None
    except CheckpointError:
        step = None
    if step is None:
        return "no checkpoint was written yet; rerun the same command to start again"
    return f"the last checkpoint, iteration {step} in {save}, is intact; rerun the same command to resume from it"


def _run(args: argparse.Namespace, known_save: list[Path]) -> int:
    """Check the config and data, prepare the cache, then train (or resume) and report; the save
    folder is appended to ``known_save`` as soon as it is known (for the Ctrl-C line)."""
    config, weights = _checked_config(args)
    layout = config.layout
    samples = read_manifest(config.training.manifest, layout)
    if args.validate_only:
        print(f"ok: {len(samples)} training samples of {layout.name} -> {config.training.save}")
        return 0
    save = Path(config.training.save)
    known_save.append(save)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
