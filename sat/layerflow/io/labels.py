"""Text on pictures: the layer names and frame numbers of previews and contact sheets.

Text is drawn with the font Pillow carries inside itself (rendered by FreeType; Pillow's small
bitmap font where it was built without FreeType), so no font file and no new package is needed.
Labels on frames are white on a dark box, readable over any picture. Frame numbers count from 0,
as the PNG sequences name their files (``0003.png`` is frame 3).

Legend: t frames, h height, w width.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TEXT_SHADE = 255  # white text
BOX_SHADE = 0  # on a black box
MIN_FONT_PX = 10


@functools.cache
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` pixels (its fixed-size bitmap font without FreeType)."""
    return ImageFont.load_default(size)


def font_size_for(height: int) -> int:
    """Label text size for frames ``height`` pixels high: 1/24 of it (20 px at 480), at least 10."""
    return max(MIN_FONT_PX, round(height / 24))


def text_box(text: str, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of ``text`` drawn at the origin."""
    return tuple(int(v) for v in ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font(size)))


def draw_text(image: Image.Image, text: str, xy: tuple[int, int], size: int, fill) -> None:
    """Draw ``text`` on ``image`` (in place) with its box's top-left corner at ``xy``."""
    left, top, _, _ = text_box(text, size)
    ImageDraw.Draw(image).text((xy[0] - left, xy[1] - top), text, fill=fill, font=font(size))


def label_height(frame_height: int) -> int:
    """Rows a label box may cover at the top or bottom of a frame ``frame_height`` pixels high
    (the box of the tallest text: letters with ascenders and descenders)."""
    size = font_size_for(frame_height)
    _, top, _, bottom = text_box("foreground frame 0123456789 gjpqy", size)
    return bottom - top + 2 * _padding(size)


def _padding(size: int) -> int:
    return max(2, size // 4)


def label_frame(frame: np.ndarray, text: str, corner: str = "top-left", size: int | None = None) -> np.ndarray:
    """A copy of ``frame`` (h, w, 3) bytes with ``text`` on a dark box in a ``corner``
    (``top-left``, ``bottom-left``); the box is clipped at the frame's edges."""
    h, w, _ = frame.shape
    size = size or font_size_for(h)
    pad = _padding(size)
    left, top, right, bottom = text_box(text, size)
    box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
    y0 = 0 if corner == "top-left" else max(0, h - box_h)
    image = Image.fromarray(np.ascontiguousarray(frame), "RGB")
    ImageDraw.Draw(image).rectangle((0, y0, box_w - 1, y0 + box_h - 1), fill=(BOX_SHADE,) * 3)
    draw_text(image, text, (pad, y0 + pad), size, (TEXT_SHADE,) * 3)
    return np.asarray(image)


def label_frames(frames: np.ndarray, texts: Sequence[str], corner: str = "top-left") -> np.ndarray:
    """Frames (t, h, w, 3) with ``texts[i]`` on frame i (see :func:`label_frame`)."""
    return np.stack([label_frame(frame, text, corner) for frame, text in zip(frames, texts, strict=True)])


def labelled_side_by_side(panels: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    """Named panels, each (t, h, w, 3) bytes, side by side (t, h, n w, 3): every panel carries its
    name in the top-left corner and the first one the frame number (``frame 3``) in the bottom-left."""
    labelled = []
    for index, (name, frames) in enumerate(panels):
        frames = label_frames(frames, [name] * len(frames))
        if index == 0:
            frames = label_frames(frames, [f"frame {i}" for i in range(len(frames))], corner="bottom-left")
        labelled.append(frames)
    return np.concatenate(labelled, axis=2)  # (t, h, n w, 3)
