"""How layer pixels map between image files and the model, as the original LayerFlow data code does it.

The readers (:mod:`layerflow.io.reader`) and writers (:mod:`layerflow.io.writer`) share
these conventions:

* Model pixels are float32 in [-1, 1], laid out (t, c, h, w): ``x = u8 / 127.5 - 1``.
* The foreground layer is matted over mid-grey, ``fg = (rgb + 1) * a - a = rgb * a`` with the
  matte ``a`` in [0, 1] taken from the mask converted to one grey channel (PIL ``"L"``). Where
  the matte is 0 the layer is 0, i.e. grey 127.5.
* The RGBA variant adds an alpha layer: the mask image as three channels (its RGB conversion),
  mapped to [-1, 1] like any other layer.
* Model output goes back to bytes by ``uint8(255 * (clamp(x, -1, 1) + 1) / 2)`` with truncation,
  exactly as the original's sample saving does.

Legend: t frames, c channels, h height, w width.
"""

from __future__ import annotations

import numpy as np
import torch

MATTE_EPSILON = 1.0 / 255.0  # below this matte the foreground colour cannot be recovered


class LayerSourceError(ValueError):
    """A layer source (video file or frame folder) cannot be used; the message names the file."""


class EncoderUnavailableError(RuntimeError):
    """The bundled ffmpeg lacks an encoder that a writer needs."""


class EncodeError(RuntimeError):
    """ffmpeg failed while writing an output."""


def uint8_to_model(frames: np.ndarray) -> torch.Tensor:
    """Bytes (t, h, w, c) -> model pixels (t, c, h, w) float32 in [-1, 1], as ``u8 / 127.5 - 1``."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(torch.float32) / 127.5 - 1  # (t, h, w, c)
    return x.permute(0, 3, 1, 2).contiguous()  # (t, c, h, w)


def uint8_to_unit(frames: np.ndarray) -> torch.Tensor:
    """Matte bytes (t, h, w, c) -> (t, c, h, w) float32 in [0, 1], as ``u8 / 255``."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(torch.float32) / 255.0  # (t, h, w, c)
    return x.permute(0, 3, 1, 2).contiguous()  # (t, c, h, w)


def matte_foreground(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Foreground layer from colour (t, 3, h, w) in [-1, 1] and matte (t, 1, h, w) in [0, 1].

    Written in the same operation order as the original, ``(rgb + 1) * a - a``, which equals
    ``rgb * a``: the foreground composited over mid-grey.
    """
    return (rgb + 1) * alpha - alpha


def unmatte_foreground(fg: torch.Tensor, alpha: torch.Tensor, epsilon: float = MATTE_EPSILON) -> torch.Tensor:
    """Straight colour (t, 3, h, w) in [-1, 1] from a grey-matted foreground layer and its matte in [0, 1].

    Inverts :func:`matte_foreground` by ``fg / a`` where ``a > epsilon``; elsewhere the colour is
    unknown and set to 0 (grey). The result is clamped to [-1, 1].
    """
    safe = alpha.clamp(min=epsilon)  # (t, 1, h, w)
    rgb = torch.where(alpha > epsilon, fg / safe, torch.zeros_like(fg))  # (t, 3, h, w)
    return rgb.clamp(-1.0, 1.0)


def alpha_to_layer(alpha: torch.Tensor) -> torch.Tensor:
    """Matte (t, 1, h, w) in [0, 1] -> three-channel alpha layer (t, 3, h, w) in [-1, 1]."""
    return (2 * alpha - 1).expand(-1, 3, -1, -1).contiguous()


def layer_to_alpha(layer: torch.Tensor) -> torch.Tensor:
    """Alpha layer (t, c, h, w) in [-1, 1] -> matte (t, 1, h, w) in [0, 1].

    The training data repeats the matte in all three channels, so the channel mean is the
    inverse that is least sensitive to the model's per-channel noise.
    """
    return ((layer.mean(dim=1, keepdim=True) + 1) / 2).clamp(0.0, 1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model pixels (t, c, h, w) in [-1, 1] -> bytes (t, h, w, c), ``uint8(255 * (clamp(x) + 1) / 2)`` truncated."""
    unit = (x.detach().to(torch.float32).cpu().clamp(-1.0, 1.0) + 1.0) / 2.0  # (t, c, h, w) in [0, 1]
    return (255.0 * unit).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()  # (t, h, w, c)


def unit_to_uint8(x: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] (any shape) -> bytes by ``uint8(255 * x)`` truncated, the original's rule."""
    return (255.0 * np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)).astype(np.uint8)


def rgba_from_layers(fg: torch.Tensor, alpha_layer: torch.Tensor) -> np.ndarray:
    """Straight RGBA bytes (t, h, w, 4) from the model's foreground (t, 3, h, w) and alpha layer (t, c, h, w)."""
    if fg.shape[0] != alpha_layer.shape[0] or fg.shape[-2:] != alpha_layer.shape[-2:]:
        raise ValueError(
            f"foreground {tuple(fg.shape)} and alpha layer {tuple(alpha_layer.shape)} differ in frames or size"
        )
    alpha = layer_to_alpha(alpha_layer.to(torch.float32))  # (t, 1, h, w)
    rgb = unmatte_foreground(fg.to(torch.float32), alpha)  # (t, 3, h, w)
    return to_uint8(torch.cat([rgb, 2 * alpha - 1], dim=1))  # (t, h, w, 4)


def premultiply(rgba: np.ndarray) -> np.ndarray:
    """Straight RGBA bytes (..., 4) -> premultiplied: colour ``c * a / 255`` rounded to nearest, alpha kept."""
    rgba = np.asarray(rgba)
    alpha = rgba[..., 3:].astype(np.float32)  # (..., 1)
    colour = np.rint(rgba[..., :3].astype(np.float32) * alpha / 255.0)  # (..., 3)
    return np.concatenate([colour.astype(np.uint8), rgba[..., 3:]], axis=-1)


def unpremultiply(rgba: np.ndarray) -> np.ndarray:
    """Premultiplied RGBA bytes (..., 4) -> straight: colour ``c * 255 / a`` rounded and clipped; 0 where a = 0."""
    rgba = np.asarray(rgba)
    alpha = rgba[..., 3:].astype(np.float32)  # (..., 1)
    colour = rgba[..., :3].astype(np.float32) * 255.0 / np.maximum(alpha, 1.0)  # (..., 3)
    colour = np.where(alpha > 0, np.clip(np.rint(colour), 0, 255), 0.0)
    return np.concatenate([colour.astype(np.uint8), rgba[..., 3:]], axis=-1)
