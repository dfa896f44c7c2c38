"""The VAE decode of one video split over the ranks of its group.

The region-by-region decoder (:meth:`layerflow.models.vae.CausalVideoVAE.decode` with chunking) runs one
decoder layer at a time over (t, h, w) regions of its output, reading each region's causal and
spatial halo from the whole previous activation. Split over g ranks, member j computes regions
j, j + g, ... of every layer into a zero tensor and one ``all_reduce`` (sum) per layer gives every
rank the whole activation; each element has exactly one non-zero contribution, so the sum is exact
and the video equals the one-rank decode with the same regions, bit for bit. Upsampler outputs are
never stored whole, so they are not exchanged: each rank computes the boxes it reads from their input. The GroupNorm
statistics are then taken over the whole activation on every rank, as on one rank.

Without a chunk size in the config the latent frames are cut into g temporal chunks, one per rank.
When activations may be parked in CPU memory (``runtime.vae_device_budget_gib``), nothing is exchanged and
every rank decodes the whole video: the collective backend of GPU runs cannot reduce CPU tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from layerflow.runtime.parallel.agreement import Exchange
from layerflow.runtime.parallel.groups import ParallelGroups


@dataclass(frozen=True)
class RegionShare:
    """Worker ``index`` of ``count`` computes regions index, index + count, ... of every decoder layer;
    ``complete`` turns its output (zero outside its regions) into the whole activation, e.g. a sum
    over the workers (:meth:`layerflow.models.vae.CausalVideoVAE.decode` takes it as ``share``)."""

    index: int
    count: int
    complete: Callable[[torch.Tensor], torch.Tensor]


def _sum_over(out: torch.Tensor, group: Exchange) -> torch.Tensor:
    group.all_reduce(out)
    return out


def decode_arguments(chunking: dict, latent_frames: int, groups: ParallelGroups) -> dict:
    """``chunking`` (the decode keyword arguments) extended to deal the regions out over the group."""
    if groups.size == 1 or "buffer_device" in chunking:
        return chunking
    split = dict(chunking)
    if "temporal_chunk" not in split and "spatial_tile" not in split:
        split["temporal_chunk"] = -(-latent_frames // groups.size)
    split["share"] = RegionShare(groups.member, groups.size, partial(_sum_over, group=groups.video_group))
    return split
