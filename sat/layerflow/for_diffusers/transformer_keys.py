"""The names of our DiT's tensors (the released SAT checkpoints') in diffusers, both ways, strictly.

The mapping is the one diffusers' own CogVideoX converter applies, plus LayerFlow's keys:

* the fused ``query_key_value`` (q, k, v stacked along the output) splits into ``to_q/to_k/to_v``;
* the 12 adaLN chunks of a layer, (shift, scale, gate) x (attention, MLP) for video then for text,
  split into ``norm1.linear`` = video attention + text attention chunks and ``norm2.linear`` = video
  MLP + text MLP chunks (diffusers' ``CogVideoXLayerNormZero`` order: shift, scale, gate, text shift,
  text scale, text gate);
* ``input_layernorm`` / ``post_attention_layernorm`` are ``norm1.norm`` / ``norm2.norm``, SAT's
  ``final_layernorm`` is ``norm_final``, our final adaLN is ``norm_out``;
* ``mixins.pos_embed.txt_embedder`` (the layer embedding) is ``patch_embed.txt_embedder``;
* the position table ``mixins.pos_embed.pos_embedding`` is dropped where it is the fixed sin-cos table:
  its video rows must equal :func:`layerflow.models.dit.sincos_3d_table` and its text rows be zero,
  which is checked (to one unit of the stored dtype), since the diffusers model recomputes it; a
  learned table (``learnable_pos_embed``) is kept whole as ``patch_embed.pos_embedding``;
* each LoRA factor of partition p (q, k, v of the qkv projection; the output projection) becomes
  a peft tensor of that projection: motion A/B -> adapter ``motion`` lora_A/lora_B, content C/D ->
  adapter ``content`` lora_A/lora_B (:mod:`layerflow.for_diffusers.lora` sets their scales).

Base tensors carry diffusers' plain names; adapter tensors peft's saved names (``...to_q.lora_A.weight``,
without the adapter name). Every key must be mapped and none be left: anything else is an
:class:`~layerflow.for_diffusers.transformer.ExportError` of one line naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from layerflow.for_diffusers.transformer import ExportError
from layerflow.models.dit import DiTConfig, video_position_table

POSITION_TABLE_KEY = "mixins.pos_embed.pos_embedding"
CONTENT, MOTION = "content", "motion"
ADAPTERS = (CONTENT, MOTION)
ADALN_CHUNKS = 12
QKV = ("to_q", "to_k", "to_v")
# SAT's LoRA factor -> (adapter, peft factor)
LORA_FACTORS = {"matrix_A": (MOTION, "lora_A"), "matrix_B": (MOTION, "lora_B"), "matrix_C": (CONTENT, "lora_A"),
                "matrix_D": (CONTENT, "lora_B")}  # fmt: skip
# Video (attention, MLP) then text (attention, MLP), 3 chunks each -> norm1, norm2.
NORM1_CHUNKS = (0, 1, 2, 6, 7, 8)
NORM2_CHUNKS = (3, 4, 5, 9, 10, 11)

SAME, SPLIT, ADALN = "same", "split", "adaln"


@dataclass(frozen=True)
class KeyMap:
    """One SAT tensor and the diffusers tensors it becomes: the same tensor, equal chunks along the
    output (qkv), or the 12 adaLN chunks reordered into two. Names of adapter tensors start with the
    adapter's name and a slash (``content/transformer_blocks.0.attn1.to_q.lora_A.weight``)."""

    sat: str
    diffusers: tuple[str, ...]
    kind: str = SAME


def _pairs(sat: str, diffusers: str) -> list[KeyMap]:
    return [KeyMap(f"{sat}.{p}", (f"{diffusers}.{p}",)) for p in ("weight", "bias")]


def _lora_maps(sat: str, projections: tuple[str, ...]) -> list[KeyMap]:
    maps = []
    for factor, (adapter, peft_factor) in LORA_FACTORS.items():
        for p, projection in enumerate(projections):
            maps.append(KeyMap(f"{sat}.{factor}.{p}", (f"{adapter}/{projection}.{peft_factor}.weight",)))
    return maps


