"""Reading given layers: frame folders or video files -> model pixels, as the original stage-2 data code.

The original (``SFTDataset_layer_f3_stage2``) reads every layer from folders of numbered frames
and treats them all alike:

1. Only the first 64 frames of a clip are considered.
2. It picks ``T`` frame indices spread evenly over a window of ``min(n, T - 1)`` consecutive
   frames starting at ``start``: ``floor(linspace(start, start + window - 1, T))``. With the
   default ``T = 16`` the 16 frames come from 15 source frames, one of them used twice. The
   original draws ``start`` at random; here it is an argument (default 0).
3. Each frame becomes float32 in [-1, 1] (``u8 / 127.5 - 1``); the foreground is matted over
   grey with the mask at the source resolution (see :mod:`layerflow.io.pixels`).
4. The stacked clip is resized with bicubic, antialiased interpolation (torchvision ``resize``
   on a tensor) so that it covers the target size with its aspect kept, sizes truncated to int,
   and then centre-cropped with offsets ``(excess_h // 2, excess_w // 2)``. A clip already at the
   target size is left untouched. Bicubic filtering can overshoot [-1, 1] slightly; like the
   original, the layers are not clamped (mattes returned in [0, 1] are).

A source may also be a sample folder of an earlier run (a folder with ``meta.json``): the layer
is then read from that folder's file for it (:func:`resolve_layer_source`).

Video files (mp4, mov, webm, ...) are decoded with the ffmpeg binary of ``imageio-ffmpeg``
(without auto-rotation, as decord does) and then handled exactly like frame folders. A video
with an alpha channel (ProRes 4444, VP9 with alpha, ...) gives RGBA frames.

Legend: t frames, c channels, h height, w width, n frames available in the source.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from imageio_ffmpeg import get_ffmpeg_exe
from PIL import Image, UnidentifiedImageError

from layerflow.io.pixels import LayerSourceError, matte_foreground, uint8_to_model, uint8_to_unit
from layerflow.io.sample_files import ALPHA_EXPORTS, is_sample_folder, layer_video, read_meta
from layerflow.io.writer import ALPHA_CODECS
from layerflow.tasks import MASK_INPUT, Layer

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_SOURCE_FRAMES = 64  # the original looks at the first 64 frames of a clip only
DEFAULT_NUM_FRAMES = 16
DEFAULT_SIZE = (480, 720)  # (height, width)

CROP_WARNING_FRACTION = 0.2  # warn when the centre crop cuts away more than this share of a frame

log = logging.getLogger(__name__)

_ALPHA_PIX_FMT = re.compile(r"^(yuva|rgba|bgra|argb|abgr|gbrap|ya\d)")


@dataclass(frozen=True)
class VideoStream:
    """What ffmpeg reports about the first video stream of a file."""

    codec: str
    pix_fmt: str
    width: int
    height: int
    alpha_side_channel: bool  # VP8/VP9 in WebM keep alpha in a side stream ("alpha_mode: 1")

    @property
    def has_alpha(self) -> bool:
        return self.alpha_side_channel or bool(_ALPHA_PIX_FMT.match(self.pix_fmt))


# ---------------------------------------------------------------------------------------------
# frame selection and geometry


def sample_frame_indices(available: int, num_frames: int = DEFAULT_NUM_FRAMES, start: int = 0) -> list[int]:
    """Indices of the ``num_frames`` frames the original picks from a clip of ``available`` frames.

    Raises :class:`LayerSourceError` when the clip is shorter than the window the original
    samples from (``num_frames - 1`` frames), where it would silently stretch the clip.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    usable = min(available, MAX_SOURCE_FRAMES)
    window = min(usable, num_frames - 1)
    needed = max(num_frames - 1, 1)
    if usable < needed:
        raise LayerSourceError(f"clip has {available} frames, {num_frames} output frames need at least {needed}")
    if not 0 <= start <= usable - window:
        raise ValueError(f"start frame {start} is outside 0..{usable - window} for a clip of {usable} usable frames")
    picks = np.linspace(start, start + window - 1, num_frames, dtype=int)
    return [int(i) for i in picks]


