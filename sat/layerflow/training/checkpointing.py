"""Training checkpoints in the original release layout, written atomically, and resuming from them.

``<save>/`` after iteration 200::

    latest                               "200", written last
    200/mp_rank_00_model_states.pt       {'module': {'model.diffusion_model.<name>': tensor}}: the whole network
    200/training_state.pt                optimizer, LR schedule, step, and what the run must not change
    sample.yaml                          a config that samples this checkpoint with sat/sample_video.py

The iteration folder appears complete or not at all, and ``latest`` names it only afterwards, so
a run killed at any moment resumes from the last complete checkpoint; the staging folder such a
kill leaves behind is removed when the next run starts (:func:`remove_stale_staging`). Nothing is
written through a link, and only the trainer's own two files are ever deleted from an iteration
folder (pruning keeps a folder that holds anything else). A full disk stops the run with one line
naming the folder and the checkpoint's size, the partial checkpoint removed. The model file is the
format ``sat/sample_video.py`` loads (``model.checkpoint: <save>``). Everything is read back with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from layerflow.io import links
from layerflow.io.atomic import (
    OwnedFolder,
    atomic_directory,
    atomic_path,
    remove_owned,
    save_torch,
    temporary_of,
    write_text_atomic,
)
from layerflow.training.config import TrainConfig
from layerflow.weights.checkpoint import NETWORK_PREFIX, SAT_MODEL_FILE, CheckpointError
from layerflow.weights.resolve import resolve_weights

TRAINING_STATE_FILE = "training_state.pt"
SAMPLE_CONFIG_FILE = "sample.yaml"
CHECKPOINT_FILES = frozenset({SAT_MODEL_FILE, TRAINING_STATE_FILE})
# What layerflow.io.atomic names its temporary siblings while an iteration folder or ``latest`` is written.
_ITERATION_LEFTOVER = re.compile(r"^\.(?P<step>\d+)\.(?P<tag>tmp|old)-[0-9a-f]{8}$")
_LATEST_LEFTOVER = re.compile(r"^\.latest\.tmp-[0-9a-f]{8}$")
LATEST_FILE = "latest"
WHERE = "training.save"  # the setting a user changes when something is in the way (named in messages)

log = logging.getLogger(__name__)


@dataclass
class ResumeState:
    """What a resumed run continues with."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict


def run_identity(config: TrainConfig, trainable: list[str], world_size: int) -> dict:
    """Settings a resumed run must share with the run it continues (else the data order would differ)."""
    training = config.training
    return {
        "task": config.layout.name,
        "trainable": list(trainable),
        "global_batch": training.batch_size * training.grad_accumulation * world_size,
        "seed": training.seed,
    }


def save_checkpoint(
    folder: Path,
    step: int,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    identity: Mapping,
    keep: int = 0,
) -> Path:
    """Write iteration ``step`` (model, training state), then point ``latest`` at it."""
    module = {NETWORK_PREFIX + name: value.detach().cpu().contiguous() for name, value in network.state_dict().items()}
    training_state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "identity": dict(identity),
    }
    target = folder / str(step)
    size = _tensor_bytes(module) + _tensor_bytes(training_state)  # what the disk must hold, near enough
    with atomic_directory(target, owned=CHECKPOINT_FOLDER, where=WHERE, expected_bytes=size) as staging:
        save_torch({"module": module}, staging / SAT_MODEL_FILE)
        save_torch(training_state, staging / TRAINING_STATE_FILE)
    write_text_atomic(folder / LATEST_FILE, str(step), where=WHERE)
    if keep:
        _prune(folder, keep)
    return target


