"""Typed configuration: YAML files merged in order, validated once into frozen dataclasses.

A run is described by ``--base a.yaml b.yaml ...`` (later files win, key by key) plus
``--set section.key=value`` overrides. After :func:`load_config` no code reads raw keys: an
unknown key or a value of the wrong type fails with the key, the file it came from and the
nearest valid key. A value must also be usable: a float key refuses ``.nan`` and ``.inf`` (YAML's
not-a-number and infinity), and every numeric key has a range named in its error.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from layerflow.errors import ConfigError, FieldError
from layerflow.io.writer import DEFAULT_CRF, MASTER_CHOICES
from layerflow.models.dit import DiTConfig
from layerflow.models.vae import VAEConfig
from layerflow.runtime.attention import ATTENTION_CHOICES
from layerflow.runtime.parallel.layout import ParallelSection
from layerflow.tasks import Task, TaskLayout, Variant, get_layout

# Config files that were merged into others, so that an old command line says where they went.
RENAMED_CONFIGS = {
    name: f" ({name} and its twin became configs/model.yaml; the task file gives the variant)"
    for name in ("model_rgb.yaml", "model_rgba.yaml")
}


def _require(ok: bool, name: str, expected: str) -> None:
    if not ok:
        raise FieldError(name, expected)


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

MAX_GUIDANCE_EXPONENT = 100  # the ramp's base reaches -(999 - S)/S; a larger power overflows a float

_AT_LEAST_ONE = (lambda value: value >= 1, "an integer >= 1")
_POSITIVE = (lambda value: value > 0, "a number > 0")
# Ranges of the numeric keys of dataclasses that live below the config layer (the network's sizes),
# checked before they are built so that a 0 names its key instead of failing inside the model.
_FIELD_RANGES: dict[type, dict[str, tuple[Callable[[object], bool], str]]] = {
    DiTConfig: {
        **{
            name: _AT_LEAST_ONE
            for name in (
                "num_frames",
                "hidden_size",
                "num_layers",
                "num_attention_heads",
                "time_embed_dim",
                "text_hidden_size",
                "in_channels",
                "out_channels",
                "patch_size",
                "latent_height",
                "latent_width",
            )
        },
        "text_length": (lambda value: value >= 0, "0 (from the task) or a multiple of 226"),
        **{name: _POSITIVE for name in ("height_interpolation", "width_interpolation", "time_interpolation")},
    },
}


@dataclass(frozen=True)
class TaskSection:
    name: Task
    variant: Variant


@dataclass(frozen=True)
class VAESection:
    """``model.vae``: the checkpoint file and the sizes of :class:`VAEConfig` (its defaults: CogVideoX-2B)."""

    path: str = "CogVideoX-2b-sat/vae/3d-vae.pt"
    ch: int = VAEConfig.ch
    ch_mult: tuple[int, ...] = VAEConfig.ch_mult
    num_res_blocks: int = VAEConfig.num_res_blocks
    z_channels: int = VAEConfig.z_channels
    scale_factor: float = VAEConfig.scale_factor

    def __post_init__(self) -> None:
        for name in ("ch", "num_res_blocks", "z_channels"):
            _require(getattr(self, name) >= 1, name, "an integer >= 1")
        _require(bool(self.ch_mult) and min(self.ch_mult) >= 1, "ch_mult", "a non-empty list of integers >= 1")
        _require(self.scale_factor > 0, "scale_factor", "a number > 0")
        _ = self.sizes  # building it checks the sizes (load_config names model.vae in the error)

    @property
    def sizes(self) -> VAEConfig:
        """The one place a :class:`VAEConfig` is built from the YAML keys."""
        return VAEConfig(
            ch=self.ch,
            ch_mult=self.ch_mult,
            num_res_blocks=self.num_res_blocks,
            z_channels=self.z_channels,
            scale_factor=self.scale_factor,
        )


@dataclass(frozen=True)
class TextEncoderSection:
    path: str = "CogVideoX-2b-sat/t5-v1_1-xxl"


@dataclass(frozen=True)
class ModelSection:
    """``weights: checkpoint`` loads the files named here; ``random`` builds seeded random weights
    (the tiny built-in model, and full-size speed benchmarks)."""

    network: DiTConfig
    checkpoint: str = ""
    weights: str = "checkpoint"
    vae: VAESection = field(default_factory=VAESection)
    text_encoder: TextEncoderSection = field(default_factory=TextEncoderSection)

    def __post_init__(self) -> None:
        _require(self.weights in ("checkpoint", "random"), "weights", "checkpoint or random")


@dataclass(frozen=True)
class SamplingSection:
    """VP-SDE DPM-Solver++(2M) with dynamic CFG, as the released checkpoints were sampled."""

    num_steps: int = 50
    guidance_scale: float = 6.0
    guidance_exponent: float = 5.0
    seed: int = 42
    lora_scale: float = 0.0
    faithful_rng: bool = True
    guidance_batched: bool = True

    def __post_init__(self) -> None:
        _require(2 <= self.num_steps <= 1000, "num_steps", "an integer from 2 to 1000")
        _require(self.guidance_scale >= 0, "guidance_scale", "a number >= 0")
        _require(
            float(self.guidance_exponent).is_integer() and 0 <= self.guidance_exponent <= MAX_GUIDANCE_EXPONENT,
            "guidance_exponent",
            f"a whole number from 0 to {MAX_GUIDANCE_EXPONENT} (the guidance ramp raises a negative base to it)",
        )
        _require(0 <= self.seed < 2**63, "seed", "an integer from 0 to 2**63-1")


@dataclass(frozen=True)
class RuntimeSection:
    device: str = "auto"
    dtype: str = "auto"
    keep_text_encoder: bool = False
    vae_temporal_chunk: int = 0
    vae_spatial_tile: int = 0
    vae_device_budget_gib: float = 0.0  # region-by-region VAE: GiB of whole activations kept on the GPU
    model_cpu_offload: bool = False
    # The inference path (layerflow.runtime.devices.resolve_speed). ``None`` is written ``auto`` in YAML:
    # faithful on the CPU (the original's numbers), fast on a GPU (merged LoRA, compiled blocks and
    # the fastest exact attention kernel installed).
    faithful: bool | None = None
    attention: str = "auto"
    merge_lora: bool | None = None
    compile: bool | None = None
    cpu_threads: int = 1  # fixed per process so every process count gives the same bytes (devices.cpu_threads)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def __post_init__(self) -> None:
        _require(self.attention in ATTENTION_CHOICES, "attention", f"one of {', '.join(ATTENTION_CHOICES)}")
        if self.faithful:
            _require(
                self.attention == "auto",
                "attention",
                "auto while runtime.faithful is true (the faithful path runs the original's attention)",
            )
            _require(not self.merge_lora, "merge_lora", "false or auto while runtime.faithful is true")
            _require(not self.compile, "compile", "false or auto while runtime.faithful is true")
        _require(self.cpu_threads >= 0, "cpu_threads", "a thread count, or 0 for torch's choice")
        _require(bool(DEVICE_PATTERN.match(self.device)), "device", "auto, cpu, cuda or cuda:N")
        _require(
            self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype", "auto, float32, bfloat16 or float16"
        )
        _require(self.vae_temporal_chunk >= 0, "vae_temporal_chunk", "0 (off) or a positive number of latent frames")
        _require(self.vae_spatial_tile >= 0, "vae_spatial_tile", "0 (off) or a positive tile size in latent pixels")
        _require(
            self.vae_device_budget_gib >= 0,
            "vae_device_budget_gib",
            "0 (every VAE activation on the compute device) or a positive number of GiB",
        )

    @property
    def vae_streaming(self) -> dict:
        """Keyword arguments of CausalVideoVAE.encode/decode: the region sizes (both directions) and, with
        a budget, CPU memory for the whole activations beyond it. Empty: the one-call encode and decode."""
        streaming: dict = {}
        if self.vae_temporal_chunk:
            streaming["temporal_chunk"] = self.vae_temporal_chunk
        if self.vae_spatial_tile:
            streaming["spatial_tile"] = (self.vae_spatial_tile, self.vae_spatial_tile)
        if streaming and self.vae_device_budget_gib:
            streaming["buffer_device"] = "cpu"
            streaming["device_budget"] = int(self.vae_device_budget_gib * 2**30)
        return streaming


ALPHA_MODES = ("straight", "premultiplied", "both")
# output.alpha_video: the RGBA videos written; "both" is ProRes 4444 (.mov) and VP9 with alpha (.webm)
ALPHA_VIDEOS = ("prores", "vp9", "both", "none")
MASTER_LAYERS = ("fg", "bg", "blend", "alpha")


@dataclass(frozen=True)
class OutputSection:
    """``alpha_mode`` picks the RGBA files written: straight colour, colour premultiplied by alpha, or both.

    ``crf`` is the H.264 quality of the layer videos; ``master`` adds an editing master of each layer
    in ``master_layers`` next to its H.264 file: PNG frames, FFV1 (both lossless), ProRes 422 HQ or
    ProRes 4444 (see :mod:`layerflow.io.writer`).
    """

    fps: int = 8
    alpha_video: str = "prores"
    png_sequence: bool = True
    preview: bool = True
    alpha_mode: str = "straight"
    scores: bool = True  # RGBA: layer-consistency scores in meta.json (a few CPU seconds per sample)
    crf: int = DEFAULT_CRF  # H.264 constant rate factor of the layer videos: 0 lossless .. 51; 25 the original's
    master: str = "none"
    master_layers: tuple[str, ...] = MASTER_LAYERS

    def __post_init__(self) -> None:
        _require(1 <= self.fps <= 240, "fps", "frames per second from 1 to 240")
        _require(self.alpha_video in ALPHA_VIDEOS, "alpha_video", "prores, vp9, both or none")
        _require(self.alpha_mode in ALPHA_MODES, "alpha_mode", "straight, premultiplied or both")
        _require(0 <= self.crf <= 51, "crf", "an H.264 constant rate factor from 0 (lossless) to 51")
        _require(self.master in MASTER_CHOICES, "master", ", ".join(MASTER_CHOICES))
        _require(
            bool(self.master_layers) and set(self.master_layers) <= set(MASTER_LAYERS),
            "master_layers",
            f"a non-empty list of {', '.join(MASTER_LAYERS)}",
        )


@dataclass(frozen=True)
class LayerFlowConfig:
    task: TaskSection
    model: ModelSection
    sampling: SamplingSection = field(default_factory=SamplingSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    output: OutputSection = field(default_factory=OutputSection)
    sources: tuple[str, ...] = ()

    @property
    def layout(self) -> TaskLayout:
        return get_layout(self.task.name, self.task.variant)

    @property
    def network(self) -> DiTConfig:
        """``model.network`` with the task's text length filled in."""
        return dataclasses.replace(self.model.network, text_length=self.layout.text_length)

    @property
    def video_size(self) -> tuple[int, int]:
        from layerflow.geometry import VAE_SPATIAL_COMPRESSION

        net = self.model.network
        return net.latent_height * VAE_SPATIAL_COMPRESSION, net.latent_width * VAE_SPATIAL_COMPRESSION

    def to_dict(self) -> dict:
        def plain(value):
            if isinstance(value, (Task, Variant)):
                return value.value
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        data = plain(dataclasses.asdict(self))
        data.pop("sources")
        data["model"]["network"]["text_length"] = self.layout.text_length
        return data


