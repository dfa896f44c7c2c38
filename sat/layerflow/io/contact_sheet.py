"""A contact sheet: one PNG with a grid of frames (columns) by layers (rows), for looking instead of playing.

Rows, top to bottom: the foreground over a checkerboard, the alpha matte as grey (RGBA samples
only), the background, the blend. Columns are frames spread evenly over the clip, first and last
included. Cells wider than :data:`MAX_CELL_WIDTH` are shrunk (Lanczos, aspect kept); cells are
separated by :data:`GAP` pixels of dark grey.

Legend: t frames, h height, w width, c channels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from layerflow.io.atomic import atomic_path
from layerflow.io.writer import as_uint8_frames, checkerboard, composite_over

COLUMNS = 8  # frames shown per layer
MAX_CELL_WIDTH = 240  # pixels; wider frames are shrunk
GAP = 4  # pixels between cells and around the grid
GAP_SHADE = 32  # grey of the gaps


def column_frames(count: int, columns: int = COLUMNS) -> list[int]:
    """Frame indices of the columns: ``min(columns, count)`` frames spread evenly, rounded to nearest."""
    return [int(i) for i in np.rint(np.linspace(0, count - 1, min(columns, count)))]


def cell_size(height: int, width: int, max_width: int = MAX_CELL_WIDTH) -> tuple[int, int]:
    """(h, w) of one cell: the frame size, shrunk to ``max_width`` with the aspect kept."""
    if width <= max_width:
        return height, width
    return max(1, round(height * max_width / width)), max_width


def layer_rows(fg: np.ndarray, bg: np.ndarray, blend: np.ndarray) -> list[np.ndarray]:
    """The sheet's rows (t, h, w, 3) each from a foreground (t, h, w, 3 or 4 straight RGBA), background and blend."""
    fg = as_uint8_frames(fg, (3, 4), "foreground")
    rows = []
    if fg.shape[-1] == 4:
        rows.append(composite_over(fg, checkerboard(fg.shape[1], fg.shape[2])))  # (t, h, w, 3)
        rows.append(np.repeat(fg[..., 3:], 3, axis=-1))  # (t, h, w, 3) the matte as grey
    else:
        rows.append(fg)
    rows.append(as_uint8_frames(bg, (3,), "background"))
    rows.append(as_uint8_frames(blend, (3,), "blend"))
    shapes = {row.shape for row in rows}
    if len(shapes) != 1:
        raise ValueError(f"contact sheet: layers differ in frames or size: {sorted(shapes)} (t, h, w, c)")
    return rows


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


def write_contact_sheet(path: str | os.PathLike, fg: np.ndarray, bg: np.ndarray, blend: np.ndarray) -> Path:
    """Write the contact sheet of one sample as a PNG (see the module docstring for the rows)."""
    target = Path(path)
    sheet = contact_sheet(layer_rows(fg, bg, blend))
    with atomic_path(target) as temporary:
        Image.fromarray(sheet, "RGB").save(temporary, format="PNG")
    return target
