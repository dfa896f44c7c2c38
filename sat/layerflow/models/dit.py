"""The LayerFlow diffusion transformer: CogVideoX-2B's DiT on SwissArmyTransformer, layer-aware.

The network is a SAT :class:`~sat.model.base_model.BaseModel` whose behaviour comes from mixins
hooked into SAT's transformer (same parameter names as the released checkpoints):

* ``pos_embed``   3D sin-cos position table (text rows first) plus, with ``learnable_txt_embed``,
                  a learned embedding of the layer index added to each prompt's 226 text rows;
* ``patch_embed`` 2x2 patchify of every latent frame and a projection of the T5 text states;
* ``adaln_layer`` per-layer adaLN modulation with separate text / video shift, scale and gate,
                  and LayerNorm on queries and keys;
* ``final_layer`` final adaLN and unpatchify;
* ``lora``        dual LoRA on the attention projections (:mod:`layerflow.models.lora`).

Layers are sub-clips stacked along the latent time axis, and the network sees the whole stack: it
knows nothing of tasks or given layers. The caller puts the clean latents of the given layers in
place and drops their predictions (:func:`layerflow.pipeline.conditioned_denoiser`,
:func:`layerflow.training.loss.diffusion_loss`).

SAT's layers ask its model-parallel group for their size, so the process that builds the network
first calls :func:`layerflow.runtime.distributed.ensure_model_parallel`.

Sequence parallelism (``forward(..., sequence_parallel=...)``): the embedding hooks keep this
rank's slice of the tokens, attention exchanges heads with the other ranks, and the final layer
gathers the slices (:mod:`layerflow.runtime.parallel.ulysses`); without it nothing changes.

Dimension letters: b batch, T latent frames, c latent channels, H/W latent height/width,
n tokens (L text + N video), d hidden size, e T5 width, p patch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from einops import rearrange
from sat import mpu
from sat.model.base_model import BaseMixin, BaseModel
from sat.model.transformer import BaseTransformer
from torch import nn

from layerflow.geometry import LATENT_CHANNELS, PATCH_SIZE, TOKENS_PER_PROMPT, pos_embed_frames
from layerflow.models.lora import DualLoraLinear, DualLoraMixin, LoraConfig
from layerflow.runtime.attention import FAITHFUL, HEADS_FIRST, AttentionKernel

if TYPE_CHECKING:
    from layerflow.runtime.parallel.ulysses import UlyssesGroup

# The released configs hand SAT a LayerNorm with eps 1e-6, but SAT's transformer passes its own
# ``layernorm_epsilon`` (1e-5) when it builds the per-layer and final norms; the checkpoints
# were trained with that 1e-5. The per-head q/k norms and the final adaLN norm use 1e-6.
TRANSFORMER_LAYERNORM_EPS = 1e-5
MODULATION_LAYERNORM_EPS = 1e-6


@dataclass(frozen=True)
class DiTConfig:
    """Sizes and switches of the diffusion transformer (``network_config`` of the original YAML).

    ``text_length`` (226 tokens per prompt) follows from the task; 0 means "not set yet", which
    the config loader fills in from the task layout.
    """

    num_frames: int
    text_length: int = 0
    hidden_size: int = 1920
    num_layers: int = 30
    num_attention_heads: int = 30
    time_embed_dim: int = 512
    text_hidden_size: int = 4096
    in_channels: int = LATENT_CHANNELS
    out_channels: int = LATENT_CHANNELS
    patch_size: int = PATCH_SIZE
    latent_height: int = 60
    latent_width: int = 90
    learnable_txt_embed: bool = False
    learnable_pos_embed: bool = False
    height_interpolation: float = 1.875
    width_interpolation: float = 1.875
    time_interpolation: float = 1.0
    qk_ln: bool = True
    elementwise_affine: bool = True
    lora: LoraConfig | None = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 for the 3D sin-cos table")
        if self.latent_height % self.patch_size or self.latent_width % self.patch_size:
            raise ValueError(
                f"latent size {self.latent_height}x{self.latent_width} is not divisible by patch {self.patch_size}"
            )
        if self.text_length % TOKENS_PER_PROMPT:
            raise ValueError(f"text_length {self.text_length} is not a multiple of {TOKENS_PER_PROMPT} tokens")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def pos_embed_frames(self) -> int:
        return pos_embed_frames(self.num_frames)

    @property
    def patch_grid(self) -> tuple[int, int]:
        return self.latent_height // self.patch_size, self.latent_width // self.patch_size


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[sin(p w_k)]_k ++ [cos(p w_k)]_k with w_k = 10000^(-k/(dim/2)), in float64. (M,) -> (M, dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_3d_table(
    dim: int, frames: int, rows: int, cols: int, row_interp: float, col_interp: float, time_interp: float = 1.0
) -> torch.Tensor:
    """CogVideoX's 3D sin-cos table (frames*rows*cols, dim): [time (dim/4), column (3dim/8), row (3dim/8)].

    Positions are computed in float32 as the original does, the sines in float64.
    """
    spatial, temporal = dim // 4 * 3, dim // 4
    row_pos = np.arange(rows, dtype=np.float32) / np.float32(row_interp)
    col_pos = np.arange(cols, dtype=np.float32) / np.float32(col_interp)
    cols_grid, rows_grid = np.meshgrid(col_pos, row_pos)  # (rows, cols) each
    spatial_emb = np.concatenate(
        [sincos_1d(spatial // 2, cols_grid), sincos_1d(spatial // 2, rows_grid)], axis=1
    )  # (rows*cols, 3dim/4)
    time_emb = sincos_1d(temporal, np.arange(frames, dtype=np.float32) / np.float32(time_interp))  # (frames, dim/4)
    table = np.concatenate(
        [np.repeat(time_emb[:, None], rows * cols, axis=1), np.repeat(spatial_emb[None], frames, axis=0)], axis=-1
    )  # (frames, rows*cols, dim)
    return torch.from_numpy(table.reshape(frames * rows * cols, dim)).float()


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosines first: (b,) -> (b, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift with per-sample (b, d) modulation over (b, n, d)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def video_position_table(config: DiTConfig) -> torch.Tensor:
    """The video rows of the network's sin-cos position table: (pos_embed_frames * rows * cols, d)."""
    rows, cols = config.patch_grid
    return sincos_3d_table(
        config.hidden_size,
        config.pos_embed_frames,
        rows,
        cols,
        config.height_interpolation,
        config.width_interpolation,
        config.time_interpolation,
    )


