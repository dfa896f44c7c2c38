"""Dual LoRA on the attention projections, as LayerFlow fine-tunes CogVideoX-2B.

Each adapted linear layer keeps the frozen projection as ``original`` and adds two low-rank
branches per output partition p (q, k, v for the fused qkv projection; one for the output):

    y = W x + b + s * cat_p(B_p A_p x) * alpha / r_motion + cat_p(D_p C_p x) * alpha / r_content

The low-rank "motion" branch (A, B) is switched per sample by ``s`` (the original passes 0 at
inference, so it is off); the high-rank "content" branch (C, D) is always on. Parameter names
(``original``, ``matrix_A.0`` …) are those of the released checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sat.model.base_model import BaseMixin
from torch import nn


@dataclass(frozen=True)
class LoraConfig:
    """Ranks and switches of the dual LoRA (``lora_config`` of the original YAML)."""

    motion_r: int = 8
    spatial_r: int = 256
    lora_alpha: float = 1.0
    is_switch: bool = True
    is_stage1: bool = False

    def __post_init__(self) -> None:
        if self.motion_r <= 0 or self.spatial_r <= 0:
            raise ValueError(f"LoRA ranks must be positive, got motion_r={self.motion_r} spatial_r={self.spatial_r}")


class DualLoraLinear(nn.Module):
    """A linear layer with a switchable motion LoRA and an always-on content LoRA per partition."""

    def __init__(self, in_features: int, out_features: int, partitions: int, config: LoraConfig, bias: bool = True):
        super().__init__()
        if out_features % partitions:
            raise ValueError(f"{out_features} output features do not split into {partitions} partitions")
        part = out_features // partitions
        self.config = config
        self.original = nn.Linear(in_features, out_features, bias=bias)
        self.matrix_A = nn.ParameterList(
            [nn.Parameter(torch.zeros(config.motion_r, in_features)) for _ in range(partitions)]
        )
        self.matrix_B = nn.ParameterList([nn.Parameter(torch.zeros(part, config.motion_r)) for _ in range(partitions)])
        self.matrix_C = nn.ParameterList(
            [nn.Parameter(torch.zeros(config.spatial_r, in_features)) for _ in range(partitions)]
        )
        self.matrix_D = nn.ParameterList([nn.Parameter(torch.zeros(part, config.spatial_r)) for _ in range(partitions)])
        self.motion_scaling = config.lora_alpha / config.motion_r
        self.content_scaling = config.lora_alpha / config.spatial_r
        self.merged = False

    @staticmethod
    def _branch(x: torch.Tensor, down: nn.ParameterList, up: nn.ParameterList, scaling: float) -> torch.Tensor:
        return torch.cat([(x @ a.T) @ b.T for a, b in zip(down, up, strict=True)], dim=-1) * scaling

    def _motion_on(self, scale: torch.Tensor | float) -> bool:
        return not (isinstance(scale, (int, float)) and scale == 0)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | float = 0) -> torch.Tensor:
        """x: (b, n, in) -> (b, n, out). ``scale``: a number or one value per sample (b,)."""
        y = self.original(x)
        config = self.config
        if config.is_switch and config.is_stage1:
            return y + self._branch(x, self.matrix_A, self.matrix_B, self.motion_scaling)
        if config.is_switch and self._motion_on(scale):
            motion = self._branch(x, self.matrix_A, self.matrix_B, self.motion_scaling)
            if isinstance(scale, torch.Tensor):
                motion = motion * scale.to(motion.dtype).reshape(-1, *([1] * (motion.dim() - 1)))
            else:
                motion = motion * scale
            y = y + motion
        if not self.merged:
            y = y + self._branch(x, self.matrix_C, self.matrix_D, self.content_scaling)
        return y

    @torch.no_grad()
    def merge_content_branch(self) -> None:
        """Fold the always-on content branch into ``original.weight`` (faster inference, not bit-exact)."""
        if self.merged:
            return
        delta = torch.cat([b.float() @ a.float() for a, b in zip(self.matrix_C, self.matrix_D, strict=True)], dim=0)
        weight = self.original.weight
        weight.copy_((weight.float() + delta * self.content_scaling).to(weight.dtype))
        self.merged = True


class DualLoraMixin(BaseMixin):
    """Replaces each layer's attention projections with :class:`DualLoraLinear`; the DiT block
    (:class:`layerflow.models.dit.DiTBlock`) passes the per-sample motion switch ``scale`` to them."""

    def __init__(self, num_layers: int, config: LoraConfig):
        super().__init__()
        self.num_layers = num_layers
        self.config = config

    def reinit(self, parent_model=None) -> None:
        transformer = parent_model.transformer
        hidden = transformer.hidden_size
        for layer in transformer.layers[: self.num_layers]:
            attention = layer.attention
            qkv, dense = attention.query_key_value, attention.dense
            attention.query_key_value = self._adapted(qkv, hidden, qkv.weight.shape[0], attention.stride)
            attention.dense = self._adapted(dense, dense.weight.shape[1], hidden, 1)

    def _adapted(self, linear: nn.Module, in_features: int, out_features: int, partitions: int) -> DualLoraLinear:
        weight = linear.weight
        with torch.device(weight.device):
            adapted = DualLoraLinear(in_features, out_features, partitions, self.config, bias=linear.bias is not None)
        adapted.to(weight.dtype)
        if weight.device.type != "meta":
            with torch.no_grad():
                adapted.original.weight.copy_(weight)
                if linear.bias is not None:
                    adapted.original.bias.copy_(linear.bias)
        return adapted
