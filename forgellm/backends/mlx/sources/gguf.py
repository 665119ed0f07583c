"""GGUF files (llama.cpp's format) converted into MLX model directories that ``mlx_lm.load`` serves.

MLX reads GGUF itself (``mx.load``): tensors of types Q4_0, Q4_1 and Q8_0 come back as MLX
affine-quantized triplets (weight, scales, biases; groups of 32), float tensors as they are,
and other quantized types dequantized to float16. What this module adds is the rest of a
model directory: the tensors renamed to mlx-lm's parameter names, a ``config.json`` read from
the metadata, and a ``tokenizer.json`` rebuilt from the vocabulary and merges (``gguf_tokenizer``).

Supported: the ``llama`` and ``qwen2`` architectures with a byte-level BPE vocabulary
(``tokenizer.ggml.model == "gpt2"``). Anything else is an ``UnsupportedGguf`` naming what is.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx

from forgellm.backends.mlx.sources.gguf_errors import UnsupportedGguf
from forgellm.backends.mlx.sources.gguf_tokenizer import build_tokenizer, tokenizer_config
from forgellm.backends.mlx.sources.weights_file import save_weights

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# GGUF tensor names to mlx-lm's, for the llama family (qwen2 included).
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# A tensor's last name part: "weight", a real "bias" (qwen2's attention), or MLX's "scales"/"biases".
_TENSOR_NAME = re.compile(r"^(?:blk\.(?P<layer>\d+)\.)?(?P<name>[a-z_]+)\.(?P<part>weight|bias|scales|biases)$")
GGUF_GROUP_SIZE = 32  # every GGUF block type MLX keeps quantized holds 32 weights


@dataclass(frozen=True)
class WeightFormat:
    """How converted weights are stored: as the file's own quantization, or dequantized to a float dtype."""

    dequantize_to: str | None = None  # None keeps Q4_0/Q4_1/Q8_0 tensors quantized; else "float32", ...

    @property
    def label(self) -> str:
        return self.dequantize_to or "quantized"


Progress = Callable[[str], None]


def read_gguf(path: pathlib.Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """The file's tensors and metadata, or UnsupportedGguf for a file MLX cannot read."""
    try:
        tensors, metadata = cast(
            tuple[dict[str, mx.array], dict[str, Any]], mx.load(str(path), format="gguf", return_metadata=True)
        )
    except (RuntimeError, ValueError) as exc:
        raise UnsupportedGguf(f"{path.name} is not a readable GGUF file ({exc})") from None
    return tensors, {key: _plain(value) for key, value in metadata.items()}


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, mx.array) else value


