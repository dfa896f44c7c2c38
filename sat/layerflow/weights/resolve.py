"""Where the weights come from: the released files, or seeded random weights for the tiny model.

Real weights are never downloaded by this program (no hub calls); when a file is missing the
error names every missing path and where the original release publishes it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from layerflow.config import LayerFlowConfig
from layerflow.models.text_encoder import TextEncoderFilesError, check_t5_folder
from layerflow.weights.checkpoint import CheckpointError, release_folder_name, resolve_checkpoint_file

TASK_WEIGHTS_URL = "https://huggingface.co/zjuJish/LayerFlow (folder {folder})"
VAE_URL = "https://cloud.tsinghua.edu.cn/f/fdba7608a49c463ba754/?dl=1 (CogVideoX-2B SAT VAE, vae.zip)"
T5_URL = "https://huggingface.co/THUDM/CogVideoX-2b (folders text_encoder + tokenizer, as t5-v1_1-xxl)"
TINY_CACHE = Path(".cache") / "layerflow"


class MissingWeightsError(FileNotFoundError):
    """Weights files are missing; the message lists each one and where to get it."""


def missing_weights(config: LayerFlowConfig) -> list[str]:
    model = config.model
    problems = []
    try:
        resolve_checkpoint_file(model.checkpoint)
    except CheckpointError as error:
        folder = release_folder_name(config.layout)
        problems.append(f"task checkpoint: {error} -> download {TASK_WEIGHTS_URL.format(folder=folder)} "
                        f"into {model.checkpoint}")
    if not Path(model.vae.path).is_file():
        problems.append(f"VAE: {model.vae.path} not found -> {VAE_URL}, unzip into CogVideoX-2b-sat/")
    try:
        check_t5_folder(model.text_encoder.path)
    except TextEncoderFilesError as error:
        problems.append(f"T5 text encoder: {error} -> {T5_URL}")
    return problems


def check_weights(config: LayerFlowConfig) -> None:
    problems = missing_weights(config)
    if problems:
        raise MissingWeightsError("missing weights (see README, 'Real weights'): " + " | ".join(problems))


def prepare_random_weights(config: LayerFlowConfig, cache: Path = TINY_CACHE) -> LayerFlowConfig:
    """For ``model.weights: random``: make sure a tiny T5 folder of the configured width exists."""
    from layerflow.weights.tiny import build_tiny_t5

    width = config.model.network.text_hidden_size
    folder = Path(config.model.text_encoder.path)
    if not (folder / "config.json").is_file():
        folder = cache / f"tiny-t5-d{width}"
        if not (folder / "config.json").is_file():
            build_tiny_t5(folder, d_model=width)
    text_encoder = dataclasses.replace(config.model.text_encoder, path=str(folder))
    return dataclasses.replace(config, model=dataclasses.replace(config.model, text_encoder=text_encoder))