class LayerPositionEmbedding(BaseMixin):
    """Position table (1, L + T*N, d) with text rows first; layer embedding on the text rows."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        rows, cols = config.patch_grid
        self.config = config
        self.num_patches = config.pos_embed_frames * rows * cols
        self.text_length = config.text_length
        self.pos_embedding = nn.Parameter(
            torch.zeros(1, config.text_length + self.num_patches, config.hidden_size),
            requires_grad=config.learnable_pos_embed,
        )
        if config.learnable_txt_embed:
            self.txt_embedder = nn.Sequential(nn.Linear(1, config.hidden_size), nn.LayerNorm(config.hidden_size))
        else:
            self.txt_embedder = None

    def reinit(self, parent_model=None) -> None:
        if self.pos_embedding.device.type == "meta":
            return
        with torch.no_grad():
            self.pos_embedding[0, self.text_length :].copy_(video_position_table(self.config))

    def layer_embedding(self) -> torch.Tensor:
        """(L, d): txt_embedder(k) repeated over the 226 rows of prompt k."""
        prompts = self.text_length // TOKENS_PER_PROMPT
        index = torch.arange(prompts, device=self.pos_embedding.device, dtype=self.pos_embedding.dtype)
        per_prompt = self.txt_embedder(index[:, None])  # (prompts, d)
        return per_prompt.repeat_interleave(TOKENS_PER_PROMPT, dim=0)

    def position_embedding_forward(self, position_ids, **kw_args) -> torch.Tensor:
        table = self.pos_embedding[:, : self.text_length + kw_args["seq_length"]]  # (1, L + N, d)
        if self.txt_embedder is not None:
            text = table[:, : self.text_length] + self.layer_embedding()[None]
            table = torch.cat([text, table[:, self.text_length :]], dim=1)
        shard = kw_args.get("sequence_shard")
        return table if shard is None else shard.take(table)  # (1, n_r, d) on a sequence-parallel rank


class PatchEmbedding(BaseMixin):
    """Patchify latent frames and project text states: tokens (b, L + T*N, d), text first."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, config.patch_size, stride=config.patch_size)
        self.text_proj = nn.Linear(config.text_hidden_size, config.hidden_size)

    def word_embedding_forward(self, input_ids, **kw_args) -> torch.Tensor:
        images = kw_args["images"]  # (b, T, c, H, W)
        b = images.shape[0]
        video = self.proj(images.flatten(0, 1))  # (b*T, d, H/p, W/p)
        video = rearrange(video, "(b t) d h w -> b (t h w) d", b=b)
        text = self.text_proj(kw_args["encoder_outputs"])  # (b, L, d)
        tokens = torch.cat([text, video], dim=1).contiguous()
        shard = kw_args.get("sequence_shard")
        return tokens if shard is None else shard.take(tokens)  # (b, n_r, d) on a sequence-parallel rank


