"""The T5 v1.1 XXL text encoder of CogVideoX, as LayerFlow conditions each layer on its own prompt.

LayerFlow (arXiv 2506.04228) gives every layer a prompt of its own and tells the layers apart by a
numeric prefix: layer k's prompt becomes ``f"{k}, {prompt}"`` (fg ``'0, '``, bg ``'1, '``, blend
``'2, '``; decomposition has only fg and bg). Each prefixed prompt is encoded on its own into a
226-token segment, and the segments are laid end to end in layer order, so prompt k owns text tokens
[226k, 226k + 226) of the network's text sequence.

What the original ``FrozenT5Embedder`` does, and we repeat:

* tokenizer: ``T5Tokenizer`` of the folder, ``max_length=226``, ``truncation=True``,
  ``padding="max_length"``: SentencePiece pieces, cut to 225 when longer, then EOS (id 1), then pad
  (id 0) up to 226. An empty prompt is EOS followed by 225 pads; it is encoded like any other.
* all prompts of a sample go through the encoder as one batch, **without an attention mask**: the
  pad tokens take part in self-attention, and all 226 output states (pads included) are used.
* the output is ``last_hidden_state``, with autocast switched off, in the encoder's own dtype (the
  original engine is cast to bfloat16 as a whole, T5 included, and the states are not cast again).
* the unconditional text for classifier-free guidance is not encoded at all: it is
  ``zeros_like(c)`` (``force_uc_zero_embeddings``), see :func:`unconditional_states`.

Loading is strictly local: the folder is checked first (a missing folder or file raises
:class:`TextEncoderFilesError` naming it) and transformers is called with ``local_files_only=True``,
so a path is never taken for a hub repository id and nothing is downloaded.

Legend: n prompts (layers), L tokens per prompt (226), e T5 width (4096 for XXL).
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from layerflow.geometry import TOKENS_PER_PROMPT

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "spiece.model"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
WEIGHTS_HELP = "see README.md, 'Real weights' (THUDM/CogVideoX-2b folders text_encoder + tokenizer)"


class TextEncoderFilesError(FileNotFoundError):
    """The T5 folder or one of its files is missing or unusable (the message names which)."""


def layer_prompt(index: int, prompt: str) -> str:
    """Prompt of layer ``index`` as the LayerFlow data code writes it: ``'0, ' + prompt`` for layer 0."""
    return f"{index}, {prompt}"


def layer_prompts(prompts_by_layer: Sequence[str]) -> list[str]:
    """Per-layer prompts in layer order (fg, bg[, blend]) -> the prefixed texts the encoder sees."""
    if isinstance(prompts_by_layer, str):
        raise TypeError("layer_prompts takes one prompt per layer (a list of strings), not a single string")
    return [layer_prompt(index, prompt) for index, prompt in enumerate(prompts_by_layer)]


def unconditional_states(states: torch.Tensor) -> torch.Tensor:
    """The original's negative text for guidance: zeros of the conditional states' shape, dtype and device."""
    return torch.zeros_like(states)


def _weights_in(folder: Path) -> Path:
    """The weights entry point of a transformers folder; for a sharded index, every listed shard must exist."""
    present = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise TextEncoderFilesError(
            f"T5 text encoder weights not found in {folder}: expected one of {', '.join(WEIGHT_FILES)} ({WEIGHTS_HELP})"
        )
    entry = present[0]
    if entry.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(entry.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as error:
            raise TextEncoderFilesError(f"{entry} is not a weight index with a 'weight_map' ({error})") from error
        for shard in shards:
            if not (folder / shard).is_file():
                raise TextEncoderFilesError(
                    f"T5 weight shard {folder / shard} (listed in {entry.name}) not found ({WEIGHTS_HELP})"
                )
    return entry


def check_t5_folder(folder: str | os.PathLike) -> Path:
    """Make sure ``folder`` holds a T5 encoder in transformers format; return it as an absolute path.

    Needed: ``config.json`` (``model_type`` t5), the weights (``model.safetensors``, a sharded
    ``model.safetensors.index.json`` with its shards, or the ``pytorch_model.bin`` equivalents) and
    the SentencePiece model ``spiece.model``.
    """
    path = Path(folder).expanduser().absolute()
    if not path.is_dir():
        raise TextEncoderFilesError(
            f"T5 text encoder folder {path} not found: it should hold {CONFIG_FILE}, the model weights and "
            f"{TOKENIZER_FILE} ({WEIGHTS_HELP})"
        )
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise TextEncoderFilesError(f"T5 text encoder config {config_path} not found ({WEIGHTS_HELP})")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (ValueError, AttributeError) as error:
        raise TextEncoderFilesError(f"{config_path} is not a JSON object ({error})") from error
    if model_type != "t5":
        raise TextEncoderFilesError(f"{config_path} has model_type {model_type!r}, expected 't5'")
    _weights_in(path)
    if not (path / TOKENIZER_FILE).is_file():
        raise TextEncoderFilesError(f"T5 tokenizer model {path / TOKENIZER_FILE} not found ({WEIGHTS_HELP})")
    return path


class T5TextEncoder:
    """A frozen T5 encoder and its tokenizer: prompts in, (n, 226, e) text states out.

    The encoder computes on ``device``. Between uses it can be parked on the CPU with
    :meth:`offload` (the next :meth:`encode` brings it back) or dropped with :meth:`release`.
    """

    def __init__(
        self, tokenizer, model: torch.nn.Module, device: torch.device, folder: Path, max_length: int = TOKENS_PER_PROMPT
    ):
        self.tokenizer = tokenizer
        self.model: torch.nn.Module | None = model
        self.device = torch.device(device)
        self.folder = folder
        self.max_length = max_length

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = TOKENS_PER_PROMPT,
    ) -> T5TextEncoder:
        """Load tokenizer and encoder from a local transformers folder such as ``CogVideoX-2b-sat/t5-v1_1-xxl``.

        Every parameter ends up in ``dtype`` (the pipeline passes the placement's), including the
        feed-forward output projections (``wo``) that transformers would otherwise keep in float32:
        the original casts its whole engine, T5 included.
        """
        from transformers import T5EncoderModel, T5Tokenizer

        path = check_t5_folder(folder)
        device = torch.device(device)
        tokenizer = T5Tokenizer.from_pretrained(path, local_files_only=True)
        model = T5EncoderModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return cls(tokenizer, model, device, path, max_length)

    @property
    def released(self) -> bool:
        return self.model is None

    @property
    def width(self) -> int:
        """e, the size of one text state."""
        return self._live_model().config.d_model

    def _live_model(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError(
                f"the T5 encoder from {self.folder} was released; load it again with T5TextEncoder.from_folder"
            )
        return self.model

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> token ids (n, L): pieces cut to L-1, EOS, then pad, as the original tokenizer call."""
        if isinstance(prompts, str) or not all(isinstance(prompt, str) for prompt in prompts):
            raise TypeError("prompts must be a list of strings, one per layer")
        if len(prompts) == 0:
            raise ValueError("no prompts to encode")
        batch = self.tokenizer(
            list(prompts), truncation=True, max_length=self.max_length, padding="max_length", return_tensors="pt"
        )
        return batch["input_ids"]  # (n, L)

    def token_count(self, prompt: str) -> int:
        """How many tokens ``prompt`` has before truncation (EOS included); more than L are cut."""
        return len(self.tokenizer(prompt, truncation=False)["input_ids"])

    def encode(self, prompts: Sequence[str], keep: bool = True) -> torch.Tensor:
        """Prompts -> text states (n, L, e) on ``device``, row k for ``prompts[k]``.

        The prompts are used as given (prefix them with :func:`layer_prompts`). With ``keep=False``
        the encoder is released afterwards.
        """
        model = self._live_model().to(self.device)
        input_ids = self.tokenize(prompts).to(self.device)  # (n, L)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=False):
            states = model(input_ids=input_ids).last_hidden_state  # (n, L, e)
        if not keep:
            self.release()
        return states

    def encode_layers(self, prompts_by_layer: Sequence[str], keep: bool = True) -> torch.Tensor:
        """Per-layer prompts (fg, bg[, blend]) -> the network's text sequence (1, n·L, e), layer k at [kL, kL+L)."""
        states = self.encode(layer_prompts(prompts_by_layer), keep=keep)  # (n, L, e)
        return states.reshape(1, -1, states.shape[-1])  # (1, n·L, e)

    def offload(self) -> None:
        """Park the encoder in CPU memory (freeing the accelerator); the next :meth:`encode` moves it back."""
        self._live_model().to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def release(self) -> None:
        """Free the encoder's weights: its parameters become storage-less ``meta`` tensors and it is dropped."""
        if self.model is None:
            return
        self.model.to("meta")
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
