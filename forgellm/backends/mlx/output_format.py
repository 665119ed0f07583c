"""How a model marks reasoning and tool calls in its output, as mlx-lm infers it from the chat template."""

from __future__ import annotations

import json
import pkgutil
from typing import Any

import mlx_lm.tool_parsers
from mlx_lm.tokenizer_utils import TokenizerWrapper

from forgellm import OutputFormat

# For a model whose template names no tool-call format: calls as JSON between these markers (the Hermes
# format, mlx-lm's json_tools), which the tool prompt asks for.
DEFAULT_TOOL_CALL_MARKERS = ("<tool_call>", "</tool_call>")


def parse_json_tool_call(text: str, tools: list[dict] | None) -> dict:
    return dict(json.loads(text.strip()))


def output_format(tokenizer: TokenizerWrapper) -> OutputFormat:
    """The markers mlx-lm infers from the model's chat template and vocabulary."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    reasoning: dict[str, Any] = {}
    if tokenizer.has_thinking:
        reasoning = {
            "think": (tokenizer.think_start, tokenizer.think_end),
            "opens_reasoning": lambda prompt: tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt),
        }
    if tokenizer.tool_parser is not None:
        tool_call = (tokenizer.tool_call_start, tokenizer.tool_call_end)
        return OutputFormat(
            tool_call=tool_call, parse_tool_call=tokenizer.tool_parser, renders_tools="tools" in template, **reasoning
        )
    return OutputFormat(
        tool_call=DEFAULT_TOOL_CALL_MARKERS,
        parse_tool_call=parse_json_tool_call,
        renders_tools="tools" in template,
        **reasoning,
    )


# mlx-lm's tool-call parsers, one module per model family's call syntax.
TOOL_PARSERS = sorted(module.name for module in pkgutil.iter_modules(mlx_lm.tool_parsers.__path__))
