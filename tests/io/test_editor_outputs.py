"""Outputs an editor can trust (issue 20): frames in order, no halos, tagged colour, the matte in
alpha.mp4, lossless masters on request, ffmpeg's WIDTHxHEIGHT, stills as inputs, linear blending.

Every expected value is derived here independently: frame numbers coded into the pixels, a flat
colour that any correct resize keeps, ffmpeg's own report of the tags, the sRGB formulas.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image

from layerflow.batch.given import check_given_layers, given_layer_sources, read_given_layers
from layerflow.batch.manifest import Sample
from layerflow.batch.sample_folder import write_layer_files
from layerflow.cli.command import main
from layerflow.config import ConfigError, OutputSection, load_config
from layerflow.io.pixels import LayerSourceError, alpha_to_layer
from layerflow.io.reader import (
    read_clip_frames,
    read_layer_video,
    read_layer_with_alpha,
    resize_for_rectangle_crop,
    resolve_layer_source,
)
from layerflow.io.writer import (
    available_alpha_codecs,
    write_alpha_video,
    write_layer,
    write_master,
    write_matte_mp4,
    write_mp4,
    write_preview,
)
from layerflow.tools.compose import compose_layers, parse_size

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
CONFIGS = REPO_ROOT / "configs"
RED = (0xC0, 0x20, 0x20)  # the test colour, #c02020


def tiny_config(name: str, *overrides: str):
    return load_config([CONFIGS / "model.yaml", CONFIGS / "tasks" / f"{name}.yaml", CONFIGS / "tiny.yaml"], overrides)


def stream_line(path) -> str:
    """The video stream's description as ``ffmpeg -i`` prints it (ffprobe may be absent)."""
    report = subprocess.run([FFMPEG, "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    return next(line for line in report.splitlines() if "Video:" in line).split("Video:", 1)[1]


def colour_tags(path) -> tuple[str, str]:
    """(range, 'matrix/primaries/transfer') from the stream line, e.g. ('tv', 'bt709/bt709/bt709')."""
    match = re.search(r"\((tv|pc), ([a-z0-9/]+)[,)]", stream_line(path))
    assert match, f"{path.name} carries no colour tags: {stream_line(path)}"
    tags = match.group(2)
    return match.group(1), tags if "/" in tags else "/".join([tags] * 3)  # ffmpeg prints one when all agree


def decode_as_tagged(path, pix_fmt="rgb24", decoder=None) -> np.ndarray:
    """Decode the way an editor honouring the tags does: the file's own matrix and range, exact rounding."""
    colour_range, tags = colour_tags(path)
    matrix = tags.split("/")[0]
    size = re.search(r", (\d+)x(\d+)", stream_line(path))
    width, height = int(size.group(1)), int(size.group(2))
    exact = "flags=accurate_rnd+full_chroma_int"
    # RGB (gbr) has no matrix to apply, nor a grey matte (which ffmpeg tags as matrix unknown)
    scale = (
        f"scale={exact}"
        if matrix in ("gbr", "unknown")
        else f"scale=in_color_matrix={matrix}:in_range={colour_range}:{exact}"
    )
    command = [FFMPEG, "-v", "error", *(["-c:v", decoder] if decoder else []), "-i", str(path), "-vf", scale]
    command += ["-f", "rawvideo", "-pix_fmt", pix_fmt, "-"]
    raw = subprocess.run(command, capture_output=True, check=True).stdout
    channels = {"rgb24": 3, "rgba": 4, "gray": 1}[pix_fmt]
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, channels)


def numbered_rgba_clip(folder, frames=16, height=32, width=48):
    """RGBA PNGs: a flat colour disc with a soft 3-pixel edge; green codes the frame number; clear pixels black."""
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    matte = np.clip((0.3 * min(height, width) - np.hypot(yy - height / 2, xx - width / 2)) / 3 + 0.5, 0, 1)
    colours = []
    for i in range(frames):
        colour = np.array([200, 10 + 15 * i, 60], np.uint8)
        rgba = np.zeros((height, width, 4), np.uint8)
        rgba[..., :3] = np.where(matte[..., None] > 0, colour, 0)
        rgba[..., 3] = np.rint(255 * matte)
        Image.fromarray(rgba, "RGBA").save(folder / f"{i:04d}.png")
        colours.append(colour)
    return folder, np.stack(colours)


def frame_numbers(rgba: np.ndarray) -> list[int]:
    """Which source frame each (t, h, w, 4) frame shows, read from its opaque pixels' green."""
    return [int(round((np.median(frame[..., 1][frame[..., 3] == 255]) - 10) / 15)) for frame in rgba]


@pytest.fixture(scope="module")
def enlarged_composite(tmp_path_factory):
    """A 16-frame 48x32 RGBA clip composed at 96x64 (enlarged 2x) over white."""
    root = tmp_path_factory.mktemp("enlarged")
    clip, colours = numbered_rgba_clip(root / "fg")
    folder = root / "comp"
    assert main(["compose", "--fg", str(clip), "--bg", "white", "--output", str(folder), "--size", "96x64"]) == 0
    return folder, colours


# -- 2. no frame shift --------------------------------------------------------------------------------


def test_compose_keeps_the_frames_in_order(enlarged_composite):
    folder, _ = enlarged_composite
    pngs = read_clip_frames(folder / "foreground_rgba")
    assert frame_numbers(pngs) == list(range(16))  # the original's pick would give 0, 0, 1, ..., 14
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["given_sources"]["fg"]["frames"] == list(range(16))
    assert meta["given_sources"]["fg"]["frame_pick"] == "one-for-one"
    assert meta["size"] == "96x64" and meta["frames"] == 16


def test_sampling_input_takes_the_first_frames_one_for_one(tmp_path):
    config = tiny_config("bg2fg_rgb")
    height, width = config.video_size
    (tmp_path / "bg").mkdir()
    for i in range(20):
        Image.fromarray(np.full((height, width, 3), 10 + 10 * i, np.uint8)).save(tmp_path / "bg" / f"{i:04d}.png")
    sample = Sample("x", {}, {"bg": str(tmp_path / "bg")})
    bg = read_given_layers(sample, config)["bg"]
    levels = ((bg[:, 0, 0, 0] + 1) * 127.5).round().numpy()
    assert ((levels - 10) / 10).tolist() == list(range(16))
    record = given_layer_sources(sample, config)["bg"]
    assert record["frames"] == list(range(16)) and record["frame_pick"] == "one-for-one"


def test_a_clip_shorter_than_the_model_needs_is_refused(tmp_path):
    folder, _ = numbered_rgba_clip(tmp_path / "short", frames=15)
    with pytest.raises(LayerSourceError, match=r"short: clip has 15 frames, 16 output frames need 16"):
        check_given_layers(Sample("x", {}, {"fg": str(folder)}), tiny_config("fg2bg_rgba"))


# -- 3. no halos; warnings once -----------------------------------------------------------------------


def test_enlarging_rgba_keeps_the_edge_colour(tmp_path, enlarged_composite):
    folder, _ = numbered_rgba_clip(tmp_path / "fg", frames=2)
    rgb, alpha = read_layer_with_alpha(folder, None, num_frames=2, size=(64, 96))
    colour = torch.tensor([200, 10, 60], dtype=torch.float32) / 127.5 - 1
    edge = (alpha > 1 / 255) & (alpha < 1)  # (t, 1, h, w)
    assert edge.sum() > 100
    # a flat colour stays flat under any premultiplied resize; straight resizing pulls in the black
    error = (rgb[:1] - colour[None, :, None, None]).abs()[edge[:1].expand(-1, 3, -1, -1)]
    assert error.max() < 1e-4
    as_video = read_layer_video(folder, num_frames=2, size=(64, 96))
    torch.testing.assert_close(as_video[:, :3], rgb)
    composite, colours = enlarged_composite
    pngs = read_clip_frames(composite / "foreground_rgba").astype(int)  # straight RGBA as an editor reads it
    seen = (pngs[..., 3] > 0) & (pngs[..., 3] < 255)
    darkening = (pngs[..., :3] - colours[:, None, None, :])[seen]
    assert darkening.min() >= -1  # the byte rule truncates: one level at most


def test_opaque_rgba_resizes_exactly_as_rgb(tmp_path):
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (2, 30, 44, 4), dtype=np.uint8)
    frames[..., 3] = 255
    (tmp_path / "rgba").mkdir()
    (tmp_path / "rgb").mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame, "RGBA").save(tmp_path / "rgba" / f"{i}.png")
        Image.fromarray(frame[..., :3], "RGB").save(tmp_path / "rgb" / f"{i}.png")
    rgba = read_layer_video(tmp_path / "rgba", num_frames=2, size=(64, 96))
    rgb = read_layer_video(tmp_path / "rgb", num_frames=2, size=(64, 96))
    assert torch.equal(rgba[:, :3], rgb)


