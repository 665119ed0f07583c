"""GGUF files through the real loading path: conversion, the cache, and the load errors users see.

The files are written here from the tiny random-weight model, the way llama.cpp's converter
writes a llama checkpoint (q/k projections permuted for GGML's rope), so a correct conversion
must give exactly the greedy text of the directory it came from.
"""

from __future__ import annotations

import json
import os
import pathlib

import mlx.core as mx
import pytest

from forgellm.backends.mlx import automatic_gguf_weights
from forgellm.backends.mlx.sources.model_cache import CONVERTER_VERSION, sha256_of
from forgellm.testing import test_client, wait_until_loaded

PROMPT = {"prompt": "tell me about tokens", "max_tokens": 12, "temperature": 0}
# Loads a client asks for are explained (why a file does not load) only where the operator confined them
# with --allow-model; "*" confines nothing but turns the explanations on.
EXPLAINED = {"allow_model": ("*",)}

_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _ggml_permuted(weight: mx.array, heads: int) -> mx.array:
    """llama.cpp's permutation of a q/k projection: each head's halves interleaved for GGML's rope."""
    out, inp = weight.shape
    return weight.reshape(heads, 2, out // heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def write_gguf(model_dir: pathlib.Path, target: pathlib.Path, *, architecture: str = "llama") -> pathlib.Path:
    """The tiny model as a GGUF file of the given architecture (float32 tensors)."""
    config = json.loads((model_dir / "config.json").read_text())
    weights = mx.load(str(model_dir / "model.safetensors"))
    tensors = {}
    for name, tensor in weights.items():
        if name == "model.embed_tokens.weight":
            tensors["token_embd.weight"] = tensor
        elif name == "model.norm.weight":
            tensors["output_norm.weight"] = tensor
        elif name == "lm_head.weight":
            tensors["output.weight"] = tensor
        else:
            _, _, layer, rest = name.split(".", 3)
            module, part = rest.rsplit(".", 1)
            if architecture == "llama" and module == "self_attn.q_proj":
                tensor = _ggml_permuted(tensor, config["num_attention_heads"])
            elif architecture == "llama" and module == "self_attn.k_proj":
                tensor = _ggml_permuted(tensor, config["num_key_value_heads"])
            tensors[f"blk.{layer}.{_LAYER_NAMES[module]}.{part}"] = tensor
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    special = {token["content"] for token in tokenizer["added_tokens"] if token["special"]}
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in tokenizer["model"]["merges"]]
    names = [token for token, _ in vocab]
    metadata = {
        "general.architecture": architecture,
        f"{architecture}.embedding_length": mx.array(config["hidden_size"]),
        f"{architecture}.block_count": mx.array(config["num_hidden_layers"]),
        f"{architecture}.feed_forward_length": mx.array(config["intermediate_size"]),
        f"{architecture}.attention.head_count": mx.array(config["num_attention_heads"]),
        f"{architecture}.attention.head_count_kv": mx.array(config["num_key_value_heads"]),
        f"{architecture}.attention.layer_norm_rms_epsilon": mx.array(config["rms_norm_eps"]),
        f"{architecture}.rope.freq_base": mx.array(config["rope_theta"]),
        f"{architecture}.context_length": mx.array(config["max_position_embeddings"]),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": names,
        "tokenizer.ggml.token_type": mx.array([3 if token in special else 1 for token in names], dtype=mx.int32),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": mx.array(names.index("<s>")),
        "tokenizer.ggml.eos_token_id": mx.array(names.index("</s>")),
        "tokenizer.ggml.add_bos_token": mx.array(True),
        "tokenizer.chat_template": (model_dir / "chat_template.jinja").read_text(),
    }
    mx.save_gguf(str(target), tensors, metadata)
    return target


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory):
    return write_gguf(pathlib.Path(tiny_model), tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


def _generate(client) -> dict:
    response = client.post("/api/model/generate", json=PROMPT)
    assert response.status_code == 200, response.text
    return response.json()


def test_converted_gguf_generates_what_its_source_directory_does(tiny_model, tiny_gguf, tmp_path):
    with test_client(tiny_model) as client:
        expected = _generate(client)
    with test_client(tiny_gguf, cache_dir=str(tmp_path)) as client:
        status = client.get("/api/model/status").json()
        assert status["loaded"] and status["model_name"] == str(tiny_gguf)
        converted = _generate(client)
        chat = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "model": str(tiny_gguf)},
        )
        assert chat.status_code == 200, chat.text
    assert converted["text"] == expected["text"]
    assert converted["prompt_tokens"] == expected["prompt_tokens"]


