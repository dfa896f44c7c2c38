"""A synthetic layered clip (a moving disc with a soft matte over a textured background) for the
demo and the tests: every layer is known exactly, so readers and writers can be checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from layerflow.io.writer import write_matte_mp4, write_mp4
from layerflow.tasks import Layer


def layered_clip(frames: int, height: int, width: int) -> dict[str, np.ndarray]:
    """Layers as bytes: fg (t, h, w, 3), alpha (t, h, w) in 0..255, bg and blend (t, h, w, 3)."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    fg, alpha, bg = [], [], []
    for t in range(frames):
        phase = t / max(1, frames - 1)
        cy, cx = height * (0.3 + 0.4 * phase), width * (0.25 + 0.5 * phase)
        radius = 0.22 * min(height, width)
        distance = np.sqrt((rows - cy) ** 2 + (cols - cx) ** 2)
        matte = np.clip((radius - distance) / 2.0 + 0.5, 0.0, 1.0)  # soft 2-pixel edge
        colour = np.stack([200 + 40 * np.sin(cols / 7 + t), 60 + 0 * rows, 50 + 30 * np.cos(rows / 5)], axis=-1)
        texture = np.stack(
            [
                110 + 60 * np.sin(cols / 9 + t / 3),
                120 + 50 * np.cos(rows / 11),
                140 + 40 * np.sin((rows + cols) / 13),
            ],
            axis=-1,
        )
        fg.append(colour)
        alpha.append(matte)
        bg.append(texture)
    fg_a, alpha_a, bg_a = np.stack(fg), np.stack(alpha)[..., None], np.stack(bg)
    blend = fg_a * alpha_a + bg_a * (1 - alpha_a)
    as_bytes = lambda x: np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return {
        Layer.FG: as_bytes(fg_a),
        Layer.ALPHA: as_bytes(255 * alpha_a[..., 0]),
        Layer.BG: as_bytes(bg_a),
        Layer.BLEND: as_bytes(blend),
    }


def write_layered_clip(folder: Path, frames: int = 16, height: int = 64, width: int = 96) -> dict[str, Path]:
    """Write the clip as the demo's inputs: fg_rgba/ (RGBA PNGs), fg.mp4 + mask.mp4 (the matte), bg.mp4, blend.mp4."""
    folder = Path(folder)
    layers = layered_clip(frames, height, width)
    (folder / "fg_rgba").mkdir(parents=True, exist_ok=True)
    for index, (rgb, matte) in enumerate(zip(layers[Layer.FG], layers[Layer.ALPHA], strict=True)):
        rgba = np.concatenate([rgb, matte[..., None]], axis=-1)
        Image.fromarray(rgba, "RGBA").save(folder / "fg_rgba" / f"{index:04d}.png")
    paths = {"fg_rgba": folder / "fg_rgba"}
    for name in (Layer.FG, Layer.BG, Layer.BLEND):
        paths[name] = write_mp4(folder / f"{name}.mp4", layers[name])
    paths["mask"] = write_matte_mp4(folder / "mask.mp4", layers[Layer.ALPHA])
    return paths