def test_geometry_warnings_are_given_once(tmp_path, caplog):
    small = tmp_path / "small"
    small.mkdir()
    for i in range(16):
        Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(small / f"{i:04d}.png")
    sample, config = Sample("x", {}, {"bg": str(small)}), tiny_config("bg2fg_rgb")
    with caplog.at_level(logging.WARNING):
        check_given_layers(sample, config)  # what the command line checks first
        check_given_layers(sample, config)  # and each sample's preflight again
        read_given_layers(sample, config)
    enlarged = [r for r in caplog.records if "enlarged" in r.getMessage()]
    cropped = [r for r in caplog.records if "centre crop cuts away" in r.getMessage()]
    assert len(enlarged) == 1 and len(cropped) == 1, [r.getMessage() for r in caplog.records]
    assert str(small) in enlarged[0].getMessage() and "16x16 frames are enlarged" in enlarged[0].getMessage()


# -- 4. colour is tagged and right --------------------------------------------------------------------


@pytest.fixture(scope="module")
def flat_red(tmp_path_factory):
    """A flat #c02020 frame at 1280x720 through every writer, and the frames each file decodes to."""
    root = tmp_path_factory.mktemp("flat")
    rgb = np.broadcast_to(np.array(RED, np.uint8), (2, 720, 1280, 3)).copy()
    rgba = np.concatenate([rgb, np.full((2, 720, 1280, 1), 255, np.uint8)], axis=-1)
    files = {
        "h264": (write_mp4(root / "flat.mp4", rgb), "rgb24", None),
        "preview": (
            write_preview(root / "preview.mp4", rgba[:, :, :448], rgb[:, :, :448], rgb[:, :, :448]),
            "rgb24",
            None,
        ),
        "prores_hq": (write_master(root / "flat_hq.mov", rgb, "prores_hq"), "rgb24", None),
        "ffv1": (write_master(root / "flat.mkv", rgb, "ffv1"), "rgb24", None),
    }
    for codec, suffix, decoder in (("prores", ".mov", None), ("vp9", ".webm", "libvpx-vp9")):
        if codec in available_alpha_codecs():
            files[codec] = (write_alpha_video(root / f"flat{suffix}", rgba, codec=codec), "rgba", decoder)
    return {name: (path, decode_as_tagged(path, pix_fmt, decoder)) for name, (path, pix_fmt, decoder) in files.items()}


