"""Seeded random weights for models run without checkpoints: the tiny built-in demo model and
full-size speed benchmarks (timing does not depend on weight values)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, keep: tuple[str, ...] = ("pos_embedding",)) -> nn.Module:
    """Fill every parameter in place, in ``named_parameters`` order, from one generator.

    Matrices get N(0, 1/fan_in), 1-D weights of norms 1 + 0.1 N, biases 0.05 N. Parameters whose
    name ends with an entry of ``keep`` (the sin-cos position table) keep their value.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if name.endswith(keep) or param.device.type == "meta":
            continue
        shape = param.shape
        if param.dim() >= 2:
            values = torch.randn(shape, generator=generator) / max(1, shape[1:].numel()) ** 0.5
        elif name.endswith("bias"):
            values = 0.05 * torch.randn(shape, generator=generator)
        else:
            values = 1 + 0.1 * torch.randn(shape, generator=generator)
        param.copy_(values.to(param.dtype))
    return module