def _layer_maps(i: int, lora: bool) -> list[KeyMap]:
    sat, block = f"transformer.layers.{i}", f"transformer_blocks.{i}"
    qkv, dense = f"{sat}.attention.query_key_value", f"{sat}.attention.dense"
    qkv_base, dense_base = (f"{qkv}.original", f"{dense}.original") if lora else (qkv, dense)
    projections = tuple(f"{block}.attn1.{name}" for name in QKV)
    modulation = f"mixins.adaln_layer.adaLN_modulations.{i}.1"
    maps = [
        *_pairs(f"{sat}.input_layernorm", f"{block}.norm1.norm"),
        *_pairs(f"{sat}.post_attention_layernorm", f"{block}.norm2.norm"),
        *(KeyMap(f"{qkv_base}.{p}", tuple(f"{name}.{p}" for name in projections), SPLIT) for p in ("weight", "bias")),
        *_pairs(dense_base, f"{block}.attn1.to_out.0"),
        *_pairs(f"{sat}.mlp.dense_h_to_4h", f"{block}.ff.net.0.proj"),
        *_pairs(f"{sat}.mlp.dense_4h_to_h", f"{block}.ff.net.2"),
        *(
            KeyMap(f"{modulation}.{p}", (f"{block}.norm1.linear.{p}", f"{block}.norm2.linear.{p}"), ADALN)
            for p in ("weight", "bias")
        ),
        *_pairs(f"mixins.adaln_layer.query_layernorm_list.{i}", f"{block}.attn1.norm_q"),
        *_pairs(f"mixins.adaln_layer.key_layernorm_list.{i}", f"{block}.attn1.norm_k"),
    ]
    if lora:
        maps += _lora_maps(qkv, projections) + _lora_maps(dense, (f"{block}.attn1.to_out.0",))
    return maps


def key_maps(config: DiTConfig) -> list[KeyMap]:
    """Every tensor of our network but a fixed (sin-cos) position table, family by family."""
    maps = []
    if config.learnable_txt_embed:
        maps += _pairs("mixins.pos_embed.txt_embedder.0", "patch_embed.txt_embedder.0")
        maps += _pairs("mixins.pos_embed.txt_embedder.1", "patch_embed.txt_embedder.1")
    maps += _pairs("mixins.patch_embed.proj", "patch_embed.proj")
    maps += _pairs("mixins.patch_embed.text_proj", "patch_embed.text_proj")
    for i in range(config.num_layers):
        maps += _layer_maps(i, config.lora is not None)
    maps += _pairs("mixins.final_layer.norm_final", "norm_out.norm")
    maps += _pairs("mixins.final_layer.linear", "proj_out")
    maps += _pairs("mixins.final_layer.adaLN_modulation.1", "norm_out.linear")
    maps += _pairs("transformer.final_layernorm", "norm_final")
    maps += _pairs("time_embed.0", "time_embedding.linear_1")
    maps += _pairs("time_embed.2", "time_embedding.linear_2")
    if config.learnable_pos_embed:
        maps.append(KeyMap(POSITION_TABLE_KEY, ("patch_embed.pos_embedding",)))
    return maps


def _listing(keys, limit: int = 4) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def check_keys(found, expected, source: str, what: str) -> None:
    """One-line :class:`ExportError` when ``found`` is not exactly the ``expected`` set of keys."""
    found, expected = set(found), set(expected)
    unexpected, missing = found - expected, expected - found
    if unexpected or missing:
        parts = [f"unexpected key {_listing(unexpected)}" if unexpected else "",
                 f"missing key {_listing(missing)}" if missing else ""]  # fmt: skip
        raise ExportError(f"{source}: not {what}: " + "; ".join(p for p in parts if p))


def _split_name(name: str) -> tuple[str | None, str]:
    adapter, slash, key = name.partition("/")
    return (adapter, key) if slash else (None, name)


def check_position_table(table: torch.Tensor, config: DiTConfig, source: str) -> None:
    """The table must have the config's length, and be the recomputed one (text rows zero) to be dropped."""
    rows, cols = config.patch_grid
    frames = config.pos_embed_frames
    shape = (1, config.text_length + frames * rows * cols, config.hidden_size)
    if tuple(table.shape) != shape:
        raise ExportError(
            f"{source}: {POSITION_TABLE_KEY} has shape {tuple(table.shape)}, expected {shape} "
            f"({config.text_length} text rows + {frames} frames x {rows}x{cols} patches; another task or variant?)"
        )
    if table.device.type == "meta" or config.learnable_pos_embed:
        return
    expected = video_position_table(config)
    stored = table[0].float()
    expected = torch.cat([torch.zeros(config.text_length, config.hidden_size), expected]).to(table.dtype).float()
    difference = (stored - expected).abs().max().item()
    if difference > torch.finfo(table.dtype).eps:
        raise ExportError(
            f"{source}: {POSITION_TABLE_KEY} differs from the sin-cos table by up to {difference:.3g} "
            f"(a learned or edited table, but the config says learnable_pos_embed: false)"
        )


