"""A sample's fingerprint: everything that decides its pixels and files, so a rerun never keeps a stale result.

``meta.json`` records it as ``{"sha256": ..., "settings": {name: value}}``, ``settings`` being one
flat, ordered mapping of JSON values. A rerun computes the fingerprint of every finished sample
before any model loads; a folder whose recorded settings differ is refused (or, with
``--redo-changed``, made again), naming the first setting that differs.

What is in it, in this order (every key of the validated config counts unless left out below, so
a key added later counts by default):

* ``task.*``, ``model.*`` (the network and VAE sizes, ``model.weights``), ``sampling.*`` (with the
  sample's own ``overrides`` applied);
* ``weights.network``, ``weights.vae``, ``weights.text_encoder``: which weights. A file is named
  by its resolved path, byte size and modification time (a stat, microseconds even for a 10 GB
  checkpoint; hashing its content would read all of it before every run, see the README). A T5
  folder (the configured one, or the built-in stand-in) is named by its path and a digest of the
  (name, size, time) of every file in it. Random weights are named by their seeds
  (``sampling.seed`` and ``sampling.seed + 1``);
* ``seed``: the sample's seed;
* ``prompts.<layer>``;
* ``inputs.<name>``: the content of each given layer as read (a sample folder's file resolved):
  ``sha256:<hex>`` of a file's bytes, or ``sha256-frames:<hex>``, the SHA-256 of the frames'
  SHA-256 digests in name order, for a frame folder (moving the input, or renaming frames in the
  same order, does not count; changing a byte does);
* ``runtime.*``, with what ``auto`` resolves to here: ``device`` as the device kind (``cpu``,
  ``cuda (<GPU name>)``, not the index), ``dtype``, the speed path (``faithful``, ``attention``,
  ``merge_lora``, ``compile``), ``cpu_threads`` as the thread count in use (it changes bytes on
  the CPU), and the rest as configured (VAE regions and budget, ``parallel.*``);
* ``output.*``: they decide which files are written and how they are encoded.

Left out, because they do not change a pixel or a file (:data:`EXCLUDED`): the run seed
(``sampling.seed``: it acts through ``seed`` and the random weights' seeds), the weight paths as
written (``weights.*`` names the files they resolve to), ``runtime.keep_text_encoder`` and
``runtime.model_cpu_offload`` (where models wait between uses; every operation runs on the same
device in the same dtype), ``runtime.parallel.timeout_s`` (how long a rank waits for a hung
partner). Also not in it: the number of processes (any count gives the same bytes), the
progress and log options, and the versions of LayerFlow, torch and ffmpeg (recorded in
``meta.json``; counting them would refuse every finished folder after an upgrade).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layerflow.batch.given import given_layer_file, source_files
from layerflow.batch.manifest import Sample
from layerflow.config import LayerFlowConfig
from layerflow.io.output_folder import OutputFolderError
from layerflow.runtime.devices import resolve_placement, resolve_speed
from layerflow.weights.checkpoint import resolve_checkpoint_file
from layerflow.weights.resolve import Weights

FINGERPRINT_KEY = "fingerprint"  # its key in meta.json
EXCLUDED = {
    "sampling.seed": "acts through the sample's seed and the random weights' seeds",
    "model.checkpoint": "weights.network names the file it resolves to",
    "model.vae.path": "weights.vae names the file",
    "model.text_encoder.path": "weights.text_encoder names the folder",
    "runtime.parallel.timeout_s": "how long a rank waits for a hung partner; no pixel depends on it",
    "runtime.keep_text_encoder": "memory only: T5 is kept or freed after the prompts are encoded",
    "runtime.model_cpu_offload": "memory only: models wait on the CPU between uses, and run where they would anyway",
}
_LATE = ("runtime.", "output.")  # config keys listed after the sample's own settings
_CHUNK = 1 << 20
_SHOWN_CHARS = 60  # a longer value (a prompt, a path) is cut in the one-line message


class ChangedSampleError(OutputFolderError):
    """A finished sample folder was made with other settings than this run's; nothing was touched."""


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested mapping -> ``{"a.b": value}`` (lists stay values)."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _utc(ns: int) -> str:
    seconds, rest = divmod(ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest:09d}Z"


