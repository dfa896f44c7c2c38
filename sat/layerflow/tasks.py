"""Where every layer sits in the stacked clip, for each task and variant: one table of data.

LayerFlow stacks its layers as sub-clips along the time axis of one video. A task decides which
of those layers the user gives (they enter the transformer as clean latents) and which are
generated. All slicing, inserting and splitting in the pipeline, the training loss and the I/O
goes through :class:`TaskLayout`; no other module knows a frame index.

The table reproduces what the released checkpoints were trained on, quirks included:

* RGBA foreground/background-conditioned generation duplicates the first pixel frame before the
  VAE, so the clip has 65 frames and 17 latent frames; latent 0 holds that copy alone.
* RGB decomposition conditions on the last 2 blend latents only; the first 2 blend latents are
  generated with the other layers (and thrown away when the video is split).
* Decomposition has two prompts (foreground, background); the other tasks three.

Legend for latent-frame ranges: ``[start, stop)`` along the latent time axis.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from layerflow.geometry import PIXEL_FRAMES_PER_LAYER, TOKENS_PER_PROMPT, VAE_TEMPORAL_COMPRESSION

FIRST_FRAME_COPY = "first_frame_copy"
MASK_INPUT = "mask"  # a separate matte for an RGBA foreground, given as a file of its own


class Layer(str, enum.Enum):
    """The layers of a stacked clip; the value is the short name of prompts, inputs and manifests.

    A member is its short name everywhere: ``Layer.FG == "fg"``, it hashes as ``"fg"`` (so it finds
    ``"fg"`` dictionary keys and plain strings find it), and f-strings, messages and JSON show ``fg``.
    A :class:`TaskLayout` stores the short names themselves (plain strings), so layer videos keyed by
    its names pickle and ``torch.load(weights_only=True)`` as before.
    """

    FG = "fg"  # the foreground, matted over grey
    ALPHA = "alpha"  # the RGBA variant's matte, as a three-channel layer
    BG = "bg"  # the background
    BLEND = "blend"  # the composite of foreground and background

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)


class Task(str, enum.Enum):
    """The four LayerFlow tasks; the value is the short name used in file and config names."""

    GENERATION = "gen"
    DECOMPOSITION = "seg"
    FOREGROUND_TO_BACKGROUND = "fg2bg"
    BACKGROUND_TO_FOREGROUND = "bg2fg"


class Variant(str, enum.Enum):
    """RGB: foreground without matte. RGBA: the matte is generated as its own 3-channel layer."""

    RGB = "rgb"
    RGBA = "rgba"


# The original release publishes one checkpoint folder per task and variant, ``<folder>-<variant>``.
RELEASE_REPOSITORY = "https://huggingface.co/zjuJish/LayerFlow"
RELEASE_FOLDERS = {
    Task.GENERATION: "multi-layer-generation",
    Task.DECOMPOSITION: "multi-layer-decomposition",
    Task.FOREGROUND_TO_BACKGROUND: "foreground-conditioned-generation",
    Task.BACKGROUND_TO_FOREGROUND: "background-conditioned-generation",
}


@dataclass(frozen=True)
class LayerSpan:
    """One layer of the stacked clip: its name and its latent and pixel frame ranges."""

    name: str
    latent_start: int
    latent_stop: int
    pixel_start: int
    pixel_stop: int

    @property
    def latent_frames(self) -> int:
        return self.latent_stop - self.latent_start

    @property
    def pixel_frames(self) -> int:
        return self.pixel_stop - self.pixel_start


@dataclass(frozen=True)
class GivenInput:
    """One given layer as a user supplies it, and the rules its file must meet.

    ``needs_alpha``: the task also takes the foreground's matte, so the file must carry alpha
    (RGBA frames) or come with a :data:`MASK_INPUT` file; ``takes_mask`` says that file is accepted.
    """

    layer: str
    pixel_frames: int
    needs_alpha: bool = False
    takes_mask: bool = False


@dataclass(frozen=True)
class TaskLayout:
    """The frame layout of one (task, variant) pair.

    ``layers`` lists (name, latent frame count) in stacking order; ``condition`` is the latent range
    that enters clean (``None``: everything is generated); ``given_layers`` are the pixel layers the
    user supplies; ``prompt_layers`` are the layers that have a prompt, in prompt order.
    """

    task: Task
    variant: Variant
    layers: tuple[tuple[str, int], ...]
    prompt_layers: tuple[str, ...]
    given_layers: tuple[str, ...] = ()
    condition: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        # The table is written with Layer members; a layout keeps their short names as plain strings, so
        # what flows out of it (dictionary keys of layer videos, pickles, messages) carries no enum.
        object.__setattr__(self, "layers", tuple((str(name), count) for name, count in self.layers))
        object.__setattr__(self, "prompt_layers", tuple(str(name) for name in self.prompt_layers))
        object.__setattr__(self, "given_layers", tuple(str(name) for name in self.given_layers))
        total = self.latent_frames
        if self.condition is not None:
            start, stop = self.condition
            if not 0 <= start < stop <= total:
                raise ValueError(f"{self.name}: condition range {self.condition} outside 0..{total}")
        names = [name for name, _ in self.layers]
        for name in (*self.given_layers, *self.prompt_layers):
            if name not in names:
                raise ValueError(f"{self.name}: layer {name!r} is not one of {names}")

    @property
    def name(self) -> str:
        return f"{self.task.value}_{self.variant.value}"

    @property
    def release_folder(self) -> str:
        """The checkpoint folder of the original release, e.g. ``multi-layer-generation-rgba``."""
        return f"{RELEASE_FOLDERS[self.task]}-{self.variant.value}"

    @property
    def download(self) -> str:
        """Where that folder is published."""
        return f"{RELEASE_REPOSITORY} (folder {self.release_folder})"

    @property
    def spans(self) -> tuple[LayerSpan, ...]:
        spans, latent, pixel = [], 0, 0
        for name, latent_frames in self.layers:
            pixel_frames = 1 if name == FIRST_FRAME_COPY else latent_frames * VAE_TEMPORAL_COMPRESSION
            spans.append(LayerSpan(name, latent, latent + latent_frames, pixel, pixel + pixel_frames))
            latent += latent_frames
            pixel += pixel_frames
        return tuple(spans)

    def span(self, name: str) -> LayerSpan:
        for span in self.spans:
            if span.name == name:
                return span
        raise KeyError(f"{self.name} has no layer {name!r}")

    @property
    def latent_frames(self) -> int:
        return sum(count for _, count in self.layers)

    @property
    def pixel_frames(self) -> int:
        return self.spans[-1].pixel_stop

    @property
    def repeats_first_frame(self) -> bool:
        return self.layers[0][0] == FIRST_FRAME_COPY

    @property
    def video_layers(self) -> tuple[str, ...]:
        """The layers a user sees as videos, in stacking order."""
        return tuple(name for name, _ in self.layers if name != FIRST_FRAME_COPY)

    @property
    def given_inputs(self) -> tuple[GivenInput, ...]:
        """The given layers a user supplies as files (the alpha layer comes with the foreground)."""
        with_matte = Layer.ALPHA in self.given_layers
        return tuple(
            GivenInput(
                name,
                self.span(name).pixel_frames,
                needs_alpha=with_matte and name == Layer.FG,
                takes_mask=with_matte and name == Layer.FG,
            )
            for name in self.given_layers
            if name != Layer.ALPHA
        )

    @property
    def accepted_inputs(self) -> tuple[str, ...]:
        """Every input name a sample may give: the given layers, plus the mask where it is taken."""
        names = tuple(given.layer for given in self.given_inputs)
        return (*names, MASK_INPUT) if any(given.takes_mask for given in self.given_inputs) else names

    def check_input_names(self, names) -> tuple[list[str], list[str]]:
        """(missing, not used): the required inputs absent from ``names``, and the names this task does not take."""
        missing = [given.layer for given in self.given_inputs if given.layer not in names]
        return missing, sorted(set(names) - set(self.accepted_inputs))

    @property
    def condition_frames(self) -> int:
        return 0 if self.condition is None else self.condition[1] - self.condition[0]

    @property
    def generated_frames(self) -> int:
        return self.latent_frames - self.condition_frames

    @property
    def text_length(self) -> int:
        return TOKENS_PER_PROMPT * len(self.prompt_layers)


def _stack(variant: Variant, repeat_first_frame: bool = False) -> tuple[tuple[str, int], ...]:
    per_layer = PIXEL_FRAMES_PER_LAYER // VAE_TEMPORAL_COMPRESSION
    names = (
        (Layer.FG, Layer.ALPHA, Layer.BG, Layer.BLEND) if variant is Variant.RGBA else (Layer.FG, Layer.BG, Layer.BLEND)
    )
    head = ((FIRST_FRAME_COPY, 1),) if repeat_first_frame else ()
    return head + tuple((name, per_layer) for name in names)


_THREE_PROMPTS = (Layer.FG, Layer.BG, Layer.BLEND)
_TWO_PROMPTS = (Layer.FG, Layer.BG)

LAYOUTS: dict[tuple[Task, Variant], TaskLayout] = {
    (Task.GENERATION, Variant.RGB): TaskLayout(Task.GENERATION, Variant.RGB, _stack(Variant.RGB), _THREE_PROMPTS),
    (Task.GENERATION, Variant.RGBA): TaskLayout(Task.GENERATION, Variant.RGBA, _stack(Variant.RGBA), _THREE_PROMPTS),
    (Task.DECOMPOSITION, Variant.RGB): TaskLayout(
        Task.DECOMPOSITION, Variant.RGB, _stack(Variant.RGB), _TWO_PROMPTS, (Layer.BLEND,), condition=(10, 12)
    ),
    (Task.DECOMPOSITION, Variant.RGBA): TaskLayout(
        Task.DECOMPOSITION, Variant.RGBA, _stack(Variant.RGBA), _TWO_PROMPTS, (Layer.BLEND,), condition=(12, 16)
    ),
    (Task.FOREGROUND_TO_BACKGROUND, Variant.RGB): TaskLayout(
        Task.FOREGROUND_TO_BACKGROUND, Variant.RGB, _stack(Variant.RGB), _THREE_PROMPTS, (Layer.FG,), condition=(0, 4)
    ),
    (Task.FOREGROUND_TO_BACKGROUND, Variant.RGBA): TaskLayout(
        Task.FOREGROUND_TO_BACKGROUND,
        Variant.RGBA,
        _stack(Variant.RGBA, repeat_first_frame=True),
        _THREE_PROMPTS,
        (Layer.FG, Layer.ALPHA),
        condition=(0, 9),
    ),
    (Task.BACKGROUND_TO_FOREGROUND, Variant.RGB): TaskLayout(
        Task.BACKGROUND_TO_FOREGROUND, Variant.RGB, _stack(Variant.RGB), _THREE_PROMPTS, (Layer.BG,), condition=(4, 8)
    ),
    (Task.BACKGROUND_TO_FOREGROUND, Variant.RGBA): TaskLayout(
        Task.BACKGROUND_TO_FOREGROUND,
        Variant.RGBA,
        _stack(Variant.RGBA, repeat_first_frame=True),
        _THREE_PROMPTS,
        (Layer.BG,),
        condition=(9, 13),
    ),
}


def get_layout(task: Task | str, variant: Variant | str) -> TaskLayout:
    """The layout for a task and variant given by enum or short name (``"seg"``, ``"rgba"``)."""
    try:
        key = (Task(task), Variant(variant))
    except ValueError:
        tasks = ", ".join(t.value for t in Task)
        variants = ", ".join(v.value for v in Variant)
        raise ValueError(f"unknown task/variant {task!r}/{variant!r}: tasks are {tasks}; variants {variants}") from None
    return LAYOUTS[key]


def stack_layers(layers: Mapping[str, torch.Tensor], layout: TaskLayout) -> torch.Tensor:
    """Layer videos (F_layer, 3, H, W) by name -> the stacked clip (1, 3, F, H, W) the VAE encodes.

    The layers go in the layout's order; a layout that repeats the first frame starts with a copy
    of frame 0. ``layers`` must hold every video layer of the layout (the callers fill or check them).
    """
    frames = [layers[span.name] for span in layout.spans if span.name != FIRST_FRAME_COPY]
    clip = torch.cat(frames, dim=0)  # (F, 3, H, W)
    if layout.repeats_first_frame:
        clip = torch.cat([clip[:1], clip], dim=0)
    return clip.permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, F, H, W)


def insert_condition(generated: torch.Tensor, condition: torch.Tensor, layout: TaskLayout) -> torch.Tensor:
    """Put the clean condition latents back at their place among the generated ones.

    generated: (b, T_gen, c, h, w); condition: (b, T_cond, c, h, w) -> (b, T, c, h, w).
    """
    if layout.condition is None:
        return generated
    start = layout.condition[0]
    return torch.cat([generated[:, :start], condition, generated[:, start:]], dim=1)


def remove_condition(full: torch.Tensor, layout: TaskLayout) -> torch.Tensor:
    """Drop the condition latents from a full-length sequence: (b, T, ...) -> (b, T_gen, ...)."""
    if layout.condition is None:
        return full
    start, stop = layout.condition
    return torch.cat([full[:, :start], full[:, stop:]], dim=1)


def split_condition(full: torch.Tensor, layout: TaskLayout) -> torch.Tensor:
    """Take the condition latents out of a full-length sequence: (b, T, ...) -> (b, T_cond, ...)."""
    if layout.condition is None:
        raise ValueError(f"{layout.name} has no given layer")
    start, stop = layout.condition
    return full[:, start:stop]
