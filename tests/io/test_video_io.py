"""Reading given layers and writing outputs, on a tiny synthetic layered clip made here.

The clip: a red square with a soft-edged matte (255 inside, 128 on a 2-pixel rim, 0 outside)
moving over a textured gradient; blend = fg * a + bg * (1 - a). Lossless sources (PNG) must
read back exactly as ``u8 / 127.5 - 1``; lossy ones (H.264 written at imageio quality 8) within
a mean absolute error of 0.03 in [-1, 1] (about 4 grey levels; 0.021 measured). MP4s our writer
makes (quality 5, crf 25) decode within a mean of 6 grey levels (3.8 measured).
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from layerflow.io import writer as video_writer
from layerflow.io.atomic import NotWritableError, atomic_path, write_text_atomic
from layerflow.io.labels import label_height
from layerflow.io.pixels import (
    EncodeError,
    EncoderUnavailableError,
    LayerSourceError,
    alpha_to_layer,
    layer_to_alpha,
    matte_foreground,
    rgba_from_layers,
    to_uint8,
)
from layerflow.io.reader import (
    read_foreground_layers,
    read_layer_video,
    read_layer_with_alpha,
    sample_frame_indices,
)
from layerflow.io.writer import (
    CHECKER_SHADES,
    available_alpha_codecs,
    write_alpha_video,
    write_mp4,
    write_png_sequence,
    write_preview,
)

SOURCE_FRAMES, H, W = 18, 48, 72
T = 16  # frames per layer
SIZE = (H, W)
MP4_MEAN_ABS_TOLERANCE = 0.03  # in [-1, 1], for sources written at imageio quality 8
MP4_WRITE_TOLERANCE = 6  # mean absolute error in grey levels of our quality-5 MP4 (about 3.8 measured)
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


# ---------------------------------------------------------------------------------------------
# the synthetic clip and independent ways to store and decode it


def make_layers(frames: int = SOURCE_FRAMES, h: int = H, w: int = W) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fg, alpha, bg = [], [], []
    for i in range(frames):
        texture = 30 * np.sin(xx / 4 + 0.4 * i) * np.cos(yy / 5)
        bg.append(np.stack([40 + 150 * xx / w + texture, 60 + 120 * yy / h, 140 - texture], axis=-1))
        top, left, side = 10 + (i % 4), 6 + 2 * i, 20
        a = np.zeros((h, w), np.float32)
        a[top - 2 : top + side + 2, left - 2 : left + side + 2] = 128
        a[top : top + side, left : left + side] = 255
        alpha.append(a)
        fg.append(np.broadcast_to(np.array([230, 40 + 5 * i, 30], np.float32), (h, w, 3)))
    fg_u8 = np.stack(fg).round().astype(np.uint8)
    alpha_u8 = np.stack(alpha).astype(np.uint8)
    bg_u8 = np.clip(np.stack(bg), 0, 255).round().astype(np.uint8)
    a = alpha_u8[..., None].astype(np.float32) / 255
    blend = (fg_u8 * a + bg_u8 * (1 - a)).round().astype(np.uint8)
    return {"fg": fg_u8, "alpha": alpha_u8, "bg": bg_u8, "blend": blend}


def save_pngs(folder: Path, frames: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:04d}.png")
    return folder


def save_mp4(path: Path, frames: np.ndarray) -> Path:
    """H.264 yuv420p at imageio quality 8, written with imageio-ffmpeg directly."""
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    writer = imageio_ffmpeg.write_frames(
        str(path), (frames.shape[2], frames.shape[1]), fps=8, quality=8, macro_block_size=2, ffmpeg_log_level="error"
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def decode(path: Path, h: int, w: int, pix_fmt: str = "rgb24", decoder: str | None = None) -> np.ndarray:
    """Decode with the bundled ffmpeg into (t, h, w, c) bytes."""
    channels = {"rgb24": 3, "rgba": 4}[pix_fmt]
    command = [FFMPEG, "-v", "error", *(["-c:v", decoder] if decoder else []), "-i", str(path)]
    raw = subprocess.run([*command, "-f", "rawvideo", "-pix_fmt", pix_fmt, "-"], capture_output=True, check=True).stdout
    assert len(raw) % (h * w * channels) == 0, "decoded size does not fit the expected frame size"
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, channels)


def model(u8: np.ndarray) -> torch.Tensor:
    """Bytes (t, h, w, c) -> (t, c, h, w) in [-1, 1], written out here as the original's u8 / 127.5 - 1."""
    return torch.from_numpy(u8.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def layers() -> dict[str, np.ndarray]:
    return make_layers()


@pytest.fixture(scope="module")
def sources(tmp_path_factory, layers) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    rgba = np.concatenate([layers["fg"], layers["alpha"][..., None]], axis=-1)
    return {
        "bg_png": save_pngs(root / "bg", layers["bg"]),
        "fg_png": save_pngs(root / "fg", layers["fg"]),
        "mask_png": save_pngs(root / "mask", layers["alpha"]),
        "mask_rgb_png": save_pngs(root / "mask_rgb", np.repeat(layers["alpha"][..., None], 3, axis=-1)),
        "rgba_png": save_pngs(root / "rgba", rgba),
        "blend_mp4": save_mp4(root / "blend.mp4", layers["blend"]),
        "fg_mp4": save_mp4(root / "fg.mp4", layers["fg"]),
        "mask_mp4": save_mp4(root / "mask.mp4", layers["alpha"]),
    }


def expected_indices(start: int) -> list[int]:
    # the original's rule in words: 16 frames spread evenly from `start` to `start + 14` inclusive,
    # each position rounded down
    return [math.floor(start + k * 14 / 15) for k in range(T)]


# ---------------------------------------------------------------------------------------------
# readers


def test_png_folder_reads_exactly(sources, layers):
    x = read_layer_video(sources["bg_png"], T, SIZE)
    assert x.shape == (T, 3, H, W) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x, model(layers["bg"][expected_indices(0)]), rtol=0, atol=0)


