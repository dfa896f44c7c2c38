"""Our dual LoRA (:mod:`layerflow.models.lora`) as two peft adapters on the attention projections.

Per projection (``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` of every block) SAT adds

    s * B A x * alpha / r_motion + D C x * alpha / r_content        (alpha = lora_alpha, 1 in the release)

which is two peft LoRA adapters on the same modules: ``content`` (lora_A = C, lora_B = D, rank
``spatial_r``), always on, and ``motion`` (lora_A = A, lora_B = B, rank ``motion_r``), present but
off at inference (the original passes s = 0). peft scales an adapter by ``lora_alpha / r`` times
its weight, so both adapters carry SAT's ``lora_alpha`` (not the rank, which would make the scale 1);
:func:`set_motion_scale` switches the motion adapter on with weight s, which gives SAT's
``lora_scale=s``. Stage-1 networks (motion only, always on) are not exported.

On disk the adapters are diffusers' CogVideoX LoRA files (``CogVideoXLoraLoaderMixin.save_lora_weights``:
keys prefixed ``transformer.``, the peft config with ranks and alpha in the metadata), one per
adapter, ``content_lora.safetensors`` and ``motion_lora.safetensors`` beside the model's weights.
So both ``transformer.load_lora_adapter(folder, weight_name=..., adapter_name=...)`` and a
pipeline's ``load_lora_weights(folder, weight_name=..., adapter_name=...)`` restore them with the
right scale. One weight per adapter: a per-sample motion switch (SAT's tensor ``lora_scale``) is not
expressible with peft.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers.loaders import CogVideoXLoraLoaderMixin
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict

from layerflow.for_diffusers.transformer import ExportError, LayerFlowTransformer3DModel
from layerflow.for_diffusers.transformer_keys import ADAPTERS, CONTENT, MOTION, check_keys
from layerflow.models.lora import LoraConfig

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
ADAPTER_FILES = {name: f"{name}_lora.safetensors" for name in ADAPTERS}


def adapter_configs(lora: LoraConfig) -> dict[str, PeftLoraConfig]:
    """peft configs of the two adapters: ranks spatial_r (content) and motion_r, SAT's alpha for both."""
    ranks = {CONTENT: lora.spatial_r, MOTION: lora.motion_r}
    return {
        name: PeftLoraConfig(
            r=rank, lora_alpha=lora.lora_alpha, lora_dropout=0.0, target_modules=TARGET_MODULES, bias="none"
        )
        for name, rank in ranks.items()
    }


def add_adapters(model: LayerFlowTransformer3DModel, lora: LoraConfig) -> None:
    """Inject both adapters (values to be loaded), then leave only ``content`` active."""
    with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the design
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        for name, config in adapter_configs(lora).items():
            model.add_adapter(config, adapter_name=name)
    set_motion_scale(model, 0.0)


def peft_key(key: str, adapter: str) -> str:
    """A saved peft name (``...to_q.lora_A.weight``) as the model holds it (``...lora_A.content.weight``)."""
    stem, _, parameter = key.rpartition(".")
    return f"{stem}.{adapter}.{parameter}"


def base_key(key: str) -> str:
    """A base tensor's name in a model with adapters, as diffusers names it without (no ``base_layer``)."""
    return key.replace(".base_layer.", ".")


def is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def model_state(base: Mapping[str, torch.Tensor], adapters: Mapping[str, Mapping[str, torch.Tensor]]) -> dict:
    """The state dict of a model with the adapters injected, from plain base names and saved peft names."""
    state = {}
    for key, value in base.items():
        stem, _, parameter = key.rpartition(".")
        wrapped = bool(adapters) and any(stem.endswith(f".{name}") for name in TARGET_MODULES)
        state[f"{stem}.base_layer.{parameter}" if wrapped else key] = value
    for adapter, tensors in adapters.items():
        state.update({peft_key(key, adapter): value for key, value in tensors.items()})
    return state


def base_state(model: LayerFlowTransformer3DModel) -> dict[str, torch.Tensor]:
    """The model's tensors without the adapters, under diffusers' plain names."""
    return {base_key(key): value for key, value in model.state_dict().items() if not is_adapter_key(key)}


def adapter_states(model: LayerFlowTransformer3DModel) -> dict[str, dict[str, torch.Tensor]]:
    """{adapter: its tensors under peft's saved names}; empty for a model without adapters."""
    names = list(getattr(model, "peft_config", {}))
    check_keys(names, ADAPTERS if names else [], "transformer", "a LayerFlow transformer's adapters")
    return {name: get_peft_model_state_dict(model, adapter_name=name) for name in names}


def lora_config_of(model: LayerFlowTransformer3DModel) -> LoraConfig | None:
    """Our LoRA config back from the model's adapters (None without)."""
    configs = getattr(model, "peft_config", {})
    if not configs:
        return None
    content, motion = configs[CONTENT], configs[MOTION]
    if content.lora_alpha != motion.lora_alpha:
        raise ExportError(
            f"the adapters' lora_alpha differ (content {content.lora_alpha}, motion {motion.lora_alpha}); "
            f"SAT's LoRA has one alpha"
        )
    return LoraConfig(motion_r=motion.r, spatial_r=content.r, lora_alpha=float(content.lora_alpha))


def set_motion_scale(model: LayerFlowTransformer3DModel, scale: float) -> None:
    """SAT's ``lora_scale``: 0 leaves only ``content`` on; s != 0 adds ``motion`` with weight s."""
    if scale == 0:
        model.set_adapters([CONTENT])
    else:
        model.set_adapters([CONTENT, MOTION], [1.0, float(scale)])


def save_adapters(model: LayerFlowTransformer3DModel, folder: Path) -> None:
    """Write each adapter as a diffusers CogVideoX LoRA file (peft config in its metadata) into ``folder``."""
    for name, tensors in adapter_states(model).items():
        CogVideoXLoraLoaderMixin.save_lora_weights(
            str(folder),
            transformer_lora_layers=tensors,
            weight_name=ADAPTER_FILES[name],
            transformer_lora_adapter_metadata=model.peft_config[name].to_dict(),
        )


def load_adapters(model: LayerFlowTransformer3DModel, folder: Path) -> None:
    """Attach the adapters saved by :func:`save_adapters`, content on and motion off; both files or none."""
    present = {name for name, file in ADAPTER_FILES.items() if (folder / file).is_file()}
    if not present:
        return
    if present != set(ADAPTERS):
        missing = ", ".join(str(folder / ADAPTER_FILES[name]) for name in ADAPTERS if name not in present)
        raise ExportError(f"{missing}: missing (a LayerFlow transformer has both the content and motion LoRA)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        for name in ADAPTERS:
            model.load_lora_adapter(str(folder), weight_name=ADAPTER_FILES[name], adapter_name=name)
    set_motion_scale(model, 0.0)
