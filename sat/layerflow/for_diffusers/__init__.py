"""LayerFlow for diffusers: our DiT as a diffusers transformer with peft LoRA adapters, both ways; the
export of a task to a diffusers folder and the ``DiffusionPipeline`` that runs it.

diffusers and peft are the optional ``[diffusers]`` extra; only this package imports them.

Public API (what ``layerflow export --to diffusers`` calls):

* :func:`transformer_from_sat` ``(state, dit_config, dtype=torch.float32)`` -> a
  :class:`LayerFlowTransformer3DModel` from our network's state dict (the released checkpoint's
  keys, prefix removed: :func:`layerflow.weights.checkpoint.network_state`), with the ``content``
  adapter active and ``motion`` attached but off; every key is mapped and none is left over, or
  :class:`ExportError` (one line) names the key;
* :func:`save_transformer` ``(model, folder)`` writes ``folder`` atomically: ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` as ``save_pretrained`` does (base weights only), plus
  ``content_lora.safetensors`` and ``motion_lora.safetensors`` (diffusers' CogVideoX LoRA files, which
  ``load_lora_adapter`` and a pipeline's ``load_lora_weights`` read); an earlier save there is
  replaced once the new one is complete, any other existing folder is refused and left untouched;
* :func:`load_transformer` ``(folder, dtype=torch.float32)`` restores exactly what was saved;
* :func:`sat_state_from_transformer` ``(model)`` -> our network's state dict again (position table
  recomputed), which loads with ``strict=True`` into :class:`layerflow.models.dit.LayerFlowDiT`;
* :func:`set_motion_scale` ``(model, s)``: SAT's ``lora_scale`` (0, the default, leaves motion off);
* :func:`dit_config_of` ``(model)``: our ``DiTConfig`` back from the transformer's config and adapters.

Exported networks: every released task and variant (sin-cos or learned position table, with or
without the layer embedding). Refused with :class:`ExportError`: stage-1 networks, no q/k norm,
norms without weights (diffusers' CogVideoX blocks always have them).

Module by module: :mod:`.transformer` (the model class and :func:`transformer_config`),
:mod:`.transformer_keys` (the key mapping), :mod:`.lora` (the adapters); :mod:`.vae_keys` (our VAE as
``AutoencoderKLCogVideoX``), :mod:`.scheduler` (our sampler as a diffusers scheduler), :mod:`.pipeline`
(``LayerFlowPipeline``) and :mod:`.export` (``layerflow export --to diffusers``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from layerflow.for_diffusers.lora import (
    ADAPTER_FILES,
    adapter_states,
    add_adapters,
    base_state,
    load_adapters,
    lora_config_of,
    model_state,
    save_adapters,
    set_motion_scale,
)
from layerflow.for_diffusers.transformer import ExportError, LayerFlowTransformer3DModel, transformer_config
from layerflow.for_diffusers.transformer_keys import diffusers_to_sat, sat_to_diffusers
from layerflow.io.atomic import atomic_path
from layerflow.models.dit import DiTConfig

__all__ = [
    "ExportError",
    "LayerFlowTransformer3DModel",
    "dit_config_of",
    "load_transformer",
    "sat_state_from_transformer",
    "save_transformer",
    "set_motion_scale",
    "transformer_config",
    "transformer_from_sat",
]


def _check_shapes(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str) -> None:
    wrong = [
        f"{key} {tuple(value.shape)} (expected {tuple(expected[key].shape)})"
        for key, value in state.items()
        if tuple(value.shape) != tuple(expected[key].shape)
    ]
    if wrong:
        more = f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise ExportError(f"{source}: wrong shape: {', '.join(wrong[:3])}{more}")


def transformer_from_sat(
    state: Mapping[str, torch.Tensor],
    dit_config: DiTConfig,
    dtype: torch.dtype = torch.float32,
    source: str = "checkpoint",
) -> LayerFlowTransformer3DModel:
    """The diffusers transformer of our network's state dict; see the package docstring.

    The tensors are copied (in ``dtype``); meta tensors give a model on the meta device (shapes only).
    """
    kwargs = transformer_config(dit_config)
    base, adapters = sat_to_diffusers(state, dit_config, source)
    with torch.device("meta"):
        model = LayerFlowTransformer3DModel(**kwargs)
        if dit_config.lora is not None:
            add_adapters(model, dit_config.lora)
    tensors = {key: value.to(dtype=dtype, copy=True) for key, value in model_state(base, adapters).items()}
    _check_shapes(tensors, model.state_dict(), source)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


SAVED_FILES = frozenset({"config.json", "diffusion_pytorch_model.safetensors", *ADAPTER_FILES.values()})


def is_saved_transformer(folder: Path) -> bool:
    """Whether ``folder`` holds only what :func:`save_transformer` writes (so saving again may replace it)."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    names = {entry.name for entry in folder.iterdir()}
    if not names <= SAVED_FILES or "config.json" not in names:
        return False
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("_class_name") == LayerFlowTransformer3DModel.__name__


def save_transformer(model: LayerFlowTransformer3DModel, folder: str | Path) -> Path:
    """Write ``folder`` (all or nothing): diffusers' ``save_pretrained`` of the base weights and the adapters.

    An existing ``folder`` is replaced only when it is an earlier save (:func:`is_saved_transformer`);
    anything else there is left untouched and :class:`~layerflow.io.atomic.TargetInTheWayError` raised.
    """
    folder = Path(folder)
    with torch.device("meta"):
        plain = LayerFlowTransformer3DModel.from_config(model.config)
    plain.load_state_dict(base_state(model), strict=True, assign=True)
    with atomic_path(folder, may_replace=is_saved_transformer) as staging:
        staging.mkdir()
        plain.save_pretrained(staging)
        save_adapters(model, staging)
    return folder


def load_transformer(folder: str | Path, dtype: torch.dtype = torch.float32) -> LayerFlowTransformer3DModel:
    """A transformer written by :func:`save_transformer`, content adapter on and motion off."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder}: no config.json (expected a folder written by save_transformer)")
    model = LayerFlowTransformer3DModel.from_pretrained(folder, torch_dtype=dtype)
    load_adapters(model, folder)
    return model.eval()


def dit_config_of(model: LayerFlowTransformer3DModel) -> DiTConfig:
    """Our network's config back from the transformer's config and adapters."""
    c = model.config
    return DiTConfig(
        num_frames=c.sample_frames,
        text_length=c.max_text_seq_length,
        hidden_size=c.num_attention_heads * c.attention_head_dim,
        num_layers=c.num_layers,
        num_attention_heads=c.num_attention_heads,
        time_embed_dim=c.time_embed_dim,
        text_hidden_size=c.text_embed_dim,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        patch_size=c.patch_size,
        latent_height=c.sample_height,
        latent_width=c.sample_width,
        learnable_txt_embed=c.layer_embedding,
        learnable_pos_embed=c.learned_positions,
        height_interpolation=c.height_interpolation,
        width_interpolation=c.width_interpolation,
        time_interpolation=c.temporal_interpolation_scale,
        qk_ln=True,
        elementwise_affine=c.norm_elementwise_affine,
        lora=lora_config_of(model),
    )


def sat_state_from_transformer(model: LayerFlowTransformer3DModel) -> dict[str, torch.Tensor]:
    """Our network's state dict from the transformer (the round trip of :func:`transformer_from_sat`)."""
    return diffusers_to_sat(base_state(model), adapter_states(model), dit_config_of(model))