def test_rgba_png_folder_gives_colour_and_alpha(sources, layers):
    picks = expected_indices(0)
    x = read_layer_video(sources["rgba_png"], T, SIZE)
    assert x.shape == (T, 4, H, W)
    torch.testing.assert_close(x[:, 3:], model(layers["alpha"][picks][..., None]), rtol=0, atol=0)
    rgb, alpha = read_layer_with_alpha(sources["rgba_png"], None, T, SIZE)
    torch.testing.assert_close(rgb, model(layers["fg"][picks]), rtol=0, atol=0)
    known = torch.from_numpy(layers["alpha"][picks].astype(np.float32) / 255)[:, None]
    torch.testing.assert_close(alpha, known, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mask", ["mask_png", "mask_rgb_png"])
def test_rgb_plus_mask_folder_gives_the_known_matte(sources, layers, mask):
    picks = expected_indices(0)
    rgb, alpha = read_layer_with_alpha(sources["fg_png"], sources[mask], T, SIZE)
    assert rgb.shape == (T, 3, H, W) and alpha.shape == (T, 1, H, W)
    assert alpha.min() >= 0 and alpha.max() <= 1
    torch.testing.assert_close(rgb, model(layers["fg"][picks]), rtol=0, atol=0)
    known = torch.from_numpy(layers["alpha"][picks].astype(np.float32) / 255)[:, None]
    torch.testing.assert_close(alpha, known, rtol=0, atol=1e-6)


def test_foreground_layers_are_matted_over_grey(sources, layers):
    picks = expected_indices(0)
    fg, alpha_layer = read_foreground_layers(sources["fg_png"], sources["mask_png"], T, SIZE)
    a = torch.from_numpy(layers["alpha"][picks].astype(np.float32) / 255)[:, None]
    torch.testing.assert_close(fg, model(layers["fg"][picks]) * a, rtol=0, atol=1e-6)
    assert torch.all(fg[a.expand_as(fg) == 0] == 0), "outside the matte the layer is grey (0)"
    torch.testing.assert_close(alpha_layer, (2 * a - 1).expand(-1, 3, -1, -1), rtol=0, atol=1e-6)
    fg_rgba, alpha_rgba = read_foreground_layers(sources["rgba_png"], None, T, SIZE)
    torch.testing.assert_close(fg_rgba, fg, rtol=0, atol=0)
    torch.testing.assert_close(alpha_rgba, alpha_layer, rtol=0, atol=1e-6)


def test_mp4_reads_within_tolerance(sources, layers):
    picks = expected_indices(0)
    x = read_layer_video(sources["blend_mp4"], T, SIZE)
    assert x.shape == (T, 3, H, W) and x.min() >= -1 and x.max() <= 1
    assert (x - model(layers["blend"][picks])).abs().mean() < MP4_MEAN_ABS_TOLERANCE


def test_rgb_mp4_plus_mask_mp4(sources, layers):
    picks = expected_indices(0)
    rgb, alpha = read_layer_with_alpha(sources["fg_mp4"], sources["mask_mp4"], T, SIZE)
    assert rgb.shape == (T, 3, H, W) and alpha.shape == (T, 1, H, W)
    assert (rgb - model(layers["fg"][picks])).abs().mean() < MP4_MEAN_ABS_TOLERANCE
    known = torch.from_numpy(layers["alpha"][picks].astype(np.float32) / 255)[:, None]
    assert (alpha - known).abs().mean() < MP4_MEAN_ABS_TOLERANCE / 2


@pytest.mark.parametrize("start", [0, 7, 25])
def test_sampling_from_a_long_clip_picks_the_original_frames(tmp_path, start):
    frames = np.stack([np.full((4, 6, 3), 10 + 5 * i, np.uint8) for i in range(40)])
    folder = save_pngs(tmp_path / "long", frames)
    x = read_layer_video(folder, T, (4, 6), start=start)
    picked = (((x[:, 0, 0, 0] + 1) * 127.5).round().numpy() - 10) / 5
    assert picked.tolist() == expected_indices(start)
    assert sample_frame_indices(40, T, start) == expected_indices(start)


def test_sampling_looks_at_the_first_64_frames_only():
    assert sample_frame_indices(100, T, 49)[-1] == 63
    with pytest.raises(ValueError, match="start frame 50"):
        sample_frame_indices(100, T, 50)


def test_wide_source_is_resized_and_centre_cropped(tmp_path):
    # 60x120 -> covers 48x72 at 48x96 (scale 0.8), then 12 columns are cut on each side
    ramp = np.broadcast_to((2 * np.arange(120)).astype(np.uint8)[None, :, None], (60, 120, 3))
    folder = save_pngs(tmp_path / "wide", np.stack([ramp] * T))
    x = read_layer_video(folder, T, SIZE)
    assert x.shape == (T, 3, H, W)
    j = np.arange(8, W - 8)  # away from the borders the bicubic filter reproduces a ramp
    source_x = (j + 12 + 0.5) / 0.8 - 0.5
    expected = torch.from_numpy((2 * source_x / 127.5 - 1).astype(np.float32))
    torch.testing.assert_close(x[3, 1, 20, 8 : W - 8], expected, rtol=0, atol=2e-3)


def test_tall_source_is_resized_and_centre_cropped(tmp_path):
    # 120x60 -> covers 48x72 at 144x72 (scale 1.2), then 48 rows are cut at the top and bottom
    ramp = np.broadcast_to((2 * np.arange(120)).astype(np.uint8)[:, None, None], (120, 60, 3))
    folder = save_pngs(tmp_path / "tall", np.stack([ramp] * T))
    x = read_layer_video(folder, T, SIZE)
    assert x.shape == (T, 3, H, W)
    i = np.arange(H)
    source_y = (i + 48 + 0.5) / 1.2 - 0.5
    expected = torch.from_numpy((2 * source_y / 127.5 - 1).astype(np.float32))
    torch.testing.assert_close(x[0, 2, :, 30], expected, rtol=0, atol=2e-3)


@pytest.mark.parametrize(
    "source_hw, cover_hw, offset",
    [
        ((60, 120), (48, 96), (0, 12)),
        ((44, 75), (48, 81), (0, 4)),  # 81.82 columns truncated to 81
        ((120, 60), (144, 72), (48, 0)),
        ((50, 66), (54, 72), (3, 0)),  # 54.55 rows truncated to 54
    ],
)
def test_resize_matches_an_antialiased_bicubic_reference(tmp_path, source_hw, cover_hw, offset):
    # The original resizes tensors with torchvision's bicubic, antialiased resize; PIL's bicubic
    # resize of float images is antialiased the same way and serves as the independent reference.
    # cover_hw and offset are worked out by hand: scale to cover 48x72, truncate, cut the excess evenly.
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (T, *source_hw, 3), dtype=np.uint8)
    folder = save_pngs(tmp_path / "textured", frames)
    x = read_layer_video(folder, T, SIZE)
    top, left = offset
    for t, c in ((0, 0), (T - 1, 2)):
        source_frame = frames[expected_indices(0)[t], ..., c]
        plane = Image.fromarray(source_frame.astype(np.float32) / 127.5 - 1, mode="F")
        resized = np.asarray(plane.resize(cover_hw[::-1], Image.BICUBIC))
        expected = torch.from_numpy(resized[top : top + H, left : left + W].copy())
        torch.testing.assert_close(x[t, c], expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# conversions


def test_to_uint8_truncates_like_the_original():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    # clamp to [-1, 1], then 255 * (x + 1) / 2 rounded down: 0, 0, 63.75, 127.5, 254.87, 255, 255
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 63, 127, 254, 255, 255]
    assert to_uint8(x).shape == (1, 1, 7, 3)


