"""LayerFlow's DiT as a diffusers model: CogVideoX's transformer with the layer embedding on top.

:class:`LayerFlowTransformer3DModel` is diffusers' ``CogVideoXTransformer3DModel`` (CogVideoX-2B:
sin-cos positions, no RoPE) with what LayerFlow adds, all kept in its ``config.json``:

* ``max_text_seq_length`` is 226 tokens per prompt times the task's prompts (one per layer);
* ``layer_embedding``: a learned ``txt_embedder`` (Linear(1, d) then LayerNorm) of the prompt index
  k, added to the 226 text rows of prompt k;
* ``sample_frames`` is the whole stack of layers: the position table covers
  ``(sample_frames - 1) // 4 + 1`` latent frames, as our ``DiTConfig.num_frames`` does;
* ``height_interpolation`` / ``width_interpolation``: our table divides rows and columns apart;
* ``adaln_norm_eps``: the final adaLN LayerNorm runs with 1e-6, while the block norms and
  ``norm_final`` use ``norm_eps`` (1e-5); the per-head q/k norms are diffusers' 1e-6 already.

* ``learned_positions``: the tasks whose network learned its position table (``learnable_pos_embed``:
  seg, and fg2bg/bg2fg RGB) keep it, text rows included, as the buffer ``patch_embed.pos_embedding``
  (1, L + F*N, d), the layout of diffusers' own learned table.

Otherwise the position table is that of :func:`layerflow.models.dit.sincos_3d_table` (sines in
float64, then float32), computed for the input's frames and patch grid and kept per size and
device; text rows get no position, only the layer embedding. The forward is diffusers' own (patchify, blocks with
text and video modulated apart, final adaLN, unpatchify), so the signature is diffusers':
``forward(hidden_states (b, T, c, H, W), encoder_hidden_states (b, L, e), timestep (b,))``.

Dimension letters: b batch, T latent frames, c latent channels, H/W latent height/width, L text
tokens, N video tokens, d hidden size, e T5 width.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import CogVideoXPatchEmbed

# diffusers' pipeline loader looks a custom component's base class up by name in the component's module
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXTransformer3DModel
from torch import nn

from layerflow.geometry import TOKENS_PER_PROMPT, VAE_TEMPORAL_COMPRESSION
from layerflow.models.dit import MODULATION_LAYERNORM_EPS, TRANSFORMER_LAYERNORM_EPS, DiTConfig, sincos_3d_table


class ExportError(ValueError):
    """A network that cannot be written for diffusers, or a state that does not fit; one line."""


class LayerFlowPatchEmbed(CogVideoXPatchEmbed):
    """Text projection and patchify as diffusers' (same parameter names), with LayerFlow's positions:
    the 3D sin-cos table on the video tokens and the layer embedding on each prompt's text rows."""

    def __init__(
        self,
        *,
        layer_embedding: bool,
        learned_positions: bool,
        height_interpolation: float,
        width_interpolation: float,
        temporal_interpolation: float,
        **kwargs,
    ):
        super().__init__(use_positional_embeddings=False, use_learned_positional_embeddings=False, **kwargs)
        self.height_interpolation = height_interpolation
        self.width_interpolation = width_interpolation
        self.temporal_interpolation = temporal_interpolation
        self.txt_embedder = (
            nn.Sequential(nn.Linear(1, self.embed_dim), nn.LayerNorm(self.embed_dim)) if layer_embedding else None
        )
        self._tables: dict[tuple, torch.Tensor] = {}
        self.learned_positions = learned_positions
        if learned_positions:
            rows, cols = self.sample_height // self.patch_size, self.sample_width // self.patch_size
            frames = (self.sample_frames - 1) // self.temporal_compression_ratio + 1
            table = torch.zeros(1, self.max_text_seq_length + frames * rows * cols, self.embed_dim)
            self.register_buffer("pos_embedding", table, persistent=True)

    def position_table(self, frames: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """(frames*rows*cols, d) float32 sin-cos table, computed once per size and device."""
        key = (frames, rows, cols, device)
        if key not in self._tables:
            table = sincos_3d_table(
                self.embed_dim,
                frames,
                rows,
                cols,
                self.height_interpolation,
                self.width_interpolation,
                self.temporal_interpolation,
            )
            self._tables[key] = table.to(device)
        return self._tables[key]

    def layer_embedding(self, text_length: int) -> torch.Tensor:
        """(L, d): txt_embedder(k) repeated over the 226 rows of prompt k."""
        weight = self.txt_embedder[0].weight
        index = torch.arange(text_length // TOKENS_PER_PROMPT, device=weight.device, dtype=weight.dtype)
        return self.txt_embedder(index[:, None]).repeat_interleave(TOKENS_PER_PROMPT, dim=0)

    def forward(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        text_length = text_embeds.shape[1]
        if text_length != self.max_text_seq_length:
            raise ValueError(
                f"encoder_hidden_states has {text_length} tokens, this model takes {self.max_text_seq_length} "
                f"({self.max_text_seq_length // TOKENS_PER_PROMPT} prompts of {TOKENS_PER_PROMPT} tokens)"
            )
        embeds = super().forward(text_embeds, image_embeds)  # (b, L + T*N, d), no positions yet
        if self.learned_positions:
            text, video = self.learned_table(embeds.shape[1], image_embeds.shape[-2:])  # (L, d), (T*N, d)
        else:
            frames, height, width = image_embeds.shape[1], image_embeds.shape[3], image_embeds.shape[4]
            video = self.position_table(frames, height // self.patch_size, width // self.patch_size, embeds.device)
            text = None
        if self.txt_embedder is not None:
            layers = self.layer_embedding(text_length)
            text = layers if text is None else text + layers
        video = embeds[:, text_length:] + video.to(embeds.dtype)  # (b, T*N, d)
        text = embeds[:, :text_length] if text is None else embeds[:, :text_length] + text.to(embeds.dtype)
        return torch.cat([text, video], dim=1)

    def learned_table(self, length: int, size: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` rows of the learned table, as (text rows, video rows)."""
        if tuple(size) != (self.sample_height, self.sample_width) or length > self.pos_embedding.shape[1]:
            raise ValueError(
                f"the learned position table covers {self.sample_height}x{self.sample_width} latents and "
                f"{self.pos_embedding.shape[1]} tokens, the input has {tuple(size)} and {length}"
            )
        table = self.pos_embedding[0, :length]
        return table[: self.max_text_seq_length], table[self.max_text_seq_length :]


class LayerFlowTransformer3DModel(CogVideoXTransformer3DModel):
    """CogVideoX's transformer with LayerFlow's layer embedding and stacked position table
    (see the module docstring); loads with ``from_pretrained`` like any diffusers model."""

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 30,
        attention_head_dim: int = 64,
        in_channels: int = 16,
        out_channels: int | None = 16,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        time_embed_dim: int = 512,
        ofs_embed_dim: int | None = None,
        text_embed_dim: int = 4096,
        num_layers: int = 30,
        dropout: float = 0.0,
        attention_bias: bool = True,
        sample_width: int = 90,
        sample_height: int = 60,
        sample_frames: int = 49,
        patch_size: int = 2,
        patch_size_t: int | None = None,
        temporal_compression_ratio: int = 4,
        max_text_seq_length: int = 226,
        activation_fn: str = "gelu-approximate",
        timestep_activation_fn: str = "silu",
        norm_elementwise_affine: bool = True,
        norm_eps: float = TRANSFORMER_LAYERNORM_EPS,
        spatial_interpolation_scale: float = 1.875,
        temporal_interpolation_scale: float = 1.0,
        use_rotary_positional_embeddings: bool = False,
        use_learned_positional_embeddings: bool = False,
        patch_bias: bool = True,
        layer_embedding: bool = False,
        learned_positions: bool = False,
        height_interpolation: float = 1.875,
        width_interpolation: float = 1.875,
        adaln_norm_eps: float = MODULATION_LAYERNORM_EPS,
    ):
        if use_rotary_positional_embeddings or use_learned_positional_embeddings or patch_size_t is not None:
            raise ValueError("LayerFlowTransformer3DModel is CogVideoX-2B's: sin-cos positions, 2D patches only")
        super().__init__(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift,
            time_embed_dim=time_embed_dim,
            ofs_embed_dim=ofs_embed_dim,
            text_embed_dim=text_embed_dim,
            num_layers=num_layers,
            dropout=dropout,
            attention_bias=attention_bias,
            sample_width=sample_width,
            sample_height=sample_height,
            sample_frames=sample_frames,
            patch_size=patch_size,
            patch_size_t=patch_size_t,
            temporal_compression_ratio=temporal_compression_ratio,
            max_text_seq_length=max_text_seq_length,
            activation_fn=activation_fn,
            timestep_activation_fn=timestep_activation_fn,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
            spatial_interpolation_scale=spatial_interpolation_scale,
            temporal_interpolation_scale=temporal_interpolation_scale,
            use_rotary_positional_embeddings=False,
            use_learned_positional_embeddings=False,
            patch_bias=patch_bias,
        )
        self.patch_embed = LayerFlowPatchEmbed(
            layer_embedding=layer_embedding,
            learned_positions=learned_positions,
            height_interpolation=height_interpolation,
            width_interpolation=width_interpolation,
            temporal_interpolation=temporal_interpolation_scale,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=num_attention_heads * attention_head_dim,
            text_embed_dim=text_embed_dim,
            bias=patch_bias,
            sample_width=sample_width,
            sample_height=sample_height,
            sample_frames=sample_frames,
            temporal_compression_ratio=temporal_compression_ratio,
            max_text_seq_length=max_text_seq_length,
        )
        self.norm_out.norm.eps = adaln_norm_eps


def transformer_config(dit_config: DiTConfig) -> dict:
    """``LayerFlowTransformer3DModel`` keyword arguments for our network's config.

    Raises :class:`ExportError` for what diffusers' CogVideoX blocks cannot express (no q/k norm,
    norms without weights), a stage-1 network or a config without a text length.
    """
    c = dit_config
    if c.text_length <= 0:
        raise ExportError("DiTConfig.text_length is not set (226 tokens per prompt of the task)")
    if not (c.qk_ln and c.elementwise_affine):
        raise ExportError(
            "diffusers' CogVideoX blocks always have q/k LayerNorms with weights (qk_ln, elementwise_affine)"
        )
    if c.lora is not None and c.lora.is_stage1:
        raise ExportError("a stage-1 network (lora.is_stage1: motion LoRA only, always on) is not exported")
    return {
        "num_attention_heads": c.num_attention_heads,
        "attention_head_dim": c.head_dim,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "time_embed_dim": c.time_embed_dim,
        "text_embed_dim": c.text_hidden_size,
        "num_layers": c.num_layers,
        "sample_width": c.latent_width,
        "sample_height": c.latent_height,
        "sample_frames": c.num_frames,
        "patch_size": c.patch_size,
        "temporal_compression_ratio": VAE_TEMPORAL_COMPRESSION,
        "max_text_seq_length": c.text_length,
        "norm_elementwise_affine": c.elementwise_affine,
        "norm_eps": TRANSFORMER_LAYERNORM_EPS,
        "spatial_interpolation_scale": c.height_interpolation,
        "temporal_interpolation_scale": c.time_interpolation,
        "layer_embedding": c.learnable_txt_embed,
        "learned_positions": c.learnable_pos_embed,
        "height_interpolation": c.height_interpolation,
        "width_interpolation": c.width_interpolation,
        "adaln_norm_eps": MODULATION_LAYERNORM_EPS,
    }
