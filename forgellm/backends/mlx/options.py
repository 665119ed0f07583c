"""The MLX backend's options: each default lives here, in its Option, and only here."""

from __future__ import annotations

from typing import Any

import click

from forgellm import Option
from forgellm.backends.mlx.distributed.sharding import PARALLEL_CHOICES
from forgellm.backends.mlx.draft_policy import DEFAULT_NUM_DRAFT_TOKENS, DEFAULT_POSITION_COST
from forgellm.backends.mlx.output_format import TOOL_PARSERS
from forgellm.backends.mlx.quantized_kv import KV_BITS_CHOICES, KV_GROUP_SIZE_CHOICES
from forgellm.backends.mlx.sources import GGUF_AUTO, GGUF_WEIGHT_CHOICES

DEFAULT_PROMPT_CACHE_SIZE = 10  # mlx_lm.server's default
# Prompts prefilled together in one pass (mlx_lm.server's default). On a GPU a pass over several prompts
# costs little more than one. On the CPU, measured on SmolLM2-135M with OpenBLAS, a pass of 8 cost 135 ms
# a prompt against 223 ms for one alone, and passes of 2 instead of 8 served 0.67-0.90 times the tokens/s
# at 4-16 clients with later first tokens too (benchmarks/README.md).
DEFAULT_PREFILL_BATCH_SIZE = 8
# Prompt tokens each prompt in the prefill pass advances by per engine step. Every step also decodes one
# token for the running sequences, so a long prompt is prefilled in slices between their tokens instead
# of stalling them for its whole length (mlx-lm's default, 2048, left running streams waiting for seconds
# on a CPU; benchmarks/prefill_stall.py measures it).
DEFAULT_PREFILL_CHUNK_SIZE = 256
DEFAULT_PROMPT_CACHE_DISK_BYTES = 8 << 30
# A rank that has not taken a command or finished a step after this long has stopped answering. A step
# prefills at most one --prefill-chunk-size slice per prompt, well within it on machines that can serve.
DEFAULT_RANK_TIMEOUT = 30.0


class IntChoice(click.types.IntParamType):
    """An integer among a few (``kv_bits = 8`` in the config file, as ``--kv-bits 8`` on the command line)."""

    def __init__(self, choices: tuple[int, ...]) -> None:
        self.choices = choices
        self.name = "|".join(map(str, choices))

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        number = super().convert(value, param, ctx)
        if number not in self.choices:
            self.fail(f"{number} is not one of {', '.join(map(str, self.choices))}", param, ctx)
        return int(number)


