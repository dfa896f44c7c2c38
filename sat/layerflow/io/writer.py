"""Writing generated layers: MP4, RGBA PNG sequences, alpha videos, mattes, masters and a preview.

Every writer goes through :mod:`layerflow.io.atomic`, so an output appears complete or not at all.
Videos are encoded by the ffmpeg binary that ``imageio-ffmpeg`` ships. The MP4 settings follow
what the original's ``imageio.get_writer(path, fps=8)`` produced: H.264 (libx264), yuv420p,
constant rate factor 25 (imageio quality 5, ``int((1 - quality / 10) * 51)``), 8 fps.

Colour: frames are display-referred RGB (sRGB / Rec. 709 primaries). Every video is converted
to YUV with the BT.709 matrix, whatever its size (ffmpeg's own default is BT.601, which an editor
reading HD video as BT.709 shows visibly off), and is tagged with what it holds: BT.709 primaries,
transfer and matrix, and its range (``tv`` = limited for colour, ``pc`` = full for the matte and
FFV1's RGB), so a player or editor that honours the tags decodes the frames that were written.

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
from layerflow.io.pixels import EncodeError, EncoderUnavailableError, layer_to_alpha, to_uint8, unit_to_uint8
from layerflow.io.sample_files import MASTER_SUFFIXES, layer_video, master_file

DEFAULT_FPS = 8  # the sampling configs' fps
DEFAULT_CRF = 25  # what the original wrote with: imageio quality 5
MATTE_QP = 1  # the matte's H.264 quantiser: near-lossless (within 1 level) yet plain High profile
CHECKER_CELL = 16  # checkerboard square (pixels) behind the foreground in previews
CHECKER_SHADES = (204, 255)  # the two greys of the checkerboard
# libx264's bitstream depends on its thread count, which ffmpeg would take from the machine's cores
# (or a process's CPU binding): fixed here, with bit-exact containers (no random Matroska segment id,
# no muxer version tag), the same frames give the same file bytes on any machine with this ffmpeg.
ENCODER_THREADS = 4
COLOUR_STANDARD = "bt709"  # primaries, transfer and YUV matrix of every video written
_SCALER_FLAGS = "accurate_rnd+full_chroma_int"  # exact rounding: a flat colour keeps its value
_INPUT_PIX_FMTS = {1: "gray", 3: "rgb24", 4: "rgba"}  # raw frames piped to ffmpeg, by channel count


@dataclass(frozen=True)
class VideoFormat:
    """What a written video holds: its encoder and options, the pixel format encoded and its range.

    ``pix_fmt`` is given for colour (3 channels), with alpha (4) and for a grey matte (1) where
    they differ; ``colour_range`` is ``tv`` (limited, 16-235) or ``pc`` (full, 0-255). A format
    whose pixel format is RGB (FFV1) keeps the frames as they are and is tagged with the RGB matrix.
    """

    encoder: str
    suffix: str
    pix_fmt: str
    options: tuple[str, ...] = ()
    colour_range: str = "tv"
    pix_fmt_alpha: str = ""
    pix_fmt_matte: str = ""

    def encoded_pix_fmt(self, channels: int) -> str:
        return {4: self.pix_fmt_alpha, 1: self.pix_fmt_matte}.get(channels) or self.pix_fmt

    def ffmpeg_options(self, channels: int) -> list[str]:
        """Conversion to the encoded pixel format with the BT.709 matrix, the encoder and the colour tags."""
        pix_fmt = self.encoded_pix_fmt(channels)
        rgb = pix_fmt.startswith(("gbr", "bgr", "rgb"))
        matrix = "gbr" if rgb else COLOUR_STANDARD
        tags = f"setparams=color_primaries={COLOUR_STANDARD}:color_trc={COLOUR_STANDARD}"
        convert = "" if rgb else f"scale=out_color_matrix={matrix}:out_range={self.colour_range}:flags={_SCALER_FLAGS},"
        return [
            "-vf", f"{tags},{convert}format={pix_fmt}",
            "-c:v", self.encoder, *self.options,
            "-colorspace", "rgb" if rgb else matrix, "-color_primaries", COLOUR_STANDARD,
            "-color_trc", COLOUR_STANDARD, "-color_range", self.colour_range,
        ]  # fmt: skip


H264 = VideoFormat("libx264", ".mp4", "yuv420p")
MATTE_H264 = VideoFormat("libx264", ".mp4", "yuv420p", ("-qp", str(MATTE_QP)), colour_range="pc")
ALPHA_CODECS = {
    # ProRes 4444 with alpha: prores_ks takes 10-bit 4:4:4 colour plus alpha (16 bits); ffmpeg's
    # decoder reports such a file as yuva444p12le, the format it decodes ProRes 4444 into
    "prores": VideoFormat("prores_ks", ".mov", "yuva444p10le", ("-profile:v", "4444")),
    "vp9": VideoFormat("libvpx-vp9", ".webm", "yuva420p", ("-b:v", "0", "-crf", "18")),
}
MASTER_CODECS = {
    "ffv1": VideoFormat("ffv1", MASTER_SUFFIXES["ffv1"], "gbrp", ("-level", "3"), "pc", pix_fmt_matte="gray"),
    "prores_hq": VideoFormat("prores_ks", MASTER_SUFFIXES["prores_hq"], "yuv422p10le", ("-profile:v", "hq")),
    "prores_4444": VideoFormat("prores_ks", MASTER_SUFFIXES["prores_4444"], "yuv444p10le", ("-profile:v", "4444")),
}
MASTER_CHOICES = ("none", *MASTER_SUFFIXES)  # output.master: "png" is a PNG sequence, no encoder


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


def _encode(frames: np.ndarray, fps: float, video: VideoFormat, temporary: Path, target: Path) -> None:
    """Pipe raw frames (t, h, w, c) through ffmpeg into ``temporary`` as ``video``; errors name ``target``."""
    t, h, w, channels = frames.shape
    pix_fmt = video.encoded_pix_fmt(channels)
    if ("420" in pix_fmt or "422" in pix_fmt) and (h % 2 or w % 2):  # chroma at half resolution
        raise ValueError(f"{target}: {pix_fmt} needs even frame sizes, got {w}x{h}")
    _require_encoder(video.encoder, target)
    command = [
        get_ffmpeg_exe(), "-nostdin", "-y", "-v", "error",
        "-f", "rawvideo", "-pix_fmt", _INPUT_PIX_FMTS[channels], "-s", f"{w}x{h}", "-r", str(fps), "-i", "-",
        "-an", *video.ffmpeg_options(channels), "-threads", str(ENCODER_THREADS), "-fflags", "+bitexact",
        "-frames:v", str(t), str(temporary),
    ]  # fmt: skip
    result = subprocess.run(command, input=frames.tobytes(), capture_output=True)
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise EncodeError(f"ffmpeg could not write {target}: {reason}")


def _write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, video: VideoFormat) -> Path:
    target = Path(path)
    with atomic_path(target) as temporary:
        _encode(frames, fps, video, temporary, target)
    return target


def _check_crf(crf: int, target: Path) -> None:
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"{target}: the H.264 constant rate factor must be an integer from 0 to 51, got {crf!r}")


def write_mp4(
    path: str | os.PathLike,
    frames: np.ndarray | torch.Tensor,
    fps: float = DEFAULT_FPS,
    crf: int = DEFAULT_CRF,
) -> Path:
    """Write RGB frames (t, h, w, 3) as H.264 yuv420p MP4 (BT.709, limited range) at constant rate factor ``crf``.

    ``crf`` runs from 0 (lossless, which needs a High 4:4:4 decoder) to 51; 25 is the original's.
    """
    target = Path(path)
    rgb = as_uint8_frames(frames, (3,), str(target))
    _check_crf(crf, target)
    return _write_video(target, rgb, fps, VideoFormat("libx264", ".mp4", H264.pix_fmt, ("-crf", str(crf))))


def matte_bytes(frames: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """A grey matte as bytes (t, h, w, 1) from (t, h, w), (t, h, w, 1) or grey RGB (t, h, w, 3) frames."""
    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.ndim == 3:
        array = array[..., None]
    matte = as_uint8_frames(array, (1, 3), name)
    if matte.shape[-1] == 3:
        if not (np.array_equal(matte[..., 0], matte[..., 1]) and np.array_equal(matte[..., 0], matte[..., 2])):
            raise ValueError(f"{name}: a matte must be grey (equal channels); take one channel or their mean first")
        matte = matte[..., :1]
    return np.ascontiguousarray(matte)


def write_matte_mp4(path: str | os.PathLike, frames: np.ndarray | torch.Tensor, fps: float = DEFAULT_FPS) -> Path:
    """Write a grey matte (t, h, w) as a full-range H.264 MP4 that decodes within 1 level of the bytes given.

    Plain High profile 4:2:0 (grey needs no chroma), quantiser :data:`MATTE_QP`, tagged full range,
    so an editor that honours the tag reads 0 as 0 and 255 as 255.
    """
    target = Path(path)
    return _write_video(target, matte_bytes(frames, str(target)), fps, MATTE_H264)


def write_png_sequence(folder: str | os.PathLike, frames: np.ndarray | torch.Tensor) -> Path:
    """Write frames (t, h, w, 4, 3 or 1) as ``0000.png``, ``0001.png``, ... (RGBA keeps its alpha; 1 is grey)."""
    target = Path(folder)
    array = as_uint8_frames(frames, (1, 3, 4), str(target))
    mode = {4: "RGBA", 3: "RGB", 1: "L"}[array.shape[-1]]
    with atomic_directory(target) as temporary:
        for index, frame in enumerate(array):
            Image.fromarray(frame[..., 0] if mode == "L" else frame, mode).save(temporary / f"{index:04d}.png")
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
    return _write_video(target, as_uint8_frames(frames, (4,), str(target)), fps, spec)


def write_master(
    path: str | os.PathLike, frames: np.ndarray | torch.Tensor, codec: str, fps: float = DEFAULT_FPS
) -> Path:
    """Write an editing master of RGB (t, h, w, 3) or grey (t, h, w, 1) frames.

    ``codec``: ``png`` (a folder of PNG frames, lossless), ``ffv1`` (Matroska, lossless RGB or
    grey), ``prores_hq`` (ProRes 422 HQ, 10-bit) or ``prores_4444`` (ProRes 4444, 10-bit, no alpha).
    """
    target = Path(path)
    if codec not in MASTER_SUFFIXES:
        raise ValueError(f"{target}: unknown master codec '{codec}', expected one of {', '.join(MASTER_SUFFIXES)}")
    array = as_uint8_frames(frames, (1, 3), str(target))
    if codec == "png":
        return write_png_sequence(target, array)
    return _write_video(target, array, fps, MASTER_CODECS[codec])


def write_layer(
    folder: str | os.PathLike,
    layer: str,
    video: torch.Tensor,
    fps: float = DEFAULT_FPS,
    crf: int = DEFAULT_CRF,
    master: str = "none",
) -> list[Path]:
    """The files of one model layer (t, 3, h, w) in [-1, 1] in a sample folder; returns their paths.

    ``<layer>.mp4`` (H.264 at ``crf``; for ``alpha`` the grey matte, near-lossless), plus the
    layer's master in ``master`` unless that is ``none``. The matte is the alpha layer's channel
    mean, the same bytes as the alpha of the RGBA exports.
    """
    folder = Path(folder)
    if layer == "alpha":
        frames = to_uint8(2 * layer_to_alpha(video.to(torch.float32)) - 1)  # (t, h, w, 1)
        written = [write_matte_mp4(folder / layer_video(layer), frames, fps=fps)]
    else:
        frames = to_uint8(video)  # (t, h, w, 3)
        written = [write_mp4(folder / layer_video(layer), frames, fps=fps, crf=crf)]
    if master != "none":
        written.append(write_master(folder / master_file(layer, master), frames, master, fps=fps))
    return written


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
