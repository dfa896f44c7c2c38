"""``layerflow inspect``: what made a sample folder, and the exact command that makes it again.

The command reruns one sample through ``layerflow generate`` with

* the config files the sample recorded (or, where they are not found from the current folder,
  the repository's model and task files) and a ``--set`` for every key whose recorded value
  differs from what those files give, so the run uses the recorded config exactly;
* a one-line manifest fed on standard input (a here-document) with the sample's id, prompts,
  seed and the absolute paths of its given layers.

A composite made by ``layerflow compose`` shows the compose command it recorded, with its inputs
by absolute path and ``--output`` set to a new folder, so it runs from anywhere.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from pathlib import Path

from layerflow.config import ConfigError, load_config
from layerflow.io.sample_files import SampleFolderError, read_meta

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_REPRODUCE_OUTPUT = "outputs/reproduce"


def flatten(config: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested config dict -> {"section.key": value}; lists are values."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _base_files(meta: Mapping) -> list[str]:
    """The recorded config files made absolute, or the repository's model and task files if any is missing."""
    recorded = [Path(f) for f in meta.get("config_files", [])]
    if recorded and all(f.is_file() for f in recorded):
        return [str(f.resolve()) for f in recorded]
    name = f"{meta['task']}_{meta['variant']}"
    configs = REPO_ROOT / "configs"
    return [str(configs / "model.yaml"), str(configs / "tasks" / f"{name}.yaml")]


def config_overrides(recorded: Mapping, base: list[str]) -> list[str]:
    """``key=value`` for every recorded config key that the base files give differently (values as JSON)."""
    try:
        reference = flatten(load_config(base).to_dict())
    except ConfigError:
        reference = {}
    return [f"{key}={json.dumps(value)}" for key, value in flatten(recorded).items() if reference.get(key) != value]


COMPOSE_PATH_OPTIONS = {"--fg": "fg", "--bg": "bg", "--mask": "mask"}  # options naming a given layer's file


def compose_command(meta: Mapping, folder: str | os.PathLike, output: str = DEFAULT_REPRODUCE_OUTPUT) -> list[str]:
    """The recorded ``layerflow compose`` command, runnable from any folder: the inputs by the absolute
    paths recorded in ``given_sources`` and ``--output`` set to ``output/<id>`` (the sample itself exists)."""
    recorded = list(meta.get("command") or [])
    if recorded[:2] != ["layerflow", "compose"]:
        raise SampleFolderError(f"{Path(folder) / 'meta.json'}: records no compose command, so it cannot be redone")
    sources = meta.get("given_sources") or {}

    def value_for(option: str, value: str) -> str:
        if option == "--output":
            return str(Path(output) / str(meta.get("id") or Path(folder).name))
        path = (sources.get(COMPOSE_PATH_OPTIONS.get(option, "")) or {}).get("path")
        return path or value  # a colour background has no path

    argv, rest = recorded[:2], iter(recorded[2:])
    for token in rest:
        option, sep, value = token.partition("=")
        if option in COMPOSE_PATH_OPTIONS or option == "--output":
            if sep:
                argv.append(f"{option}={value_for(option, value)}")
            else:
                argv += [option, value_for(option, next(rest, ""))]
        else:
            argv.append(token)
    return argv


def reproduce_command(folder: str | os.PathLike, output: str = DEFAULT_REPRODUCE_OUTPUT) -> str:
    """A shell command (POSIX sh) that regenerates the sample into ``output/<id>/``."""
    meta = read_meta(folder)
    if meta.get("tool") == "compose":
        return shlex.join(compose_command(meta, folder, output))
    missing = [key for key in ("id", "task", "variant", "prompts", "seed", "config") if key not in meta]
    if missing:
        raise SampleFolderError(f"{Path(folder) / 'meta.json'}: lacks {missing}, so the sample cannot be reproduced")
    base = _base_files(meta)
    sources = meta.get("given_sources") or {}
    inputs = {
        layer: sources[layer]["path"] if layer in sources else str(Path(path).resolve())
        for layer, path in (meta.get("inputs") or {}).items()
    }
    manifest = {"id": meta["id"], "prompts": meta["prompts"], "inputs": inputs, "seed": meta["seed"]}
    argv = ["layerflow", "generate", "--base", *base]
    for override in config_overrides(meta["config"], base):
        argv += ["--set", override]
    argv += ["--manifest", "/dev/stdin", "--output", output, "--no-progress"]
    return f"{shlex.join(argv)} <<'EOF'\n{json.dumps(manifest, ensure_ascii=False)}\nEOF"


def describe(folder: str | os.PathLike, output: str = DEFAULT_REPRODUCE_OUTPUT) -> str:
    """The text ``layerflow inspect`` prints: prompts, task, seed, checkpoint, sources, scores, command."""
    meta = read_meta(folder)
    lines = [f"sample      {Path(folder).resolve()}", f"id          {meta.get('id', '-')}"]
    if meta.get("tool") == "compose":
        lines.append("made by     layerflow compose")
    else:
        lines += [
            f"task        {meta.get('task', '-')} ({meta.get('variant', '-')})",
            f"seed        {meta.get('seed', '-')}",
            f"checkpoint  {meta.get('checkpoint', '-')}",
            "prompts",
        ]
        lines += [f"  {layer:<6} {text}" for layer, text in (meta.get("prompts") or {}).items()]
    sources = meta.get("given_sources") or {}
    if sources:
        lines.append("given layers")
        for layer, source in sources.items():
            origin = source.get("path") or source.get("colour", "")
            sample = source.get("sample")
            if sample:
                origin += (
                    f"  ({source.get('file')} of sample {sample.get('id')}, {sample.get('task')}_"
                    f"{sample.get('variant')}, seed {sample.get('seed')})"
                )
            lines.append(f"  {layer:<6} {origin}")
    scores = meta.get("scores")
    if scores:
        shown = (
            f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}" for key, value in scores.items()
        )
        lines.append("scores      " + ", ".join(shown))
    lines += ["reproduce", reproduce_command(folder, output)]
    return "\n".join(lines)
