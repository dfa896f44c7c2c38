"""Reading LayerFlow task checkpoints: the original SAT layout, or safetensors.

The original release stores a task as ``<dir>/latest`` (the iteration number as text) and
``<dir>/<iteration>/mp_rank_00_model_states.pt`` holding ``{'module': state_dict}``. The network's
keys start with ``model.diffusion_model.``; a full engine file may also hold the VAE
(``first_stage_model.``) and the T5 encoder (``conditioner.``), which are reported as ignored
because those weights come from ``CogVideoX-2b-sat/``. Pickles are read with
``weights_only=True`` only, so a crafted file cannot run code; such a file is refused as one that
could run code, while a file that is not a torch file at all (random bytes, text, a truncated
download) is called that.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from layerflow.tasks import RELEASE_FOLDERS, TaskLayout, Variant, get_layout

log = logging.getLogger(__name__)

NETWORK_PREFIX = "model.diffusion_model."
IGNORED_PREFIXES = {"first_stage_model.": "VAE", "conditioner.": "T5 text encoder"}
SAT_MODEL_FILE = "mp_rank_00_model_states.pt"
METADATA_TASK, METADATA_VARIANT = "layerflow_task", "layerflow_variant"

# Folder names of the original release (the task table's RELEASE_FOLDERS), to the task they hold.
RELEASE_FOLDER_TASKS = {folder: task for task, folder in RELEASE_FOLDERS.items()}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""


class CheckpointNotFoundError(CheckpointError):
    """The checkpoint's files are not there (to download), as opposed to there but unusable."""


def release_folder_name(layout: TaskLayout) -> str:
    return layout.release_folder


def resolve_checkpoint_file(path: str | Path) -> Path:
    """The weights file for a checkpoint folder (``latest`` + iteration) or a direct file path."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: checkpoint not found")
    for name in ("model.safetensors",):
        if (path / name).is_file():
            return path / name
    latest = path / "latest"
    if not latest.is_file():
        raise CheckpointNotFoundError(
            f"{path}: no 'latest' file (expected the iteration number, as in the original release)"
        )
    iteration = latest.read_text(encoding="utf-8", errors="replace").strip()
    if not (iteration.isascii() and iteration.isdigit()):
        iterations = sorted(p.name for p in path.iterdir() if p.name.isdigit() and (p / SAT_MODEL_FILE).is_file())
        present = f"; this folder has iteration {', '.join(iterations)}" if iterations else ""
        raise CheckpointError(
            f"{latest}: corrupt 'latest' file: it should hold only the iteration number to load (the name of "
            f"the subfolder with {SAT_MODEL_FILE}, e.g. 1000), found {iteration[:40]!r}{present}"
        )
    weights = path / iteration / SAT_MODEL_FILE
    if not weights.is_file():
        raise CheckpointNotFoundError(f"{weights}: missing ('latest' names iteration {iteration})")
    return weights


# What PyTorch's weights-only unpickler says when a pickle asks for an object beyond tensors and
# plain containers (a file that would run code); its other refusals are of malformed data.
_BLOCKED_OBJECT = re.compile(r"GLOBAL [\w.]+|reduce for unrecognized function|Can only (create new object|build)")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format (what torch.load itself tests)


def _unsafe_detail(error: BaseException) -> str:
    """What PyTorch's weights-only refusal names as the blocked object, without its advice."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return f"the object '{found.group(1)}'" if found else "an object that is not a tensor or a plain container"


def _not_a_torch_file(file: Path, error: BaseException) -> str:
    """The one-line reason a file that is no loadable torch file was refused."""
    with open(file, "rb") as handle:
        head = handle.read(len(_ZIP_MAGIC))
    if not head:
        return f"{file}: empty file, not a torch checkpoint"
    if head == _ZIP_MAGIC:
        reason = str(error).splitlines()[0].split(". ")[0] if str(error) else type(error).__name__
        return f"{file}: corrupt or truncated file ({reason})"
    return f"{file}: not a checkpoint (not a valid torch file: neither a torch.save archive nor a legacy torch pickle)"


def load_pickled_tensors(file: Path, error_type: type[Exception]) -> object:
    """``torch.load`` with ``weights_only=True`` for both the zip format and the legacy (pre-1.6) format.

    A crafted file that would run code is refused and never executed; the error says why and does
    not suggest turning the check off. A zip file is memory-mapped (no copy of a large file).
    """
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as error:
        if not _BLOCKED_OBJECT.search(str(error)):
            raise error_type(_not_a_torch_file(file, error)) from None
        raise error_type(
            f"{file}: refused: loading it would call {_unsafe_detail(error)}, which could run code; only "
            f"tensors and plain containers are accepted (get the file again from its original release)"
        ) from None
    except PermissionError as error:
        raise error_type(f"{file}: cannot read the file ({error.strerror})") from None
    except (
        RuntimeError,
        EOFError,
        OSError,
        zipfile.BadZipFile,
        ValueError,
        KeyError,
        IndexError,
        AttributeError,
    ) as error:
        raise error_type(_not_a_torch_file(file, error)) from None  # IndexError: the unpickler on random bytes


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a checkpoint file (or folder) and its metadata (safetensors only)."""
    file = resolve_checkpoint_file(path)
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                metadata = handle.metadata() or {}
                return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{file}: unreadable safetensors file ({error})") from None
    payload = load_pickled_tensors(file, CheckpointError)
    metadata = {}
    if isinstance(payload, Mapping) and "module" in payload:
        metadata = {key: payload[key] for key in (METADATA_TASK, METADATA_VARIANT) if isinstance(payload.get(key), str)}
        payload = payload["module"]
    if not isinstance(payload, Mapping) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(f"{file}: expected {{'module': state_dict}} or a state_dict of tensors")
    return dict(payload), metadata


def network_state(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Keys of the network with the prefix removed; other known components are logged as ignored."""
    network, ignored, unknown = {}, {}, []
    for key, value in state.items():
        if key.startswith(NETWORK_PREFIX):
            network[key[len(NETWORK_PREFIX) :]] = value
            continue
        for prefix, component in IGNORED_PREFIXES.items():
            if key.startswith(prefix):
                ignored[component] = ignored.get(component, 0) + 1
                break
        else:
            unknown.append(key)
    if not network and not unknown:
        raise CheckpointError(f"{source}: no '{NETWORK_PREFIX}*' keys: not a LayerFlow task checkpoint")
    if unknown and network:
        raise CheckpointError(f"{source}: unexpected keys outside the network: {_listing(unknown)}")
    if unknown:
        network = dict(state)  # a bare network state_dict (e.g. from convert --bare)
    for component, count in ignored.items():
        log.info("%s: ignoring %d %s keys (loaded from CogVideoX-2b-sat instead)", source, count, component)
    return network


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def check_release_folder(path: Path, layout: TaskLayout) -> None:
    """Refuse a folder of the original release that is named for another task or variant."""
    for part in (path, *path.parents):
        name = part.name
        for folder, task in RELEASE_FOLDER_TASKS.items():
            for variant in Variant:
                if name == f"{folder}-{variant.value}" and (task, variant) != (layout.task, layout.variant):
                    raise CheckpointError(
                        f"{path}: this is the {task.value}_{variant.value} checkpoint, "
                        f"but the config is for {layout.name}"
                    )