def _merge(base: dict, update: Mapping, origins: dict, source: str, prefix: str = "") -> None:
    for key, value in update.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value, origins, source, path + ".")
        else:
            base[key] = dict(value) if isinstance(value, Mapping) else value
            origins[path] = source
            if isinstance(value, Mapping):
                _mark(value, origins, source, path + ".")


def _mark(mapping: Mapping, origins: dict, source: str, prefix: str) -> None:
    for key, value in mapping.items():
        origins[f"{prefix}{key}"] = source
        if isinstance(value, Mapping):
            _mark(value, origins, source, f"{prefix}{key}.")


def _origin(origins: dict, path: str) -> str:
    path = re.sub(r"(\[\d+\])+$", "", path)  # a list item was set with its list
    while path:
        if path in origins:
            return origins[path]
        path = path.rpartition(".")[0]
    return "the defaults"


def _convert(value, hint, path: str, origins: dict):
    """``value`` from YAML as the type ``hint`` (a section, an optional switch, an enum, a tuple, a scalar)."""
    where = f"{path} (from {_origin(origins, path)})"
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {hint.__name__} keys, got {type(value).__name__}")
        return _build(hint, value, path + ".", origins)
    if origin in (typing.Union, types.UnionType):
        return _convert_optional(value, hint, path, origins, where)
    if isinstance(hint, type) and issubclass(hint, (Task, Variant)):
        try:
            return hint(value)
        except ValueError:
            choices = ", ".join(member.value for member in hint)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}") from None
    if origin is tuple:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_convert(v, item, f"{path}[{i}]", origins) for i, v in enumerate(value))
    return _convert_scalar(value, hint, path, origins)