def cover_size(height: int, width: int, size: Sequence[int]) -> tuple[int, int]:
    """Size after the aspect-keeping resize that covers ``size`` = (H, W) (before the centre crop)."""
    target_h, target_w = size
    if width / height > target_w / target_h:
        return target_h, int(width * target_h / height)
    return int(height * target_w / width), target_w


def resize_for_rectangle_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize (t, c, h, w) to cover ``size`` keeping the aspect (bicubic, antialiased), then centre-crop."""
    target_h, target_w = size
    h, w = x.shape[-2:]
    new_h, new_w = cover_size(h, w, size)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    return x[..., top : top + target_h, left : left + target_w].contiguous()  # (t, c, H, W)


# ---------------------------------------------------------------------------------------------
# sources: a folder of frames or a video file, both as "n frames, fetch frame i"

_ALPHA_DECODERS = {"vp9": "libvpx-vp9", "vp8": "libvpx"}  # the native decoders drop the side-channel alpha


def _frame_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise LayerSourceError(f"{folder}: folder holds no frames (expected {', '.join(FRAME_SUFFIXES)} files)")
    return files


def _load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise LayerSourceError(f"{path}: not a readable image ({err})") from err


def probe_video(path: str | os.PathLike) -> VideoStream:
    """Codec, pixel format and size of the first video stream, from ffmpeg's report."""
    result = subprocess.run(
        [get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
    )
    report = result.stderr
    line = next((ln for ln in report.splitlines() if re.search(r"Stream #\S+.*: Video: ", ln)), None)
    if line is None:
        reason = report.strip().splitlines()[-1] if report.strip() else "no output"
        raise LayerSourceError(f"{path}: not a readable video ({reason})")
    description = line.split(": Video: ", 1)[1]
    codec = description.split()[0].rstrip(",")
    pix_fmt = re.search(r", ([a-z0-9_]+)[(,]", description)
    dimensions = re.search(r", (\d+)x(\d+)\b", description)
    if pix_fmt is None or dimensions is None:
        raise LayerSourceError(f"{path}: cannot tell the frame size or pixel format of its video stream")
    side_alpha = re.search(r"alpha_mode\s*:\s*1", report) is not None
    return VideoStream(codec, pix_fmt.group(1), int(dimensions.group(1)), int(dimensions.group(2)), side_alpha)


def _decode_video(path: Path) -> np.ndarray:
    """All frames (up to the 64 the original considers) as bytes (n, h, w, 3 or 4)."""
    stream = probe_video(path)
    channels = 4 if stream.has_alpha else 3
    decoder = _ALPHA_DECODERS.get(stream.codec) if stream.alpha_side_channel else None
    command = [
        get_ffmpeg_exe(), "-v", "error", "-nostdin", "-noautorotate", *(["-c:v", decoder] if decoder else []),
        "-i", str(path), "-frames:v", str(MAX_SOURCE_FRAMES),
        "-f", "rawvideo", "-pix_fmt", "rgba" if channels == 4 else "rgb24", "-",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True)
    frame_bytes = stream.width * stream.height * channels
    if result.returncode != 0 or not result.stdout or len(result.stdout) % frame_bytes:
        reason = result.stderr.decode(errors="replace").strip().splitlines()
        raise LayerSourceError(f"{path}: video could not be decoded ({reason[-1] if reason else 'no frames'})")
    return np.frombuffer(result.stdout, np.uint8).reshape(-1, stream.height, stream.width, channels)


@dataclass(frozen=True)
class _Source:
    """A clip of ``count`` frames; ``frame(i)`` gives frame i as a PIL image."""

    path: Path
    count: int
    frame: Callable[[int], Image.Image]


def _open_source(source: str | os.PathLike) -> _Source:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"layer source {path} does not exist (expected a video file or a folder of frames)")
    if path.is_dir():
        files = _frame_files(path)
        return _Source(path, len(files), lambda i: _load_image(files[i]))
    if path.suffix.lower() in FRAME_SUFFIXES:
        raise LayerSourceError(f"{path}: a single image is not a clip (expected a video file or a folder of frames)")
    frames = _decode_video(path)
    return _Source(path, len(frames), lambda i: Image.fromarray(frames[i]))


