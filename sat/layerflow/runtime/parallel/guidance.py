"""Guidance parallelism: the unconditional and conditional passes of one step on two ranks.

The sampler asks its model function for a guidance batch of 2b samples, unconditional first
(:func:`layerflow.sampling.guided_v`). :func:`split_guidance_batch` wraps the pipeline's model
function so that member c of the guidance pair computes half c of that batch and the two halves
are exchanged with one ``all_gather`` (after the group's vote that neither rank failed, see
:mod:`.agreement`); both ranks then hold the whole batch and take the same sampler step. Nothing
inside the network communicates, and the sampler does not know.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from layerflow.runtime.parallel.agreement import Exchange

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def split_guidance_batch(model_fn: ModelFn, index: int, group: Exchange) -> ModelFn:
    """``model_fn`` on half ``index`` of each (2b, ...) guidance batch, the halves gathered over ``group``."""

    def half_each(x: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % 2:
            raise ValueError(f"guidance parallelism needs an unconditional + conditional batch, got {x.shape[0]}")
        b = x.shape[0] // 2
        mine = slice(index * b, (index + 1) * b)
        v = model_fn(x[mine], timesteps[mine], text[mine]).contiguous()  # (b, ...)
        halves = [torch.empty_like(v) for _ in range(2)]
        group.all_gather(halves, v)
        return torch.cat(halves)  # (2b, ...), unconditional first

    return half_each
