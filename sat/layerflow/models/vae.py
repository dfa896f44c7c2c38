"""The CogVideoX 3D causal VAE (arXiv 2408.06072) as LayerFlow runs it: encode and decode.

This is the original SAT ``VideoAutoencoderInferenceWrapper`` with ``ContextParallelEncoder3D`` /
``ContextParallelDecoder3D`` at context-parallel size 1 and the DiagonalGaussian regularizer, written
again in plain torch (layers in ``vae_blocks``). We keep our own implementation rather than diffusers'
``AutoencoderKLCogVideoX``: its parameter names equal the original's, so ``CogVideoX-2b-sat/vae/3d-vae.pt``
loads strictly with no key conversion (:func:`layerflow.weights.vae.load_vae`), and it needs no extra
dependency (diffusers is not installed).

Posterior sampling. The original ``encode()`` returns mean + exp(0.5 * logvar) * eps with
eps = randn_like(mean) from the global generator. ``encode(video)`` does exactly that (same draw, same
order); pass ``generator=`` to draw eps from a generator of your own instead.

Scale factor. The engine works in scaled latents: ``encode_to_latent`` returns scale_factor * sample and
``decode_from_latent`` decodes latent * (1 / scale_factor), as the original engine computes them.

Decoding. The original LayerFlow inference (test_video.py -> log_video -> decode_first_stage) decodes
all latent frames in one call, and ``decode(latent)`` reproduces that call. (CogVideoX's sample_video.py
instead decodes latent frames [0,3), [3,5), ... with a cache of the previous frames for the causal
convolutions; since every GroupNorm then sees one chunk only, and an even frame count loses its last
latent frame, that scheme does not equal the one-call decode, and we do not reproduce it.)

Memory-bounded decoding and encoding. ``decode(latent, temporal_chunk=..., spatial_tile=...)`` runs the
decoder layer by layer, each layer over (t, h, w) regions of its output: a causal conv reads its region
plus a halo (the previous k-1 frames, one pixel around), and every GroupNorm uses statistics gathered
over the whole activation in a first pass (each region's mean and variance, combined in float64). Only
the activations between layers are held whole (on ``buffer_device``, e.g. the CPU, except for those that
fit in ``device_budget`` bytes on the compute device); the per-layer temporaries shrink to one region. A
residual block that keeps its width adds its result into its input in place, and an upsampler's output
is never held whole: every read computes its box from the upsampler's 2-4x smaller input.
``encode(video, temporal_chunk=..., spatial_tile=...)`` runs the encoder the same way (the downsamplers
read the frame pairs they average and the 3x3 stride-2 window of the region); region sizes are given in
latent units in both directions. Nothing is blended: the result is the one-call decode (encode) up to
rounding. In float64 the two agree to 1e-13; in float32 they differ by float32 rounding of the GroupNorm
statistics, no more than the one-call decode's own distance from a float64 run (on the tiny fixture
model <= 1e-5 for 17 frames, <= 2e-5 for 65 frames, |x| <= 9; the tests assert atol = rtol = 1e-5 on
the 17-frame clip and 1e-10 in float64).

Legend: b batch, c pixel channels, z latent channels, t/h/w frames/height/width (pixels),
t'/h'/w' the same in latents.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

from layerflow.geometry import VAE_SCALE_FACTOR
from layerflow.models.vae_blocks import (
    NORM_EPS,
    CausalConv3d,
    Decoder3D,
    Encoder3D,
    SpatialNorm3D,
    conv3d_in_time_pieces,
    resize_latent_to,
    swish,
    upsample_nearest,
)

if TYPE_CHECKING:
    from layerflow.runtime.parallel.vae_decode import RegionShare

LOGVAR_RANGE = (-30.0, 20.0)  # the posterior's log-variance is clamped to this range


@dataclass(frozen=True)
class VAEConfig:
    """Sizes of the causal VAE; encoder and decoder share them (as every CogVideoX config does)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 3
    z_channels: int = 16
    in_channels: int = 3
    out_channels: int = 3
    temporal_compress_times: int = 4
    norm_groups: int = 32
    # The original's context-parallel GroupNorm flags; at context-parallel size 1 both are plain GroupNorm.
    encoder_gather_norm: bool = True
    decoder_gather_norm: bool = False
    scale_factor: float = VAE_SCALE_FACTOR

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        for width in (self.ch * m for m in self.ch_mult):
            if width % self.norm_groups:
                raise ValueError(f"VAE width {width} is not divisible by {self.norm_groups} norm groups")
        k = self.temporal_compress_times
        if k < 1 or k & (k - 1) or self.time_levels > len(self.ch_mult) - 1:
            raise ValueError(
                f"temporal_compress_times must be 2^k with k <= {len(self.ch_mult) - 1} "
                f"(one per downsampling level), got {self.temporal_compress_times}"
            )

    @property
    def time_levels(self) -> int:
        """Number of levels that halve (encoder) or double (decoder) the frame count."""
        return self.temporal_compress_times.bit_length() - 1

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def cogvideox_2b(cls) -> VAEConfig:
        """The released CogVideoX-2B VAE (``vae/3d-vae.pt``)."""
        return cls()


