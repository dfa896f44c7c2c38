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

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
