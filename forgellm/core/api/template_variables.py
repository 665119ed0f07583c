"""A client's chat-template variables (``chat_template_kwargs``), checked to be data and nothing else.

The variables reach ``apply_chat_template(**kwargs)``, whose own keywords change what it does: ``tokenize``
false made the prompt a string that failed the whole batch, ``chat_template`` ran a client's Jinja program
(one line of it took the server past its memory), ``return_tensors`` changed the result's type. So a
variable is a name the template may read (``enable_thinking``, ``reasoning_effort``), never one of those
keywords nor a name the template's renderer supplies itself, and its value is JSON of bounded size.
"""

from __future__ import annotations

import json
import re
from typing import Any

from forgellm.core.errors import bad_request

FIELD = "chat_template_kwargs"
MAX_VARIABLES = 16
MAX_BYTES = 4096  # the variables as JSON
MAX_DEPTH = 4  # nesting of lists and objects in one value
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

# apply_chat_template's own keywords (transformers' and mlx-lm's): each changes how the template is applied,
# or which template; tests/test_hardening.py checks this covers the installed transformers' signature.
APPLY_KEYWORDS = frozenset(
    {
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)
# What the renderer puts in the template's context itself; a variable of the same name would replace it.
RENDERER_NAMES = frozenset(
    {
        "messages",
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
        "additional_special_tokens",
        "raise_exception",
        "strftime_now",
    }
)


def template_variables(variables: dict[str, Any] | None) -> dict[str, Any] | None:
    """The client's variables, or a 400 naming the first that is not plain, bounded data for the template."""
    if not variables:
        return None
    if len(variables) > MAX_VARIABLES:
        raise bad_request(f"{FIELD} has {len(variables)} variables; at most {MAX_VARIABLES} are allowed")
    for name, value in variables.items():
        if name in APPLY_KEYWORDS or name.startswith("return_"):
            raise bad_request(
                f"{FIELD}.{name} is not allowed: it changes how the chat template is applied, "
                "it is not a variable the template reads"
            )
        if name in RENDERER_NAMES:
            raise bad_request(f"{FIELD}.{name} is not allowed: the server sets it for the chat template")
        if not _NAME.match(name):
            raise bad_request(f"{FIELD}: {name[:64]!r} is not a template variable name (letters, digits, _)")
        if _depth(value) > MAX_DEPTH:
            raise bad_request(f"{FIELD}.{name} nests deeper than {MAX_DEPTH} levels")
    size = len(json.dumps(variables).encode())
    if size > MAX_BYTES:
        raise bad_request(f"{FIELD} is {size} bytes as JSON; at most {MAX_BYTES} are allowed")
    return dict(variables)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(item) for item in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(item) for item in value), default=0)
    return 0
