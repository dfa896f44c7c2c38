"""Writing generated layers: MP4, RGBA PNG sequences, alpha videos and a side-by-side preview.

Every writer goes through :mod:`layerflow.io.atomic`, so an output appears complete or not at all.
Videos are encoded by the ffmpeg binary that ``imageio-ffmpeg`` ships. The MP4 settings follow
what the original's ``imageio.get_writer(path, fps=8)`` produced: H.264 (libx264), yuv420p,
imageio quality 5 (constant rate factor ``int((1 - quality / 10) * 51)`` = 25), 8 fps.

Frames are bytes (t, h, w, c), numpy or torch. Float frames are taken to be in [0, 1] and turned
into bytes by the original's rule ``uint8(255 * x)``; model outputs in [-1, 1] go through
:func:`layerflow.io.pixels.to_uint8` (or :func:`~layerflow.io.pixels.rgba_from_layers`) first.

Legend: t frames, c channels, h height, w width.
"""

from __future__ import annotations

import functools
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from imageio_ffmpeg import get_ffmpeg_exe
from PIL import Image

from layerflow.io.atomic import atomic_directory, atomic_path
from layerflow.io.labels import labelled_side_by_side
from layerflow.io.pixels import EncodeError, EncoderUnavailableError, unit_to_uint8

DEFAULT_FPS = 8  # the sampling configs' fps
DEFAULT_MP4_QUALITY = 5  # imageio's default, what the original wrote with
CHECKER_CELL = 16  # checkerboard square (pixels) behind the foreground in previews
CHECKER_SHADES = (204, 255)  # the two greys of the checkerboard
# libx264's bitstream depends on its thread count, which ffmpeg would take from the machine's cores
# (or a process's CPU binding): fixed here, with bit-exact containers (no random Matroska segment id,
# no muxer version tag), the same frames give the same file bytes on any machine with this ffmpeg.
ENCODER_THREADS = 4


@dataclass(frozen=True)
class AlphaCodec:
    """An ffmpeg encoder that keeps the alpha channel, with the container it needs."""

    encoder: str
    suffix: str
    options: tuple[str, ...]


ALPHA_CODECS = {
    "prores": AlphaCodec("prores_ks", ".mov", ("-profile:v", "4", "-pix_fmt", "yuva444p10le")),  # ProRes 4444
    "vp9": AlphaCodec("libvpx-vp9", ".webm", ("-pix_fmt", "yuva420p", "-b:v", "0", "-crf", "18")),
}


@functools.cache
def ffmpeg_encoders() -> frozenset[str]:
    """Names of the video encoders the bundled ffmpeg offers (``ffmpeg -encoders``)."""
    result = subprocess.run([get_ffmpeg_exe(), "-hide_banner", "-encoders"], capture_output=True, text=True)
    names = set()
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and len(parts[0]) == 6 and parts[0].startswith("V"):
            names.add(parts[1])
    return frozenset(names)


def available_alpha_codecs() -> list[str]:
    """The keys of :data:`ALPHA_CODECS` this ffmpeg can encode."""
    return [name for name, codec in ALPHA_CODECS.items() if codec.encoder in ffmpeg_encoders()]


def _require_encoder(encoder: str, target: Path) -> None:
    if encoder not in ffmpeg_encoders():
        raise EncoderUnavailableError(f"cannot write {target}: the bundled ffmpeg has no '{encoder}' encoder")


def as_uint8_frames(frames: np.ndarray | torch.Tensor, channels: tuple[int, ...], name: str) -> np.ndarray:
    """Check and convert frames to contiguous bytes (t, h, w, c) with c in ``channels``."""
    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] not in channels or 0 in array.shape:
        raise ValueError(f"{name}: expected frames (t, h, w, c) with c in {channels}, got shape {array.shape}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name}: expected uint8 or float frames, got {array.dtype}")
    if array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(
            f"{name}: float frames must lie in [0, 1], got [{array.min():.3g}, {array.max():.3g}] "
            "(convert model output in [-1, 1] with to_uint8)"
        )
    return unit_to_uint8(array)


def _encode(frames: np.ndarray, pix_fmt_in: str, fps: float, codec_options: list[str], temporary: Path, target: Path):
    """Pipe raw frames (t, h, w, c) through ffmpeg into ``temporary``; raise EncodeError naming ``target``."""
    t, h, w, _ = frames.shape
    command = [
        get_ffmpeg_exe(), "-nostdin", "-y", "-v", "error",
        "-f", "rawvideo", "-pix_fmt", pix_fmt_in, "-s", f"{w}x{h}", "-r", str(fps), "-i", "-",
        "-an", *codec_options, "-threads", str(ENCODER_THREADS), "-fflags", "+bitexact",
        "-frames:v", str(t), str(temporary),
    ]  # fmt: skip
    result = subprocess.run(command, input=frames.tobytes(), capture_output=True)
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise EncodeError(f"ffmpeg could not write {target}: {reason}")