class AdaLNLayers(BaseMixin):
    """Per-layer adaLN with separate text/video modulation, and q/k LayerNorm per head.

    SAT calls ``layer_forward`` for every layer; it runs that layer's :class:`DiTBlock`, which reads
    the parameters where SAT and this mixin keep them (the checkpoint's names).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.qk_ln = config.qk_ln
        hidden = config.hidden_size
        self.adaLN_modulations = nn.ModuleList(
            [nn.Sequential(nn.SiLU(), nn.Linear(config.time_embed_dim, 12 * hidden)) for _ in range(config.num_layers)]
        )
        if config.qk_ln:
            norm = partial(
                nn.LayerNorm,
                config.head_dim,
                eps=MODULATION_LAYERNORM_EPS,
                elementwise_affine=config.elementwise_affine,
            )
            self.query_layernorm_list = nn.ModuleList([norm() for _ in range(config.num_layers)])
            self.key_layernorm_list = nn.ModuleList([norm() for _ in range(config.num_layers)])
        self.blocks: list[DiTBlock] = []  # a plain list: the blocks own no parameters of their own

    def block(self, layer_id: int) -> DiTBlock:
        if not self.blocks:
            layers = self.transformer.layers
            self.blocks = [
                DiTBlock(
                    layers[i],
                    self.adaLN_modulations[i],
                    self.query_layernorm_list[i] if self.qk_ln else None,
                    self.key_layernorm_list[i] if self.qk_ln else None,
                )
                for i in range(len(self.adaLN_modulations))
            ]
        return self.blocks[layer_id]

    def layer_forward(self, hidden_states: torch.Tensor, mask: torch.Tensor, *args, **kw_args) -> torch.Tensor:
        return self.block(kw_args["layer_id"])(
            hidden_states,
            kw_args["emb"],
            kw_args["text_length"],
            kw_args.get("scale", 0),
            kw_args.get("sequence_shard"),
        )


def _project(linear: nn.Module, x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """An attention projection, passing the motion-LoRA switch to it when it has LoRA branches."""
    return linear(x, scale) if isinstance(linear, DualLoraLinear) else linear(x)


class DiTBlock(nn.Module):
    """One DiT block on (b, L + N, d): modulated attention then modulated MLP, text and video apart.

    ``attention`` (a :class:`~layerflow.runtime.attention.AttentionKernel`) decides the memory layout
    of queries, keys and values: heads first is the original's order and numbers, tokens first skips
    the permute copies (see :mod:`layerflow.runtime.attention`). The block holds references to
    parameters that live in the network; since blocks differ only in those, ``torch.compile`` of each
    block compiles the code once and reuses it for all (regional compilation).
    """

    def __init__(
        self, layer: nn.Module, modulation: nn.Module, query_norm: nn.Module | None, key_norm: nn.Module | None
    ):
        super().__init__()
        self.layer = layer
        self.modulation = modulation
        self.query_norm = query_norm
        self.key_norm = key_norm
        self.attention = FAITHFUL

    def forward(
        self,
        hidden_states: torch.Tensor,
        emb: torch.Tensor,
        text_length: int,
        scale: torch.Tensor | float = 0,
        shard=None,
    ) -> torch.Tensor:
        layer = self.layer
        (
            shift_msa,
            scale_msa,
            gate_msa,
            shift_mlp,
            scale_mlp,
            gate_mlp,
            text_shift_msa,
            text_scale_msa,
            text_gate_msa,
            text_shift_mlp,
            text_scale_mlp,
            text_gate_mlp,
        ) = self.modulation(emb).chunk(12, dim=1)  # 12 x (b, d)
        text, video = hidden_states[:, :text_length], hidden_states[:, text_length:]  # (b, L, d), (b, N, d)

        attention_input = torch.cat(
            [
                modulate(layer.input_layernorm(text), text_shift_msa, text_scale_msa),
                modulate(layer.input_layernorm(video), shift_msa, scale_msa),
            ],
            dim=1,
        )
        attention_output = self.attend(attention_input, scale, shard)  # (b, L + N, d)
        text = text + text_gate_msa.unsqueeze(1) * attention_output[:, :text_length]
        video = video + gate_msa.unsqueeze(1) * attention_output[:, text_length:]

        mlp_input = torch.cat(
            [
                modulate(layer.post_attention_layernorm(text), text_shift_mlp, text_scale_mlp),
                modulate(layer.post_attention_layernorm(video), shift_mlp, scale_mlp),
            ],
            dim=1,
        )
        mlp = layer.mlp
        mlp_output = mlp.dense_4h_to_h(mlp.activation_func(mlp.dense_h_to_4h(mlp_input)))  # (b, L + N, d)
        text = text + text_gate_mlp.unsqueeze(1) * mlp_output[:, :text_length]
        video = video + gate_mlp.unsqueeze(1) * mlp_output[:, text_length:]
        return torch.cat([text, video], dim=1)

    def attend(self, x: torch.Tensor, scale: torch.Tensor | float, shard) -> torch.Tensor:
        """Self-attention with LayerNorm over each head's queries and keys: (b, n, d) -> (b, n, d).

        No mask: every token attends to every token. With ``shard`` (Ulysses) the heads are exchanged
        with the group's other ranks around PyTorch's attention, in the heads-first layout.
        """
        attention = self.layer.attention
        b, n, d = x.shape
        heads = (b, n, -1, attention.hidden_size_per_attention_head)
        query, key, value = _project(attention.query_key_value, x, scale).chunk(3, dim=-1)  # 3 x (b, n, d)
        query, key, value = query.view(heads), key.view(heads), value.view(heads)  # (b, n, h, e) views
        if self.attention.layout == HEADS_FIRST or shard is not None:
            query, key, value = (t.permute(0, 2, 1, 3) for t in (query, key, value))  # (b, h, n, e)
        if self.query_norm is not None:
            query, key = self.query_norm(query), self.key_norm(key)
        if shard is not None:
            context = shard.attention(query, key, value).permute(0, 2, 1, 3)  # (b, n, h, e)
        elif self.attention.layout == HEADS_FIRST:
            context = self.attention(query, key, value).permute(0, 2, 1, 3)  # (b, h, n, e) -> (b, n, h, e)
        else:
            context = self.attention(query, key, value)  # (b, n, h, e)
        return _project(attention.dense, context.reshape(b, n, d), scale)


class FinalLayer(BaseMixin):
    """Final adaLN, projection to patches and unpatchify: (b, L + N, d) -> (b, T, c, H, W)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        hidden, p = config.hidden_size, config.patch_size
        self.patch_size = p
        self.out_channels = config.out_channels
        self.grid = config.patch_grid
        self.norm_final = nn.LayerNorm(
            hidden, elementwise_affine=config.elementwise_affine, eps=MODULATION_LAYERNORM_EPS
        )
        self.linear = nn.Linear(hidden, p * p * config.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.time_embed_dim, 2 * hidden))

    def final_forward(self, logits: torch.Tensor, **kw_args) -> torch.Tensor:
        text_length, shard = kw_args["text_length"], kw_args.get("sequence_shard")
        if shard is not None:
            logits, text_length = shard.gather(logits), shard.text_length  # (b, n_r, d) -> (b, L + N, d)
        video = logits[:, text_length:]  # (b, N, d)
        shift, scale = self.adaLN_modulation(kw_args["emb"]).chunk(2, dim=1)
        video = self.linear(modulate(self.norm_final(video), shift, scale))  # (b, N, c*p*p)
        rows, cols = self.grid
        return rearrange(
            video,
            "b (t h w) (c p q) -> b t c (h p) (w q)",
            h=rows,
            w=cols,
            c=self.out_channels,
            p=self.patch_size,
            q=self.patch_size,
        )


