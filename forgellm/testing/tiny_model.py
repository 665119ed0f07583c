"""Build tiny random-weight models on disk for tests.

Part of the plugin-authoring kit: ``build_tiny_model`` writes a complete
Llama checkpoint (config, float32 safetensors weights, a byte-level BPE
tokenizer and a chat template) that ``mlx_lm.load`` loads like any real
model, and ``build_tiny_adapter`` writes a LoRA adapter for it that
``mlx_lm.load(path, adapter_path=...)`` accepts.  Everything is generated
in-process from a seed, so builds are fast, offline and reproducible.

The weights are random but shaped so that tests can rely on the output:
greedy decoding of different prompts gives varied, printable text, and the
model never emits a special token (including EOS) when decoding greedily and
almost never when sampling, so a generation runs to ``max_tokens``.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import string
from typing import Any, cast

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from forgellm.backends.mlx.sources.weights_file import save_weights

__all__ = ["build_tiny_model", "build_tiny_adapter"]

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Order fixes the ids: <s>=0, </s>=1, <pad>=2, then the role markers.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS)

VOCAB_SIZE = 512

# Zephyr-style template: each turn is "<|role|>\n{content}</s>\n", so the turn
# terminator is the EOS token a server stops on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

MODEL_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}

# Residual dimension held at a constant value for every token and position:
# after the final norm it is a steady positive input that lm_head uses as an
# output bias (Llama's lm_head has none).
_BIAS_DIM = 0
_BIAS_ACTIVATION = 2.0
_OUTPUT_BIAS = 8.0

LORA_RANK = 4
LORA_KEYS = ("self_attn.q_proj", "self_attn.v_proj")
LORA_SCALE = 20.0

# Enough distinct English text for the BPE trainer to fill VOCAB_SIZE.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still write
words, even when its weights are random and nobody has trained it at all.
Servers load models, read prompts, and stream tokens back to the people who
asked for them. Every request has a prompt, a limit on new tokens, and some
settings for sampling such as temperature and top p.

Once upon a time there was a little town by the sea. The people there made
bread in the morning and told stories in the evening. Children ran along the
beach, looking for shells, while the fishing boats came home with the tide.
In winter the wind was cold and the nights were long, but the houses were
warm and full of light.

Language models predict the next token given the tokens before it. They are
built from layers of attention and feed forward networks, with normalization
between them. A tokenizer splits text into pieces, and each piece has a number.
The model turns those numbers into vectors, mixes them together, and returns a
score for every piece in the vocabulary.

Good software is tested. Tests build small examples, run the code, and check
the results against what we expect. When a test fails, we read the message,
find the bug, fix it, and run the tests again until everything passes. Simple
tools, clear names, and short functions make this work much easier for
everyone on the team.
"""