@dataclass
class DiagonalGaussian:
    """The posterior N(mean, exp(logvar)) per latent element; logvar already clamped to LOGVAR_RANGE."""

    mean: torch.Tensor  # b z t' h' w'
    logvar: torch.Tensor  # b z t' h' w'

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = moments.chunk(2, dim=1)  # mean first, as the original splits them
        return cls(mean, logvar.clamp(*LOGVAR_RANGE))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps; eps from ``generator``, or from the global generator like randn_like(mean)."""
        device = self.mean.device if generator is None else generator.device
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=device)
        return self.mean + self.std * eps.to(self.mean.device)


class CausalVideoVAE(nn.Module):
    """CogVideoX 3D causal VAE: (b, c, t, h, w) in [-1, 1] <-> (b, z, t', h', w'), t' = t/4 or 1 + (t-1)/4.

    Inputs are moved to the device and dtype of the parameters (fp32 on CPU, bf16 on CUDA, ...).
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        sizes = dict(
            ch=config.ch,
            ch_mult=config.ch_mult,
            num_res_blocks=config.num_res_blocks,
            z_channels=config.z_channels,
            groups=config.norm_groups,
            time_levels=config.time_levels,
        )
        self.encoder = Encoder3D(in_channels=config.in_channels, **sizes)
        self.decoder = Decoder3D(out_channels=config.out_channels, **sizes)

    def _like_parameters(self, x: torch.Tensor) -> torch.Tensor:
        p = next(self.parameters())
        return x.to(device=p.device, dtype=p.dtype)

    def posterior(self, video: torch.Tensor, **streaming) -> DiagonalGaussian:
        """The encoder's posterior for ``video`` (b, c, t, h, w); ``streaming`` as in :meth:`decode`."""
        cfg = self.config
        if video.dim() != 5 or video.shape[1] != cfg.in_channels:
            raise ValueError(f"video must be (b, {cfg.in_channels}, t, h, w), got {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        k, s = cfg.temporal_compress_times, cfg.spatial_compression
        if (t - t % 2) % k or h % s or w % s:
            raise ValueError(f"video of {t} frames at {h}x{w}: needs {k}n or 1+{k}n frames and sides divisible by {s}")
        x = self._like_parameters(video)
        latent_thw = ((t - t % 2) // k + t % 2, h // s, w // s)
        streamed = self._streamed(latent_thw, x.device, **streaming)
        moments = self.encoder(x) if streamed is None else streamed.encode(self.encoder, x)
        return DiagonalGaussian.from_moments(moments)

    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None, **streaming) -> torch.Tensor:
        """A posterior sample (what the original ``encode()`` returns): (b, c, t, h, w) -> (b, z, t', h', w').

        ``streaming`` (temporal_chunk, spatial_tile, buffer_device, device_budget) runs the encoder region
        by region like :meth:`decode`; the result equals the one-call encode up to float reassociation.
        """
        return self.posterior(video, **streaming).sample(generator)

    def decode(
        self,
        latent: torch.Tensor,
        temporal_chunk: int | None = None,
        spatial_tile: tuple[int, int] | None = None,
        buffer_device: torch.device | str | None = None,
        device_budget: int | None = None,
        share: RegionShare | None = None,
    ) -> torch.Tensor:
        """(b, z, t', h', w') -> (b, c, t, h, w). Chunk sizes are in latent frames / latent pixels.

        With no chunking this is the original one-call decode. Otherwise the decoder runs region by region
        (see the module docstring) and the result equals the one-call decode up to float reassociation.
        Whole activations live on the module's device, or with ``buffer_device`` (e.g. the CPU) there,
        except that up to ``device_budget`` bytes of them stay on the module's device (each activation
        goes wherever it fits when it is made). The result is on the device of the last activation. With
        ``share`` this worker computes its part of each layer's regions and ``share.complete`` joins the
        parts; the result is the same.
        """
        if latent.dim() != 5 or latent.shape[1] != self.config.z_channels:
            raise ValueError(f"latent must be (b, {self.config.z_channels}, t', h', w'), got {tuple(latent.shape)}")
        z = self._like_parameters(latent)
        streamed = self._streamed(
            tuple(z.shape[2:]), z.device, temporal_chunk, spatial_tile, buffer_device, device_budget, share
        )
        return self.decoder(z) if streamed is None else streamed.decode(self.decoder, z)

    @staticmethod
    def _streamed(
        latent_thw: tuple[int, ...],
        device: torch.device,
        temporal_chunk: int | None = None,
        spatial_tile: tuple[int, int] | None = None,
        buffer_device: torch.device | str | None = None,
        device_budget: int | None = None,
        share: RegionShare | None = None,
    ) -> _StreamedNet | None:
        """The region-by-region runner for a latent grid of ``latent_thw``, or None for the one-call path."""
        if temporal_chunk is None and spatial_tile is None:
            return None
        t, h, w = latent_thw
        th, tw = spatial_tile if spatial_tile is not None else (h, w)
        steps = (temporal_chunk if temporal_chunk is not None else t, th, tw)
        if min(steps) < 1:
            raise ValueError(f"temporal_chunk and spatial_tile must be positive, got {steps}")
        if device_budget is not None and device_budget < 0:
            raise ValueError(f"device_budget must be a byte count >= 0, got {device_budget}")
        store = torch.device(buffer_device) if buffer_device is not None else device
        placement = _ActivationPlacement(device, store, device_budget)
        return _StreamedNet(_Regions((t, h, w), steps), device, placement, share)

    def encode_to_latent(
        self, video: torch.Tensor, generator: torch.Generator | None = None, **streaming
    ) -> torch.Tensor:
        """The engine's latent: scale_factor * posterior sample; ``streaming`` goes to ``encode``."""
        return self.config.scale_factor * self.encode(video, generator, **streaming)

    def decode_from_latent(self, latent: torch.Tensor, **chunking) -> torch.Tensor:
        """Decode an engine latent: decode(latent * (1 / scale_factor)); ``chunking`` goes to ``decode``."""
        return self.decode(1.0 / self.config.scale_factor * latent, **chunking)


# ---------------------------------------------------------------------------------------------------
# Region-by-region decoding and encoding


@dataclass(frozen=True)
class _Regions:
    """Region sizes given in latent units, scaled to each activation's (t, h, w)."""

    latent_thw: tuple[int, int, int]
    latent_steps: tuple[int, int, int]

    def __call__(self, thw: tuple[int, ...]) -> Iterator[tuple[slice, slice, slice]]:
        spans = []
        for n, step, n_latent in zip(thw, self.latent_steps, self.latent_thw, strict=True):
            size = -(-n * step // n_latent)
            spans.append([slice(s, min(s + size, n)) for s in range(0, n, size)])
        return itertools.product(*spans)


def _index_map(resize: Callable[[torch.Tensor], torch.Tensor], n: int, dim: int) -> list[int]:
    """For a nearest-neighbour ``resize``, the source position of every output position along ``dim``.

    Positions depend on sizes only, so they are computed on real tensors even when the model runs under
    FakeTensorMode (``benchmarks/memory_estimate.py``); every other index here is plain Python integers.
    """
    shape = [1, 1, 1, 1, 1]
    shape[dim] = n
    with unset_fake_temporarily():
        out = resize(torch.arange(n, dtype=torch.float64).view(shape))
        return out[tuple(slice(None) if d == dim else 0 for d in range(5))].long().tolist()


def _lookup(index_map: list[int], positions: range) -> list[int]:
    """index_map[positions]; positions outside the map become source positions just outside the source
    on the same side (-1 or past the last), which ``_zero_outside`` zeroes (the conv's zero padding)."""
    return [index_map[p] if 0 <= p < len(index_map) else (-1 if p < 0 else index_map[-1] + 1) for p in positions]


def _window(x: torch.Tensor | _Upsampled, index: tuple[list[int], ...], device: torch.device) -> torch.Tensor:
    """x[:, :, ti][:, :, :, hi][..., wi] on ``device``; out-of-range positions read the nearest edge.

    Read-only when every position is in range and none repeats (then it may be a view of x); a
    fresh tensor otherwise, which ``_zero_outside`` may fill in place.
    """
    box, local, plain = [], [], True
    for dim, positions in zip((2, 3, 4), index, strict=True):
        clamped = [min(max(p, 0), x.shape[dim] - 1) for p in positions]
        lo, hi = min(clamped), max(clamped)
        box.append(slice(lo, hi + 1))
        local.append([c - lo for c in clamped])
        plain = plain and clamped == positions and local[-1] == list(range(hi - lo + 1))
    win = _read(x, *box, device=device)
    if plain:
        return win
    for dim, positions in zip((2, 3, 4), local, strict=True):
        win = win.index_select(dim, torch.tensor(positions, device=device))
    return win


def _read(x: torch.Tensor | _Upsampled, rt: slice, rh: slice, rw: slice, device: torch.device) -> torch.Tensor:
    """The box x[:, :, rt, rh, rw] on ``device`` (a view when x is there already)."""
    if isinstance(x, _Upsampled):
        return x.box(rt, rh, rw)
    return x[:, :, rt, rh, rw].to(device)


class _Upsampled:
    """The output of an Upsample3D that is never stored whole: every read computes its box from the
    input (nearest source positions, then the 3x3 conv with its 1-pixel halo). Its input is 2x or 4x
    smaller, so the largest activation of the decoder (256 channels at full size) never exists."""

    def __init__(self, layer: nn.Module, x: torch.Tensor, device: torch.device):
        b, c, t, h, w = x.shape
        resize = partial(upsample_nearest, compress_time=layer.compress_time)
        self.maps = [_index_map(resize, n, d) for n, d in ((t, 2), (h, 3), (w, 4))]
        self.shape = (b, c, *(len(m) for m in self.maps))
        self.dtype = x.dtype
        self.layer, self.x, self.device = layer, x, device

    def box(self, rt: slice, rh: slice, rw: slice) -> torch.Tensor:
        index = (
            self.maps[0][rt],
            _lookup(self.maps[1], range(rh.start - 1, rh.stop + 1)),
            _lookup(self.maps[2], range(rw.start - 1, rw.stop + 1)),
        )
        win = _zero_outside(_window(self.x, index, self.device), index, tuple(self.x.shape[2:]))
        return _per_frame(win, self.layer.conv)  # b c t_r h_r w_r


def _zero_outside(win: torch.Tensor, index: tuple[list[int], ...], thw: tuple[int, ...]) -> torch.Tensor:
    """Zero the positions of a fresh ``_window`` result whose index lies outside 0..n-1 (zero padding)."""
    for dim, positions, n in zip((2, 3, 4), index, thw, strict=True):
        outside = [i for i, p in enumerate(positions) if not 0 <= p < n]
        if outside:
            win.index_fill_(dim, torch.tensor(outside, device=win.device), 0)
    return win


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """GroupNorm arithmetic runs in float32 at least (as torch's GroupNorm does for half types)."""
    return torch.promote_types(dtype, torch.float32)


def _group_norm_with(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm of a region with whole-activation statistics mean, rstd (b, g); one working copy of x."""
    b, c = x.shape[:2]
    dtype = _norm_dtype(x.dtype)
    y = x.to(dtype, copy=True).reshape(b, norm.num_groups, -1)  # b g (c/g t h w)
    y.sub_(mean[..., None]).mul_(rstd[..., None])
    y = y.reshape(x.shape).mul_(norm.weight.to(dtype).view(1, c, 1, 1, 1)).add_(norm.bias.to(dtype).view(1, c, 1, 1, 1))
    return y.to(x.dtype)


class _ActivationPlacement:
    """Where each whole activation lives: on the compute device while the activations held there stay
    within ``budget`` bytes, otherwise on ``store`` (e.g. the CPU). ``budget`` None: always on ``store``.
    Activations are counted from their creation until they are garbage (weakref finalizers)."""

    def __init__(self, device: torch.device, store: torch.device, budget: int | None):
        self.device, self.store, self.budget = device, store, budget
        self.resident = 0

    def _release(self, nbytes: int) -> None:
        self.resident -= nbytes

    def new(self, shape: tuple[int, ...], dtype: torch.dtype, zeros: bool) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        on_device = self.budget is not None and self.resident + nbytes <= self.budget
        make = torch.zeros if zeros else torch.empty
        out = make(shape, dtype=dtype, device=self.device if on_device else self.store)
        if on_device and self.device != self.store:
            self.resident += nbytes
            weakref.finalize(out, self._release, nbytes)
        return out


class _StreamedNet:
    """Encoder3D / Decoder3D forward, one layer at a time, each layer region by region (module docstring).

    Whole activations are placed by ``placement``; a residual block whose width does not change adds its
    result into its own input (the input is not read again), so it holds two activations, not three.
    """

    def __init__(
        self, regions: _Regions, device: torch.device, placement: _ActivationPlacement, share: RegionShare | None = None
    ):
        self.regions, self.device, self.placement, self.share = regions, device, placement, share
        self.z: torch.Tensor | None = None  # the decoder's latent (spatial normalization reads it)

    def _new_output(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        return self.placement.new(shape, dtype, zeros=self.share is not None)

    def _owned(self, regions: Iterator) -> Iterator:
        return regions if self.share is None else itertools.islice(regions, self.share.index, None, self.share.count)

    def _joined(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.share is None else self.share.complete(out)

    def decode(self, decoder: Decoder3D, z: torch.Tensor) -> torch.Tensor:
        """Decoder3D.forward(z) (b, z, t', h', w') -> (b, c, t, h, w)."""
        self.z = z
        h = self.conv(decoder.conv_in, z)
        h = self.resnet_block(decoder.mid.block_2, self.resnet_block(decoder.mid.block_1, h))
        for level in reversed(decoder.up):
            for block in level.block:
                h = self.resnet_block(block, h)
            if hasattr(level, "upsample"):
                h = self.upsample(level.upsample, h)
        return self.conv(decoder.conv_out, h, decoder.norm_out)

    def encode(self, encoder: Encoder3D, video: torch.Tensor) -> torch.Tensor:
        """Encoder3D.forward(video) (b, c, t, h, w) -> moments (b, 2z, t', h', w')."""
        h = self.conv(encoder.conv_in, video)
        for level in encoder.down:
            for block in level.block:
                h = self.resnet_block(block, h)
            if hasattr(level, "downsample"):
                h = self.downsample(level.downsample, h)
        h = self.resnet_block(encoder.mid.block_2, self.resnet_block(encoder.mid.block_1, h))
        return self.conv(encoder.conv_out, h, encoder.norm_out)

    def resnet_block(self, block: nn.Module, x: torch.Tensor | _Upsampled) -> torch.Tensor:
        """x + conv2(norm2(conv1(norm1(x)))), with a 1x1x1 shortcut on a width change. The output is placed
        before the intermediate: under a budget the activation that lives on gets the device first."""
        if isinstance(x, torch.Tensor) and block.nin_shortcut is None and self.share is None:
            out = x  # each region reads its shortcut before its result replaces it
        else:
            out = self._new_output(x.shape[0], block.conv2.conv.out_channels, *x.shape[2:], dtype=x.dtype)
        h = self.conv(block.conv1, x, block.norm1)
        return self.conv(block.conv2, h, block.norm2, shortcut=(x, block.nin_shortcut), into=out)

    def conv(
        self,
        layer: CausalConv3d,
        x: torch.Tensor | _Upsampled,
        norm: nn.Module | None = None,
        shortcut: tuple[torch.Tensor, nn.Module | None] | None = None,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """layer(swish(norm(x))) (or layer(x) without a norm), plus the block's shortcut when given;
        written into ``into`` when given (it may be the shortcut's input)."""
        b, _, t, h, w = x.shape
        kt, p = layer.time_pad, layer.space_pad
        prologue = self.norm_swish(norm, x) if norm is not None else None
        out = into if into is not None else self._new_output(b, layer.conv.out_channels, t, h, w, dtype=x.dtype)
        for rt, rh, rw in self._owned(self.regions((t, h, w))):
            index = (
                [max(i, 0) for i in range(rt.start - kt, rt.stop)],  # causal: frame 0 repeats in front
                list(range(rh.start - p, rh.stop + p)),
                list(range(rw.start - p, rw.stop + p)),
            )
            win = _window(x, index, self.device)  # b c (t_r+kt) (h_r+2p) (w_r+2p)
            if prologue is not None:
                win = prologue(win, index)
            y = conv3d_in_time_pieces(layer.conv, _zero_outside(win, index, (t, h, w)))  # b c_out t_r h_r w_r
            del win
            if shortcut is not None:
                x_in, nin = shortcut
                r = _read(x_in, rt, rh, rw, self.device)
                y = (r if nin is None else nin(r)) + y
            out[:, :, rt, rh, rw] = y.to(out.device)
        return self._joined(out)

    def norm_swish(self, norm: nn.Module, x: torch.Tensor | _Upsampled) -> Callable:
        """The function (win, index) -> swish(norm(win)) for windows of x, with x's whole GroupNorm statistics;
        a SpatialNorm3D also reads the latent at the window's positions."""
        group_norm = norm.norm_layer if isinstance(norm, SpatialNorm3D) else norm
        mean, rstd = self.group_statistics(x, group_norm.num_groups)
        if not isinstance(norm, SpatialNorm3D):
            return lambda win, index: swish(_group_norm_with(win, mean, rstd, group_norm))
        thw = tuple(x.shape[2:])
        z_maps = []
        for d in range(3):
            size = [1, 1, 1]
            size[d] = thw[d]
            z_maps.append(_index_map(partial(resize_latent_to, size=tuple(size)), self.z.shape[2 + d], 2 + d))

        def apply(win: torch.Tensor, index: tuple[torch.Tensor, ...]) -> torch.Tensor:
            z_index = tuple(
                [m[min(max(i, 0), n - 1)] for i in positions]
                for m, positions, n in zip(z_maps, index, thw, strict=True)
            )
            zq = _window(self.z, z_index, self.device)  # b z (window's t h w)
            y = norm.conv_y(zq).mul_(_group_norm_with(win, mean, rstd, group_norm)).add_(norm.conv_b(zq))
            return torch.sigmoid(y).mul_(y)  # swish(norm(win) * conv_y(zq) + conv_b(zq)), in place

        return apply

    def group_statistics(self, x: torch.Tensor | _Upsampled, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (sample, group) mean and 1/sqrt(var + eps) over all of x: each region's mean and variance
        (in the norm's precision, no bigger working copy than the region) combined in float64."""
        b = x.shape[0]
        total = torch.zeros(b, groups, dtype=torch.float64, device=self.device)
        total_sq = torch.zeros_like(total)
        dtype = _norm_dtype(x.dtype)
        for rt, rh, rw in self.regions(tuple(x.shape[2:])):
            v = _read(x, rt, rh, rw, self.device).reshape(b, groups, -1).to(dtype)  # b g (region elements)
            size = v.shape[-1]
            var, mean = (m.double() for m in torch.var_mean(v, dim=-1, correction=0))  # b g each
            del v
            total += mean * size
            total_sq += (var + mean * mean) * size
        n = math.prod(x.shape[1:]) // groups
        mean = total / n
        var = (total_sq / n - mean * mean).clamp(min=0)
        return mean.to(dtype), torch.rsqrt(var + NORM_EPS).to(dtype)

    def upsample(self, layer: nn.Module, x: torch.Tensor) -> _Upsampled:
        """Upsample3D, computed region by region whenever the next layers read it (see _Upsampled)."""
        return _Upsampled(layer, x, self.device)

    def downsample(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Downsample3D region by region: the frame pairs it averages, then the stride-2 3x3 conv whose
        right/bottom zero padding is the window's out-of-range row and column."""
        b, c, t, h, w = x.shape
        pairs = _time_pairs(t, layer.compress_time)  # the source frames of every output frame
        out_thw = (len(pairs), (h - 2) // 2 + 1, (w - 2) // 2 + 1)
        out = self._new_output(b, c, *out_thw, dtype=x.dtype)
        for rt, rh, rw in self._owned(self.regions(out_thw)):
            index = (
                [f for pair in pairs[rt] for f in pair],
                list(range(2 * rh.start, 2 * rh.stop + 1)),
                list(range(2 * rw.start, 2 * rw.stop + 1)),
            )
            win = _zero_outside(_window(x, index, self.device), index, (t, h, w))  # b c 2t_r (2h_r+1) (2w_r+1)
            win = (win[:, :, 0::2] + win[:, :, 1::2]) / 2  # b c t_r (2h_r+1) (2w_r+1)
            out[:, :, rt, rh, rw] = _per_frame(win, layer.conv).to(out.device)
        return self._joined(out)


def _time_pairs(t: int, compress_time: bool) -> list[tuple[int, int]]:
    """The source frames averaged into each output frame by Downsample3D's time pooling: pairs
    (2j, 2j+1); with an odd count frame 0 alone (as the pair (0, 0)); no pooling: (j, j)."""
    if not compress_time or t == 1:
        return [(j, j) for j in range(t)]
    first = [(0, 0)] if t % 2 else []
    return first + [(j, j + 1) for j in range(t % 2, t, 2)]


def _per_frame(win: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """An unpadded 2D ``conv`` on every frame: (b, c, t, h, w) -> (b, c_out, t, h', w')."""
    frames = win.shape[2]
    y = F.conv2d(rearrange(win, "b c t h w -> (b t) c h w"), conv.weight, conv.bias, stride=conv.stride)
    return rearrange(y, "(b t) c h w -> b c t h w", t=frames)
