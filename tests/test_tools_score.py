"""Layer scores, premultiplied alpha and the contact sheet, checked on constructed inputs with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, tiny_files
from PIL import Image

from layerflow.batch.sample_folder import write_layer_files
from layerflow.config import ConfigError, OutputSection, load_config
from layerflow.io.contact_sheet import GAP, GAP_SHADE, column_frames, contact_sheet, layer_rows
from layerflow.io.pixels import premultiply, unpremultiply
from layerflow.io.reader import read_clip_frames
from layerflow.scores import (
    SCORE_KEYS,
    alpha_temporal_change,
    edge_band,
    layer_scores,
    psnr,
    sample_layers,
    score_folder,
    ssim_map,
    to_json,
)

CONFIGS = REPO_ROOT / "configs"


def test_psnr_known_answers():
    x = torch.zeros(2, 8, 8, 3)
    assert psnr(x, x) == math.inf
    assert psnr(x, x + 0.1) == pytest.approx(20.0)  # MSE 0.01 -> 10 log10(100)
    y = x.clone()
    y[:, :4] = 0.01  # error only in the top half
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, :4] = True
    assert psnr(x, y, mask) == pytest.approx(40.0)  # MSE 1e-4 inside the mask
    assert psnr(x, y, ~mask) == math.inf
    assert psnr(x, y, torch.zeros_like(mask)) is None


def test_ssim_known_answers():
    x = torch.rand(2, 20, 24, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim_map(x, x), torch.ones(2, 20, 24), atol=1e-5)
    a, b = torch.full((1, 16, 16, 3), 0.2), torch.full((1, 16, 16, 3), 0.6)
    c1 = 0.01**2  # constant images: no variance, so SSIM is the luminance term alone
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert torch.allclose(ssim_map(a, b), torch.full((1, 16, 16), expected), atol=1e-5)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert float(ssim_map(x, noisy).mean()) < 0.9


def test_ssim_matches_a_direct_windowed_computation():
    """Wang et al.'s formula evaluated pixel by pixel with an explicit 11x11 Gaussian window (edge padding)."""
    rng = np.random.default_rng(2)
    x = rng.random((1, 14, 17, 2))
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    expected = np.zeros((14, 17))
    for ch in range(2):
        a, b = (np.pad(v[0, :, :, ch], 5, mode="edge") for v in (x, y))
        for i in range(14):
            for j in range(17):
                pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
                ma, mb = (window * pa).sum(), (window * pb).sum()
                va, vb = (window * (pa - ma) ** 2).sum(), (window * (pb - mb) ** 2).sum()
                cov = (window * (pa - ma) * (pb - mb)).sum()
                expected[i, j] += ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)) / 2
    got = ssim_map(torch.from_numpy(x), torch.from_numpy(y))[0].double().numpy()
    assert np.abs(got - expected).max() < 1e-4


def test_edge_band_of_a_straight_edge():
    alpha = torch.zeros(1, 10, 20)
    alpha[..., 8:] = 1.0  # inside from column 8 on
    band = edge_band(alpha, radius=3)
    expected = torch.zeros(1, 10, 20, dtype=torch.bool)
    expected[..., 5:11] = True  # 3 columns either side of the edge between columns 7 and 8
    assert torch.equal(band, expected)
    assert not edge_band(torch.ones(1, 10, 20)).any()


def test_alpha_temporal_change():
    ramp = torch.arange(5, dtype=torch.float32)[:, None, None].expand(5, 4, 6) * 0.1
    assert alpha_temporal_change(ramp) == pytest.approx(0.1)
    assert alpha_temporal_change(torch.ones(3, 4, 6)) == 0.0


def constructed_layers(frames=4, height=16, width=24):
    """Hard-edged matte moving right by 2 px a frame over a gradient: the exact blend is known."""
    rows, cols = np.mgrid[0:height, 0:width]
    fg = np.broadcast_to(
        np.stack([60 + 8 * rows, 180 + 0 * rows, 90 + 4 * cols], axis=-1).astype(np.uint8), (frames, height, width, 3)
    ).copy()
    bg = np.broadcast_to(
        np.linspace(0, 255, width).astype(np.uint8)[None, None, :, None], (frames, height, width, 3)
    ).copy()
    alpha = np.zeros((frames, height, width), np.uint8)
    for t in range(frames):
        alpha[t, :, 6 + 2 * t : 14 + 2 * t] = 255
    blend = np.where(alpha[..., None] == 255, fg, bg)
    return np.concatenate([fg, alpha[..., None]], axis=-1), bg, blend