def _layer_mode(image: Image.Image) -> str:
    """RGBA when the image carries transparency, else RGB."""
    return "RGBA" if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info else "RGB"


def _read_frames(source: _Source, indices: Sequence[int], modes: Sequence[str]) -> list[np.ndarray]:
    """The picked frames, once per PIL mode in ``modes`` ("layer" = RGBA or RGB as the first frame has it).

    Returns one (t, h, w, c) array per mode; every frame must have the first frame's size.
    """
    stacks: list[list[np.ndarray]] = [[] for _ in modes]
    resolved = list(modes)
    size = None
    for i in indices:
        image = source.frame(i)
        if size is None:
            size = image.size
            resolved = [_layer_mode(image) if mode == "layer" else mode for mode in modes]
        elif image.size != size:
            raise LayerSourceError(
                f"{source.path}: frame {i} is {image.size[0]}x{image.size[1]}, "
                f"expected {size[0]}x{size[1]} like frame {indices[0]}"
            )
        for stack, mode in zip(stacks, resolved, strict=True):
            array = np.asarray(image.convert(mode))
            stack.append(array[..., None] if array.ndim == 2 else array)  # (h, w, c)
    return [np.stack(stack) for stack in stacks]  # (t, h, w, c) each


def _pick_frames(clip: _Source, num_frames: int, start: int) -> list[int]:
    """:func:`sample_frame_indices` for ``clip``, with its path in the error."""
    try:
        return sample_frame_indices(clip.count, num_frames, start)
    except LayerSourceError as error:
        raise LayerSourceError(f"{clip.path}: {error}") from None


def _no_alpha_message(path: Path) -> str:
    return (
        f"{path}: frames have no alpha channel; give RGBA frames (PNG with alpha, ProRes 4444, VP9 with "
        f"alpha) or the matte as --input mask=PATH (manifest: inputs.mask)"
    )


def _warn_about_geometry(path: Path, width: int, height: int, size: Sequence[int]) -> None:
    """One warning line when the clip is enlarged, and one when the centre crop cuts much of it away."""
    target_h, target_w = size
    cover_h, cover_w = cover_size(height, width, size)
    scale = cover_h / height
    if scale > 1:
        log.warning(
            "%s: %dx%d frames are enlarged %.1fx to cover %dx%d; expect a soft result",
            path,
            width,
            height,
            scale,
            target_w,
            target_h,
        )
    cut = 1 - (target_h * target_w) / (cover_h * cover_w)
    if cut > CROP_WARNING_FRACTION:
        log.warning(
            "%s: %dx%d frames do not have the %dx%d aspect; the centre crop cuts away %d%% of each frame",
            path,
            width,
            height,
            target_w,
            target_h,
            round(100 * cut),
        )


def check_layer_source(
    source: str | os.PathLike,
    num_frames: int = DEFAULT_NUM_FRAMES,
    size: Sequence[int] = DEFAULT_SIZE,
    needs_alpha: bool = False,
    mask: str | os.PathLike | None = None,
) -> None:
    """Check a given layer before any model loads: it exists, decodes, is long enough, has alpha if needed.

    Raises the error reading it would raise (one line naming the file); warns once when the clip
    will be enlarged or heavily cropped.
    """
    clip = _open_source(source)
    _pick_frames(clip, num_frames, 0)
    first = clip.frame(0)
    if mask is not None:
        matte = _open_source(mask)
        if matte.count != clip.count:
            raise LayerSourceError(
                f"{matte.path}: mask has {matte.count} frames, expected {clip.count} like {clip.path}"
            )
    elif needs_alpha and _layer_mode(first) != "RGBA":
        raise LayerSourceError(_no_alpha_message(clip.path))
    _warn_about_geometry(clip.path, first.size[0], first.size[1], size)