def _train_tokenizer() -> Tokenizer:
    """Train a deterministic byte-level BPE tokenizer on the built-in corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes, so any input text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS], trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Prepend BOS like Llama tokenizers do; the chat template renders its own.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


def _printable_token_mask(tokenizer: Tokenizer) -> np.ndarray:
    """True for tokens that decode to non-empty printable ASCII text.

    Byte-level BPE has a token for every byte; lone non-ASCII bytes decode to
    replacement characters, so the model is kept from emitting them.
    """
    allowed = set(string.printable) - set("\t\r\x0b\x0c")
    special = {tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    mask = np.zeros(tokenizer.get_vocab_size(), dtype=bool)
    for token_id in range(len(mask)):
        text = tokenizer.decode([token_id])
        mask[token_id] = token_id not in special and bool(text) and set(text) <= allowed
    return mask


def _model_of(config: dict[str, Any]) -> Any:
    """mlx-lm's model for config's model_type, as its loader would build it (random weights)."""
    architecture = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    return architecture.Model(architecture.ModelArgs.from_dict(config))


def _random_weights(config: dict[str, Any], allowed_outputs: np.ndarray, seed: int) -> dict[str, mx.array]:
    """Random float32 weights under the names and shapes mlx-lm's model of config's model_type uses."""
    rng = np.random.default_rng(seed)
    parameters = cast(list[tuple[str, Any]], tree_flatten(_model_of(config).parameters()))
    shapes = {name: param.shape for name, param in parameters}
    weights = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith("norm.weight"):
            value = np.ones(shape)
        elif name.endswith(".bias"):
            value = np.zeros(shape)
        elif name == "model.embed_tokens.weight":
            value = rng.normal(0.0, 1.0, shape)
            value[:, _BIAS_DIM] = _BIAS_ACTIVATION
        elif name == "lm_head.weight":
            # Logits with a standard deviation of about 2: peaked enough for
            # clear greedy choices, flat enough for sampling to vary.
            value = rng.normal(0.0, 2.0 / np.sqrt(shape[1]), shape)
            value[:, _BIAS_DIM] = _OUTPUT_BIAS
            # Zero rows score exactly 0, far below the biased logits of the
            # printable tokens, so even sampling (almost) never picks them.
            value[~allowed_outputs] = 0.0
        else:
            # Unit-variance outputs keep attention and MLP contributions as
            # large as the embedding, so the output depends on the context
            # and not only on the last token (which would loop quickly).
            value = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
            # Blocks neither write the bias dimension (so it stays constant)
            # nor read it (so it does not steer attention or the MLP).
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                value[_BIAS_DIM] = 0.0
            else:
                value[:, _BIAS_DIM] = 0.0
        weights[name] = mx.array(value.astype(np.float32))
    return weights


def build_tiny_model(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    chat_template: bool | str = True,
    config_overrides: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Write a tiny random-weight Llama model into path and return it.

    Writes config.json, model.safetensors, the tokenizer files and (unless
    chat_template is False) chat_template.jinja: a Zephyr-style template, or
    the Jinja text chat_template gives; the directory is created if needed.
    The same seed always gives the same weights. config_overrides changes
    the Llama shape (hidden_size, num_hidden_layers, ...), e.g. for a
    model big enough that benchmark timings mean something.
    """
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}

    config = {
        **MODEL_CONFIG,
        **(config_overrides or {}),
        "vocab_size": tokenizer.get_vocab_size(),
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids[PAD_TOKEN],
    }
    _write_json(out / "config.json", config)

    special_tokens_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": list(ROLE_TOKENS),
    }
    _write_json(out / "special_tokens_map.json", special_tokens_map)
    _write_json(
        out / "tokenizer_config.json",
        {
            **special_tokens_map,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": MODEL_CONFIG["max_position_embeddings"],
            "clean_up_tokenization_spaces": False,
        },
    )
    template_file = out / "chat_template.jinja"
    if chat_template:
        # transformers 5 reads the template from this file next to the tokenizer.
        template_file.write_text(CHAT_TEMPLATE if chat_template is True else chat_template, encoding="utf-8")
    else:
        template_file.unlink(missing_ok=True)

    weights = _random_weights(config, _printable_token_mask(tokenizer), seed)
    save_weights(out, weights)
    return out


def build_tiny_adapter(
    model_path: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    seed: int = 1,
    scale: float = LORA_SCALE,
) -> pathlib.Path:
    """Write a tiny LoRA adapter for the model at model_path into path and return it.

    Writes adapter_config.json and adapters.safetensors, with rank-4 LoRA on
    the query and value projections of every layer. The adapter changes the
    model's greedy output; scale multiplies the size of that change.
    """
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config_file = pathlib.Path(model_path) / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    lora_parameters = {
        "rank": LORA_RANK,
        "scale": scale,
        "dropout": 0.0,
        "keys": list(LORA_KEYS),
    }
    adapter_config = {
        "fine_tune_type": "lora",
        "num_layers": config["num_hidden_layers"],
        "lora_parameters": lora_parameters,
    }

    # Wrap a model exactly as mlx-lm's loader will, so names and shapes match.
    model = _model_of(config)
    linear_to_lora_layers(model, config["num_hidden_layers"], lora_parameters)
    rng = np.random.default_rng(seed)
    weights = {}
    parameters = cast(list[tuple[str, Any]], tree_flatten(model.parameters()))
    for name, param in sorted(parameters, key=lambda item: item[0]):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "lora_a":
            value = rng.normal(0.0, 1.0 / np.sqrt(param.shape[0]), param.shape)
            # Like the base blocks, ignore the constant bias dimension.
            value[_BIAS_DIM] = 0.0
        elif leaf == "lora_b":
            # Unlike training init, lora_b is non-zero so the adapter has an
            # effect; at the default scale the update is about as large as
            # the base projection's output, enough to change greedy output.
            std = 1.0 / (LORA_SCALE * np.sqrt(param.shape[0]))
            value = rng.normal(0.0, std, param.shape)
        else:
            continue
        weights[name] = mx.array(value.astype(np.float32))

    _write_json(out / "adapter_config.json", adapter_config)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    return out


def _write_json(file: pathlib.Path, data: dict[str, Any]) -> None:
    file.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