def _tensor_bytes(value: object) -> int:
    """The bytes of every tensor in nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def _mode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0


def is_training_checkpoint(path: Path) -> bool:
    """An iteration folder this trainer wrote (it holds the training state); only those are replaced or pruned.

    Neither the folder nor its training state may be a link."""
    return stat.S_ISDIR(_mode(path)) and stat.S_ISREG(_mode(path / TRAINING_STATE_FILE))


def _written_by_trainer(path: Path) -> bool:
    """A plain file of an iteration folder that the trainer writes (or a temporary of one)."""
    name = temporary_of(path.name) or path.name
    return name in (SAT_MODEL_FILE, TRAINING_STATE_FILE) and stat.S_ISREG(_mode(path))


CHECKPOINT_FOLDER = OwnedFolder(
    is_ours=is_training_checkpoint, owns=_written_by_trainer, finished_by=TRAINING_STATE_FILE
)


def _prune(folder: Path, keep: int) -> None:
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and is_training_checkpoint(p))
    for step in steps[:-keep]:
        kept = remove_owned(folder / str(step), _written_by_trainer)
        if kept:
            log.warning(
                "%s: pruned, but kept with files the trainer did not write (%s)", folder / str(step), ", ".join(kept)
            )


def remove_stale_staging(folder: Path) -> list[str]:
    """Remove what a run killed while saving left in ``folder``; returns the names removed.

    Only the trainer's own leftovers go, recognised by name and content: a ``.<step>.tmp-<8 hex>``
    staging folder (or a ``.<step>.old-<8 hex>`` one being swapped out) holding nothing but
    checkpoint files, and a ``.latest.tmp-<8 hex>`` file. An ``.old`` folder whose iteration is
    neither in place nor past ``latest`` may be the only copy and is kept. Links, and files or
    folders of any other name or content, are never touched.
    """
    if not folder.is_dir():
        return []
    latest = latest_step(folder)
    removed = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            continue
        match = _ITERATION_LEFTOVER.match(entry.name)
        if match is not None and _holds_only_checkpoint_files(entry):
            step = int(match["step"])
            redundant = is_training_checkpoint(folder / str(step)) or latest is None or step > latest
            if match["tag"] == "tmp" or redundant:
                shutil.rmtree(entry)
                removed.append(entry.name)
        elif _LATEST_LEFTOVER.match(entry.name) and entry.is_file():
            entry.unlink()
            removed.append(entry.name)
    return removed


def _holds_only_checkpoint_files(path: Path) -> bool:
    """A real folder whose entries are plain files named as the trainer's checkpoint files (maybe none yet)."""
    if not path.is_dir() or path.is_symlink():
        return False
    with os.scandir(path) as entries:
        return all(e.name in CHECKPOINT_FILES and e.is_file(follow_symlinks=False) for e in entries)


def latest_step(folder: Path) -> int | None:
    latest = folder / LATEST_FILE
    if latest.is_symlink():
        raise CheckpointError(str(links.link_refusal(latest, WHERE)))
    if not latest.is_file():
        return None
    text = latest.read_text(encoding="utf-8").strip()
    if not text.isdigit():
        raise CheckpointError(f"{latest}: expected an iteration number, found {text[:40]!r}")
    return int(text)


def load_resume_state(folder: Path, identity: Mapping) -> ResumeState | None:
    """The last checkpoint of a run in ``folder``, or ``None`` when it has none."""
    step = latest_step(folder)
    if step is None:
        return None
    model_file, state_file = folder / str(step) / SAT_MODEL_FILE, folder / str(step) / TRAINING_STATE_FILE
    for path in (model_file, state_file):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing, but {folder / 'latest'} names iteration {step}")
    try:
        module = torch.load(model_file, map_location="cpu", weights_only=True)["module"]
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, KeyError, OSError) as error:
        raise CheckpointError(f"{folder / str(step)}: unreadable checkpoint ({error})") from None
    recorded = state.get("identity", {})
    changed = sorted(key for key in identity if recorded.get(key) != identity[key])
    if changed:
        details = ", ".join(f"{key}: {recorded.get(key)!r} -> {identity[key]!r}" for key in changed)
        raise CheckpointError(
            f"{folder}: cannot resume iteration {step} with changed settings ({details}); "
            f"use a new training.save folder"
        )
    model = {name[len(NETWORK_PREFIX) :]: value for name, value in module.items()}
    return ResumeState(step=int(state["step"]), model=model, optimizer=state["optimizer"], scheduler=state["scheduler"])


def write_sample_config(config: TrainConfig, folder: Path, vae_path: str | None = None) -> Path:
    """``<save>/sample.yaml``: the run's config for ``sat/sample_video.py``, with this folder as checkpoint."""
    data = config.sampling_dict()
    data["model"]["weights"] = "checkpoint"
    data["model"]["checkpoint"] = str(folder.resolve())
    data["model"]["vae"]["path"] = vae_path or str(Path(data["model"]["vae"]["path"]).resolve())
    data["model"]["text_encoder"]["path"] = str(resolve_weights(config, check=False).text_encoder.resolve())
    path = folder / SAMPLE_CONFIG_FILE
    with atomic_path(path, where=WHERE) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
