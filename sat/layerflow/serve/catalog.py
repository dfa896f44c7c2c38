"""Which config each job runs with: the task file of its task and variant, the tiny model when no weights
are present, the server's own config files and ``--set`` overrides, its frame size.

A job's config is ``configs/model.yaml``, ``configs/tasks/<task>_<variant>.yaml``, ``configs/tiny.yaml``
(when the tiny model stands in), the files of ``--config`` and then the overrides: the serve defaults
(:data:`SERVE_OVERRIDES`: both alpha videos, so a job's zip holds ProRes 4444 and WebM with alpha; for
the tiny model its T5 stays loaded too),
``--set``, and the job's size as the network's latent size. Steps and guidance are a job's own
(sample overrides, recorded in its fingerprint); the run seed stays the config's, so the tiny model's
random weights (seeded by it) are the same for every job and one built pipeline serves them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layerflow.config import ConfigError, LayerFlowConfig, load_config
from layerflow.geometry import VAE_SPATIAL_COMPRESSION
from layerflow.tasks import LAYOUTS, TaskLayout
from layerflow.weights.resolve import MissingWeightsError, resolve_weights

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
SERVE_OVERRIDES = ("output.alpha_video=both",)
TINY_OVERRIDES = ("runtime.keep_text_encoder=true",)  # the tiny T5 stays loaded with its pipeline
SIZE_STEP = 2 * VAE_SPATIAL_COMPRESSION  # a frame side is whole latent patches: 8 pixels per latent x patch 2
MAX_STEPS = 200


def format_size(size: tuple[int, int]) -> str:
    """(height, width) -> ``WIDTHxHEIGHT``."""
    return f"{size[1]}x{size[0]}"


def parse_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` -> (height, width), each side a positive multiple of :data:`SIZE_STEP`."""
    width, sep, height = str(text).strip().lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ValueError(f"size {text!r}: expected WIDTHxHEIGHT, e.g. 96x64")
    size = (int(height), int(width))
    if min(size) < SIZE_STEP or size[0] % SIZE_STEP or size[1] % SIZE_STEP:
        raise ValueError(f"size {text!r}: width and height must be positive multiples of {SIZE_STEP}")
    return size


@dataclass(frozen=True)
class ModelChoice:
    """What every job's config is made of besides its task: the tiny model or not, the extra files and keys."""

    tiny: bool
    configs: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()

    def config(self, layout: TaskLayout, size: tuple[int, int] | None = None) -> LayerFlowConfig:
        """The validated config of a job of ``layout`` at ``size`` (height, width; None: the config's own)."""
        files = [CONFIGS / "model.yaml", CONFIGS / "tasks" / f"{layout.name}.yaml"]
        files += [CONFIGS / "tiny.yaml"] if self.tiny else []
        overrides = [*SERVE_OVERRIDES, *(TINY_OVERRIDES if self.tiny else ()), *self.overrides]
        if size is not None:
            height, width = (side // VAE_SPATIAL_COMPRESSION for side in size)
            overrides += [f"model.network.latent_height={height}", f"model.network.latent_width={width}"]
        return load_config([*files, *self.configs], overrides)


def choose_model(configs: Sequence[str], overrides: Sequence[str], tiny: bool | None) -> ModelChoice:
    """``tiny`` True or False as asked; None: the tiny model when no task's weights are present.

    A config error (a bad ``--config`` file or ``--set`` key) is raised here, before the server starts.
    """
    real = ModelChoice(False, tuple(configs), tuple(overrides))
    if tiny is not None:
        choice = ModelChoice(True, real.configs, real.overrides) if tiny else real
        choice.config(next(iter(LAYOUTS.values())))  # a bad file or key stops the start
        return choice
    for layout in LAYOUTS.values():
        config = real.config(layout)
        try:
            resolve_weights(config)
            return real
        except MissingWeightsError:
            continue
    return ModelChoice(True, real.configs, real.overrides)


def default_sizes(choice: ModelChoice) -> tuple[tuple[int, int], ...]:
    """The config's size; the tiny model also offers twice that size."""
    size = choice.config(next(iter(LAYOUTS.values()))).video_size
    return (size, (2 * size[0], 2 * size[1])) if choice.tiny else (size,)


def check_sizes(choice: ModelChoice, sizes: Sequence[tuple[int, int]]) -> None:
    """Each size makes a valid config (the network's latent size)."""
    layout = next(iter(LAYOUTS.values()))
    for size in sizes:
        try:
            choice.config(layout, size)
        except ConfigError as error:
            raise ConfigError(f"--size {format_size(size)}: {error}") from None
