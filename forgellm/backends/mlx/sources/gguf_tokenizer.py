"""A GGUF file's vocabulary as a Hugging Face ``tokenizer.json``: byte-level BPE rebuilt from its tokens, merges
and token types, split the way the model's original tokenizer split text (``tokenizer.ggml.pre``)."""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from forgellm.backends.mlx.sources.gguf_errors import UnsupportedGguf

# Pre-tokenizers by llama.cpp's name for them (tokenizer.ggml.pre). Each splits text the way the
# model's original tokenizer did; a wrong split still round-trips text but gives other token ids.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SUPPORTED_PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "qwen2")

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL = 3
_USER_DEFINED = 4


def build_tokenizer(metadata: dict[str, Any], file_name: str) -> tuple[Tokenizer, dict]:
    """A Hugging Face tokenizer rebuilt from the GGUF vocabulary, and the special tokens it names."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedGguf(
            f"{file_name}: tokenizer type {kind!r} is not supported; supported: 'gpt2' (byte-level BPE)"
        )
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in SUPPORTED_PRE_TOKENIZERS:
        raise UnsupportedGguf(
            f"{file_name}: pre-tokenizer {pre!r} is not supported; supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)}"
        )
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types: list[int] = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", [])]
    vocab: dict[str, int] = {}
    for index, piece in enumerate(tokens):
        vocab.setdefault(piece, index)  # a duplicated string keeps its first id
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(pre)
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [
            AddedToken(piece, special=True, normalized=False)
            for piece, kind in zip(tokens, types, strict=True)
            if kind == _CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(piece, normalized=False)
            for piece, kind in zip(tokens, types, strict=True)
            if kind == _USER_DEFINED
        ]
    )

    def token(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    special = {
        "bos": token("bos"),
        "eos": token("eos"),
        "pad": token("padding"),
        "unk": token("unknown"),
        "ids": {
            f"{key}_token_id": metadata[f"tokenizer.ggml.{key}_token_id"]
            for key in ("bos", "eos")
            if f"tokenizer.ggml.{key}_token_id" in metadata
        },
    }
    bos = special["bos"]
    if metadata.get("tokenizer.ggml.add_bos_token") and isinstance(bos, str):
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer, special


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in ("default", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    split = _LLAMA3_SPLIT if pre == "llama-bpe" else _QWEN2_SPLIT
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def tokenizer_config(metadata: dict[str, Any], special: dict) -> dict:
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    for key in ("bos", "eos", "pad", "unk"):
        if special[key] is not None:
            config[f"{key}_token"] = special[key]
    return config
