"""Layer consistency: does the generated blend equal the layers composited, ``a * fg + (1 - a) * bg``?

For an RGBA sample the scores are

* ``psnr_db``, ``ssim``: PSNR and SSIM between the blend and the composite of the straight
  foreground over the background, over the whole frame;
* ``edge_psnr_db``, ``edge_ssim``: the same over the alpha edge band only, the pixels within
  :data:`EDGE_RADIUS` pixels (square neighbourhood) of both a matte >= 0.5 and a matte < 0.5;
* ``alpha_temporal_change``: the mean ``|a_t - a_(t-1)|`` over frames 1.. and all pixels (0 = a
  still matte), with the matte in [0, 1];
* ``edge_fraction``: the share of pixels in the edge band.

Pixels are taken in [0, 1] (bytes / 255), so PSNR is ``10 log10(1 / MSE)``. SSIM is Wang et al.
(2004): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, computed per
colour channel and averaged; frame borders are padded by repeating the edge pixels, so the SSIM
map covers every pixel and can be averaged over the edge band. Identical images give an infinite
PSNR (written ``"inf"`` in JSON) and SSIM 1; an empty edge band gives ``null`` edge scores.

The layers are read from the sample folder's files (the straight RGBA PNGs, else the
premultiplied ones, else ``foreground.mp4`` and ``alpha.mp4``; ``background.mp4``; ``blend.mp4``),
so ``layerflow score`` and the scores that ``sample_video.py`` records in ``meta.json`` agree.

Legend: t frames, h height, w width, c channels.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from layerflow.io.atomic import write_text_atomic
from layerflow.io.pixels import rgba_from_layers, uint8_to_model, unpremultiply
from layerflow.io.reader import read_clip_frames
from layerflow.io.sample_files import ALPHA_EXPORTS, SCORES_FILE, SampleFolderError, layer_video
from layerflow.runtime.devices import cpu_threads
from layerflow.tasks import Layer

EDGE_RADIUS = 3  # pixels either side of the matte's 0.5 contour that form the edge band
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
SCORE_KEYS = ("psnr_db", "ssim", "edge_psnr_db", "edge_ssim", "alpha_temporal_change", "edge_fraction")


def psnr(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> float | None:
    """PSNR in dB of images in [0, 1] (t, h, w, c) over all pixels or where ``mask`` (t, h, w) is true.

    ``inf`` when they are equal there; ``None`` when the mask is empty.
    """
    error = (x.double() - y.double()).pow(2).mean(dim=-1)  # (t, h, w)
    if mask is not None:
        if not bool(mask.any()):
            return None
        error = error[mask]
    mse = float(error.mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def _gaussian_taps(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian (size,); the 2-D window is its outer product, applied separably."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    return (g / g.sum()).to(torch.float32)


def _ssim_frame(x: torch.Tensor, y: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM (h, w) of one frame (h, w, c) in [0, 1], averaged over channels."""
    c = x.shape[-1]
    pad = SSIM_WINDOW // 2
    a = x.double().permute(2, 0, 1)[:, None]  # (c, 1, h, w)
    b = y.double().permute(2, 0, 1)[:, None]
    mean_a, mean_b = a.mean(dim=(2, 3), keepdim=True), b.mean(dim=(2, 3), keepdim=True)  # (c, 1, 1, 1)
    a, b = (a - mean_a).float(), (b - mean_b).float()  # centred: the second moments lose no precision
    stack = torch.cat([a, b, a * a, b * b, a * b])  # (5c, 1, h, w)
    stack = F.pad(stack, (pad, pad, pad, pad), mode="replicate")  # (5c, 1, h + 2 pad, w + 2 pad)
    stack = stack.unfold(2, SSIM_WINDOW, 1) @ taps  # (5c, 1, h, w + 2 pad) blurred down the columns
    mu_a, mu_b, aa, bb, ab = (stack.unfold(3, SSIM_WINDOW, 1) @ taps).split(c)  # (c, 1, h, w) each, then rows
    var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
    mu_a, mu_b = mu_a + mean_a.float(), mu_b + mean_b.float()
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim.mean(dim=(0, 1))  # (h, w)


def ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM (t, h, w) of images in [0, 1] (t, h, w, c), averaged over channels (frame by frame)."""
    taps = _gaussian_taps()
    return torch.stack([_ssim_frame(a, b, taps) for a, b in zip(x, y, strict=True)])  # (t, h, w)


def edge_band(alpha: torch.Tensor, radius: int = EDGE_RADIUS) -> torch.Tensor:
    """Pixels (t, h, w) within ``radius`` (square neighbourhood) of both sides of the matte's 0.5 contour."""
    inside = (alpha >= 0.5).float()[:, None]  # (t, 1, h, w)
    size = 2 * radius + 1
    near_inside = F.max_pool2d(inside, size, stride=1, padding=radius)  # dilation
    near_outside = F.max_pool2d(1 - inside, size, stride=1, padding=radius)  # dilation of the outside
    return (near_inside * near_outside)[:, 0].bool()  # (t, h, w)