def test_layer_scores_on_a_constructed_clip():
    rgba, bg, blend = constructed_layers()
    exact = layer_scores(rgba, bg, blend)
    assert exact["psnr_db"] == math.inf and exact["edge_psnr_db"] == math.inf
    assert exact["ssim"] == pytest.approx(1.0, abs=1e-5) and exact["edge_ssim"] == pytest.approx(1.0, abs=1e-5)
    # each frame the matte gains 2 columns and loses 2 of 24: 4 of 24 pixels change by 1
    assert exact["alpha_temporal_change"] == pytest.approx(4 / 24)
    # two vertical edges, 3 px band either side of each: 12 of 24 columns
    assert exact["edge_fraction"] == pytest.approx(12 / 24)
    brighter = np.clip(blend.astype(int) + 5, 0, 255)
    assert (brighter - blend == 5).mean() > 0.9
    off = layer_scores(rgba, bg, brighter.astype(np.uint8))
    mse = (((brighter - blend) / 255.0) ** 2).mean()  # independent of the clipping at 255
    assert off["psnr_db"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)
    assert off["ssim"] < 1.0
    assert to_json(exact)["psnr_db"] == "inf"


def test_premultiply_known_values():
    rgba = np.array([[200, 100, 50, 128], [10, 20, 30, 0], [10, 20, 30, 255]], np.uint8)
    expected = np.array([[100, 50, 25, 128], [0, 0, 0, 0], [10, 20, 30, 255]], np.uint8)  # 200*128/255 = 100.4
    assert np.array_equal(premultiply(rgba), expected)
    assert np.array_equal(unpremultiply(expected), np.array([[199, 100, 50, 128], [0, 0, 0, 0], [10, 20, 30, 255]]))


def test_alpha_mode_is_validated():
    files = tiny_files("gen_rgba")
    assert load_config(files).output.alpha_mode == "straight"
    assert load_config(files, ["output.alpha_mode=both"]).output.alpha_mode == "both"
    with pytest.raises(ConfigError) as error:
        load_config(files, ["output.alpha_mode=premult"])
    message = str(error.value)
    assert message == (
        "output.alpha_mode = 'premult' (from --set output.alpha_mode=premult): expected straight, premultiplied or both"
    )
    assert "\n" not in message


def model_layers(rgba, bg, blend):
    """Bytes -> the model's layers in [-1, 1]: fg matted over grey, alpha as 3 channels, bg, blend."""
    as_model = lambda x: torch.from_numpy(x).float().permute(0, 3, 1, 2) / 127.5 - 1
    alpha = torch.from_numpy(rgba[..., 3]).float()[:, None] / 255.0  # (t, 1, h, w)
    return {
        "fg": as_model(rgba[..., :3]) * alpha,
        "bg": as_model(bg),
        "blend": as_model(blend),
        "alpha": (2 * alpha - 1).expand(-1, 3, -1, -1),
    }


@pytest.mark.parametrize("mode", ["straight", "premultiplied", "both"])
def test_alpha_mode_files(tmp_path, mode):
    rgba, bg, blend = constructed_layers()
    write_layer_files(tmp_path, model_layers(rgba, bg, blend), OutputSection(alpha_mode=mode))
    names = {p.name for p in tmp_path.iterdir()}
    straight = {"foreground_rgba", "foreground.mov"}
    premultiplied = {"foreground_rgba_premultiplied", "foreground_premultiplied.mov"}
    assert (straight <= names) == (mode != "premultiplied")
    assert (premultiplied <= names) == (mode != "straight")
    assert {"contact_sheet.png", "preview.mp4", "alpha.mp4", "blend.mp4"} <= names
    if mode == "both":
        png_straight = read_clip_frames(tmp_path / "foreground_rgba")
        png_premultiplied = read_clip_frames(tmp_path / "foreground_rgba_premultiplied")
        assert np.array_equal(png_premultiplied, premultiply(png_straight))
        assert np.array_equal(png_straight[..., 3], rgba[..., 3])
        inside = rgba[..., 3] == 255
        assert np.abs(png_straight[inside][:, :3].astype(int) - rgba[inside][:, :3]).max() <= 1
        assert not png_premultiplied[rgba[..., 3] == 0][:, :3].any()
        prores = read_clip_frames(tmp_path / "foreground_premultiplied.mov")
        assert np.abs(prores.astype(int) - png_premultiplied).mean() < 2
    # every export reads back to the same straight foreground for the scores
    fg, _, _ = sample_layers(tmp_path)
    assert np.array_equal(fg[..., 3], rgba[..., 3])
    scores = score_folder(tmp_path)
    assert scores["psnr_db"] > 25 and scores["alpha_temporal_change"] == pytest.approx(4 / 24)


