"""What the page shows of a finished job: its files as URLs, its scores, its zip, and compose.

Every URL is ``/files/<path under the output folder>``. The zip of a sample folder (every file in
it, under ``<job id>/``: PNG RGBA frames, ProRes 4444 ``.mov``, WebM with alpha, the MP4s,
``meta.json``) is made once into ``zips/<job id>.zip``. Compose puts the job's foreground over a
colour or an uploaded background with :func:`layerflow.tools.compose.compose`, into
``composes/<job id>-<colour or upload>/``; the same request again gets the same folder.
"""

from __future__ import annotations

import os
import re
import threading
import zipfile
from pathlib import Path
from urllib.parse import quote

from layerflow.config import OutputSection
from layerflow.geometry import VAE_SPATIAL_COMPRESSION
from layerflow.io.atomic import atomic_path
from layerflow.io.output_folder import is_complete
from layerflow.io.sample_files import META_FILE, given_video, layer_video, read_meta
from layerflow.tasks import Layer, TaskLayout, get_layout
from layerflow.tools.compose import compose

ALPHA_WEBM = "foreground.webm"  # output.alpha_video both: VP9 with alpha, the page's checkerboard view
PREVIEW = "preview.mp4"
COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")
# compose writes only what the page shows: the blend and the layer videos, no RGBA exports or preview
COMPOSE_OUTPUT = OutputSection(alpha_video="none", png_sequence=False, preview=False)


class ResultError(ValueError):
    """A request about a result that cannot be met (the message is one line)."""


def file_url(output: Path, path: Path) -> str:
    return "/files/" + quote(path.relative_to(output).as_posix())


def layout_of(folder: Path) -> TaskLayout:
    meta = read_meta(folder)
    return get_layout(meta["task"], meta["variant"])


def describe(output: Path, folder: Path) -> dict:
    """The ``result`` of a finished job (its sample folder ``folder``), as the contract names it."""
    meta = read_meta(folder)
    layout = get_layout(meta["task"], meta["variant"])

    def url(name: str) -> str | None:
        path = folder / name
        return file_url(output, path) if path.is_file() else None

    layers = {name: url(layer_video(name)) for name in layout.video_layers if name != Layer.ALPHA}
    given = {name: url(given_video(name)) for name in layout.given_layers}
    return {
        "layers": {name: link for name, link in layers.items() if link},
        "alpha": url(layer_video(Layer.ALPHA)),
        "fg_alpha": url(ALPHA_WEBM),
        "given": {name: link for name, link in given.items() if link},
        "preview": url(PREVIEW),
        "score": meta.get("scores"),
        "meta": url(META_FILE),
        "zip": f"/api/jobs/{quote(folder.name)}/zip",
    }


def _files_of(folder: Path) -> list[Path]:
    """Every plain file below ``folder``, links left out, in name order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(root, d)))
        found += [Path(root, name) for name in sorted(files) if not os.path.islink(os.path.join(root, name))]
    return found


class Results:
    """Zips and composes of the sample folders in ``output / "samples"``."""

    def __init__(self, output: Path):
        self.output = output
        self.samples = output / "samples"
        self.zips = output / "zips"
        self.composes = output / "composes"
        self._lock = threading.Lock()  # one zip or compose written at a time: the same request twice makes one

    def folder(self, job_id: str) -> Path | None:
        folder = self.samples / job_id
        return folder if is_complete(folder) else None

    def zip_of(self, folder: Path) -> Path:
        """``zips/<id>.zip`` of a sample folder (made the first time it is asked for)."""
        target = self.zips / f"{folder.name}.zip"
        with self._lock:
            if not target.is_file():
                with atomic_path(target, within=self.output, where="--output") as temporary:
                    with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as archive:
                        for file in _files_of(folder):
                            archive.write(file, f"{folder.name}/{file.relative_to(folder).as_posix()}")
        return target

    def compose_over(self, folder: Path, background: str, name: str) -> Path:
        """The job's foreground over ``background`` (a colour or a file): ``composes/<id>-<name>/blend.mp4``."""
        layout = layout_of(folder)
        if Layer.ALPHA not in layout.video_layers:
            raise ResultError(f"compose needs a foreground with alpha; {layout.name} has none (use an RGBA variant)")
        target = self.composes / f"{folder.name}-{name}"
        with self._lock:
            if not is_complete(target):
                height, width = _frame_size(folder)
                self.composes.mkdir(parents=True, exist_ok=True)
                compose(str(folder), background, target, size=(height, width), settings=COMPOSE_OUTPUT)
        return target / layer_video(Layer.BLEND)


def _frame_size(folder: Path) -> tuple[int, int]:
    """(height, width) of a sample folder's frames, from its config in ``meta.json``."""
    network = read_meta(folder)["config"]["model"]["network"]
    return network["latent_height"] * VAE_SPATIAL_COMPRESSION, network["latent_width"] * VAE_SPATIAL_COMPRESSION
