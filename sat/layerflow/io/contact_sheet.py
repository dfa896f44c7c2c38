"""A contact sheet: one PNG with a grid of frames (columns) by layers (rows), for looking instead of playing.

Rows, top to bottom: the foreground over a checkerboard, the alpha matte as grey (RGBA samples
only), the background, the blend. Columns are frames spread evenly over the clip, first and last
included. Cells wider than :data:`MAX_CELL_WIDTH` are shrunk (Lanczos, aspect kept); cells are
separated by :data:`GAP` pixels of dark grey. The written sheet names each row on the left and
numbers each column's frame on top (from 0, as the PNG sequence's file names).

Legend: t frames, h height, w width, c channels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from layerflow.io.atomic import atomic_path
from layerflow.io.labels import draw_text, text_box
from layerflow.io.writer import as_uint8_frames, checkerboard, composite_over

COLUMNS = 8  # frames shown per layer
MAX_CELL_WIDTH = 240  # pixels; wider frames are shrunk
GAP = 4  # pixels between cells and around the grid
GAP_SHADE = 32  # grey of the gaps
LABEL_FONT_PX = 12  # row names and frame numbers
LABEL_SHADE = (230, 230, 230)


def column_frames(count: int, columns: int = COLUMNS) -> list[int]:
    """Frame indices of the columns: ``min(columns, count)`` frames spread evenly, rounded to nearest."""
    return [int(i) for i in np.rint(np.linspace(0, count - 1, min(columns, count)))]


def cell_size(height: int, width: int, max_width: int = MAX_CELL_WIDTH) -> tuple[int, int]:
    """(h, w) of one cell: the frame size, shrunk to ``max_width`` with the aspect kept."""
    if width <= max_width:
        return height, width
    return max(1, round(height * max_width / width)), max_width


def named_layer_rows(fg: np.ndarray, bg: np.ndarray, blend: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The sheet's rows, (name, frames (t, h, w, 3)), from a foreground (t, h, w, 3 or 4 straight RGBA),
    background and blend."""
    fg = as_uint8_frames(fg, (3, 4), "foreground")
    rows = []
    if fg.shape[-1] == 4:
        rows.append(("foreground", composite_over(fg, checkerboard(fg.shape[1], fg.shape[2]))))  # (t, h, w, 3)
        rows.append(("alpha", np.repeat(fg[..., 3:], 3, axis=-1)))  # (t, h, w, 3) the matte as grey
    else:
        rows.append(("foreground", fg))
    rows.append(("background", as_uint8_frames(bg, (3,), "background")))
    rows.append(("blend", as_uint8_frames(blend, (3,), "blend")))
    shapes = {row.shape for _, row in rows}
    if len(shapes) != 1:
        raise ValueError(f"contact sheet: layers differ in frames or size: {sorted(shapes)} (t, h, w, c)")
    return rows


def layer_rows(fg: np.ndarray, bg: np.ndarray, blend: np.ndarray) -> list[np.ndarray]:
    """The sheet's rows (t, h, w, 3), without their names (see :func:`named_layer_rows`)."""
    return [row for _, row in named_layer_rows(fg, bg, blend)]


def contact_sheet(
    rows: Sequence[np.ndarray], columns: int = COLUMNS, max_cell_width: int = MAX_CELL_WIDTH
) -> np.ndarray:
    """Grid image (H, W, 3) bytes of rows (t, h, w, 3) of equal shape: row r, column k shows frame k of row r."""
    t, h, w, _ = rows[0].shape
    picks = column_frames(t, columns)
    ch, cw = cell_size(h, w, max_cell_width)
    sheet = np.full((GAP + len(rows) * (ch + GAP), GAP + len(picks) * (cw + GAP), 3), GAP_SHADE, np.uint8)
    for r, row in enumerate(rows):
        for k, index in enumerate(picks):
            cell = row[index]  # (h, w, 3)
            if (ch, cw) != (h, w):
                cell = np.asarray(Image.fromarray(cell).resize((cw, ch), Image.LANCZOS))  # (ch, cw, 3)
            top, left = GAP + r * (ch + GAP), GAP + k * (cw + GAP)
            sheet[top : top + ch, left : left + cw] = cell
    return sheet


def labelled_contact_sheet(
    rows: Sequence[tuple[str, np.ndarray]], columns: int = COLUMNS, max_cell_width: int = MAX_CELL_WIDTH
) -> np.ndarray:
    """:func:`contact_sheet` of the named rows with a margin on the left naming each row and a strip
    on top numbering each column's frame; the grid itself is unchanged (at offset :func:`label_margins`)."""
    grid = contact_sheet([frames for _, frames in rows], columns, max_cell_width)
    t, h, w, _ = rows[0][1].shape
    ch, cw = cell_size(h, w, max_cell_width)
    picks = column_frames(t, columns)
    names = [name for name, _ in rows]
    top, left = label_margins(names, picks)
    sheet = np.full((grid.shape[0] + top, grid.shape[1] + left, 3), GAP_SHADE, np.uint8)
    sheet[top:, left:] = grid
    image = Image.fromarray(sheet, "RGB")
    for r, name in enumerate(names):
        _, y0, _, y1 = text_box(name, LABEL_FONT_PX)
        y = top + GAP + r * (ch + GAP) + (ch - (y1 - y0)) // 2
        draw_text(image, name, (GAP, y), LABEL_FONT_PX, LABEL_SHADE)
    for k, index in enumerate(picks):
        x0, _, x1, _ = text_box(str(index), LABEL_FONT_PX)
        x = left + GAP + k * (cw + GAP) + (cw - (x1 - x0)) // 2
        draw_text(image, str(index), (x, GAP), LABEL_FONT_PX, LABEL_SHADE)
    return np.asarray(image)


def label_margins(names: Sequence[str], picks: Sequence[int]) -> tuple[int, int]:
    """(top, left) pixels added by :func:`labelled_contact_sheet` for the frame numbers and row names."""
    boxes = [text_box(text, LABEL_FONT_PX) for text in [*names, *map(str, picks)]]
    height = max(bottom - top for _, top, _, bottom in boxes)
    width = max(right - left for left, _, right, _ in boxes[: len(names)])
    return height + GAP, width + 2 * GAP


def write_contact_sheet(path: str | os.PathLike, fg: np.ndarray, bg: np.ndarray, blend: np.ndarray) -> Path:
    """Write the labelled contact sheet of one sample as a PNG (see the module docstring for the rows)."""
    target = Path(path)
    sheet = labelled_contact_sheet(named_layer_rows(fg, bg, blend))
    with atomic_path(target) as temporary:
        Image.fromarray(sheet, "RGB").save(temporary, format="PNG")
    return target
