"""Labels on previews and contact sheets: layer names and frame numbers where they belong, nothing else touched."""

from __future__ import annotations

import numpy as np
from PIL import Image

from layerflow.io.contact_sheet import (
    GAP,
    GAP_SHADE,
    cell_size,
    column_frames,
    contact_sheet,
    label_margins,
    labelled_contact_sheet,
    named_layer_rows,
    write_contact_sheet,
)
from layerflow.io.labels import BOX_SHADE, TEXT_SHADE, label_frame, label_height, labelled_side_by_side

H, W = 64, 96


def ink(region: np.ndarray, background) -> int:
    """Pixels of ``region`` (h, w, 3) that differ from the ``background`` shade: where text was drawn."""
    return int((region != np.asarray(background, np.uint8)).any(axis=-1).sum())


def test_a_label_is_text_on_a_box_in_its_corner_and_nothing_else_changes():
    frame = np.full((H, W, 3), 128, np.uint8)
    top = label_frame(frame, "blend")
    changed = (top != frame).any(axis=-1)  # (h, w)
    rows, cols = np.nonzero(changed)
    assert rows.min() == 0 and cols.min() == 0 and rows.max() < label_height(H) and cols.max() < W // 2
    box = top[: rows.max() + 1, : cols.max() + 1]
    assert (box == BOX_SHADE).all(axis=-1).any() and (box > TEXT_SHADE - 64).all(axis=-1).any()  # anti-aliased
    assert np.array_equal(top[~changed], frame[~changed])
    bottom = label_frame(frame, "blend", corner="bottom-left")
    rows = np.nonzero((bottom != frame).any(axis=-1))[0]
    assert rows.max() == H - 1 and rows.min() >= H - label_height(H)
    assert not np.array_equal(label_frame(frame, "alpha"), top), "another text draws other pixels"


def test_preview_panels_carry_their_names_and_the_frame_number():
    t = 3
    panels = [(name, np.full((t, H, W, 3), shade, np.uint8)) for name, shade in (("foreground", 90), ("alpha", 160))]
    video = labelled_side_by_side(panels)  # (t, h, 2w, 3)
    assert video.shape == (t, H, 2 * W, 3)
    band = slice(label_height(H), H - label_height(H))
    assert (video[:, band, :W] == 90).all() and (video[:, band, W:] == 160).all(), "labels stay in their corners"
    top, bottom = slice(0, label_height(H)), slice(H - label_height(H), H)
    for k in (0, 1):
        assert ink(video[0, top, k * W : (k + 1) * W], (90, 160)[k]) > 0, "every panel is named"
    assert np.array_equal(video[0, top], video[2, top]), "the names do not change from frame to frame"
    assert not np.array_equal(video[0, bottom, :W], video[1, bottom, :W]), "the frame number does"
    assert ink(video[0, bottom, W:], 160) == 0, "only the first panel carries the frame number"


def test_the_contact_sheet_names_rows_and_numbers_columns_around_the_unchanged_grid(tmp_path):
    frames = 10
    rng = np.random.default_rng(0)
    fg = rng.integers(0, 256, (frames, H, W, 4), dtype=np.uint8)
    bg, blend = (rng.integers(0, 256, (frames, H, W, 3), dtype=np.uint8) for _ in range(2))
    rows = named_layer_rows(fg, bg, blend)
    assert [name for name, _ in rows] == ["foreground", "alpha", "background", "blend"]
    sheet = labelled_contact_sheet(rows, columns=4)
    picks = column_frames(frames, 4)
    top, left = label_margins([name for name, _ in rows], picks)
    grid = contact_sheet([frames for _, frames in rows], columns=4)
    assert sheet.shape == (grid.shape[0] + top, grid.shape[1] + left, 3)
    assert np.array_equal(sheet[top:, left:], grid), "labels never cover a frame"
    ch, cw = cell_size(H, W)
    headers = [sheet[:top, left + GAP + k * (cw + GAP) :][:, :cw] for k in range(len(picks))]
    assert all(ink(header, GAP_SHADE) > 0 for header in headers), "every column is numbered"
    assert not np.array_equal(headers[0], headers[1]), f"frames {picks[0]} and {picks[1]} are told apart"
    names = [sheet[top + GAP + r * (ch + GAP) :][:ch, :left] for r in range(len(rows))]
    assert all(ink(name, GAP_SHADE) > 0 for name in names), "every row is named"
    assert len({name.tobytes() for name in names}) == len(rows)
    path = write_contact_sheet(tmp_path / "sheet.png", fg, bg, blend)
    assert np.array_equal(np.asarray(Image.open(path)), labelled_contact_sheet(rows))
    rgb_rows = named_layer_rows(fg[..., :3], bg, blend)
    assert [name for name, _ in rgb_rows] == ["foreground", "background", "blend"], "no matte row without alpha"
