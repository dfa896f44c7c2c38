"""Which parameters train, and where the starting weights come from.

Parameter groups (``training.trainable``), by the released checkpoints' parameter names:

* ``content_lora``    the always-on high-rank LoRA (``matrix_C``, ``matrix_D``);
* ``motion_lora``     the switchable low-rank LoRA (``matrix_A``, ``matrix_B``);
* ``layer_embedding`` the learned layer-index embedding of the prompts (``txt_embedder``);
* ``transformer``     every other weight of the network except the fixed sin-cos position table.

``training.layers`` narrows the per-layer groups to some transformer layers (the released
content LoRA trained every sixth layer: 5, 11, 17, 23, 29). Everything else is frozen.

Starting points (``training.init``): ``release`` loads a LayerFlow checkpoint strictly (to
continue a stage); ``cogvideox`` loads the CogVideoX-2B SAT transformer, keeps the position
table computed for the task's clip length, and starts the LoRA branches (A, C Kaiming-uniform,
B, D zero, so the network starts as the base model) and the layer embedding fresh.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable

import torch
from torch import nn

from layerflow.config import ConfigError
from layerflow.tasks import TaskLayout
from layerflow.weights.checkpoint import (
    CheckpointError,
    load_network,
    network_state,
    read_checkpoint,
    resolve_checkpoint_file,
)

log = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"^(?:transformer\.layers|mixins\.adaln_layer\.\w+)\.(\d+)\.")
_GROUP_PATTERNS = {
    "content_lora": re.compile(r"\.matrix_[CD]\.\d+$"),
    "motion_lora": re.compile(r"\.matrix_[AB]\.\d+$"),
    "layer_embedding": re.compile(r"^mixins\.pos_embed\.txt_embedder\."),
}
_NEVER_TRAINED = re.compile(r"^mixins\.pos_embed\.pos_embedding$")


def parameter_group(name: str) -> str | None:
    """The group a parameter name belongs to; ``None`` for the fixed position table."""
    if _NEVER_TRAINED.match(name):
        return None
    for group, pattern in _GROUP_PATTERNS.items():
        if pattern.search(name):
            return group
    return "transformer"


def layer_index(name: str) -> int | None:
    match = _LAYER_INDEX.match(name)
    return int(match.group(1)) if match else None


def select_trainable(network: nn.Module, groups: Iterable[str], layers: Iterable[int] = ()) -> list[str]:
    """Set ``requires_grad`` on the chosen groups (and layers) only; returns the trainable names in order."""
    groups, layers = set(groups), set(layers)
    names = []
    for name, param in network.named_parameters():
        group, index = parameter_group(name), layer_index(name)
        # with a layer list, per-layer weights train in those layers only, and the transformer's
        # shared weights (time, patch and final layers) stay frozen as in the original's recipe
        in_layers = not layers or (index in layers if index is not None else group != "transformer")
        chosen = group in groups and in_layers
        param.requires_grad_(chosen)
        if chosen:
            names.append(name)
    if not names:
        raise ConfigError(
            f"training.trainable {sorted(groups)} with layers {sorted(layers) or 'all'} selects no "
            f"parameter of this network"
        )
    return names


def describe_trainable(network: nn.Module, groups: Iterable[str]) -> str:
    """One line: tensors and parameters that train per requested group (a group may not exist in a task)."""
    parts = []
    for group in groups:
        params = [p for n, p in network.named_parameters() if p.requires_grad and parameter_group(n) == group]
        count = sum(p.numel() for p in params)
        parts.append(f"{group}: {len(params)} tensors, {count:,} parameters" if params else f"{group}: none here")
    return "; ".join(parts)


@torch.no_grad()
def init_fresh_branches(network: nn.Module) -> None:
    """LoRA as the original initialises it: down-projections (A, C) Kaiming-uniform, up-projections zero."""
    for name, param in network.named_parameters():
        if re.search(r"\.matrix_[AC]\.\d+$", name):
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        elif re.search(r"\.matrix_[BD]\.\d+$", name):
            param.zero_()


def load_checkpoint_weights(network: nn.Module, path: str, init: str, layout: TaskLayout) -> None:
    """Fill ``network`` from a LayerFlow checkpoint (strict) or from CogVideoX-2B SAT weights."""
    if init == "release":
        load_network(network, path, layout)
        return
    source = str(resolve_checkpoint_file(path))
    state = network_state(read_checkpoint(path)[0], source)
    expected = network.state_dict()
    base_keys = [key for key in expected if parameter_group(key) == "transformer"]
    renamed = {_lora_name(key): key for key in state}
    missing = [key for key in base_keys if key not in renamed]
    wrong = [key for key in base_keys if key in renamed and state[renamed[key]].shape != expected[key].shape]
    if missing or wrong:
        shown = ", ".join((missing + wrong)[:6])
        raise CheckpointError(f"{source}: not CogVideoX-2B SAT weights of this size; missing or misshaped: {shown}")
    init_fresh_branches(network)
    for key in base_keys:
        expected[key].copy_(state[renamed[key]])
    log.info("%s: %d base tensors loaded; LoRA, layer embedding and position table start fresh", source, len(base_keys))


def _lora_name(key: str) -> str:
    """CogVideoX names its attention projections ``query_key_value.weight``; ours wrap them as ``.original``."""
    return re.sub(r"\.attention\.(query_key_value|dense)\.(weight|bias)$", r".attention.\1.original.\2", key)