def convert(source: pathlib.Path, target: pathlib.Path, weights: WeightFormat, progress: Progress) -> None:
    """Write an MLX model directory for the GGUF file ``source`` into ``target`` (an empty directory)."""
    progress(f"reading {source.name}")
    tensors, metadata = read_gguf(source)
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedGguf(
            f"{source.name}: architecture {architecture!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if "rope_freqs.weight" in tensors:
        raise UnsupportedGguf(
            f"{source.name}: per-frequency rope scaling (rope_freqs, Llama 3.1 and later) is not supported"
        )
    tokenizer, special = build_tokenizer(metadata, source.name)
    renamed = _renamed(tensors, source.name)
    del tensors
    config = model_config(metadata, renamed, architecture, special)
    progress(f"converting {len(renamed)} tensors ({weights.label})")
    if weights.dequantize_to is None:
        quantization = _quantization(renamed)
        if quantization:
            config["quantization"] = quantization
    else:
        renamed = _dequantized(renamed, getattr(mx, weights.dequantize_to))
    progress("writing the MLX model directory")
    save_weights(target, renamed)
    _write_json(target / "config.json", config)
    tokenizer.save(str(target / "tokenizer.json"))
    _write_json(target / "tokenizer_config.json", tokenizer_config(metadata, special))
    template = metadata.get("tokenizer.chat_template")
    if template:
        # transformers 5 reads the chat template from this file beside the tokenizer.
        (target / "chat_template.jinja").write_text(template, encoding="utf-8")


def _renamed(tensors: dict[str, mx.array], file_name: str) -> dict[str, mx.array]:
    renamed = {}
    for name, tensor in tensors.items():
        match = _TENSOR_NAME.match(name)
        table = _GLOBAL_TENSORS if match and match["layer"] is None else _LAYER_TENSORS
        if match is None or match["name"] not in table:
            raise UnsupportedGguf(f"{file_name}: tensor {name!r} has no counterpart in mlx-lm's model")
        prefix = "" if match["layer"] is None else f"model.layers.{match['layer']}."
        renamed[f"{prefix}{table[match['name']]}.{match['part']}"] = tensor
    return renamed


def model_config(metadata: dict[str, Any], tensors: dict[str, mx.array], architecture: str, special: dict) -> dict:
    """mlx-lm's config.json for the architecture, from the GGUF metadata."""

    def field(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{architecture}.{name}", default)
        if value is None:
            raise UnsupportedGguf(f"the metadata lacks {architecture}.{name}")
        return value

    heads = field("attention.head_count")
    config: dict[str, Any] = {
        "model_type": architecture,
        "hidden_size": field("embedding_length"),
        "num_hidden_layers": field("block_count"),
        "intermediate_size": field("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": field("attention.head_count_kv", heads),
        "rms_norm_eps": field("attention.layer_norm_rms_epsilon"),
        "rope_theta": field("rope.freq_base", 10000.0),
        "max_position_embeddings": field("context_length"),
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        # llama.cpp stores llama's q/k projections permuted for GGML's interleaved rope, so the
        # model runs with that rope ("traditional" in MLX) instead of un-permuting the weights.
        # qwen2 keeps the original order and the usual rope.
        "rope_traditional": architecture == "llama",
        **special["ids"],
    }
    if f"{architecture}.attention.key_length" in metadata:
        config["head_dim"] = metadata[f"{architecture}.attention.key_length"]
    scaling = metadata.get(f"{architecture}.rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": metadata[f"{architecture}.rope.scaling.factor"]}
    elif scaling not in (None, "none"):
        raise UnsupportedGguf(f"rope scaling {scaling!r} is not supported; supported: linear")
    if architecture == "llama":
        config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in tensors
    return config


def _quantization(tensors: dict[str, mx.array]) -> dict[str, Any]:
    """mlx-lm's quantization config: each quantized layer's bits, read from its packed shape."""
    bits_of = {layer: _bits(tensors, layer) for layer in _quantized_layers(tensors)}
    if not bits_of:
        return {}
    common = Counter(bits_of.values()).most_common(1)[0][0]
    config: dict[str, Any] = {"group_size": GGUF_GROUP_SIZE, "bits": common}
    config.update(
        {layer: {"group_size": GGUF_GROUP_SIZE, "bits": bits} for layer, bits in bits_of.items() if bits != common}
    )
    return config


def _quantized_layers(tensors: dict[str, mx.array]) -> set[str]:
    return {name[: -len(".scales")] for name in tensors if name.endswith(".scales")}


def _bits(tensors: dict[str, mx.array], layer: str) -> int:
    """A quantized layer's bits per weight, from its packed uint32 weight and its per-group scales."""
    in_features = tensors[f"{layer}.scales"].shape[-1] * GGUF_GROUP_SIZE
    return tensors[f"{layer}.weight"].shape[-1] * 32 // in_features


def _dequantized(tensors: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    layers = _quantized_layers(tensors)
    plain = {}
    for name, tensor in tensors.items():
        layer = name.rsplit(".", 1)[0]
        if layer in layers:
            if name.endswith(".weight"):
                weight = mx.dequantize(
                    tensor,
                    tensors[f"{layer}.scales"],
                    tensors[f"{layer}.biases"],
                    group_size=GGUF_GROUP_SIZE,
                    bits=_bits(tensors, layer),
                )
                plain[name] = weight.astype(dtype)
        else:
            plain[name] = tensor.astype(dtype)
        if name in plain:
            mx.eval(plain[name])  # one tensor at a time, so peak memory stays near the file's size
    return plain


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