@pytest.mark.parametrize("name", ["h264", "preview", "prores", "vp9", "prores_hq", "ffv1"])
def test_flat_colour_reads_back_within_two_levels(flat_red, name):
    if name not in flat_red:
        pytest.skip(f"the bundled ffmpeg cannot encode {name}")
    path, frames = flat_red[name]
    colour_range, tags = colour_tags(path)
    primaries_transfer = tags.split("/")[1:]
    assert primaries_transfer == ["bt709", "bt709"], tags
    assert tags.split("/")[0] == ("gbr" if name == "ffv1" else "bt709"), tags
    assert colour_range == ("pc" if name == "ffv1" else "tv")
    if name == "preview":  # panels foreground | alpha | background | blend, labelled in their corners
        h, w = frames.shape[1], frames.shape[2] // 4
        centres = [frames[:, h // 4 : 3 * h // 4, i * w + w // 4 : i * w + 3 * w // 4] for i in (0, 2, 3)]
        frames = np.concatenate(centres, axis=2)  # the colour panels' centres, away from labels and the alpha
    error = np.abs(frames[..., :3].astype(int) - np.array(RED)).max()
    assert error <= 2, f"{path.name} decodes #c02020 {error} levels off"
    if frames.shape[-1] == 4:
        assert frames[..., 3].min() == 255


# -- 6. alpha.mp4 is the matte ------------------------------------------------------------------------


def test_alpha_mp4_is_the_grey_matte_of_the_pngs(tmp_path, enlarged_composite):
    # an alpha layer as the model gives it: three channels that disagree, noisy
    generator = torch.Generator().manual_seed(0)
    t, h, w = 4, 32, 48
    matte = torch.rand(t, 1, h, w, generator=generator)
    alpha_layer = (2 * matte - 1) + 0.2 * torch.randn(t, 3, h, w, generator=generator)
    layers = {
        "fg": torch.rand(t, 3, h, w, generator=generator) * 2 - 1,
        "alpha": alpha_layer.clamp(-1, 1),
        "bg": torch.zeros(t, 3, h, w),
        "blend": torch.zeros(t, 3, h, w),
    }
    write_layer_files(tmp_path, layers, OutputSection(alpha_video="none", preview=False))
    png_alpha = read_clip_frames(tmp_path / "foreground_rgba")[..., 3].astype(int)
    assert colour_tags(tmp_path / "alpha.mp4")[0] == "pc"
    decoded = decode_as_tagged(tmp_path / "alpha.mp4").astype(int)
    assert np.abs(decoded - png_alpha[..., None]).max() <= 2
    composite, _ = enlarged_composite
    png_alpha = read_clip_frames(composite / "foreground_rgba")[..., 3].astype(int)
    assert np.abs(decode_as_tagged(composite / "alpha.mp4").astype(int) - png_alpha[..., None]).max() <= 2


def test_matte_writer_refuses_colour(tmp_path):
    with pytest.raises(ValueError, match="must be grey"):
        write_matte_mp4(tmp_path / "m.mp4", np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    assert not list(tmp_path.iterdir())


# -- 7. lossless layers on request --------------------------------------------------------------------


@pytest.fixture(scope="module")
def smooth_layer():
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 64), indexing="ij")
    frames = [torch.stack([torch.sin(3 * xx + i), torch.cos(2 * yy), xx * yy]) for i in range(4)]
    return torch.stack(frames).clamp(-1, 1)  # (4, 3, 48, 64)


@pytest.mark.parametrize("codec, exact", [("png", True), ("ffv1", True), ("prores_hq", False), ("prores_4444", False)])
def test_layer_masters(tmp_path, smooth_layer, codec, exact):
    written = write_layer(tmp_path, "bg", smooth_layer, master=codec)
    names = sorted(p.name for p in written)
    suffix = {"png": "", "ffv1": ".mkv"}.get(codec, ".mov")
    assert names == sorted(["background.mp4", f"background_{codec}{suffix}"])
    expected = ((smooth_layer.permute(0, 2, 3, 1) + 1) / 2 * 255).to(torch.uint8).numpy().astype(int)
    master = tmp_path / f"background_{codec}{suffix}"
    frames = read_clip_frames(master) if codec == "png" else decode_as_tagged(master)
    error = np.abs(frames.astype(int) - expected)
    assert error.max() == 0 if exact else (error.mean() < 1 and error.max() <= 4)
    (tmp_path / "meta.json").write_text("{}")
    assert resolve_layer_source(tmp_path, "bg") == master, "a sample folder gives its master first"


def test_matte_master_is_lossless_grey(tmp_path):
    matte = torch.linspace(0, 1, 48 * 64).reshape(1, 1, 48, 64).expand(2, 1, -1, -1)
    write_layer(tmp_path, "alpha", alpha_to_layer(matte), master="ffv1")
    decoded = decode_as_tagged(tmp_path / "alpha_ffv1.mkv", "gray")[..., 0]
    assert np.array_equal(decoded, (255 * matte[:, 0]).to(torch.uint8).numpy())


def test_crf_sets_the_h264_quality(tmp_path, smooth_layer):
    errors = {}
    for crf in (5, 40):
        write_layer(tmp_path / str(crf), "blend", smooth_layer, crf=crf)
        decoded = decode_as_tagged(tmp_path / str(crf) / "blend.mp4").astype(int)
        expected = ((smooth_layer.permute(0, 2, 3, 1) + 1) * 127.5).numpy()
        errors[crf] = np.abs(decoded - expected).mean()
    assert errors[5] < 1.0 < errors[40]


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("output.master=jpeg", "output.master = 'jpeg'.*none, png, ffv1, prores_hq, prores_4444"),
        ("output.crf=52", "output.crf = 52.*0 \\(lossless\\) to 51"),
        ("output.master_layers=[bg,sky]", "output.master_layers.*fg, bg, blend, alpha"),
    ],
)
def test_output_settings_are_validated(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny_config("gen_rgb", override)
    assert tiny_config("gen_rgb", "output.master=ffv1", "output.master_layers=[bg]").output.master_layers == ("bg",)


# -- 8. sizes, stills, blending -----------------------------------------------------------------------


def test_sizes_are_width_by_height_and_the_old_form_is_refused(capsys, tmp_path):
    assert parse_size("720x480") == (480, 720) and parse_size("64x64") == (64, 64)
    with pytest.raises(ValueError, match="480x720 is ambiguous: sizes are WIDTHxHEIGHT as in ffmpeg"):
        parse_size("480x720")
    argv = ["compose", "--fg", "a", "--bg", "white", "--output", str(tmp_path / "o"), "--size", "480x720"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "write 720x480" in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_still_image_is_a_background_in_sampling(tmp_path):
    config = tiny_config("bg2fg_rgb")
    height, width = config.video_size
    photo = tmp_path / "photo.png"
    pixels = np.random.default_rng(5).integers(0, 256, (height // 2, width // 2, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photo)
    sample = Sample("x", {}, {"bg": str(photo)})
    check_given_layers(sample, config)
    bg = read_given_layers(sample, config)["bg"]
    resized = resize_for_rectangle_crop(
        torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1, (height, width)
    )
    assert bg.shape == (16, 3, height, width) and all(torch.equal(frame, resized[0]) for frame in bg)
    record = given_layer_sources(sample, config)["bg"]
    assert record["frame_pick"] == "still" and record["frames"] == [0] * 16


def test_linear_light_blend():
    white, black = torch.ones(1, 3, 1, 1), -torch.ones(1, 3, 1, 1)
    half = torch.full((1, 1, 1, 1), 0.5)
    display = compose_layers(white, half, black)["blend"][0, 0, 0, 0]
    linear = compose_layers(white, half, black, blend_space="linear")["blend"][0, 0, 0, 0]
    assert display.item() == pytest.approx(0.0)  # 50% of 255 in display values: mid-grey
    # half the light of white is sRGB 1.055 * 0.5 ** (1 / 2.4) - 0.055 = 0.7354 (188 of 255)
    assert (linear.item() + 1) / 2 == pytest.approx(1.055 * 0.5 ** (1 / 2.4) - 0.055, abs=1e-6)
    opaque = compose_layers(white * 0.3, torch.ones(1, 1, 1, 1), black, blend_space="linear")["blend"][0, 0, 0, 0]
    assert opaque.item() == pytest.approx(0.3, abs=1e-5), "an opaque pixel keeps its colour"
