"""What sampling and training manifests share: their text and JSONL lines, and the ids of their samples.

A manifest is UTF-8 JSONL, one object per line; every problem is one line naming the file (and
line). A sample id becomes a folder name (:data:`SAFE_ID`); without one, a sample gets an id from
its content (:func:`content_id`). The sampling manifest (:mod:`layerflow.batch.manifest`) and the
training manifest (:mod:`layerflow.training.dataset`) are read through these.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

# \Z, not $: "$" also matches before a final newline, which would let "a\n" through as a folder name.
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


class ManifestError(ValueError):
    """A prompt file or manifest line that cannot be used; names the file and line."""


def content_id(prompts: Mapping[str, str], inputs: Mapping[str, str]) -> str:
    blob = json.dumps({"prompts": dict(prompts), "inputs": dict(inputs)}, sort_keys=True, ensure_ascii=False)
    return "s" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def read_text(path: Path, kind: str) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path}: {kind} not found") from None
    except IsADirectoryError:
        raise ManifestError(f"{path}: is a folder, expected a {kind}") from None
    except OSError as error:
        raise ManifestError(f"{path}: cannot read the {kind} ({error.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ManifestError(f"{path}: not UTF-8 text (byte {error.start})") from None


def jsonl_entries(path: Path, kind: str, error_type: type[Exception] = ManifestError) -> Iterator[tuple[str, object]]:
    """``("file:line", value)`` for every non-blank line of a JSONL file; unreadable text or JSON is one
    ``error_type`` line naming the file (and line) and calling the file a ``kind``."""
    try:
        text = read_text(path, kind)
    except ManifestError as error:
        raise error_type(str(error)) from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as error:
            raise error_type(f"{where}: invalid JSON ({error.msg})") from None


def string_map(
    value: object,
    field_name: str,
    where: str,
    item: str = "a string",
    error_type: type[Exception] = ManifestError,
    entries: str = "layer: text",
) -> dict[str, str]:
    """A JSON object whose values are all strings (prompts, input paths); anything else is one
    ``error_type`` line naming ``where`` and the field (``inputs.fg``), never a stringified value."""
    if not isinstance(value, dict):
        raise error_type(f"{where}: {field_name} must be an object of {entries}, got {json_type(value)}")
    for key, entry in value.items():
        if not isinstance(entry, str):
            raise error_type(f"{where}: {field_name}.{key} must be {item}, got {json_type(entry)}")
    return dict(value)


def json_type(value: object) -> str:
    """The JSON type of ``value`` as messages name it: null, true/false, a number, a string, a list, an object."""
    names = {
        type(None): "null",
        bool: "true/false",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }
    return names.get(type(value), type(value).__name__)