def check_metadata(metadata: Mapping[str, str], layout: TaskLayout, source: str) -> None:
    task, variant = metadata.get(METADATA_TASK), metadata.get(METADATA_VARIANT)
    if task and variant and (task, variant) != (layout.task.value, layout.variant.value):
        raise CheckpointError(f"{source}: this is the {task}_{variant} checkpoint, but the config is for {layout.name}")


def load_network(model: nn.Module, path: str | Path, layout: TaskLayout) -> None:
    """Load a task checkpoint into ``model`` strictly; every mismatch is one clear error line."""
    path = Path(path)
    check_release_folder(path.resolve(), layout)
    state, metadata = read_checkpoint(path)
    source = str(resolve_checkpoint_file(path))
    check_metadata(metadata, layout, source)
    state = network_state(state, source)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        hint = _variant_hint(missing, unexpected, layout)
        parts = [
            f"missing {len(missing)} keys: {_listing(missing)}" if missing else "",
            f"unexpected {len(unexpected)} keys: {_listing(unexpected)}" if unexpected else "",
        ]
        raise CheckpointError(f"{source}: does not fit {layout.name}{hint}: " + "; ".join(p for p in parts if p))
    wrong = [
        f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if tuple(state[key].shape) != tuple(value.shape)
    ]
    if wrong:
        hint = ""
        if any(item.startswith("mixins.pos_embed.pos_embedding") for item in wrong):
            hint = " (the position table has another length: a checkpoint of another task or variant?)"
        raise CheckpointError(f"{source}: shapes differ from {layout.name}{hint}: {_listing(wrong, 4)}")
    model.load_state_dict(state, strict=True)


def _variant_hint(missing: list[str], unexpected: list[str], layout: TaskLayout) -> str:
    embedder = "mixins.pos_embed.txt_embedder."
    if any(key.startswith(embedder) for key in unexpected):
        return " (it has a layer embedding, which this config lacks: a checkpoint of another task or variant?)"
    if any(key.startswith(embedder) for key in missing):
        return " (it lacks the layer embedding this config has: a checkpoint of another task or variant?)"
    return ""


def save_safetensors(state: Mapping[str, torch.Tensor], path: str | Path, layout: TaskLayout | None = None) -> None:
    """Write tensors to ``path`` atomically, recording task and variant when known."""
    from safetensors.torch import save_file

    from layerflow.io.atomic import atomic_path

    tensors = {key: value.detach().contiguous().clone() for key, value in state.items()}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=layout_metadata(layout))
        os.chmod(tmp, _file_mode())  # safetensors creates its file 0600; a checkpoint is shared like any file


def layout_metadata(layout: TaskLayout | None) -> dict[str, str]:
    """What a checkpoint records of its task and variant (nothing when unknown)."""
    return {METADATA_TASK: layout.task.value, METADATA_VARIANT: layout.variant.value} if layout else {}


def _file_mode() -> int:
    """The mode a new file gets under this process's umask (0644 with the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def release_folder_layout(path: str | Path) -> TaskLayout | None:
    """The task and variant a folder of the original release is named for (``multi-layer-generation-rgba``)."""
    for part in (Path(path), *Path(path).parents):
        for folder, task in RELEASE_FOLDER_TASKS.items():
            for variant in Variant:
                if part.name == f"{folder}-{variant.value}":
                    return get_layout(task.value, variant.value)
    return None


def save_sat_checkpoint(
    state: Mapping[str, torch.Tensor], folder: str | Path, iteration: int = 1, layout: TaskLayout | None = None
) -> None:
    """Write the original layout: ``latest`` and ``<iteration>/mp_rank_00_model_states.pt``.

    With ``layout``, the file also records the task and variant (``layerflow_task``,
    ``layerflow_variant`` beside ``module``), as the safetensors metadata does.
    """
    from layerflow.io.atomic import atomic_path

    folder = Path(folder)
    (folder / str(iteration)).mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / str(iteration) / SAT_MODEL_FILE) as tmp:
        torch.save(
            {"module": {key: value.contiguous() for key, value in state.items()}, **layout_metadata(layout)}, tmp
        )
    with atomic_path(folder / "latest") as tmp:
        tmp.write_text(str(iteration), encoding="utf-8")
