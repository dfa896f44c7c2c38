"""Layers of the CogVideoX 3D causal VAE (Yang et al., "CogVideoX", arXiv 2408.06072, Sec. 2.1).

Every module here keeps the attribute names of the original SAT ``vae_modules/cp_enc_dec.py``
(context-parallel size 1), so a ``3d-vae.pt`` state_dict loads into it unchanged.

Causality lives in time only: a temporal kernel of size k sees the current frame and the k-1 frames
before it; in front of frame 0 the input is padded with k-1 copies of frame 0. Spatial padding is zeros.

Temporal resampling keeps frame 0 on its own when the frame count is odd (1 + 2n frames become
1 + n and back), and treats every frame pair alike when the count is even; one frame stays one frame.

With context parallelism of size 1 the original's "gather" GroupNorm is a plain GroupNorm over
(c/g, t, h, w), so statistics span all frames of the clip.

Legend: b batch, c channels, t frames, h height, w width, z latent channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

NORM_EPS = 1e-6
# The original runs a temporal Conv3d in pieces once its padded input exceeds 2**30 elements
# (2 GiB counted at 2 bytes an element); that keeps cuDNN below its 32-bit indexing limit.
CONV3D_PIECE_ELEMENTS = 2**30


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), written as the original writes it (F.silu may differ in the last bit)."""
    return x * torch.sigmoid(x)