class LayerFlowDiT(BaseModel):
    """The LayerFlow network; see the module docstring. Build on ``device='meta'`` to inspect shapes."""

    def __init__(self, config: DiTConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if config.text_length <= 0:
            raise ValueError("DiTConfig.text_length is not set (226 tokens per prompt of the task)")
        if not mpu.model_parallel_is_initialized():
            raise RuntimeError(
                "SAT's model-parallel group does not exist yet: call "
                "layerflow.runtime.distributed.ensure_model_parallel() before building the network"
            )
        device = torch.device(device)
        with torch.device(device):
            transformer = self._build_transformer(config, device, dtype)
        super().__init__(args=None, transformer=transformer)
        del self.transformer.word_embeddings
        del self.transformer.position_embeddings
        self.config = config
        with torch.device(device):
            self.time_embed = nn.Sequential(
                nn.Linear(config.hidden_size, config.time_embed_dim),
                nn.SiLU(),
                nn.Linear(config.time_embed_dim, config.time_embed_dim),
            )
            self.add_mixin("pos_embed", LayerPositionEmbedding(config), reinit=True)
            self.add_mixin("patch_embed", PatchEmbedding(config))
            self.add_mixin("adaln_layer", AdaLNLayers(config))
            self.add_mixin("final_layer", FinalLayer(config))
            if config.lora is not None:
                self.add_mixin("lora", DualLoraMixin(config.num_layers, config.lora), reinit=True)
        self.to(dtype)

    @staticmethod
    def _build_transformer(config: DiTConfig, device: torch.device, dtype: torch.dtype) -> BaseTransformer:
        """SAT's transformer stack; embeddings and outputs come from the mixins."""
        return BaseTransformer(
            num_layers=config.num_layers,
            vocab_size=1,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            max_sequence_length=1,
            layernorm_epsilon=TRANSFORMER_LAYERNORM_EPS,
            layernorm=partial(nn.LayerNorm, elementwise_affine=config.elementwise_affine),
            activation_func=nn.GELU(approximate="tanh"),
            use_final_layernorm=True,
            params_dtype=dtype,
            skip_init=True,
            device=device,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.mixins.patch_embed.proj.weight.dtype

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        *,
        lora_scale: torch.Tensor | float = 0,
        sequence_parallel: UlyssesGroup | None = None,
    ) -> torch.Tensor:
        """Predict v for every latent frame of the stack.

        x: (b, T, c, H, W) latents, noisy or clean; timesteps: (b,) DDPM indices; context: (b, L, e)
        with prompt k in text rows [226k, 226k + 226). Returns (b, T, c, H, W). With ``sequence_parallel``
        this rank computes its slice of the tokens (:mod:`layerflow.runtime.parallel.ulysses`); every rank
        of the group returns the whole output.
        """
        x = x.to(self.dtype)
        b, frames, _, height, width = x.shape
        emb = self.time_embed(timestep_embedding(timesteps, self.config.hidden_size).to(self.dtype))  # (b, ted)
        ones = torch.ones((1, 1), device=x.device, dtype=self.dtype)
        seq_length = frames * height * width // self.config.patch_size**2
        text_length = context.shape[1]
        shard = None if sequence_parallel is None else sequence_parallel.shard(text_length, text_length + seq_length)
        return super().forward(
            input_ids=ones,
            position_ids=ones,
            attention_mask=ones,
            images=x,
            emb=emb,
            encoder_outputs=context.to(self.dtype),
            text_length=text_length if shard is None else shard.local_text_length,
            seq_length=seq_length,
            sequence_shard=shard,
            scale=lora_scale,
        )[0]  # (b, T, c, H, W)

    def blocks(self) -> list[DiTBlock]:
        adaln = self.mixins.adaln_layer
        return [adaln.block(i) for i in range(self.config.num_layers)]

    def use_attention(self, kernel: AttentionKernel) -> None:
        """Run every block's attention with ``kernel`` (default: the original's, :data:`FAITHFUL`)."""
        for block in self.blocks():
            block.attention = kernel

    def compile_blocks(self, strict: bool = True) -> None:
        """``torch.compile`` each block (regional compilation): the blocks share their code, so it is
        compiled once, at the first call, and reused by every layer and step. With ``strict`` off a
        block that fails to compile runs eagerly (TorchDynamo logs a warning) instead of stopping."""
        if not strict:
            torch._dynamo.config.suppress_errors = True
        for block in self.blocks():
            block.compile(dynamic=False)

    def merge_lora_content(self) -> None:
        """Fold the always-on content LoRA into the projections for faster inference."""
        for layer in self.transformer.layers:
            for module in (layer.attention.query_key_value, layer.attention.dense):
                module.merge_content_branch()