# ---------------------------------------------------------------------------------------------
# reusing a layer of an earlier result


def sample_layer_files(layer: str, with_alpha: bool) -> list[str]:
    """Files of a sample folder that can give ``layer`` (fg, bg, blend or mask), in order of preference.

    An RGBA foreground comes from the straight RGBA export (PNGs, else the alpha video); an RGB
    foreground from ``foreground.mp4`` (colour matted over grey, the RGB variant's layer); a mask
    from ``alpha.mp4``.
    """
    if layer == Layer.FG and with_alpha:
        straight = ALPHA_EXPORTS["straight"]
        return [straight.png_folder, *(straight.video_stem + codec.suffix for codec in ALPHA_CODECS.values())]
    return [layer_video(Layer.ALPHA if layer == MASK_INPUT else layer)]


def resolve_layer_source(source: str | os.PathLike, layer: str, with_alpha: bool = False) -> Path:
    """``source`` itself, or for a sample folder the file in it that holds ``layer``."""
    path = Path(source)
    if not is_sample_folder(path):
        return path
    names = sample_layer_files(layer, with_alpha)
    for name in names:
        if (path / name).exists():
            return path / name
    hint = (
        " (an RGBA foreground needs the straight export; an RGB sample or one written with "
        "output.alpha_mode=premultiplied has none)"
        if layer == Layer.FG and with_alpha
        else ""
    )
    raise LayerSourceError(f"{path}: sample folder has no {' or '.join(names)} for the {layer} layer{hint}")


def layer_provenance(source: str | os.PathLike, layer: str, with_alpha: bool = False) -> dict:
    """Where a given layer came from, for ``meta.json``: the absolute path and, for a sample folder,
    the file taken and that sample's id, task, variant, seed and checkpoint."""
    path = Path(source)
    record: dict = {"path": str(path.resolve())}
    if is_sample_folder(path):
        meta = read_meta(path)
        record["file"] = resolve_layer_source(path, layer, with_alpha).name
        record["sample"] = {key: meta.get(key) for key in ("id", "task", "variant", "seed", "checkpoint")}
    return record


# ---------------------------------------------------------------------------------------------
# public readers


def read_clip_frames(source: str | os.PathLike) -> np.ndarray:
    """Every frame of a frame folder (or the first 64 of a video) as bytes (n, h, w, c), unresized.

    ``c`` is 4 when the first frame carries alpha, else 3.
    """
    clip = _open_source(source)
    (frames,) = _read_frames(clip, range(clip.count), ["layer"])  # (n, h, w, c)
    return frames


def read_still_video(
    source: str | os.PathLike, num_frames: int = DEFAULT_NUM_FRAMES, size: Sequence[int] = DEFAULT_SIZE
) -> torch.Tensor:
    """A still image held for ``num_frames`` frames: (t, c, h, w) in [-1, 1], resized and cropped like a clip."""
    image = _load_image(Path(source))
    frame = np.array(image.convert(_layer_mode(image)))[None]  # (1, h0, w0, c)
    return resize_for_rectangle_crop(uint8_to_model(frame), size).expand(num_frames, -1, -1, -1).contiguous()


def read_layer_video(
    source: str | os.PathLike,
    num_frames: int = DEFAULT_NUM_FRAMES,
    size: Sequence[int] = DEFAULT_SIZE,
    start: int = 0,
) -> torch.Tensor:
    """One layer as model pixels (t, c, h, w) float32 in [-1, 1], t = ``num_frames``, (h, w) = ``size``.

    ``c`` is 3, or 4 when the frames carry alpha (RGBA PNGs, alpha videos); the alpha channel is
    mapped to [-1, 1] like the colours. Use this for the background and blend layers, which the
    original reads as plain RGB.
    """
    clip = _open_source(source)
    indices = _pick_frames(clip, num_frames, start)
    (frames,) = _read_frames(clip, indices, ["layer"])  # (t, h0, w0, c)
    return resize_for_rectangle_crop(uint8_to_model(frames), size)  # (t, c, h, w)