def test_premultiplied_vp9(tmp_path):
    rgba, bg, blend = constructed_layers()
    write_layer_files(
        tmp_path, model_layers(rgba, bg, blend), OutputSection(alpha_mode="premultiplied", alpha_video="vp9")
    )
    assert (tmp_path / "foreground_premultiplied.webm").is_file() and not (tmp_path / "foreground.webm").exists()
    webm = read_clip_frames(tmp_path / "foreground_premultiplied.webm")
    png = read_clip_frames(tmp_path / "foreground_rgba_premultiplied")
    assert webm.shape == png.shape and np.abs(webm[..., 3].astype(int) - png[..., 3]).mean() < 3


def test_contact_sheet_grid():
    frames, height, width = 10, 6, 8
    colour = lambda value: np.full((frames, height, width, 3), value, np.uint8)
    fg = np.concatenate([colour(200), np.zeros((frames, height, width, 1), np.uint8)], axis=-1)  # transparent
    fg[..., 3][:, :, 4:] = 255  # right half opaque
    bg = np.arange(frames, dtype=np.uint8)[:, None, None, None] * np.ones((1, height, width, 3), np.uint8)
    blend = colour(7)
    rows = layer_rows(fg, bg, blend)
    assert len(rows) == 4  # fg over checkerboard, matte, bg, blend
    sheet = contact_sheet(rows, columns=4)
    picks = column_frames(frames, 4)
    assert picks == [0, 3, 6, 9]
    assert sheet.shape == (GAP + 4 * (height + GAP), GAP + 4 * (width + GAP), 3)
    assert (sheet[:GAP] == GAP_SHADE).all()
    cell = lambda r, k: sheet[GAP + r * (height + GAP) :][:height, GAP + k * (width + GAP) :][:, :width]
    assert (cell(0, 0)[:, 4:] == 200).all()  # opaque half shows the foreground
    assert set(np.unique(cell(0, 0)[:, :4])) <= {204, 255}  # transparent half shows the checkerboard
    assert (cell(1, 2)[:, :4] == 0).all() and (cell(1, 2)[:, 4:] == 255).all()  # the matte row
    for k, index in enumerate(picks):
        assert (cell(2, k) == index).all()  # background row: column k is frame picks[k]
    assert (cell(3, 1) == 7).all()


def test_contact_sheet_shrinks_wide_frames(tmp_path):
    frames = np.full((3, 100, 480, 3), 90, np.uint8)
    sheet = contact_sheet([frames, frames])
    assert sheet.shape == (GAP + 2 * (50 + GAP), GAP + 3 * (240 + GAP), 3)
    assert (sheet[GAP : GAP + 50, GAP : GAP + 240] == 90).all()


@pytest.mark.slow
def test_meta_scores_match_the_score_of_the_files(tmp_path):
    from layerflow.cli.demo import run_demo

    assert run_demo(tmp_path, ["gen_rgba"]) == 0
    meta = json.loads((tmp_path / "gen_rgba" / "meta.json").read_text())
    assert meta["scores"] == to_json(score_folder(tmp_path / "gen_rgba"))
    assert Image.open(tmp_path / "gen_rgba" / "contact_sheet.png").mode == "RGB"


@pytest.mark.slow
def test_scores_can_be_turned_off(tmp_path):
    from layerflow.cli.generate import main

    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"id": "a", "prompts": {"fg": "a", "bg": "b", "blend": "c"}}) + "\n")
    configs = [str(CONFIGS / "model.yaml"), str(CONFIGS / "tasks" / "gen_rgba.yaml"), str(CONFIGS / "tiny.yaml")]
    common = [
        "--base",
        *configs,
        "--set",
        "sampling.num_steps=2",
        "--set",
        "output.preview=false",
        "--no-progress",
        "--manifest",
        str(manifest),
    ]
    assert main([*common, "--set", "output.scores=false", "--output", str(tmp_path / "off")]) == 0
    assert main([*common, "--output", str(tmp_path / "on")]) == 0
    assert "scores" not in json.loads((tmp_path / "off" / "a" / "meta.json").read_text())
    assert set(json.loads((tmp_path / "on" / "a" / "meta.json").read_text())["scores"]) == set(SCORE_KEYS)
