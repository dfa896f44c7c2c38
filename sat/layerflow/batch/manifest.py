"""Samples to run: from per-layer prompt files or a JSONL manifest, with stable ids and seeds.

Every sample gets an id (given in the manifest, else derived from its content) and a seed derived
from the run seed and that id, so a sample's result does not depend on how many processes run or
in which order. Rank r of N takes samples r, r+N, r+2N, ...
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from layerflow.config import ConfigError, SamplingSection, apply_sampling_overrides
from layerflow.io.manifest_lines import (
    SAFE_ID,
    ManifestError,
    content_id,
    json_type,
    jsonl_entries,
    read_text,
    string_map,
)
from layerflow.tasks import MASK_INPUT, TaskLayout

# Names the run itself uses in the output folder; a sample may not take them (in any letter case,
# since macOS and Windows file systems ignore case).
RESERVED_IDS = frozenset({"logs", "failures.jsonl"})


@dataclass(frozen=True)
class Sample:
    """One generation: prompts and given-layer sources by layer name, its id, seed and overrides."""

    id: str
    prompts: Mapping[str, str]
    inputs: Mapping[str, str] = field(default_factory=dict)
    seed: int | None = None
    overrides: Mapping[str, object] = field(default_factory=dict)
    source: str = ""  # where the sample was defined, e.g. "jobs.jsonl:3", for messages

    def resolved_seed(self, run_seed: int) -> int:
        if self.seed is not None:
            return self.seed
        digest = hashlib.sha256(f"{run_seed}:{self.id}".encode()).digest()
        return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def check_prompts(prompts: Mapping[str, str], layout: TaskLayout, where: str) -> None:
    missing = [name for name in layout.prompt_layers if name not in prompts]
    extra = [name for name in prompts if name not in layout.prompt_layers]
    if missing or extra:
        raise ManifestError(
            f"{where}: {layout.name} takes prompts for {list(layout.prompt_layers)}; "
            f"missing {missing}, not used {extra}"
        )
    empty = [name for name in layout.prompt_layers if not prompts[name].strip()]
    if empty:
        raise ManifestError(f"{where}: empty prompt for {empty}")


def check_inputs(inputs: Mapping[str, str], layout: TaskLayout, where: str) -> None:
    missing, extra = layout.check_input_names(inputs)
    if missing or extra:
        required = [given.layer for given in layout.given_inputs]
        mask = " (+ optional mask: the foreground's matte)" if MASK_INPUT in layout.accepted_inputs else ""
        raise ManifestError(
            f"{where}: {layout.name} takes input videos for {required}{mask}; missing {missing}, not used {extra}"
        )


@dataclass(frozen=True)
class PromptText:
    """A prompt given inline on the command line (``--prompt-text``), used for every sample."""

    text: str


# A value ending like a file name (``fg.txt``, ``prompts/fg``): one that does not exist is a typo, not text.
_FILE_LIKE = re.compile(r"^\S*(/|\\)\S*$|^\S+\.[A-Za-z0-9]{1,8}$|\.txt$", re.IGNORECASE)


def prompt_source(layer: str, value: str) -> Path | PromptText:
    """What ``--prompt LAYER=VALUE`` means: the file ``VALUE`` when it exists, else the prompt text itself.

    A value that looks like a file name (it ends in a suffix such as ``.txt``, or is one word with
    a ``/``) but names nothing is refused, so a mistyped file name never becomes a prompt.
    """
    path = Path(value).expanduser()
    if os.path.exists(path):  # False, not an error, for a long text (the name would be too long)
        return path
    if _FILE_LIKE.search(value.strip()):
        raise ManifestError(
            f"--prompt {layer}={value}: no such prompt file (for a prompt that looks like a file name, "
            f"use --prompt-text {layer}=TEXT)"
        )
    return inline_prompt(layer, value, "--prompt")


def inline_prompt(layer: str, text: str, flag: str = "--prompt-text") -> PromptText:
    """``--prompt-text LAYER=TEXT``: one prompt on one line."""
    if "\n" in text.strip():
        raise ManifestError(f"{flag} {layer}: expected one prompt on one line (put several in a prompt file)")
    return PromptText(text.strip())


def samples_from_prompt_files(
    files: Mapping[str, Path | PromptText],
    inputs: Mapping[str, str],
    layout: TaskLayout,
    ids: Sequence[str] | None = None,
) -> list[Sample]:
    """Per-layer prompt files: line i of every file makes sample i (blank lines are skipped).

    A :class:`PromptText` is the same prompt in every sample (one sample when every layer's is).
    """
    lines: dict[str, list[str]] = {}
    shared: dict[str, str] = {}
    for layer, path in files.items():
        if isinstance(path, PromptText):
            shared[layer] = path.text
            continue
        lines[layer] = [line.strip() for line in read_text(Path(path), "prompt file").splitlines() if line.strip()]
        if not lines[layer]:
            raise ManifestError(f"{path}: empty prompt file (expected one prompt per line)")
    check_prompts({layer: "x" for layer in files}, layout, "prompt files")
    empty = [layer for layer, text in shared.items() if not text]
    if empty:
        raise ManifestError(f"empty prompt text for {empty}")
    counts = {layer: len(values) for layer, values in lines.items()}
    if len(set(counts.values())) > 1:
        raise ManifestError(f"prompt files have different numbers of prompts: {counts}")
    check_inputs(inputs, layout, "inputs")
    samples = []
    for i in range(next(iter(counts.values()), 1)):
        prompts = {layer: shared[layer] if layer in shared else lines[layer][i] for layer in layout.prompt_layers}
        sample_id = ids[i] if ids else f"{i:04d}-{content_id(prompts, inputs)}"
        where = f"prompt files, line {i + 1}"
        check_sample_id(sample_id, where)
        samples.append(Sample(id=sample_id, prompts=prompts, inputs=dict(inputs), source=where))
    return samples


def check_sample_id(sample_id: str, where: str) -> None:
    """A sample id becomes a folder name: safe characters only, and none of the run's own names."""
    if not SAFE_ID.match(sample_id):
        raise ManifestError(
            f"{where}: id {sample_id!r} must be letters, digits, '.', '_' or '-' "
            f"(starting with a letter or digit, at most 128 characters; no spaces, newlines or other "
            f"control characters)"
        )
    if sample_id.lower() in RESERVED_IDS:
        raise ManifestError(
            f"{where}: id {sample_id!r} is reserved for the run's own files "
            f"({', '.join(sorted(RESERVED_IDS))}); choose another id"
        )


def _string_map(value: object, field_name: str, where: str) -> dict[str, str]:
    """A JSON object of strings (prompts, inputs); any other JSON type is an error, never stringified."""
    return string_map(value, field_name, where)


def _json_type(value: object) -> str:
    return json_type(value)


def samples_from_manifest(path: Path, layout: TaskLayout, sampling: SamplingSection | None = None) -> list[Sample]:
    """JSONL: one object per line with ``prompts`` {layer: text}, optional ``inputs`` {layer: path}
    (relative to the manifest), ``id``, ``seed`` and ``overrides`` {sampling.key: value}.

    With ``sampling`` (the run's sampling section) every line's overrides are validated now, so a
    bad value stops the run before any model loads.
    """
    path = Path(path)
    samples, seen = [], set()
    for where, entry in jsonl_entries(path, "manifest"):
        if not isinstance(entry, dict) or "prompts" not in entry:
            raise ManifestError(f"{where}: expected an object with a 'prompts' mapping")
        unknown = sorted(set(entry) - {"id", "prompts", "inputs", "seed", "overrides"})
        if unknown:
            raise ManifestError(f"{where}: unknown fields {unknown}")
        prompts = _string_map(entry["prompts"], "prompts", where)
        check_prompts(prompts, layout, where)
        given = _string_map(entry.get("inputs") or {}, "inputs", where)
        inputs = {k: str((path.parent / v) if not Path(v).is_absolute() else v) for k, v in given.items()}
        check_inputs(inputs, layout, where)
        raw_id = entry.get("id")
        if raw_id is not None and not isinstance(raw_id, str):
            raise ManifestError(f"{where}: id must be a string, got {_json_type(raw_id)}")
        sample_id = raw_id if raw_id is not None else content_id(prompts, given)
        check_sample_id(sample_id, where)
        if sample_id.lower() in seen:
            raise ManifestError(
                f"{where}: duplicate id {sample_id!r} (ids differing only in case clash on "
                f"case-insensitive file systems)"
                if sample_id not in {s.id for s in samples}
                else f"{where}: duplicate id {sample_id!r}"
            )
        seen.add(sample_id.lower())
        seed = entry.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ManifestError(f"{where}: seed must be an integer from 0 to 2**63-1, got {seed!r}")
        overrides = entry.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ManifestError(f"{where}: overrides must be an object of sampling.key: value")
        if sampling is not None:
            try:
                apply_sampling_overrides(sampling, overrides, where)
            except ConfigError as error:
                raise ManifestError(str(error)) from None
        samples.append(Sample(sample_id, prompts, inputs, seed, overrides, source=where))
    if not samples:
        raise ManifestError(f"{path}: no samples")
    return samples


def shard(samples: Sequence[Sample], rank: int, world_size: int) -> list[Sample]:
    return list(samples[rank::world_size])