def file_identity(path: str | os.PathLike) -> dict[str, object]:
    """A weights file by its resolved path, size and modification time (no read of its content)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return {"file": str(resolved), "bytes": stat.st_size, "modified": _utc(stat.st_mtime_ns)}


def folder_identity(path: str | os.PathLike) -> dict[str, object]:
    """A weights folder by its resolved path and a digest of every file's name, size and time."""
    resolved = Path(path).resolve()
    listing = hashlib.sha256()
    for file in sorted(p for p in resolved.rglob("*") if p.is_file()):
        stat = file.stat()
        listing.update(f"{file.relative_to(resolved)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return {"folder": str(resolved), "files": listing.hexdigest()[:16]}


def weights_identity(weights: Weights, config: LayerFlowConfig) -> dict[str, object]:
    """``weights.network``, ``weights.vae``, ``weights.text_encoder`` (see the module docstring)."""
    seed = config.sampling.seed
    if weights.random:
        identity: dict[str, object] = {
            "network": f"random (from sampling.seed={seed})",
            "vae": f"random (from sampling.seed={seed} + 1)",
        }
    else:
        identity = {
            "network": file_identity(resolve_checkpoint_file(weights.checkpoint)),
            "vae": file_identity(weights.vae),
        }
    identity["text_encoder"] = folder_identity(weights.text_encoder)  # the configured one, or the built-in stand-in
    return identity


def _file_sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.digest()


@dataclass
class ContentHashes:
    """Content hashes of given files, each file read once per run (keyed by path, size and time)."""

    _known: dict[tuple, bytes] = field(default_factory=dict)

    def _digest(self, path: Path) -> bytes:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._known:
            self._known[key] = _file_sha256(path)
        return self._known[key]

    def of(self, source: Path) -> str:
        """``sha256:<hex>`` of a file, ``sha256-frames:<hex>`` of a frame folder's frames in name order."""
        if not source.is_dir():
            return f"sha256:{self._digest(source).hex()}"
        frames = hashlib.sha256()
        for frame in source_files(source):
            frames.update(self._digest(frame))
        return f"sha256-frames:{frames.hexdigest()}"


def _resolved_runtime(config: LayerFlowConfig) -> dict[str, object]:
    """``runtime.*`` with ``auto`` resolved for this process (device kind, dtype, speed path, threads)."""
    placement = resolve_placement(config.runtime)
    speed = resolve_speed(config.runtime, placement, config.network.head_dim)
    return {
        "device": placement.device_kind,
        "dtype": str(placement.dtype).removeprefix("torch."),
        **speed.describe(),
        "cpu_threads": torch.get_num_threads(),
    }


@dataclass
class Fingerprinter:
    """Fingerprints of one run's samples: the run-wide parts worked out once, given files hashed once."""

    config: LayerFlowConfig
    weights: Weights
    hashes: ContentHashes = field(default_factory=ContentHashes)

    def __post_init__(self) -> None:
        self._weights = weights_identity(self.weights, self.config)
        self._runtime = _resolved_runtime(self.config)

    @property
    def weights_named(self) -> dict[str, object]:
        """How this run names its weights (``weights.*``)."""
        return self._weights

    def adopt_weights(self, named: dict[str, object]) -> None:
        """Name the weights as another rank does (rank 0), so every rank records the same even when
        each node reads its own copy of the files. The runtime part stays this rank's own: it says
        where this rank computes."""
        self._weights = named

    def settings(
        self, sample: Sample, run_config: LayerFlowConfig, seed: int, unreadable: dict[str, str] | None = None
    ) -> dict[str, object]:
        """The flat, ordered settings that decide ``sample``'s files (``run_config``: its overrides applied).

        A given input that cannot be read raises, or with ``unreadable`` is left out and its setting's
        name put there with the reason (a finished sample whose input has since gone is not refused
        for that).
        """
        config = flatten(run_config.to_dict())
        config.update(flatten({"runtime": self._runtime}))
        config = {key: value for key, value in config.items() if key not in EXCLUDED}
        inputs = {}
        for name in sample.inputs:
            try:
                inputs[f"inputs.{name}"] = self.hashes.of(given_layer_file(sample, run_config, name))
            except (OSError, ValueError) as error:
                if unreadable is None:
                    raise
                unreadable[f"inputs.{name}"] = str(error).splitlines()[0] if str(error) else type(error).__name__
        return {
            **{key: value for key, value in config.items() if not key.startswith(_LATE)},
            **flatten({"weights": self._weights}),
            "seed": seed,
            **flatten({"prompts": dict(sample.prompts)}),
            **inputs,
            **{key: value for key, value in config.items() if key.startswith(_LATE)},
        }

    def record(self, sample: Sample, run_config: LayerFlowConfig, seed: int) -> dict[str, object]:
        """What ``meta.json`` keeps under :data:`FINGERPRINT_KEY`."""
        settings = self.settings(sample, run_config, seed)
        return {"sha256": digest(settings), "settings": settings}


def digest(settings: Mapping[str, object]) -> str:
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _show(value: object) -> str:
    """A value as the message shows it: plain words bare, other strings and values as JSON, cut when long."""
    plain = isinstance(value, str) and value != "" and not any(c.isspace() or c in "\"'" for c in value)
    text = value if plain else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "\u2026"


_MISSING = object()


def first_difference(
    recorded: Mapping[str, object], current: Mapping[str, object], unknown: Iterable[str] = ()
) -> str | None:
    """``"KEY=OLD, this run has NEW"`` for the first setting that differs, or None when all agree
    (settings named in ``unknown``, which this run could not work out, are not compared)."""
    unknown = set(unknown)
    for key in [*current, *(k for k in recorded if k not in current and k not in unknown)]:
        old, new = recorded.get(key, _MISSING), current.get(key, _MISSING)
        if old != new:
            if old is _MISSING:
                return f"no {key} (this run has {_show(new)})"
            if new is _MISSING:
                return f"{key}={_show(old)}, which this run does not have"
            return f"{key}={_show(old)}, this run has {_show(new)}"
    return None


def recorded_settings(meta: Mapping | None) -> Mapping[str, object] | None:
    """The settings a finished sample recorded, or None (an older LayerFlow, or an unreadable meta.json)."""
    fingerprint = meta.get(FINGERPRINT_KEY) if isinstance(meta, Mapping) else None
    settings = fingerprint.get("settings") if isinstance(fingerprint, Mapping) else None
    return settings if isinstance(settings, Mapping) else None


NO_FINGERPRINT = (
    "has no fingerprint in its meta.json (made by an older LayerFlow, or the file is unreadable), "
    "so this run cannot tell whether it was made with the same settings"
)


def why_changed(meta: Mapping | None, current: Mapping[str, object], unknown: Iterable[str] = ()) -> str | None:
    """Why a finished sample with ``meta`` is not what this run makes (``current``: its settings now), or None."""
    recorded = recorded_settings(meta)
    if recorded is None:
        return NO_FINGERPRINT
    difference = first_difference(recorded, current, unknown)
    return None if difference is None else f"was made with {difference}"


def refusal(folder: Path, why: str, others: int) -> str:
    """The one line that refuses to keep or replace a finished sample that was made differently."""
    more = f" ({others} more finished sample{'s differ' if others != 1 else ' differs'} too)" if others else ""
    return f"{folder} {why}{more}; rerun with --redo-changed to replace it, or use another --output"
