"""Reading given layers: frame folders, video files or still images -> model pixels.

The rules follow the original stage-2 data code (``SFTDataset_layer_f3_stage2``), which reads
every layer from folders of numbered frames and treats them all alike, with two exceptions
made for users (compose and sampling ``--input``):

1. **Which frames.** The original picks ``T`` frame indices spread evenly over a window of
   ``min(n, T - 1)`` consecutive frames starting at ``start``: ``floor(linspace(start, start +
   window - 1, T))``, so the 16 frames of a 16-frame clip come out as 0, 0, 1, ..., 14 (pick
   :data:`PICK_ORIGINAL`; training keeps it). Compose and sampling take the frames one for one
   instead (:data:`PICK_ONE_FOR_ONE`): frames ``start .. start + T - 1`` in order, and a clip
   with fewer frames is refused. Both look at the first 64 frames only.
2. Each frame becomes float32 in [-1, 1] (``u8 / 127.5 - 1``); the foreground is matted over
   grey with the mask at the source resolution (see :mod:`layerflow.io.pixels`).
3. The stacked clip is resized with bicubic, antialiased interpolation (torchvision ``resize``
   on a tensor) so that it covers the target size with its aspect kept, sizes truncated to int,
   and then centre-cropped with offsets ``(excess_h // 2, excess_w // 2)``. A clip already at the
   target size is left untouched. Bicubic filtering can overshoot [-1, 1] slightly; like the
   original, the layers are not clamped (mattes returned in [0, 1] are).
4. **Colour with alpha** is resized premultiplied (colour x alpha, resized, divided by the
   resized alpha), never as straight colour, which would pull the colour of transparent pixels
   into the edge (dark halos). A clip whose alpha is opaque everywhere is resized as plain RGB.

A still image (PNG, JPEG) is a clip of one frame, held for every frame. A source may also be a
sample folder of an earlier run (a folder with ``meta.json``): the layer is then read from that
folder's file for it (:func:`resolve_layer_source`).

Video files (mp4, mov, webm, ...) are decoded with the ffmpeg binary of ``imageio-ffmpeg``
(without auto-rotation, as decord does) and then handled exactly like frame folders. A video
with an alpha channel (ProRes 4444, VP9 with alpha, ...) gives RGBA frames; VP9/VP8 alpha is
decoded with libvpx, because ffmpeg's native decoders drop it.

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

from layerflow.io.pixels import MATTE_EPSILON, LayerSourceError, matte_foreground, uint8_to_model, uint8_to_unit
from layerflow.io.sample_files import ALPHA_EXPORTS, is_sample_folder, layer_files, read_meta
from layerflow.io.writer import ALPHA_CODECS
from layerflow.tasks import MASK_INPUT, Layer

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_SOURCE_FRAMES = 64  # the original looks at the first 64 frames of a clip only
DEFAULT_NUM_FRAMES = 16
DEFAULT_SIZE = (480, 720)  # (height, width)

CROP_WARNING_FRACTION = 0.2  # warn when the centre crop cuts away more than this share of a frame
PICK_ONE_FOR_ONE = "one-for-one"  # frames start, start + 1, ... in order (compose, sampling --input)
PICK_ORIGINAL = "original"  # the original data code's spread over T - 1 frames (training)
FRAME_PICKS = (PICK_ONE_FOR_ONE, PICK_ORIGINAL)

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


def one_for_one_indices(available: int, num_frames: int = DEFAULT_NUM_FRAMES, start: int = 0) -> list[int]:
    """Frames ``start, start + 1, ..., start + num_frames - 1`` of a clip, in order, one output frame each.

    Raises :class:`LayerSourceError` when the clip (its first 64 frames) does not hold them all:
    no frame is invented or repeated.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if start < 0:
        raise ValueError(f"start frame {start} is negative")
    usable = min(available, MAX_SOURCE_FRAMES)
    if start + num_frames > usable:
        read = f" (only the first {MAX_SOURCE_FRAMES} are read)" if available > MAX_SOURCE_FRAMES else ""
        first = f" from frame {start}" if start else ""
        raise LayerSourceError(
            f"clip has {available} frames{read}, {num_frames} output frames{first} need {start + num_frames} "
            f"(frames are taken one for one; give a longer clip, fewer frames or a still image)"
        )
    return list(range(start, start + num_frames))


def frame_indices(available: int, num_frames: int, start: int = 0, pick: str = PICK_ORIGINAL) -> list[int]:
    """The source frames that become the ``num_frames`` output frames, by the rule ``pick`` (see the module)."""
    if pick == PICK_ONE_FOR_ONE:
        return one_for_one_indices(available, num_frames, start)
    if pick == PICK_ORIGINAL:
        return sample_frame_indices(available, num_frames, start)
    raise ValueError(f"unknown frame pick {pick!r}, expected one of {', '.join(FRAME_PICKS)}")


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


