"""Where the weights come from: the released files, or seeded random weights for the tiny model.

:func:`resolve_weights` is the one place that decides it; the loaders take its :class:`Weights`.

Real weights are never downloaded by this program (no hub calls); when a file is missing the
error names every missing path and where the original release publishes it.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from layerflow.config import LayerFlowConfig
from layerflow.models.text_encoder import TextEncoderFilesError, check_t5_folder
from layerflow.weights.checkpoint import CheckpointNotFoundError, resolve_checkpoint_file

VAE_URL = "https://cloud.tsinghua.edu.cn/f/fdba7608a49c463ba754/?dl=1 (CogVideoX-2B SAT VAE, vae.zip)"
T5_URL = "https://huggingface.co/THUDM/CogVideoX-2b (folders text_encoder + tokenizer, as t5-v1_1-xxl)"
CACHE_ENV = "LAYERFLOW_CACHE"


def cache_dir() -> Path:
    """Where built files (the tiny T5 stand-in) are kept: ``$LAYERFLOW_CACHE``, else
    ``$XDG_CACHE_HOME/layerflow``, else ``~/.cache/layerflow``; never the current folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "layerflow"


class MissingWeightsError(FileNotFoundError):
    """Weights files are missing; the message lists each one and where to get it."""


def _missing_weights(config: LayerFlowConfig) -> list[str]:
    model = config.model
    problems = []
    try:
        resolve_checkpoint_file(model.checkpoint)
    except CheckpointNotFoundError as error:  # a corrupt one (e.g. its 'latest' file) is no download problem
        problems.append(f"task checkpoint: {error} -> download {config.layout.download} into {model.checkpoint}")
    if not Path(model.vae.path).is_file():
        problems.append(f"VAE: {model.vae.path} not found -> {VAE_URL}, unzip into CogVideoX-2b-sat/")
    try:
        check_t5_folder(model.text_encoder.path)
    except TextEncoderFilesError as error:
        problems.append(f"T5 text encoder: {error} -> {T5_URL}")
    return problems


@dataclass(frozen=True)
class Weights:
    """Where each model's weights come from, decided once by :func:`resolve_weights`.

    ``random``: seeded random network and VAE (no files); otherwise ``checkpoint`` (a release
    folder or a ``.safetensors`` file) and ``vae`` are read. ``text_encoder`` is the T5 folder to
    load in both cases; ``stand_in_t5`` says it is the tiny built-in one, not the configured folder.
    """

    random: bool
    checkpoint: str
    vae: str
    text_encoder: Path
    stand_in_t5: bool = False

    @property
    def description(self) -> str:
        """What ``meta.json`` records as the checkpoint."""
        return "random weights" if self.random else self.checkpoint


def resolve_weights(config: LayerFlowConfig, cache: Path | None = None, check: bool = True) -> Weights:
    """Decide where the weights of ``config`` come from; the config itself is never changed.

    ``model.weights: random`` uses the configured T5 folder when it exists, else a tiny T5 of the
    configured width under ``cache`` (default :func:`cache_dir`; built once). Otherwise, with
    ``check``, every missing file is named in one :class:`MissingWeightsError` line
    (``check=False``: a resumed training run whose encodings are all cached needs no VAE or T5 files).
    """
    model = config.model
    configured = Path(model.text_encoder.path)
    if model.weights == "random":
        if model.text_encoder.path and (configured / "config.json").is_file():
            return Weights(random=True, checkpoint="", vae="", text_encoder=configured)
        return Weights(
            random=True,
            checkpoint="",
            vae="",
            stand_in_t5=True,
            text_encoder=_tiny_t5(cache or cache_dir(), model.network.text_hidden_size),
        )
    if check:
        problems = _missing_weights(config)
        if problems:
            raise MissingWeightsError("missing weights (see README, 'Real weights'): " + " | ".join(problems))
    return Weights(random=False, checkpoint=model.checkpoint, vae=model.vae.path, text_encoder=configured)


def _tiny_t5(cache: Path, width: int) -> Path:
    """The tiny T5 of ``width`` under ``cache``, built by the first process that needs it (the others wait)."""
    from layerflow.weights.tiny import build_tiny_t5

    folder = cache / f"tiny-t5-d{width}"
    if (folder / "config.json").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # torchrun ranks start together: one builds, one reuses
        if not (folder / "config.json").is_file():
            build_tiny_t5(folder, d_model=width)
    return folder
