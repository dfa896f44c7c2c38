"""T5 text encoder: local-only loading, the original's tokenizer call, per-layer segments, freeing.

The tiny T5 folder comes from ``layerflow.weights.tiny.build_tiny_t5``; expected values are computed
independently, with SentencePiece and transformers' ``T5EncoderModel`` called directly.
"""

import shutil
import socket
import weakref

import huggingface_hub
import pytest
import sentencepiece
import torch
import transformers.utils.hub
from transformers import T5EncoderModel

from layerflow.geometry import TOKENS_PER_PROMPT
from layerflow.models.text_encoder import (
    T5TextEncoder,
    TextEncoderFilesError,
    check_t5_folder,
    layer_prompts,
    unconditional_states,
)
from layerflow.weights.tiny import build_tiny_t5

WIDTH = 32
PROMPTS = [
    "0, In the video, there is a brown bear swimming in the water.",
    "1, A scene underwater, the water surface is reflecting light.",
    "2, In the video, there is a bear swimming under the water surface in the blue sea.",
    "3, a dog",
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs offline: a socket connection or a hub download fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    for module in (huggingface_hub, huggingface_hub.file_download, transformers.utils.hub):
        for name in ("hf_hub_download", "snapshot_download"):
            monkeypatch.setattr(module, name, refuse, raising=False)


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("t5") / "tiny-t5", d_model=WIDTH)


@pytest.fixture(scope="module")
def encoder(t5_folder):
    return T5TextEncoder.from_folder(t5_folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def spiece(t5_folder):
    return sentencepiece.SentencePieceProcessor(model_file=str(t5_folder / "spiece.model"))


def reference_ids(spiece, text):
    """The original tokenizer call, spelled out: pieces cut to 225, EOS (1), pad (0) up to 226."""
    ids = spiece.encode(text)[: TOKENS_PER_PROMPT - 1] + [1]
    return ids + [0] * (TOKENS_PER_PROMPT - len(ids))


@pytest.fixture(scope="module")
def reference_states(t5_folder, spiece):
    """transformers' T5 encoder called directly on SentencePiece ids, without an attention mask."""
    model = T5EncoderModel.from_pretrained(t5_folder, local_files_only=True, dtype=torch.float32).eval()

    def states(texts, attention_mask=None):
        ids = torch.tensor([reference_ids(spiece, text) for text in texts])
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=attention_mask).last_hidden_state

    return states


# -- prompts -------------------------------------------------------------------------------------


def test_layer_prompts_two_layers():
    assert layer_prompts(["a cat", "a garden"]) == ["0, a cat", "1, a garden"]


def test_layer_prompts_three_layers():
    assert layer_prompts(["fg text.", "bg text.", "blend text."]) == ["0, fg text.", "1, bg text.", "2, blend text."]


def test_layer_prompts_rejects_a_single_string():
    with pytest.raises(TypeError, match="list of strings"):
        layer_prompts("a cat")


# -- tokenizer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [PROMPTS[0], "", "  two  spaces,tabs\tand\nnewlines ", "Ünïcödé ﬁ ① 12345!?"])
def test_token_ids_are_sentencepiece_then_eos_then_pad(encoder, spiece, text):
    ids = encoder.tokenize([text])
    assert ids.shape == (1, TOKENS_PER_PROMPT)
    assert ids[0].tolist() == reference_ids(spiece, text)


def test_long_prompt_is_cut_to_225_pieces_and_eos(encoder, spiece):
    text = "1, " + " ".join(["a brown bear swimming in the blue sea"] * 60)
    pieces = spiece.encode(text)
    assert len(pieces) > TOKENS_PER_PROMPT
    ids = encoder.tokenize([text])[0].tolist()
    assert len(ids) == TOKENS_PER_PROMPT
    assert ids[:-1] == pieces[: TOKENS_PER_PROMPT - 1]
    assert ids[-1] == spiece.eos_id() == 1


def test_empty_prompt_is_eos_and_padding(encoder):
    ids = encoder.tokenize([""])[0].tolist()
    assert ids == [1] + [0] * (TOKENS_PER_PROMPT - 1)


# -- encoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3, 4])
def test_encode_matches_direct_t5_call_without_mask(encoder, reference_states, count):
    texts = PROMPTS[:count]
    states = encoder.encode(texts)
    assert states.shape == (count, TOKENS_PER_PROMPT, WIDTH)
    assert states.dtype == torch.float32
    torch.testing.assert_close(states, reference_states(texts), atol=1e-5, rtol=1e-5)


def test_padding_is_not_masked(encoder, reference_states):
    """The original passes no attention mask; with a mask the states would differ visibly."""
    text = [PROMPTS[1]]
    ids = encoder.tokenize(text)
    masked = reference_states(text, attention_mask=(ids != 0).long())
    assert (encoder.encode(text) - masked).abs().max() > 1e-3


def test_segments_follow_prompt_order(encoder):
    texts = PROMPTS[:3]
    states = encoder.encode(texts)
    order = [2, 0, 1]
    permuted = encoder.encode([texts[k] for k in order])
    torch.testing.assert_close(permuted, states[order], atol=1e-5, rtol=1e-5)
    for k, text in enumerate(texts):
        torch.testing.assert_close(states[k], encoder.encode([text])[0], atol=1e-5, rtol=1e-5)