def pad_time_causal(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Prepend ``frames`` copies of frame 0: (b, c, t, h, w) -> (b, c, frames + t, h, w)."""
    if frames == 0:
        return x
    return torch.cat([x[:, :, :1]] * frames + [x], dim=2)


def conv3d_in_time_pieces(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """An unpadded ``conv`` over (b, c, t, h, w); inputs above CONV3D_PIECE_ELEMENTS go in time pieces.

    Pieces overlap by kt - 1 input frames, so the result is the one-shot convolution.
    """
    if x.numel() <= CONV3D_PIECE_ELEMENTS:
        return conv(x)
    kt = conv.kernel_size[0]
    t_out = x.shape[2] - kt + 1
    pieces = x.numel() // CONV3D_PIECE_ELEMENTS + 1
    step = -(-t_out // pieces)
    outs = [conv(x[:, :, s : min(s + step, t_out) + kt - 1]) for s in range(0, t_out, step)]
    return torch.cat(outs, dim=2)


class CausalConv3d(nn.Module):
    """Conv3d with a cubic kernel k, causal in time, 'same' size in (t, h, w) (key prefix ``conv``)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"causal conv kernel must be odd, got {kernel_size}")
        self.time_pad = kernel_size - 1
        self.space_pad = kernel_size // 2
        self.conv = nn.Conv3d(c_in, c_out, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.space_pad
        x = pad_time_causal(x, self.time_pad)  # b c (t+k-1) h w
        x = F.pad(x, (p, p, p, p))  # b c (t+k-1) (h+2p) (w+2p)
        return conv3d_in_time_pieces(self.conv, x)  # b c t h w


def resize_latent_to(zq: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Nearest-resize the latent zq (b, z, t', h', w') to (t, h, w) = ``size`` for spatial normalization.

    An odd t > 1 maps latent frame 0 to frame 0 alone and resizes the remaining frames together.
    """
    t = size[0]
    if t > 1 and t % 2 == 1:
        first = F.interpolate(zq[:, :, :1], size=(1, *size[1:]), mode="nearest")
        rest = F.interpolate(zq[:, :, 1:], size=(t - 1, *size[1:]), mode="nearest")
        return torch.cat([first, rest], dim=2)
    return F.interpolate(zq, size=size, mode="nearest")


class SpatialNorm3D(nn.Module):
    """GroupNorm whose scale and shift come from the latent (MoVQ spatial normalization, Zheng et al. 2022).

    y = GroupNorm(f) * conv_y(zq) + conv_b(zq), with zq nearest-resized to f's (t, h, w).
    """

    def __init__(self, channels: int, z_channels: int, groups: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.conv_y = CausalConv3d(z_channels, channels, 1)
        self.conv_b = CausalConv3d(z_channels, channels, 1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = resize_latent_to(zq, tuple(f.shape[-3:]))  # b z t h w
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


class ResnetBlock3D(nn.Module):
    """Pre-norm residual block: (norm, swish, causal conv 3) twice, plus a 1x1x1 shortcut on a width change.

    ``z_channels`` set: the norms are SpatialNorm3D (decoder); otherwise plain GroupNorm (encoder).
    """

    def __init__(self, c_in: int, c_out: int, groups: int, z_channels: int | None = None):
        super().__init__()

        def norm(channels: int) -> nn.Module:
            if z_channels is None:
                return nn.GroupNorm(groups, channels, eps=NORM_EPS)
            return SpatialNorm3D(channels, z_channels, groups)

        self.norm1 = norm(c_in)
        self.conv1 = CausalConv3d(c_in, c_out, 3)
        self.norm2 = norm(c_out)
        self.conv2 = CausalConv3d(c_out, c_out, 3)
        self.nin_shortcut = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else None

    def _norm(self, norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None) -> torch.Tensor:
        return norm(x) if zq is None else norm(x, zq)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(swish(self._norm(self.norm1, x, zq)))
        h = self.conv2(swish(self._norm(self.norm2, h, zq)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


def avg_pool_time(x: torch.Tensor) -> torch.Tensor:
    """Average frame pairs, frame 0 alone when t is odd: (b, c, t, h, w) -> (b, c, ceil(t/2), h, w)."""
    t, h, w = x.shape[2:]
    if t == 1:
        return x
    x = rearrange(x, "b c t h w -> (b h w) c t")
    if t % 2 == 1:
        x = torch.cat([x[..., :1], F.avg_pool1d(x[..., 1:], kernel_size=2, stride=2)], dim=-1)
    else:
        x = F.avg_pool1d(x, kernel_size=2, stride=2)
    return rearrange(x, "(b h w) c t -> b c t h w", h=h, w=w)


class Downsample3D(nn.Module):
    """Halve h and w with a stride-2 3x3 conv per frame (zero pad right/bottom); optionally halve t first."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compress_time:
            x = avg_pool_time(x)  # b c t' h w
        t = x.shape[2]
        x = F.pad(x, (0, 1, 0, 1))  # b c t (h+1) (w+1)
        x = self.conv(rearrange(x, "b c t h w -> (b t) c h w"))  # (b t) c h/2 w/2
        return rearrange(x, "(b t) c h w -> b c t h w", t=t)


def upsample_nearest(x: torch.Tensor, compress_time: bool) -> torch.Tensor:
    """Nearest x2 in h and w, and in t when ``compress_time`` (frame 0 alone when t is odd, t=1 kept)."""
    if compress_time and x.shape[2] > 1:
        if x.shape[2] % 2 == 1:
            first = F.interpolate(x[:, :, 0], scale_factor=2.0, mode="nearest")  # b c 2h 2w
            rest = F.interpolate(x[:, :, 1:], scale_factor=2.0, mode="nearest")  # b c 2(t-1) 2h 2w
            return torch.cat([first[:, :, None], rest], dim=2)  # b c 2t-1 2h 2w
        return F.interpolate(x, scale_factor=2.0, mode="nearest")  # b c 2t 2h 2w
    t = x.shape[2]
    x = F.interpolate(rearrange(x, "b c t h w -> (b t) c h w"), scale_factor=2.0, mode="nearest")
    return rearrange(x, "(b t) c h w -> b c t h w", t=t)


class Upsample3D(nn.Module):
    """Nearest upsampling (see ``upsample_nearest``) followed by a 3x3 conv per frame."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = upsample_nearest(x, self.compress_time)  # b c t' 2h 2w
        t = x.shape[2]
        x = self.conv(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(x, "(b t) c h w -> b c t h w", t=t)


class _Level(nn.Module):
    """One resolution level: ``block`` (residual blocks), then an optional resampler."""

    def __init__(self, blocks: list[ResnetBlock3D], resample_name: str, resample: nn.Module | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            self.add_module(resample_name, resample)


class _Middle(nn.Module):
    def __init__(self, block_1: ResnetBlock3D, block_2: ResnetBlock3D):
        super().__init__()
        self.block_1 = block_1
        self.block_2 = block_2


class Encoder3D(nn.Module):
    """Video (b, c_in, t, h, w) -> moments (b, 2z, t', h/2^(L-1), w/2^(L-1)), L = len(ch_mult).

    Level i (of L) has ``num_res_blocks`` blocks at width ch*ch_mult[i]; every level but the last ends in
    a Downsample3D that also halves time for the first log2(temporal_compress_times) levels.
    """

    def __init__(
        self,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        in_channels: int,
        z_channels: int,
        groups: int,
        time_levels: int,
    ):
        super().__init__()
        self.conv_in = CausalConv3d(in_channels, ch, 3)
        widths = [ch * m for m in ch_mult]
        c = ch
        self.down = nn.ModuleList()
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock3D(c, width, groups))
                c = width
            resample = Downsample3D(c, compress_time=i < time_levels) if i < len(widths) - 1 else None
            self.down.append(_Level(blocks, "downsample", resample))
        self.mid = _Middle(ResnetBlock3D(c, c, groups), ResnetBlock3D(c, c, groups))
        self.norm_out = nn.GroupNorm(groups, c, eps=NORM_EPS)
        self.conv_out = CausalConv3d(c, 2 * z_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # b ch t h w
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(swish(self.norm_out(h)))  # b 2z t' h' w'


class Decoder3D(nn.Module):
    """Latent (b, z, t', h', w') -> video (b, c_out, t, h, w), every norm a SpatialNorm3D on the latent.

    ``up[i]`` (run from i = L-1 down to 0) has num_res_blocks + 1 blocks at width ch*ch_mult[i]; every
    level but 0 ends in an Upsample3D that also doubles time for the top log2(temporal_compress_times).
    """

    def __init__(
        self,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        out_channels: int,
        z_channels: int,
        groups: int,
        time_levels: int,
    ):
        super().__init__()
        n_levels = len(ch_mult)
        c = ch * ch_mult[-1]
        self.conv_in = CausalConv3d(z_channels, c, 3)
        self.mid = _Middle(ResnetBlock3D(c, c, groups, z_channels), ResnetBlock3D(c, c, groups, z_channels))
        levels = []
        for i in reversed(range(n_levels)):
            width = ch * ch_mult[i]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock3D(c, width, groups, z_channels))
                c = width
            resample = Upsample3D(c, compress_time=i >= n_levels - time_levels) if i > 0 else None
            levels.insert(0, _Level(blocks, "upsample", resample))
        self.up = nn.ModuleList(levels)
        self.norm_out = SpatialNorm3D(c, z_channels, groups)
        self.conv_out = CausalConv3d(c, out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # b c t' h' w'
        h = self.mid.block_2(self.mid.block_1(h, z), z)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h, z)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h, z)))  # b c_out t h w
