"""The ``training:`` section: which parameters train, from where, on what data, with which optimizer.

A training run is the sampling config of a task (``--base model.yaml tasks/<task>.yaml``) plus a
stage file from ``configs/train/`` and ``--set training.key=value`` overrides, validated once into
:class:`TrainConfig` by the same loader as sampling. The saved checkpoints therefore carry a
config that ``sat/sample_video.py`` reads unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from layerflow.config import ConfigError, FieldError, LayerFlowConfig, load_config

PARAMETER_GROUPS = ("content_lora", "motion_lora", "layer_embedding", "transformer")
INIT_SOURCES = ("release", "cogvideox")
LR_SCHEDULES = ("constant", "linear", "cosine")


def _require(ok: bool, name: str, expected: str) -> None:
    if not ok:
        raise FieldError(name, expected)


@dataclass(frozen=True)
class TrainingSection:
    """Stage, data, optimizer and bookkeeping of one training run (see the README, "Training")."""

    manifest: str = ""  # JSONL of layered samples (every layer given)
    cache: str = ""  # folder of the VAE and T5 encodings; default <save>/cache
    save: str = "checkpoints/layerflow"  # checkpoints (release layout), logs, TensorBoard events
    init: str = "release"  # model.checkpoint is a LayerFlow checkpoint, or CogVideoX-2B SAT weights
    trainable: tuple[str, ...] = ("content_lora",)  # layer_embedding applies where the task has one
    layers: tuple[int, ...] = ()  # transformer layers whose LoRA / weights train; empty: all
    steps: int = 1000
    batch_size: int = 1  # samples per rank and micro-step
    grad_accumulation: int = 1
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    grad_clip: float = 0.1  # max global gradient norm; 0 disables
    gradient_checkpointing: bool = False
    seed: int = 0
    save_interval: int = 100
    keep_checkpoints: int = 0  # keep only this many iteration folders; 0 keeps all
    log_interval: int = 1
    tensorboard: bool = True
    text_dropout: float = 0.1  # per prompt, as the original conditioner's ucg_rate
    still_lora_scale: float = 1.0  # motion-LoRA switch for still clips; videos get 0

    def __post_init__(self) -> None:
        """Range checks; each names its key, and :func:`load_config` adds the value and where it was set."""
        unknown = [group for group in self.trainable if group not in PARAMETER_GROUPS]
        _require(
            bool(self.trainable) and not unknown, "trainable", f"groups to train; choose from {list(PARAMETER_GROUPS)}"
        )
        _require(self.init in INIT_SOURCES, "init", f"one of {list(INIT_SOURCES)}")
        _require(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {list(LR_SCHEDULES)}")
        _require(bool(self.save.strip()), "save", "a folder path")
        for name in ("steps", "batch_size", "grad_accumulation", "save_interval", "log_interval"):
            _require(getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("warmup_steps", "keep_checkpoints"):
            _require(getattr(self, name) >= 0, name, "an integer >= 0")
        _require(0 <= self.seed < 2**63, "seed", "an integer from 0 to 2**63-1")
        _require(self.learning_rate > 0, "learning_rate", "a number > 0")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a number in [0, 1]")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two numbers in [0, 1)")
        _require(self.eps > 0, "eps", "a number > 0")
        _require(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        _require(self.grad_clip >= 0, "grad_clip", "a number >= 0 (0 disables clipping)")
        _require(0 <= self.text_dropout < 1, "text_dropout", "a number in [0, 1)")

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache) if self.cache else Path(self.save) / "cache"


@dataclass(frozen=True)
class TrainConfig(LayerFlowConfig):
    """A sampling config plus its ``training`` section."""

    training: TrainingSection = field(default_factory=TrainingSection)

    def sampling_dict(self) -> dict:
        """The config as ``sample_video.py`` reads it (without the training section)."""
        data = self.to_dict()
        data.pop("training")
        return data


def load_train_config(files: Sequence[str | Path], overrides: Sequence[str] = ()) -> TrainConfig:
    """Merge and validate like :func:`layerflow.config.load_config`, with the ``training`` section."""
    config = load_config(files, overrides, schema=TrainConfig)
    layers = config.training.layers
    wrong = [layer for layer in layers if not 0 <= layer < config.network.num_layers]
    if wrong:
        raise ConfigError(f"training.layers {wrong} outside the network's {config.network.num_layers} layers")
    lora_groups = {"content_lora", "motion_lora"} & set(config.training.trainable)
    if lora_groups and config.network.lora is None:
        raise ConfigError(f"training.trainable {sorted(lora_groups)} needs model.network.lora")
    return config
