"""A job's JSON body (``POST /api/jobs``) read into a :class:`~layerflow.serve.jobs.JobRequest`.

Every field is checked and a wrong one is refused with one line naming it (HTTP 400): ``task`` and
``variant`` name a layout; ``prompts`` has a non-empty text for each of the task's prompt layers
(others are left out); ``given`` names an upload for each given layer of a conditioned task (plus
an optional ``mask`` where the task takes one) and nothing for the others; ``seed``, ``steps``,
``guidance`` and ``size`` are within the server's limits, their defaults those of the config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from layerflow.serve.catalog import format_size
from layerflow.serve.jobs import JobRequest
from layerflow.serve.uploads import UploadStore
from layerflow.tasks import Task, TaskLayout, Variant, get_layout

FIELDS = ("task", "variant", "prompts", "given", "seed", "steps", "guidance", "size")
MAX_PROMPT_CHARS = 2000
MAX_GUIDANCE = 50.0


class BadField(ValueError):
    """A field of the body that cannot be used (HTTP 400; one line naming it)."""


@dataclass(frozen=True)
class Defaults:
    """What a job gets for a field it leaves out, and the limits of the others."""

    seed: int
    steps: int
    guidance: float
    sizes: Sequence[tuple[int, int]]
    max_steps: int


def _integer(body: Mapping, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadField(f"{name}: expected an integer from {low} to {high}, got {value!r}")
    return value


def _layout(body: Mapping) -> TaskLayout:
    task, variant = body.get("task"), body.get("variant")
    if task not in [t.value for t in Task]:
        raise BadField(f"task: expected one of {', '.join(t.value for t in Task)}, got {task!r}")
    if variant not in [v.value for v in Variant]:
        raise BadField(f"variant: expected one of {', '.join(v.value for v in Variant)}, got {variant!r}")
    return get_layout(task, variant)


def _prompts(body: Mapping, layout: TaskLayout) -> dict[str, str]:
    prompts = body.get("prompts")
    if not isinstance(prompts, Mapping):
        raise BadField(f"prompts: expected an object with a text for each of {', '.join(layout.prompt_layers)}")
    chosen = {}
    for name in layout.prompt_layers:
        text = prompts.get(name)
        if not isinstance(text, str) or not text.strip():
            raise BadField(f"prompts.{name}: {layout.name} needs a non-empty {name} prompt")
        if len(text) > MAX_PROMPT_CHARS:
            raise BadField(f"prompts.{name}: at most {MAX_PROMPT_CHARS} characters, got {len(text)}")
        chosen[name] = text.strip()
    return chosen


def _given(body: Mapping, layout: TaskLayout, uploads: UploadStore) -> dict:
    given = body.get("given") or {}
    if not isinstance(given, Mapping):
        raise BadField("given: expected an object {layer: upload id}")
    required = [g.layer for g in layout.given_inputs]
    missing, unused = layout.check_input_names(given)
    if unused:
        takes = f"takes {', '.join(layout.accepted_inputs)}" if layout.accepted_inputs else "takes no given layer"
        raise BadField(f"given.{unused[0]}: {layout.name} {takes}")
    if missing:
        raise BadField(f"given.{missing[0]}: {layout.name} needs an uploaded {', '.join(required)} layer")
    files = {}
    for name, upload_id in given.items():
        upload = uploads.get(upload_id)
        if upload is None:
            raise BadField(f"given.{name}: no upload {upload_id!r} (upload the file first)")
        files[name] = upload.path
    return files


def _guidance(body: Mapping, default: float) -> float:
    value = body.get("guidance", default)
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or not 0 <= value <= MAX_GUIDANCE:
        raise BadField(f"guidance: expected a number from 0 to {MAX_GUIDANCE:g}, got {value!r}")
    return float(value)


def _size(body: Mapping, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    names = {format_size(size): size for size in sizes}
    value = body.get("size", format_size(sizes[0]))
    if value not in names:
        raise BadField(f"size: expected one of {', '.join(names)}, got {value!r}")
    return names[value]


def read_job(body: object, defaults: Defaults, uploads: UploadStore) -> JobRequest:
    """The job that ``body`` (parsed JSON) asks for; :class:`BadField` names the first wrong field."""
    if not isinstance(body, Mapping):
        raise BadField("the body: expected a JSON object with task, variant, prompts, ...")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise BadField(f"{unknown[0]}: unknown field; the fields are {', '.join(FIELDS)}")
    layout = _layout(body)
    return JobRequest(
        layout=layout,
        prompts=_prompts(body, layout),
        given=_given(body, layout, uploads),
        seed=_integer(body, "seed", defaults.seed, 0, 2**63 - 1),
        steps=_integer(body, "steps", defaults.steps, 2, defaults.max_steps),
        guidance=_guidance(body, defaults.guidance),
        size=_size(body, defaults.sizes),
    )
