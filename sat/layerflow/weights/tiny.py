"""A tiny T5 v1.1 encoder folder with seeded random weights, for tests and the weight-free demo.

``build_tiny_t5(folder)`` writes a complete transformers-format folder shaped like
``CogVideoX-2b-sat/t5-v1_1-xxl`` (``config.json``, ``model.safetensors``, ``spiece.model``,
``tokenizer_config.json``, ``special_tokens_map.json``), so the real loading code in
:mod:`layerflow.models.text_encoder` runs unchanged on it. Everything is made here, nothing is downloaded:

* the tokenizer is a small SentencePiece unigram model trained on a built-in corpus of
  video-description sentences, with T5's special ids (pad 0, eos 1, unk 2, no bos) and T5's
  ``nmt_nfkc`` normalisation; the tokenizer adds T5's 100 ``<extra_id_*>`` sentinels on top;
* the network is ``T5EncoderModel`` with the v1.1 architecture (gated-GELU feed-forward, untied
  head, relative position buckets) at a tiny width, its weights drawn from one
  ``torch.Generator(seed)`` in ``named_parameters()`` order: matrices N(0, 1/fan_in), the token
  embedding N(0, 1), the relative-position bias table 0.5·N(0, 1), RMS-norm weights 1 + 0.1·N(0, 1).

The same arguments give the same bytes on every machine (single-threaded trainer, no shuffling,
our own weight draws rather than the library's initialisers). The folder is written atomically.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from layerflow.io.atomic import atomic_path

T5_PAD_ID, T5_EOS_ID, T5_UNK_ID = 0, 1, 2
T5_EXTRA_IDS = 100  # <extra_id_0..99>, appended after the SentencePiece vocabulary by the tokenizer

_SUBJECTS = (
    "a brown bear",
    "a young woman",
    "an old man",
    "a small dog",
    "a white cat",
    "a red car",
    "a golden horse",
    "a little girl",
    "a boy",
    "a flock of birds",
    "a green turtle",
    "a gray shark",
    "a silver fish",
    "a tall giraffe",
    "an elephant",
    "a monkey",
    "a rabbit",
    "an orange fox",
    "a wolf",
    "a lion",
    "a tiger",
    "a sailing boat",
    "a wooden ship",
    "a dancer",
    "a child",
    "a cow",
    "a sheep",
    "a purple balloon",
    "a yellow kite",
    "a pink flower",
)
_ACTIONS = (
    "swimming",
    "walking slowly",
    "running quickly",
    "jumping",
    "dancing gracefully",
    "flying",
    "floating",
    "standing still",
    "sitting quietly",
    "turning around",
    "rolling",
    "playing",
    "eating",
    "drinking water",
    "looking at the camera",
    "waving",
    "smiling",
    "laughing",
    "reading a book",
    "holding a lamp",
    "glowing softly",
)
_PLACES = (
    "in the blue sea",
    "under the water surface",
    "in a dark forest",
    "on a busy city street",
    "across a wide field",
    "near a quiet lake",
    "on a sandy beach",
    "through the snow",
    "in the rain",
    "beside an ancient stone bridge",
    "in a modern kitchen",
    "in front of a window",
    "on top of a mountain",
    "inside a cave",
    "along a narrow river",
    "behind a wooden fence",
    "in a colorful garden",
    "over the desert",
    "at sunset",
    "at sunrise",
    "in the morning",
    "in the evening",
    "at night under the stars",
    "in a green park",
    "between tall buildings",
)
_BACKGROUNDS = (
    "The water surface is reflecting light, indicating that the water is clear and not murky.",
    "Sunlight falls through the leaves and the grass moves in the wind.",
    "Clouds drift across the sky while waves roll onto the shore.",
    "Smoke rises from a fire and shadows stretch over the rough rocks.",
    "Snow covers the hills and the cold air looks fresh and bright.",
    "Cars pass on the road, lights shine and people walk by.",
    "The room is warm, a candle burns on the table next to a mirror.",
)


def tiny_corpus(sentences: int = 600) -> list[str]:
    """Layer-prompt-like sentences ('0, In the video, ...') built deterministically from fixed word lists."""
    lines = []
    for k in range(sentences):
        subject = _SUBJECTS[k % len(_SUBJECTS)]
        action = _ACTIONS[(7 * k + 3) % len(_ACTIONS)]
        place = _PLACES[(11 * k + 5) % len(_PLACES)]
        background = _BACKGROUNDS[(k // 3) % len(_BACKGROUNDS)]
        lines.append(f"{k % 3}, In the video, there is {subject} {action} {place}. {background} ({k}); 'ok'!? #{k}")
    return lines


def train_tiny_spiece(vocab_size: int = 256) -> bytes:
    """A SentencePiece unigram model with T5's special ids, trained on :func:`tiny_corpus`."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=T5_PAD_ID,
        eos_id=T5_EOS_ID,
        unk_id=T5_UNK_ID,
        bos_id=-1,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def _randomize_t5_(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            draw = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("layer_norm.weight"):
                param.copy_(1.0 + 0.1 * draw)
            elif name.endswith("relative_attention_bias.weight"):
                param.copy_(0.5 * draw)
            elif name == "shared.weight":
                param.copy_(draw)
            else:
                param.copy_(draw / param.shape[-1] ** 0.5)


def _untied_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied tensor once (``encoder.embed_tokens`` is ``shared``), as transformers saves it."""
    state = model.state_dict()
    state.pop("encoder.embed_tokens.weight", None)
    return {name: tensor.contiguous() for name, tensor in state.items()}


def build_tiny_t5(
    folder: str | os.PathLike,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    d_kv: int = 16,
    d_ff: int = 64,
    spiece_vocab_size: int = 256,
    seed: int = 0,
) -> Path:
    """Write a tiny T5 v1.1 encoder folder (weights, config, tokenizer) at ``folder`` and return its path.

    An existing folder at that path is replaced once the new one is complete.
    """
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    spiece = train_tiny_spiece(spiece_vocab_size)
    config = T5Config(
        vocab_size=spiece_vocab_size + T5_EXTRA_IDS + 28,  # like 32000 + 100 + 28 = 32128 of the real model
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=T5_PAD_ID,
        eos_token_id=T5_EOS_ID,
        decoder_start_token_id=T5_PAD_ID,
    )
    model = T5EncoderModel(config).eval()
    _randomize_t5_(model, seed)
    special_tokens = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    tokenizer_config = {
        "tokenizer_class": "T5Tokenizer",
        "extra_ids": T5_EXTRA_IDS,
        "model_max_length": 226,
        **special_tokens,
    }
    with atomic_path(folder) as staging:
        staging.mkdir()
        config.save_pretrained(staging)
        save_file(_untied_state(model), str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "spiece.model").write_bytes(spiece)
        (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        (staging / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2) + "\n")
    return Path(folder)