def alpha_temporal_change(alpha: torch.Tensor) -> float:
    """Mean ``|a_t - a_(t-1)|`` of a matte (t, h, w) in [0, 1]; 0 for a single frame."""
    if alpha.shape[0] < 2:
        return 0.0
    return float((alpha[1:].double() - alpha[:-1].double()).abs().mean())


def layer_scores(fg_rgba: np.ndarray, bg: np.ndarray, blend: np.ndarray) -> dict[str, float | None]:
    """The scores (module docstring) of straight RGBA (t, h, w, 4), background and blend (t, h, w, 3) bytes."""
    if fg_rgba.shape[-1] != 4 or not fg_rgba.shape[:3] == bg.shape[:3] == blend.shape[:3]:
        raise SampleFolderError(
            f"layers do not match: foreground {fg_rgba.shape}, background {bg.shape}, "
            f"blend {blend.shape} (expected RGBA, RGB and RGB of the same frames and size)"
        )
    fg = torch.from_numpy(np.ascontiguousarray(fg_rgba)).float() / 255.0  # (t, h, w, 4)
    alpha = fg[..., 3:]  # (t, h, w, 1)
    composite = fg[..., :3] * alpha + torch.from_numpy(np.ascontiguousarray(bg)).float() / 255.0 * (1 - alpha)
    generated = torch.from_numpy(np.ascontiguousarray(blend)).float() / 255.0  # (t, h, w, 3)
    band = edge_band(alpha[..., 0])
    ssim = ssim_map(generated, composite)  # (t, h, w)
    return {
        "psnr_db": psnr(generated, composite),
        "ssim": float(ssim.double().mean()),
        "edge_psnr_db": psnr(generated, composite, band),
        "edge_ssim": float(ssim[band].double().mean()) if bool(band.any()) else None,
        "alpha_temporal_change": alpha_temporal_change(alpha[..., 0]),
        "edge_fraction": float(band.double().mean()),
    }


def _read(folder: Path, name: str) -> np.ndarray:
    path = folder / name
    if not path.exists():
        raise SampleFolderError(
            f"{folder}: no {name} (scores need the foreground with its matte, the background and the blend)"
        )
    return read_clip_frames(path)


def sample_layers(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Straight RGBA foreground (t, h, w, 4), background and blend (t, h, w, 3) bytes of a sample folder."""
    folder = Path(folder)
    if not (folder / layer_video(Layer.ALPHA)).exists():
        raise SampleFolderError(f"{folder}: no {layer_video('alpha')}: an RGB sample has no matte to score")
    straight, premultiplied = ALPHA_EXPORTS["straight"], ALPHA_EXPORTS["premultiplied"]
    if (folder / straight.png_folder).is_dir():
        fg = _read(folder, straight.png_folder)
    elif (folder / premultiplied.png_folder).is_dir():
        fg = unpremultiply(_read(folder, premultiplied.png_folder))
    else:
        matted = uint8_to_model(_read(folder, layer_video(Layer.FG)))  # (t, 3, h, w)
        fg = rgba_from_layers(matted, uint8_to_model(_read(folder, layer_video(Layer.ALPHA))))
    return fg, _read(folder, layer_video(Layer.BG))[..., :3], _read(folder, layer_video(Layer.BLEND))[..., :3]


SCORE_THREADS = 1  # the sums round by the CPU thread count: one count, so every caller gets the same digits


def score_folder(folder: str | os.PathLike) -> dict[str, float | None]:
    """The scores of one RGBA sample folder, from its files (computed with :data:`SCORE_THREADS` threads)."""
    with cpu_threads(SCORE_THREADS):
        return layer_scores(*sample_layers(folder))


def to_json(scores: Mapping[str, float | None]) -> dict:
    """Scores for JSON: an infinite PSNR becomes ``"inf"`` (JSON has no infinity)."""
    return {key: ("inf" if isinstance(value, float) and math.isinf(value) else value) for key, value in scores.items()}


def write_scores(folder: str | os.PathLike, scores: Mapping[str, float | None]) -> Path:
    return write_text_atomic(Path(folder) / SCORES_FILE, json.dumps(to_json(scores), indent=2) + "\n")


def format_table(rows: Sequence[tuple[str, Mapping[str, float | None]]]) -> str:
    """A plain-text table: one line per sample folder, one column per score."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, str) or math.isinf(value):
            return "inf"
        return f"{value:.4f}"

    header = ("sample", *SCORE_KEYS)
    lines = [header, *((name, *(cell(scores.get(key)) for key in SCORE_KEYS)) for name, scores in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip() for line in lines
    )