def write_mp4(
    path: str | os.PathLike,
    frames: np.ndarray | torch.Tensor,
    fps: float = DEFAULT_FPS,
    quality: float = DEFAULT_MP4_QUALITY,
) -> Path:
    """Write RGB frames (t, h, w, 3) as H.264 yuv420p MP4; ``quality`` 1..10 on imageio's scale."""
    target = Path(path)
    rgb = as_uint8_frames(frames, (3,), str(target))
    if rgb.shape[1] % 2 or rgb.shape[2] % 2:
        raise ValueError(f"{target}: yuv420p needs even frame sizes, got {rgb.shape[2]}x{rgb.shape[1]}")
    if not 1 <= quality <= 10:
        raise ValueError(f"{target}: quality must lie in 1..10, got {quality}")
    _require_encoder("libx264", target)
    crf = int((1 - quality / 10) * 51)
    options = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf)]
    with atomic_path(target) as temporary:
        _encode(rgb, "rgb24", fps, options, temporary, target)
    return target


def write_png_sequence(folder: str | os.PathLike, frames: np.ndarray | torch.Tensor) -> Path:
    """Write frames (t, h, w, 4 or 3) as ``0000.png``, ``0001.png``, ... (RGBA keeps its alpha)."""
    target = Path(folder)
    array = as_uint8_frames(frames, (3, 4), str(target))
    mode = "RGBA" if array.shape[-1] == 4 else "RGB"
    with atomic_directory(target) as temporary:
        for index, frame in enumerate(array):
            Image.fromarray(frame, mode).save(temporary / f"{index:04d}.png")
    return target


def write_alpha_video(
    path: str | os.PathLike,
    frames: np.ndarray | torch.Tensor,
    codec: str = "prores",
    fps: float = DEFAULT_FPS,
) -> Path:
    """Write RGBA frames (t, h, w, 4) as a video that keeps alpha: ``"prores"`` (.mov) or ``"vp9"`` (.webm)."""
    target = Path(path)
    if codec not in ALPHA_CODECS:
        raise ValueError(f"{target}: unknown alpha codec '{codec}', expected one of {sorted(ALPHA_CODECS)}")
    spec = ALPHA_CODECS[codec]
    if target.suffix.lower() != spec.suffix:
        raise ValueError(f"{target}: {codec} with alpha needs a {spec.suffix} file")
    rgba = as_uint8_frames(frames, (4,), str(target))
    if codec == "vp9" and (rgba.shape[1] % 2 or rgba.shape[2] % 2):
        raise ValueError(f"{target}: yuva420p needs even frame sizes, got {rgba.shape[2]}x{rgba.shape[1]}")
    _require_encoder(spec.encoder, target)
    with atomic_path(target) as temporary:
        _encode(rgba, "rgba", fps, ["-c:v", spec.encoder, *spec.options], temporary, target)
    return target


def checkerboard(height: int, width: int, cell: int = CHECKER_CELL) -> np.ndarray:
    """A grey checkerboard (h, w, 3) bytes, the usual backdrop that shows transparency."""
    rows = (np.arange(height) // cell)[:, None]
    cols = (np.arange(width) // cell)[None, :]
    shades = np.array(CHECKER_SHADES, dtype=np.uint8)
    return np.repeat(shades[(rows + cols) % 2][..., None], 3, axis=-1)


def composite_over(rgba: np.ndarray, backdrop: np.ndarray) -> np.ndarray:
    """Straight RGBA bytes (t, h, w, 4) over a backdrop (h, w, 3) or (t, h, w, 3) -> bytes (t, h, w, 3), rounded."""
    alpha = rgba[..., 3:].astype(np.float32) / 255.0  # (t, h, w, 1)
    mixed = rgba[..., :3].astype(np.float32) * alpha + backdrop.astype(np.float32) * (1.0 - alpha)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def write_preview(
    path: str | os.PathLike,
    fg_rgba: np.ndarray | torch.Tensor,
    bg: np.ndarray | torch.Tensor,
    blend: np.ndarray | torch.Tensor,
    fps: float = DEFAULT_FPS,
) -> Path:
    """Side-by-side MP4 (t, h, n w, 3): foreground over a checkerboard | alpha as grey | background | blend,
    each panel labelled with its layer and the first with the frame number (:mod:`layerflow.io.labels`).

    ``fg_rgba`` may be RGB (the RGB variant has no matte); it is then shown as is, with no alpha panel.
    """
    target = Path(path)
    fg = as_uint8_frames(fg_rgba, (3, 4), f"{target} (foreground)")
    bg_frames = as_uint8_frames(bg, (3,), f"{target} (background)")
    blend_frames = as_uint8_frames(blend, (3,), f"{target} (blend)")
    if not fg.shape[:3] == bg_frames.shape[:3] == blend_frames.shape[:3]:
        raise ValueError(
            f"{target}: layers differ in frames or size: foreground {fg.shape[:3]}, "
            f"background {bg_frames.shape[:3]}, blend {blend_frames.shape[:3]} (t, h, w)"
        )
    named = [("foreground", fg), ("background", bg_frames), ("blend", blend_frames)]
    if fg.shape[-1] == 4:
        named[0] = ("foreground", composite_over(fg, checkerboard(fg.shape[1], fg.shape[2])))  # (t, h, w, 3)
        named.insert(1, ("alpha", np.repeat(fg[..., 3:], 3, axis=-1)))  # (t, h, w, 3) the matte as grey
    return write_mp4(target, labelled_side_by_side(named), fps=fps)  # (t, h, n w, 3)
