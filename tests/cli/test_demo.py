"""The no-weights demo end to end: every configuration writes decodable outputs of the right shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pytest
from conftest import REPO_ROOT, tiny_config
from PIL import Image

from layerflow.batch.given import read_given_layers
from layerflow.batch.manifest import Sample
from layerflow.cli.demo import run_demo
from layerflow.io.output_folder import SAMPLE_MARKER
from layerflow.io.synthetic import layered_clip, write_layered_clip
from layerflow.tasks import LAYOUTS

pytestmark = pytest.mark.slow

CONFIGS = REPO_ROOT / "configs"
NAMES = [layout.name for layout in LAYOUTS.values()]


def decode(path, pix_fmt: str = "rgb24") -> np.ndarray:
    """All frames of a video as (t, h, w, c) bytes, decoded by ffmpeg itself."""
    probe = imageio_ffmpeg.count_frames_and_secs(str(path))[0]
    channels = 4 if pix_fmt == "rgba" else 3
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt=pix_fmt, bpp=channels)
    meta = next(reader)
    width, height = meta["size"]
    frames = np.stack([np.frombuffer(f, np.uint8).reshape(height, width, channels) for f in reader])
    assert len(frames) == probe
    return frames


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    assert run_demo(output) == 0
    return output


@pytest.mark.parametrize("name", NAMES)
def test_demo_outputs(demo, name):
    config = tiny_config(name)
    layout = config.layout
    height, width = config.video_size
    folder = demo / name
    expected = {
        "foreground.mp4",
        "background.mp4",
        "blend.mp4",
        "preview.mp4",
        "contact_sheet.png",
        "meta.json",
        SAMPLE_MARKER,
    }
    if layout.variant.value == "rgba":
        expected |= {"alpha.mp4", "foreground.mov", "foreground_rgba"}
    expected |= {
        f"given_{ {'fg': 'foreground', 'bg': 'background', 'blend': 'blend', 'alpha': 'alpha'}[n] }.mp4"
        for n in layout.given_layers
    }
    if layout.given_layers:
        expected.add("given")  # the given inputs as they were given
    assert {p.name for p in folder.iterdir()} == expected
    frames = layout.span("fg").pixel_frames
    for video in folder.glob("*.mp4"):
        decoded = decode(video)
        wide = (4 if layout.variant.value == "rgba" else 3) if video.name == "preview.mp4" else 1  # + the matte
        assert decoded.shape == (frames, height, width * wide, 3), video.name
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["task"] == layout.task.value and meta["variant"] == layout.variant.value
    assert set(meta["prompts"]) == set(layout.prompt_layers)
    assert meta["seed"] == 0 and meta["code_version"] and meta["config"]["task"]["name"] == layout.task.value
    if layout.variant.value == "rgba":
        pngs = sorted((folder / "foreground_rgba").glob("*.png"))
        assert len(pngs) == frames
        image = Image.open(pngs[0])
        assert image.mode == "RGBA" and image.size == (width, height)
        alpha = decode(folder / "foreground.mov", "rgba")[..., 3]
        assert alpha.shape == (frames, height, width)
        png_alpha = np.stack([np.asarray(Image.open(p))[..., 3] for p in pngs])
        assert np.abs(alpha.astype(int) - png_alpha.astype(int)).mean() < 2, "ProRes alpha differs from the PNGs"
        assert alpha.std() > 0, "the alpha plane should not be constant"


def test_given_layers_arrive_as_the_model_expects(tmp_path):
    """A synthetic layered clip read from RGBA PNGs, RGB + mask videos and plain MP4s."""
    inputs = write_layered_clip(tmp_path, frames=20, height=64, width=96)
    truth = layered_clip(20, 64, 96)
    rgba = tiny_config("fg2bg_rgba")
    sample = Sample("x", {}, {"fg": str(inputs["fg_rgba"])})
    from_pngs = read_given_layers(sample, rgba)
    from_mask = read_given_layers(Sample("x", {}, {"fg": str(inputs["fg"]), "mask": str(inputs["mask"])}), rgba)
    for given in (from_pngs, from_mask):
        assert set(given) == {"fg", "alpha"}
        for video in given.values():
            assert video.shape == (16, 3, 64, 96) and video.min() >= -1 and video.max() <= 1
    picked_frames = np.arange(16)  # the first 16 of the 20 frames, one for one
    matte = truth["alpha"][picked_frames].astype(np.float32) / 255.0
    expected_alpha = 2 * matte - 1
    picked = from_pngs["alpha"][:, 0].numpy()
    assert np.abs(picked - expected_alpha).mean() < 0.05
    assert np.abs(from_mask["alpha"][:, 0].numpy() - expected_alpha).mean() < 0.08
    background = read_given_layers(Sample("x", {}, {"bg": str(inputs["bg"])}), tiny_config("bg2fg_rgb"))
    assert background["bg"].shape == (16, 3, 64, 96)


def test_output_folder_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    prompts = tmp_path / "p"
    prompts.mkdir()
    for layer in ("fg", "bg", "blend"):
        (prompts / f"{layer}.txt").write_text("a thing\n")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "sat" / "sample_video.py"),
            "--base",
            *[str(CONFIGS / f) for f in ("model.yaml", "tasks/gen_rgb.yaml", "tiny.yaml")],
            "--prompt-dir",
            str(prompts),
            "--output",
            str(blocker / "out"),
            "--no-progress",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "sat")},
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(blocker) in errors[0]
    assert blocker.read_text() == "not a folder"


def test_the_rank_log_holds_each_line_once(demo):
    """The demo runs its 8 configurations in one process into one folder: one log line per record."""
    lines = (demo / "logs" / "rank0.log").read_text(encoding="utf-8").splitlines()
    starts = [line for line in lines if " rank 0/1: " in line]
    assert len(starts) == len(NAMES), starts  # one per configuration; each was repeated by every later run
    assert len(lines) == len(set(lines))