def _convert_optional(value, hint, path: str, origins: dict, where: str):
    """``X | None``: ``None`` (or ``auto`` for an optional switch) leaves it to the program."""
    options = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None or (options == [bool] and value == "auto"):
        return None  # an optional switch left to the program: ``auto`` in YAML
    if options == [bool] and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true, false or auto, got {value!r}")
    return _convert(value, options[0], path, origins)


def _convert_scalar(value, hint, path: str, origins: dict):
    """A bool, int, float or str, checked (no bool passes as a number; ``1e-4`` passes as a float; a
    float must be finite)."""
    where = f"{path} (from {_origin(origins, path)})"
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            number = math.inf if value > 0 else -math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{path} = {number!r} (from {_origin(origins, path)}): expected a finite number")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")


def _build(cls, data: Mapping, prefix: str, origins: dict):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "sources"]
    for key in data:
        if key not in names:
            path = f"{prefix}{key}"
            nearest = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{nearest[0]}?" if nearest else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key {path} in {_origin(origins, path)}{hint}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            values[f.name] = _convert(data[f.name], hints[f.name], f"{prefix}{f.name}", origins)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name != "sources":
            raise ConfigError(f"missing key {prefix}{f.name} (none of the config files sets it)")
    try:
        for name, (ok, expected) in _FIELD_RANGES.get(cls, {}).items():
            _require(name not in values or ok(values[name]), name, expected)
        return cls(**values)
    except FieldError as error:
        path = f"{prefix}{error.name}"
        raise ConfigError(
            f"{path} = {values.get(error.name)!r} (from {_origin(origins, path)}): expected {error.expected}"
        ) from None
    except ConfigError as error:
        raise ConfigError(f"{error} (in {_origin(origins, prefix.rstrip('.'))})") from None
    except ValueError as error:
        raise ConfigError(f"{prefix.rstrip('.')} (from {_origin(origins, prefix.rstrip('.'))}): {error}") from None