def _convert(value: torch.Tensor, entry: KeyMap, source: str) -> tuple[torch.Tensor, ...]:
    if entry.kind == SAME:
        return (value,)
    parts = len(QKV) if entry.kind == SPLIT else ADALN_CHUNKS
    if value.shape[0] % parts:
        raise ExportError(f"{source}: {entry.sat} has {value.shape[0]} rows, not a multiple of {parts}")
    chunks = value.chunk(parts, dim=0)
    if entry.kind == SPLIT:
        return chunks
    return tuple(torch.cat([chunks[c] for c in order]) for order in (NORM1_CHUNKS, NORM2_CHUNKS))


def _unconvert(values: list[torch.Tensor], entry: KeyMap) -> torch.Tensor:
    if entry.kind == SAME:
        return values[0]
    if entry.kind == SPLIT:
        return torch.cat(values)
    chunks: list[torch.Tensor | None] = [None] * ADALN_CHUNKS
    for order, value in zip((NORM1_CHUNKS, NORM2_CHUNKS), values, strict=True):
        for c, chunk in zip(order, value.chunk(len(order), dim=0), strict=True):
            chunks[c] = chunk
    return torch.cat(chunks)


def sat_to_diffusers(
    state: Mapping[str, torch.Tensor], config: DiTConfig, source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Our network's state dict (prefix removed, :func:`layerflow.weights.checkpoint.network_state`)
    -> (diffusers base tensors, {adapter: peft tensors}); strict, see the module docstring."""
    maps = key_maps(config)
    expected = [m.sat for m in maps] + ([] if config.learnable_pos_embed else [POSITION_TABLE_KEY])
    check_keys(state, expected, source, f"a network of this config ({describe(config)})")
    check_position_table(state[POSITION_TABLE_KEY], config, source)
    base: dict[str, torch.Tensor] = {}
    adapters: dict[str, dict[str, torch.Tensor]] = {name: {} for name in ADAPTERS} if config.lora else {}
    for entry in maps:
        for name, value in zip(entry.diffusers, _convert(state[entry.sat], entry, source), strict=True):
            adapter, key = _split_name(name)
            (base if adapter is None else adapters[adapter])[key] = value
    return base, adapters


def diffusers_to_sat(
    base: Mapping[str, torch.Tensor],
    adapters: Mapping[str, Mapping[str, torch.Tensor]],
    config: DiTConfig,
    source: str = "diffusers transformer",
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`sat_to_diffusers`, with the position table recomputed: a state dict
    that loads with ``strict=True`` into :class:`layerflow.models.dit.LayerFlowDiT`."""
    maps = key_maps(config)
    names = [name for entry in maps for name in entry.diffusers]
    found = list(base) + [f"{adapter}/{key}" for adapter, tensors in adapters.items() for key in tensors]
    check_keys(found, names, source, f"a LayerFlow transformer of this config ({describe(config)})")

    def tensor(name: str) -> torch.Tensor:
        adapter, key = _split_name(name)
        return base[key] if adapter is None else adapters[adapter][key]

    state = {}
    if not config.learnable_pos_embed:
        reference = base["patch_embed.proj.weight"]
        state[POSITION_TABLE_KEY] = position_table(config, reference.dtype, reference.device)
    for entry in maps:
        state[entry.sat] = _unconvert([tensor(name) for name in entry.diffusers], entry)
    return state


def position_table(config: DiTConfig, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Our ``pos_embedding``, (1, L + F*N, d): zero text rows, then the sin-cos table (shape only on meta)."""
    rows, cols = config.patch_grid
    if torch.device(device).type == "meta":
        length = config.text_length + config.pos_embed_frames * rows * cols
        return torch.empty(1, length, config.hidden_size, dtype=dtype, device="meta")
    table = video_position_table(config)
    return torch.cat([torch.zeros(config.text_length, config.hidden_size), table])[None].to(dtype=dtype, device=device)


def describe(config: DiTConfig) -> str:
    """A few words on the config a state must fit, for error messages."""
    lora = "with LoRA" if config.lora is not None else "without LoRA"
    embedding = "with" if config.learnable_txt_embed else "without"
    table = "learned" if config.learnable_pos_embed else "sin-cos"
    return f"{config.num_layers} layers, {embedding} layer embedding, {table} positions, {lora}"