def test_conversion_is_cached_by_content_and_reused(tiny_gguf, tmp_path):
    with test_client(tiny_gguf, cache_dir=str(tmp_path), gguf_weights="quantized"):
        pass
    converted = tmp_path / "converted" / f"{sha256_of(tiny_gguf)}-quantized-v{CONVERTER_VERSION}"
    assert (converted / "config.json").is_file()
    assert [p.name for p in (tmp_path / "converted").iterdir()] == [converted.name]  # nothing partial left
    written = (converted / "model.safetensors").stat().st_mtime_ns
    copy = tmp_path / "renamed-copy.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    with test_client(copy, cache_dir=str(tmp_path), gguf_weights="quantized") as client:
        assert _generate(client)["completion_tokens"] == PROMPT["max_tokens"]
    assert (converted / "model.safetensors").stat().st_mtime_ns == written  # same content: not converted again


def test_dequantized_weights_are_their_own_cache_entry(tiny_gguf, tmp_path):
    with test_client(tiny_gguf, cache_dir=str(tmp_path), gguf_weights="float16") as client:
        assert _generate(client)["completion_tokens"] == PROMPT["max_tokens"]
    assert (tmp_path / "converted" / f"{sha256_of(tiny_gguf)}-float16-v{CONVERTER_VERSION}" / "config.json").is_file()


def test_qwen2_gguf_loads(tiny_model, tmp_path):
    source = write_gguf(pathlib.Path(tiny_model), tmp_path / "tiny-qwen2.gguf", architecture="qwen2")
    tensors, metadata = mx.load(str(source), return_metadata=True)
    for layer in range(2):  # qwen2 projects q, k and v with a bias
        for name, size in (("attn_q", 64), ("attn_k", 32), ("attn_v", 32)):
            tensors[f"blk.{layer}.{name}.bias"] = mx.zeros((size,))
    mx.save_gguf(str(source), tensors, metadata)
    with test_client(source, cache_dir=str(tmp_path / "cache")) as client:
        assert _generate(client)["completion_tokens"] == PROMPT["max_tokens"]
    # The converted directory says which file holds each weight, as a pipeline rank needs to load only its own.
    (converted,) = (tmp_path / "cache" / "converted").iterdir()
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == dict.fromkeys(mx.load(str(converted / "model.safetensors")), "model.safetensors")


def _load_error(client, model: pathlib.Path) -> str:
    response = client.post("/api/model/load", json={"model_name": str(model)})
    assert response.status_code == 200, response.text
    status = wait_until_loaded(client)
    assert not status["loaded"] and not status["is_loading"]
    assert client.get("/healthz").status_code == 200  # the server keeps serving
    return status["error"]


def test_unsupported_architecture_is_a_load_error_naming_the_supported_ones(tiny_gguf, tmp_path):
    tensors, metadata = mx.load(str(tiny_gguf), return_metadata=True)
    metadata = {key.replace("llama.", "mamba."): value for key, value in metadata.items()}
    metadata["general.architecture"] = "mamba"
    other = tmp_path / "mamba.gguf"
    mx.save_gguf(str(other), tensors, metadata)
    with test_client(cache_dir=str(tmp_path / "cache"), **EXPLAINED) as client:
        error = _load_error(client, other)
    assert "'mamba' is not supported" in error and "llama, qwen2" in error
    assert not any((tmp_path / "cache" / "converted").iterdir())  # nothing half-written stays


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_gguf_is_a_clean_load_error(tiny_gguf, tmp_path, damage):
    broken = tmp_path / "broken.gguf"
    data = tiny_gguf.read_bytes()
    broken.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    with test_client(cache_dir=str(tmp_path / "cache"), **EXPLAINED) as client:
        error = _load_error(client, broken)
        assert "broken.gguf is not a readable GGUF file" in error
        client.post("/api/model/load", json={"model_name": str(tiny_gguf)})
        assert wait_until_loaded(client)["loaded"]  # and the next load serves
    converted = tmp_path / "cache" / "converted"
    default_weights = automatic_gguf_weights(tiny_gguf)  # what --gguf-weights auto chose on this machine
    assert [p.name for p in converted.iterdir()] == [f"{sha256_of(tiny_gguf)}-{default_weights}-v{CONVERTER_VERSION}"]


def test_missing_gguf_file_is_a_400_and_a_load_error_at_start(tmp_path):
    missing = tmp_path / "absent.gguf"
    with test_client(cache_dir=str(tmp_path), **EXPLAINED) as client:
        response = client.post("/api/model/load", json={"model_name": str(missing)})
        assert response.status_code == 400
        assert response.json() == {"success": False, "error": f"GGUF file not found: {missing}"}
    with pytest.raises(RuntimeError, match="GGUF file not found"):
        with test_client(missing, cache_dir=str(tmp_path)):
            pass