def _yaml_position(error: yaml.YAMLError) -> str:
    """``line L, column C:`` of a YAML syntax error (1-based), or nothing when YAML gives no position."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    return f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""


def _yaml_problem(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None)
    context = getattr(error, "context", None)
    if problem:
        return f"{context}, {problem}" if context else problem
    return str(error).splitlines()[0]


# Sampling keys that hold for the whole run, with what a manifest line should give instead.
RUN_ONLY_SAMPLING_KEYS = {
    "seed": 'not allowed per sample: give the sample its own "seed" field (sampling.seed is the run seed, '
    "from which the samples without one derive theirs)",
}


def apply_sampling_overrides(sampling: SamplingSection, overrides: Mapping[str, object], where: str) -> SamplingSection:
    """``sampling`` with per-sample overrides ``{"sampling.key": value}`` applied and validated.

    Only ``sampling.*`` keys are allowed; each value is checked like the same key in a YAML file,
    and an error names ``where`` (the manifest line), the key and what was expected.
    ``sampling.seed`` is refused: it is the run seed (it also seeds random weights, made once per
    run), and a sample's own seed is the manifest's ``seed`` field.
    """
    if not overrides:
        return sampling
    names = [f.name for f in dataclasses.fields(SamplingSection) if f.name not in RUN_ONLY_SAMPLING_KEYS]
    data = {}
    for key, value in overrides.items():
        section, _, name = str(key).partition(".")
        if section == "sampling" and name in RUN_ONLY_SAMPLING_KEYS:
            raise ConfigError(f"{where}: override {key!r}: {RUN_ONLY_SAMPLING_KEYS[name]}")
        if section != "sampling" or name not in names:
            nearest = difflib.get_close_matches(name, names, n=1) if section == "sampling" else []
            hint = f"; did you mean sampling.{nearest[0]}?" if nearest else ""
            raise ConfigError(
                f"{where}: override {key!r}: only sampling.<key> overrides are allowed per sample "
                f"({', '.join(names)}){hint}"
            )
        data[name] = value
    origins = {f"sampling.{name}": where for name in data}
    merged = {**dataclasses.asdict(sampling), **data}
    return _build(SamplingSection, merged, "sampling.", origins)


def parse_override(text: str) -> tuple[list[str], object]:
    """``section.key=value`` with a YAML value -> (['section', 'key'], value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected section.key=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def load_config(
    files: Sequence[str | Path], overrides: Sequence[str] = (), schema: type[LayerFlowConfig] = LayerFlowConfig
) -> LayerFlowConfig:
    """Merge YAML files in order (later wins), apply overrides, validate into :class:`LayerFlowConfig`
    (or ``schema``, a subclass with more sections, such as the training config)."""
    merged: dict = {}
    origins: dict = {}
    for file in files:
        file = Path(file)
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            hint = RENAMED_CONFIGS.get(file.name, "")
            raise ConfigError(f"{file}: config file not found{hint}") from None
        except IsADirectoryError:
            raise ConfigError(f"{file}: is a folder, expected a YAML config file") from None
        except OSError as error:
            raise ConfigError(f"{file}: cannot read the config file ({error.strerror or error})") from None
        except UnicodeDecodeError as error:
            raise ConfigError(f"{file}: not UTF-8 text (byte {error.start}), expected a YAML config file") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{file}:{_yaml_position(error)} invalid YAML ({_yaml_problem(error)})") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{file}: expected a mapping at the top level")
        _merge(merged, data, origins, str(file))
    for text in overrides:
        keys, value = parse_override(text)
        update: dict = {}
        nested = update
        for key in keys[:-1]:
            nested = nested.setdefault(key, {})
        nested[keys[-1]] = value
        _merge(merged, update, origins, f"--set {text}")
    config = _build(schema, merged, "", origins)
    set_length, task_length = config.model.network.text_length, config.layout.text_length
    if set_length not in (0, task_length):
        raise ConfigError(
            f"model.network.text_length (from {_origin(origins, 'model.network.text_length')}) is "
            f"{set_length}, but {config.layout.name} has {task_length} text tokens; leave it out"
        )
    return dataclasses.replace(config, sources=tuple(str(f) for f in files))