def resize_with_alpha(rgb: torch.Tensor, alpha: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight colour (t, c, h, w) in [-1, 1] and its matte (t, 1, h, w) in [0, 1], resized and cropped to ``size``.

    The colour is resized premultiplied: ``resize(rgb * a) / resize(a)``, clamped to [-1, 1],
    where the resized matte exceeds :data:`~layerflow.io.pixels.MATTE_EPSILON`; where it does not
    (transparent all around) the colour is resized straight, as nothing shows there. The matte is
    returned clamped to [0, 1]. A clip that is only cropped, or whose matte is 1 everywhere, keeps
    its colour exactly as an RGB clip would.
    """
    matte = resize_for_rectangle_crop(alpha, size).clamp(0.0, 1.0)  # (t, 1, H, W)
    straight = resize_for_rectangle_crop(rgb, size)  # (t, c, H, W)
    if cover_size(*rgb.shape[-2:], size) == tuple(rgb.shape[-2:]) or bool((alpha == 1).all()):
        return straight, matte  # only cropped (nothing resampled) or opaque: straight colour is exact
    premultiplied = resize_for_rectangle_crop(rgb * alpha, size)  # (t, c, H, W)
    unpremultiplied = (premultiplied / matte.clamp(min=MATTE_EPSILON)).clamp(-1.0, 1.0)
    return torch.where(matte > MATTE_EPSILON, unpremultiplied, straight), matte


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


def _count_video_frames(path: Path) -> int:
    """Frames in the first video stream, counted from its packets (no decoding)."""
    command = [
        get_ffmpeg_exe(), "-v", "error", "-nostdin", "-nostats", "-i", str(path),
        "-map", "0:v:0", "-c", "copy", "-f", "null", "-progress", "pipe:1", "-",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, errors="replace")
    counts = re.findall(r"^frame=(\d+)$", result.stdout, flags=re.MULTILINE)
    if result.returncode != 0 or not counts:
        reason = result.stderr.strip().splitlines()
        raise LayerSourceError(f"{path}: not a readable video ({reason[-1] if reason else 'no frames'})")
    return int(counts[-1])


@dataclass(frozen=True)
class _Source:
    """A clip of ``count`` frames; ``frame(i)`` gives frame i as a PIL image. A still image is one held frame."""

    path: Path
    count: int
    frame: Callable[[int], Image.Image]
    still: bool = False


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in FRAME_SUFFIXES


def _open_source(source: str | os.PathLike) -> _Source:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"layer source {path} does not exist (expected a video file, a folder of frames or an image)"
        )
    if path.is_dir():
        files = _frame_files(path)
        return _Source(path, len(files), lambda i: _load_image(files[i]))
    if _is_image_file(path):
        image = _load_image(path)
        return _Source(path, 1, lambda i: image, still=True)
    frames = _decode_video(path)
    return _Source(path, len(frames), lambda i: Image.fromarray(frames[i]))


def clip_length(source: str | os.PathLike) -> tuple[int, bool]:
    """(frames, still) of a clip without decoding it: a folder's frame count, a video's packets, 1 for an image."""
    path = Path(source)
    if path.is_dir():
        return len(_frame_files(path)), False
    if _is_image_file(path):
        return 1, True
    if not path.exists():
        raise FileNotFoundError(f"layer source {path} does not exist")
    return _count_video_frames(path), False


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
        elif "layer" in modes and resolved[modes.index("layer")] == "RGBA" and _layer_mode(image) != "RGBA":
            name = getattr(image, "filename", "") or f"{source.path} frame {i}"
            raise LayerSourceError(f"{name}: an RGB frame (no alpha) in a sequence of RGBA frames; give it its alpha")
        for stack, mode in zip(stacks, resolved, strict=True):
            array = np.asarray(image.convert(mode))
            stack.append(array[..., None] if array.ndim == 2 else array)  # (h, w, c)
    return [np.stack(stack) for stack in stacks]  # (t, h, w, c) each


_warned: set[tuple] = set()  # warnings already given in this process: each is given once


def _warn_once(key: tuple, message: str, *args) -> None:
    """``log.warning(message, *args)`` the first time ``key`` is seen (checks and reads share one warning)."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def picked_indices(count: int, still: bool, num_frames: int, start: int = 0, pick: str = PICK_ORIGINAL) -> list[int]:
    """The source frames taken for a clip of ``count`` frames (a still: frame 0 every time)."""
    return [0] * num_frames if still else frame_indices(count, num_frames, start, pick)


def _pick_frames(clip: _Source, num_frames: int, start: int, pick: str) -> list[int]:
    """:func:`picked_indices` for ``clip``, with its path in the error."""
    try:
        return picked_indices(clip.count, clip.still, num_frames, start, pick)
    except LayerSourceError as error:
        raise LayerSourceError(f"{clip.path}: {error}") from None


def _no_alpha_message(path: Path) -> str:
    return (
        f"{path}: frames have no alpha channel; give RGBA frames (PNG with alpha, ProRes 4444, VP9 with "
        f"alpha) or the matte as --input mask=PATH (manifest: inputs.mask)"
    )


def _warn_about_geometry(path: Path, width: int, height: int, size: Sequence[int]) -> None:
    """One warning line when the clip is enlarged, and one when the centre crop cuts much of it away.

    Each is given once per process for a file and target size, however often the file is checked.
    """
    target_h, target_w = size
    cover_h, cover_w = cover_size(height, width, size)
    scale = cover_h / height
    key = (str(path), width, height, target_h, target_w)
    if scale > 1:
        _warn_once(
            ("enlarged", *key),
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
        _warn_once(
            ("cropped", *key),
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
    pick: str = PICK_ORIGINAL,
) -> None:
    """Check a given layer before any model loads: it exists, decodes, is long enough, has alpha if needed.

    Raises the error reading it would raise (one line naming the file); warns (once per file and
    size in a process) when the clip will be enlarged or heavily cropped.
    """
    clip = _open_source(source)
    _pick_frames(clip, num_frames, 0, pick)
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
    from ``alpha.mp4`` (the matte). A master copy of the layer (``output.master``) comes first.
    """
    if layer == Layer.FG and with_alpha:
        straight = ALPHA_EXPORTS["straight"]
        return [straight.png_folder, *(straight.video_stem + codec.suffix for codec in ALPHA_CODECS.values())]
    return layer_files(Layer.ALPHA if layer == MASK_INPUT else layer)


def resolve_layer_source(source: str | os.PathLike, layer: str, with_alpha: bool = False) -> Path:
    """``source`` itself, or for a sample folder the file in it that holds ``layer``."""
    path = Path(source)
    if not is_sample_folder(path):
        return path
    names = sample_layer_files(layer, with_alpha)
    for name in names:
        if (path / name).exists():
            return path / name
    if layer == Layer.FG and with_alpha:
        wanted = " or ".join(names)
        hint = (
            " (an RGBA foreground needs the straight export; an RGB sample or one written with "
            "output.alpha_mode=premultiplied has none)"
        )
    else:
        wanted, hint = f"{names[-1]} (nor a master copy of it)", ""
    raise LayerSourceError(f"{path}: sample folder has no {wanted} for the {layer} layer{hint}")


def layer_provenance(
    source: str | os.PathLike,
    layer: str,
    with_alpha: bool = False,
    num_frames: int | None = None,
    pick: str = PICK_ORIGINAL,
) -> dict:
    """Where a given layer came from, for ``meta.json``: the absolute path and, for a sample folder,
    the file taken and that sample's id, task, variant, seed and checkpoint.

    With ``num_frames``, also which of its frames were used: ``frames`` (the source frame of each
    output frame, by the rule ``frame_pick``) and ``still`` for a still image.
    """
    path = Path(source)
    record: dict = {"path": str(path.resolve())}
    if is_sample_folder(path):
        meta = read_meta(path)
        record["file"] = resolve_layer_source(path, layer, with_alpha).name
        record["sample"] = {key: meta.get(key) for key in ("id", "task", "variant", "seed", "checkpoint")}
    if num_frames is not None:
        count, still = clip_length(resolve_layer_source(path, layer, with_alpha))
        record["frames"] = picked_indices(count, still, num_frames, 0, pick)
        record["frame_pick"] = "still" if still else pick
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


def _held(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """A still's one resized frame (1, c, h, w) held for ``num_frames`` frames."""
    return x.expand(num_frames, *x.shape[1:]).contiguous()


def read_layer_video(
    source: str | os.PathLike,
    num_frames: int = DEFAULT_NUM_FRAMES,
    size: Sequence[int] = DEFAULT_SIZE,
    start: int = 0,
    pick: str = PICK_ORIGINAL,
) -> torch.Tensor:
    """One layer as model pixels (t, c, h, w) float32 in [-1, 1], t = ``num_frames``, (h, w) = ``size``.

    ``c`` is 3, or 4 when the frames carry alpha (RGBA PNGs, alpha videos); the alpha channel is
    mapped to [-1, 1] like the colours, and the colour of such frames is resized premultiplied
    (:func:`resize_with_alpha`). Use this for the background and blend layers, which the original
    reads as plain RGB. ``pick`` chooses the frames (see the module); a still image is held.
    """
    clip = _open_source(source)
    indices = _pick_frames(clip, num_frames, start, pick)
    (frames,) = _read_frames(clip, indices[:1] if clip.still else indices, ["layer"])  # (t, h0, w0, c)
    x = uint8_to_model(frames)  # (t, c, h0, w0)
    if x.shape[1] == 4:
        rgb, matte = resize_with_alpha(x[:, :3], (x[:, 3:] + 1) / 2, size)
        x = torch.cat([rgb, 2 * matte - 1], dim=1)  # (t, 4, h, w)
    else:
        x = resize_for_rectangle_crop(x, size)  # (t, 3, h, w)
    return _held(x, num_frames) if clip.still else x


def _colour_and_mask(
    rgb_source: str | os.PathLike,
    mask_source: str | os.PathLike | None,
    num_frames: int,
    start: int,
    pick: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Picked colour (t, h, w, 3), grey matte (t, h, w, 1) and mask as RGB (t, h, w, 3), all bytes,
    and whether the source is a still (then t = 1)."""
    clip = _open_source(rgb_source)
    indices = _pick_frames(clip, num_frames, start, pick)
    indices = indices[:1] if clip.still else indices
    if mask_source is None:
        (rgba,) = _read_frames(clip, indices, ["layer"])  # (t, h, w, c)
        if rgba.shape[-1] != 4:
            raise LayerSourceError(_no_alpha_message(clip.path))
        matte = rgba[..., 3:]  # (t, h, w, 1)
        return rgba[..., :3], matte, np.repeat(matte, 3, axis=-1), clip.still
    mask = _open_source(mask_source)
    if mask.count != clip.count:
        raise LayerSourceError(f"{mask.path}: mask has {mask.count} frames, expected {clip.count} like {clip.path}")
    (colour,) = _read_frames(clip, indices, ["RGB"])
    matte, mask_rgb = _read_frames(mask, indices, ["L", "RGB"])
    if matte.shape[1:3] != colour.shape[1:3]:
        (mh, mw), (h, w) = matte.shape[1:3], colour.shape[1:3]
        raise LayerSourceError(f"{mask.path}: mask frames are {mw}x{mh}, expected {w}x{h} like {clip.path}")
    return colour, matte, mask_rgb, clip.still


def read_layer_with_alpha(
    rgb_source: str | os.PathLike,
    mask_source: str | os.PathLike | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
    size: Sequence[int] = DEFAULT_SIZE,
    start: int = 0,
    pick: str = PICK_ORIGINAL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight colour (t, 3, h, w) in [-1, 1] and matte (t, 1, h, w) in [0, 1] of a foreground.

    The matte comes from ``mask_source`` (grey or RGB frames, turned into one grey channel as
    PIL's ``"L"`` conversion does; white is opaque), or from the alpha channel of ``rgb_source``
    when no mask is given. The mask must have as many frames as the colour clip and the same frame
    size. The colour is resized premultiplied (:func:`resize_with_alpha`), so edges keep their colour.
    """
    colour, matte, _, still = _colour_and_mask(rgb_source, mask_source, num_frames, start, pick)
    rgb, alpha = resize_with_alpha(uint8_to_model(colour), uint8_to_unit(matte), size)  # (t, 3|1, h, w)
    return (_held(rgb, num_frames), _held(alpha, num_frames)) if still else (rgb, alpha)


def read_foreground(
    rgb_source: str | os.PathLike,
    mask_source: str | os.PathLike | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
    size: Sequence[int] = DEFAULT_SIZE,
    start: int = 0,
    pick: str = PICK_ORIGINAL,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The foreground and alpha layers (t, 3, h, w) each, in [-1, 1], exactly as the original builds them,
    and the matte (t, 1, h, w) in [0, 1], from one read of the files.

    The foreground is matted over grey at the source resolution and only then resized (which is a
    premultiplied resize); the alpha layer is the mask's RGB conversion (the alpha channel repeated
    for RGBA sources), resized on its own; the matte is the grey mask (as in :func:`read_layer_with_alpha`).
    """
    colour, matte, mask_rgb, still = _colour_and_mask(rgb_source, mask_source, num_frames, start, pick)
    fg = matte_foreground(uint8_to_model(colour), uint8_to_unit(matte))  # (t, 3, h0, w0)
    alpha = resize_for_rectangle_crop(uint8_to_unit(matte), size).clamp(0.0, 1.0)  # (t, 1, h, w)
    layers = (resize_for_rectangle_crop(fg, size), resize_for_rectangle_crop(uint8_to_model(mask_rgb), size), alpha)
    return tuple(_held(x, num_frames) for x in layers) if still else layers


def read_foreground_layers(
    rgb_source: str | os.PathLike,
    mask_source: str | os.PathLike | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
    size: Sequence[int] = DEFAULT_SIZE,
    start: int = 0,
    pick: str = PICK_ORIGINAL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The foreground and alpha layers of :func:`read_foreground`; the RGB variant uses the foreground only."""
    fg, alpha_layer, _ = read_foreground(rgb_source, mask_source, num_frames, size, start, pick)
    return fg, alpha_layer