def _colour_and_mask(
    rgb_source: str | os.PathLike, mask_source: str | os.PathLike | None, num_frames: int, start: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Picked colour (t, h, w, 3), grey matte (t, h, w, 1) and mask as RGB (t, h, w, 3), all bytes."""
    clip = _open_source(rgb_source)
    indices = _pick_frames(clip, num_frames, start)
    if mask_source is None:
        (rgba,) = _read_frames(clip, indices, ["layer"])  # (t, h, w, c)
        if rgba.shape[-1] != 4:
            raise LayerSourceError(_no_alpha_message(clip.path))
        matte = rgba[..., 3:]  # (t, h, w, 1)
        return rgba[..., :3], matte, np.repeat(matte, 3, axis=-1)
    mask = _open_source(mask_source)
    if mask.count != clip.count:
        raise LayerSourceError(f"{mask.path}: mask has {mask.count} frames, expected {clip.count} like {clip.path}")
    (colour,) = _read_frames(clip, indices, ["RGB"])
    matte, mask_rgb = _read_frames(mask, indices, ["L", "RGB"])
    if matte.shape[1:3] != colour.shape[1:3]:
        (mh, mw), (h, w) = matte.shape[1:3], colour.shape[1:3]
        raise LayerSourceError(f"{mask.path}: mask frames are {mw}x{mh}, expected {w}x{h} like {clip.path}")
    return colour, matte, mask_rgb


def read_layer_with_alpha(
    rgb_source: str | os.PathLike,
    mask_source: str | os.PathLike | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
    size: Sequence[int] = DEFAULT_SIZE,
    start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight colour (t, 3, h, w) in [-1, 1] and matte (t, 1, h, w) in [0, 1] of a foreground.

    The matte comes from ``mask_source`` (grey or RGB frames, turned into one grey channel as
    PIL's ``"L"`` conversion does), or from the alpha channel of ``rgb_source`` when no mask is
    given. The mask must have as many frames as the colour clip and the same frame size.
    """
    colour, matte, _ = _colour_and_mask(rgb_source, mask_source, num_frames, start)
    rgb = resize_for_rectangle_crop(uint8_to_model(colour), size)  # (t, 3, h, w)
    alpha = uint8_to_unit(matte)  # (t, 1, h0, w0)
    return rgb, resize_for_rectangle_crop(alpha, size).clamp(0.0, 1.0)  # (t, 1, h, w)


def read_foreground(
    rgb_source: str | os.PathLike,
    mask_source: str | os.PathLike | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
    size: Sequence[int] = DEFAULT_SIZE,
    start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The foreground and alpha layers (t, 3, h, w) each, in [-1, 1], exactly as the original builds them,
    and the matte (t, 1, h, w) in [0, 1], from one read of the files.

    The foreground is matted over grey at the source resolution and only then resized; the
    alpha layer is the mask's RGB conversion (the alpha channel repeated for RGBA sources),
    resized on its own; the matte is the grey mask (as in :func:`read_layer_with_alpha`).
    """
    colour, matte, mask_rgb = _colour_and_mask(rgb_source, mask_source, num_frames, start)
    fg = matte_foreground(uint8_to_model(colour), uint8_to_unit(matte))  # (t, 3, h0, w0)
    alpha = resize_for_rectangle_crop(uint8_to_unit(matte), size).clamp(0.0, 1.0)  # (t, 1, h, w)
    return resize_for_rectangle_crop(fg, size), resize_for_rectangle_crop(uint8_to_model(mask_rgb), size), alpha


def read_foreground_layers(
    rgb_source: str | os.PathLike,
    mask_source: str | os.PathLike | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
    size: Sequence[int] = DEFAULT_SIZE,
    start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The foreground and alpha layers of :func:`read_foreground`; the RGB variant uses the foreground only."""
    fg, alpha_layer, _ = read_foreground(rgb_source, mask_source, num_frames, size, start)
    return fg, alpha_layer