def test_alpha_layer_round_trip_uses_the_channel_mean():
    a = torch.rand(2, 1, 4, 6)
    torch.testing.assert_close(layer_to_alpha(alpha_to_layer(a)), a)
    noisy = alpha_to_layer(a) + torch.tensor([0.1, -0.1, 0.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(layer_to_alpha(noisy), a.clamp(0.05, 0.95), atol=0.051, rtol=0)


def test_rgba_from_layers_undoes_the_grey_matte(layers):
    rgb, a = model(layers["fg"][:2]), torch.from_numpy(layers["alpha"][:2].astype(np.float32) / 255)[:, None]
    rgba = rgba_from_layers(matte_foreground(rgb, a), alpha_to_layer(a))
    assert rgba.shape == (2, H, W, 4) and rgba.dtype == np.uint8
    assert np.abs(rgba[..., 3].astype(int) - layers["alpha"][:2]).max() <= 1
    seen = layers["alpha"][:2] > 0
    assert np.abs(rgba[..., :3].astype(int) - layers["fg"][:2])[seen].max() <= 1


# ---------------------------------------------------------------------------------------------
# writers


def test_write_mp4_decodes_back(tmp_path, layers):
    path = write_mp4(tmp_path / "blend.mp4", layers["blend"][:T])
    frames = decode(path, H, W)
    assert frames.shape == (T, H, W, 3)
    assert np.abs(frames.astype(float) - layers["blend"][:T]).mean() < MP4_WRITE_TOLERANCE
    assert [p.name for p in tmp_path.iterdir()] == ["blend.mp4"]


def test_write_mp4_takes_unit_floats_and_refuses_model_range(tmp_path, layers):
    unit = layers["bg"][:4].astype(np.float32) / 255
    frames = decode(write_mp4(tmp_path / "bg.mp4", unit), H, W)
    assert frames.shape == (4, H, W, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        write_mp4(tmp_path / "bad.mp4", unit * 2 - 1)


def test_write_png_sequence_keeps_alpha(tmp_path, layers):
    rgba = np.concatenate([layers["fg"][:T], layers["alpha"][:T, ..., None]], axis=-1)
    folder = write_png_sequence(tmp_path / "fg_rgba", rgba)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"{i:04d}.png" for i in range(T)]
    for i in (0, T - 1):
        with Image.open(folder / f"{i:04d}.png") as image:
            assert image.mode == "RGBA"
            assert np.array_equal(np.asarray(image), rgba[i])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fg_rgba"]


def test_write_png_sequence_replaces_an_older_folder(tmp_path, layers):
    rgba = np.concatenate([layers["fg"][:3], layers["alpha"][:3, ..., None]], axis=-1)
    write_png_sequence(tmp_path / "seq", np.concatenate([rgba, rgba]))
    write_png_sequence(tmp_path / "seq", rgba)
    assert sorted(p.name for p in (tmp_path / "seq").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seq"]


@pytest.mark.parametrize(
    "codec, suffix, decoder, tolerance", [("prores", ".mov", None, 1.0), ("vp9", ".webm", "libvpx-vp9", 3.0)]
)
def test_alpha_video_decodes_with_alpha(tmp_path, layers, codec, suffix, decoder, tolerance):
    if codec not in available_alpha_codecs():
        pytest.skip(f"the bundled ffmpeg cannot encode {codec}")
    rgba = np.concatenate([layers["fg"][:T], layers["alpha"][:T, ..., None]], axis=-1)
    path = write_alpha_video(tmp_path / f"fg{suffix}", rgba, codec=codec)
    frames = decode(path, H, W, "rgba", decoder)
    assert frames.shape == (T, H, W, 4)
    alpha = frames[..., 3].astype(float)
    assert alpha.min() <= 2 and alpha.max() >= 253, "alpha must vary from transparent to opaque"
    assert np.abs(alpha - layers["alpha"][:T]).mean() < tolerance
    x = read_layer_video(path, T, SIZE)
    assert x.shape == (T, 4, H, W), "the reader keeps the alpha of an alpha video"


def test_preview_shows_fg_alpha_bg_blend_side_by_side(tmp_path, layers):
    rgba = np.concatenate([layers["fg"][:T], layers["alpha"][:T, ..., None]], axis=-1)
    path = write_preview(tmp_path / "preview.mp4", rgba, layers["bg"][:T], layers["blend"][:T])
    frames = decode(path, H, 4 * W).astype(float)
    assert frames.shape == (T, H, 4 * W, 3)
    rows = slice(label_height(H) + 8, H - label_height(H) - 8)  # clear of the labels (and H.264's blocks)
    panel = lambda k: frames[:, rows, k * W : (k + 1) * W]
    matte = np.repeat(layers["alpha"][:T, rows, :, None], 3, axis=-1)
    assert np.abs(panel(1) - matte).mean() < MP4_WRITE_TOLERANCE
    assert np.abs(panel(2) - layers["bg"][:T, rows]).mean() < MP4_WRITE_TOLERANCE
    assert np.abs(panel(3) - layers["blend"][:T, rows]).mean() < MP4_WRITE_TOLERANCE
    opaque, clear = layers["alpha"][:T, rows] == 255, layers["alpha"][:T, rows] == 0
    assert np.abs(panel(0) - layers["fg"][:T, rows])[opaque].mean() < 8
    assert min(CHECKER_SHADES) - 8 < panel(0)[clear].mean() < max(CHECKER_SHADES) + 8
    rgb = write_preview(tmp_path / "rgb.mp4", layers["fg"][:T], layers["bg"][:T], layers["blend"][:T])
    assert decode(rgb, H, 3 * W).shape == (T, H, 3 * W, 3), "no matte, no alpha panel"


# ---------------------------------------------------------------------------------------------
# bad inputs


def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.mp4"):
        read_layer_video(tmp_path / "nowhere.mp4", T, SIZE)


def test_unreadable_video_file(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(os.urandom(2048))
    with pytest.raises(LayerSourceError, match="broken.mp4: not a readable video"):
        read_layer_video(path, T, SIZE)


def test_corrupt_frame_in_folder(tmp_path, layers):
    folder = save_pngs(tmp_path / "frames", layers["bg"])
    (folder / "0000.png").write_bytes(b"not a png")
    with pytest.raises(LayerSourceError, match="0000.png: not a readable image"):
        read_layer_video(folder, T, SIZE)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayerSourceError, match="empty: folder holds no frames"):
        read_layer_video(tmp_path / "empty", T, SIZE)


def test_too_few_frames(tmp_path, layers):
    folder = save_pngs(tmp_path / "short", layers["bg"][:10])
    with pytest.raises(LayerSourceError, match="10 frames"):
        read_layer_video(folder, T, SIZE)


def test_mask_size_mismatch(tmp_path, sources, layers):
    small = save_pngs(tmp_path / "small_mask", layers["alpha"][:, :40, :60])
    with pytest.raises(LayerSourceError, match=r"small_mask: mask frames are 60x40, expected 72x48"):
        read_layer_with_alpha(sources["fg_png"], small, T, SIZE)


def test_mask_frame_count_mismatch(tmp_path, sources, layers):
    short = save_pngs(tmp_path / "short_mask", layers["alpha"][:17])
    with pytest.raises(LayerSourceError, match=r"short_mask: mask has 17 frames, expected 18"):
        read_foreground_layers(sources["fg_png"], short, T, SIZE)


def test_rgb_source_without_mask_has_no_alpha(sources):
    with pytest.raises(LayerSourceError, match="no alpha channel"):
        read_layer_with_alpha(sources["fg_png"], None, T, SIZE)


def test_unwritable_output_folder(tmp_path, layers):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        probe = locked / "probe"
        try:
            probe.touch()
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("permissions are not enforced for this user (root)")
        with pytest.raises(NotWritableError, match="locked is not writable"):
            write_mp4(locked / "out.mp4", layers["blend"][:T])
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_output_folder_under_a_file(tmp_path, layers):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotWritableError, match="cannot be created"):
        write_png_sequence(tmp_path / "a_file" / "frames", layers["fg"][:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_failed_encode_leaves_no_file(tmp_path, layers):
    with pytest.raises(EncodeError, match="out.unknownformat"):
        write_mp4(tmp_path / "out.unknownformat", layers["blend"][:T])
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_through_a_png_sequence_leaves_nothing(tmp_path, layers, monkeypatch):
    saved = []
    original_save = Image.Image.save

    def save_then_fail(image, path, *args, **kwargs):
        if len(saved) == 3:
            raise OSError("disk full")
        saved.append(path)
        return original_save(image, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_png_sequence(tmp_path / "seq", layers["fg"][:T])
    assert len(saved) == 3
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_output(tmp_path):
    target = write_text_atomic(tmp_path / "meta.json", '{"ok": true}')
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == '{"ok": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_missing_encoder_is_named(tmp_path, layers, monkeypatch):
    monkeypatch.setattr(video_writer, "ffmpeg_encoders", lambda: frozenset())
    rgba = np.concatenate([layers["fg"][:2], layers["alpha"][:2, ..., None]], axis=-1)
    with pytest.raises(EncoderUnavailableError, match="no 'prores_ks' encoder"):
        write_alpha_video(tmp_path / "fg.mov", rgba, codec="prores")
    assert list(tmp_path.iterdir()) == []


def test_alpha_video_needs_the_matching_container(tmp_path, layers):
    rgba = np.concatenate([layers["fg"][:2], layers["alpha"][:2, ..., None]], axis=-1)
    with pytest.raises(ValueError, match=r"vp9 with alpha needs a \.webm file"):
        write_alpha_video(tmp_path / "fg.mov", rgba, codec="vp9")
    with pytest.raises(ValueError, match="unknown alpha codec"):
        write_alpha_video(tmp_path / "fg.mov", rgba, codec="gif")