def test_encode_layers_lays_prefixed_segments_end_to_end(encoder, reference_states):
    layers = ["a bear swimming.", "the blue sea.", "a bear in the sea."]
    sequence = encoder.encode_layers(layers)
    assert sequence.shape == (1, len(layers) * TOKENS_PER_PROMPT, WIDTH)
    expected = reference_states([f"{k}, {text}" for k, text in enumerate(layers)])
    for k in range(len(layers)):
        segment = sequence[0, k * TOKENS_PER_PROMPT : (k + 1) * TOKENS_PER_PROMPT]
        torch.testing.assert_close(segment, expected[k], atol=1e-5, rtol=1e-5)


def test_unconditional_states_are_zeros_like(encoder):
    c = encoder.encode(PROMPTS[:2]).to(torch.bfloat16)
    uc = unconditional_states(c)
    assert uc.shape == c.shape and uc.dtype == c.dtype and uc.device == c.device
    assert not uc.any()


def test_bfloat16_load_casts_every_parameter(t5_folder):
    encoder = T5TextEncoder.from_folder(t5_folder, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in encoder.model.parameters()} == {torch.bfloat16}
    assert encoder.encode(PROMPTS[:2]).dtype == torch.bfloat16


def test_encode_rejects_a_bare_string(encoder):
    with pytest.raises(TypeError, match="list of strings"):
        encoder.encode(PROMPTS[0])


# -- memory --------------------------------------------------------------------------------------


def test_keep_false_releases_the_weights(t5_folder):
    encoder = T5TextEncoder.from_folder(t5_folder, device="cpu", dtype=torch.float32)
    model = encoder.model
    states = encoder.encode(PROMPTS[:2], keep=False)
    assert states.shape == (2, TOKENS_PER_PROMPT, WIDTH)
    assert encoder.released and encoder.model is None
    assert {p.device.type for p in model.parameters()} == {"meta"}
    module = weakref.ref(model)
    del model
    assert module() is None
    with pytest.raises(RuntimeError, match="released"):
        encoder.encode(PROMPTS[:1])


def test_keep_true_keeps_the_encoder(encoder):
    encoder.encode(PROMPTS[:1], keep=True)
    assert not encoder.released
    assert {p.device.type for p in encoder.model.parameters()} == {"cpu"}


def test_offload_then_encode_gives_the_same_states(t5_folder):
    encoder = T5TextEncoder.from_folder(t5_folder, device="cpu", dtype=torch.float32)
    before = encoder.encode(PROMPTS[:2])
    encoder.offload()
    assert {p.device.type for p in encoder.model.parameters()} == {"cpu"}
    torch.testing.assert_close(encoder.encode(PROMPTS[:2]), before, atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_moves_the_weights_off_the_gpu(t5_folder):
    encoder = T5TextEncoder.from_folder(t5_folder, device="cuda", dtype=torch.bfloat16)
    assert {p.device.type for p in encoder.model.parameters()} == {"cuda"}
    assert encoder.encode(PROMPTS[:2]).dtype == torch.bfloat16
    encoder.offload()
    assert {p.device.type for p in encoder.model.parameters()} == {"cpu"}
    assert encoder.encode(PROMPTS[:2]).device.type == "cuda"


# -- files ---------------------------------------------------------------------------------------


@pytest.fixture
def folder_copy(t5_folder, tmp_path):
    return shutil.copytree(t5_folder, tmp_path / "t5-v1_1-xxl")


def test_missing_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TextEncoderFilesError, match=r"google/t5-v1_1-xxl not found"):
        T5TextEncoder.from_folder("google/t5-v1_1-xxl")


def test_missing_config_is_named(folder_copy):
    (folder_copy / "config.json").unlink()
    with pytest.raises(TextEncoderFilesError, match=r"t5-v1_1-xxl/config\.json not found"):
        T5TextEncoder.from_folder(folder_copy)


def test_missing_weights_are_named(folder_copy):
    (folder_copy / "model.safetensors").unlink()
    expected = r"weights not found in .*t5-v1_1-xxl: expected one of model\.safetensors"
    with pytest.raises(TextEncoderFilesError, match=expected):
        T5TextEncoder.from_folder(folder_copy)


def test_missing_shard_is_named(folder_copy):
    index = '{"metadata": {}, "weight_map": {"shared.weight": "model-00002-of-00002.safetensors"}}'
    (folder_copy / "model.safetensors").unlink()
    (folder_copy / "model.safetensors.index.json").write_text(index)
    with pytest.raises(TextEncoderFilesError, match=r"model-00002-of-00002\.safetensors \(listed in"):
        T5TextEncoder.from_folder(folder_copy)


def test_missing_tokenizer_is_named(folder_copy):
    (folder_copy / "spiece.model").unlink()
    with pytest.raises(TextEncoderFilesError, match=r"t5-v1_1-xxl/spiece\.model not found"):
        T5TextEncoder.from_folder(folder_copy)


def test_a_folder_of_another_model_is_refused(folder_copy):
    (folder_copy / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(TextEncoderFilesError, match="model_type 'clip', expected 't5'"):
        check_t5_folder(folder_copy)


def test_builder_is_deterministic(t5_folder, tmp_path):
    again = build_tiny_t5(tmp_path / "again", d_model=WIDTH)
    for name in ("model.safetensors", "spiece.model", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (t5_folder / name).read_bytes(), name