class ModelKvBits(click.ParamType):
    """``NAME=BITS``: one model's --kv-bits (0: the model's dtype), by its served name or its source; kept as
    text, so the effective configuration prints it back as it was given."""

    name = "NAME=BITS"

    @staticmethod
    def parse(spec: str) -> tuple[str, int]:
        name, equals, bits = spec.rpartition("=")
        if not equals or not name or bits.strip() not in ("0", *map(str, KV_BITS_CHOICES)):
            raise ValueError(f"{spec!r} is not NAME=BITS with BITS one of 0, 4, 8")
        return name, int(bits)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            self.parse(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


SPECULATION_CHOICES = ("prompt-lookup", "predictions", "off")
MLX_OPTIONS = (
    Option(
        "prompt_cache_size",
        "Finished sequences whose KV cache is kept, so a prompt sharing a prefix with one skips that "
        "prefix's prefill (0: off).",
        type=int,
        default=DEFAULT_PROMPT_CACHE_SIZE,
    ),
    Option(
        "prompt_cache_bytes",
        "Most bytes the prompt cache of each resident model may hold; the least recently used entries go "
        "first (0: bounded by --prompt-cache-size only).",
        type=click.IntRange(min=0),
        default=0,
    ),
    Option(
        "prompt_cache_dir",
        "A folder for the prompt cache's disk tier: entries leaving memory, and all of them at shutdown or a "
        "model swap, are written there, and a later prompt (after a restart too) loads its longest cached "
        "prefix from it instead of prefilling it (default: no disk tier).",
    ),
    Option(
        "prompt_cache_disk_bytes",
        "Most bytes the disk tier's folder may hold, over every model in it; the least recently used files go first.",
        type=click.IntRange(min=0),
        default=DEFAULT_PROMPT_CACHE_DISK_BYTES,
    ),
    Option(
        "kv_bits",
        "Store the KV cache quantized to this many bits (about 3.6 times smaller at 8 bits and 5.3 at 4 for a "
        "float32 model, 1.9 and 3.2 for float16), so more and longer sequences fit; batching stays on. Greedy "
        "output can differ slightly from full precision (docs/kv-cache.md has the measured quality). Default: the "
        "model's dtype.",
        type=IntChoice(KV_BITS_CHOICES),
    ),
    Option(
        "model_kv_bits",
        "One model's --kv-bits: NAME=BITS (0: the model's dtype), NAME being the name it is served as "
        "(--model NAME=SOURCE) or its source; repeatable, and a list in the config file's [mlx] table.",
        type=ModelKvBits(),
        multiple=True,
        one_or_many=True,
    ),
    Option(
        "kv_group_size",
        "Elements sharing one scale and bias in the quantized KV cache (--kv-bits); default: 64 at 8 bits, "
        "32 at 4 (finer groups keep 4 bits' quality, for 20% more bytes).",
        type=IntChoice(KV_GROUP_SIZE_CHOICES),
    ),
    Option(
        "quantized_kv_start",
        "With --kv-bits: a batch's KV cache stays at full precision until it holds more than this many "
        "positions (mlx_lm.server's default is 5000; here 0, everything quantized).",
        type=click.IntRange(min=0),
        default=0,
    ),
    Option(
        "prefill_batch_size",
        "Prompts prefilled together in one pass: larger passes cost less per prompt, but each prompt "
        "waits for the whole pass before its first token.",
        type=click.IntRange(min=1),
        default=DEFAULT_PREFILL_BATCH_SIZE,
    ),
    Option(
        "prefill_chunk_size",
        "Prompt tokens prefilled per engine step for each prompt; running streams get a token between "
        "slices, so a long prompt does not stall them for its whole length.",
        type=click.IntRange(min=16),
        default=DEFAULT_PREFILL_CHUNK_SIZE,
    ),
    Option(
        "speculation",
        "Speculative decoding inside the batch, where it pays (greedy output is unchanged, sampled output "
        "keeps its distribution): prompt-lookup drafts every sequence from its own prompt and output, and "
        "uses the outputs clients predict (OpenAI's prediction field); predictions uses only those; off "
        "decodes one token per step.",
        type=click.Choice(SPECULATION_CHOICES),
        default="prompt-lookup",
    ),
    Option(
        "draft_model",
        "A smaller model with the same tokenizer that drafts tokens for every model served (a directory, repo "
        "id, built-in name or GGUF file), verified by the batch like the other drafts; it pays where it "
        "decodes much faster than the target (a GPU), not on a CPU. A tokenizer that differs fails the load.",
    ),
    Option(
        "num_draft_tokens",
        "Most draft tokens a sequence verifies in one step; each step drafts only as far as its sequences' "
        "recent acceptance makes it pay.",
        type=click.IntRange(min=1, max=64),
        default=DEFAULT_NUM_DRAFT_TOKENS,
    ),
    Option(
        "draft_position_cost",
        "What one more position in a decoding step costs, as a fraction of a step's fixed cost: how far "
        "speculation drafts (measured 0.06 on a 2-core CPU; lower on a GPU, where extra positions cost less).",
        type=click.FloatRange(min=0.0, min_open=True, max=1.0),
        default=DEFAULT_POSITION_COST,
    ),
    Option(
        "parallel",
        "Under mlx.launch, how the model is split over the ranks: tensor (every layer split, its heads divided "
        "among the ranks), pipeline (each rank holds whole layers; needs model.safetensors.index.json), or auto "
        "(tensor where the model has it and the rank count divides its heads, else pipeline). Run alone, unused.",
        type=click.Choice(PARALLEL_CHOICES),
        default="auto",
    ),
    Option(
        "rank_timeout",
        "Under mlx.launch: seconds rank 0 waits for the other ranks to take a command or finish a step, and "
        "the others wait for rank 0's heartbeat, before the group counts as broken (rank 0 refuses generations "
        "with 503 and every rank exits).",
        type=click.FloatRange(min=0.5),
        default=DEFAULT_RANK_TIMEOUT,
    ),
    Option(
        "cache_dir",
        "Where built-in models are fetched to and GGUF files converted into MLX directories "
        "(default: $XDG_CACHE_HOME/forgellm, else ~/.cache/forgellm).",
    ),
    Option(
        "gguf_weights",
        "How a GGUF file's quantized tensors are converted: kept quantized (Q4_0, Q4_1, Q8_0), or "
        "dequantized to a float type (each kind is converted once and cached). auto: float32 on the CPU "
        "with an optimized BLAS when it takes at most a quarter of the memory, else quantized.",
        type=click.Choice(GGUF_WEIGHT_CHOICES),
        default=GGUF_AUTO,
    ),
    Option(
        "tool_parser",
        "How tool calls are read from the model's output: one of mlx-lm's parsers by model family "
        "(default: the one its chat template implies, else JSON between <tool_call> markers).",
        type=click.Choice(TOOL_PARSERS),
    ),
)
