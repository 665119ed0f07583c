"""forgellm-prompt-guard: refuse generations whose prompt matches a configured regular expression.

Installed, the plugin is on (as every package in the ``forgellm`` entry-point group is), and it
does nothing until a pattern is configured, through any of:

- ``forgellm run --prompt-guard-pattern 'ignore (all )?previous instructions'`` (repeatable),
- ``FORGELLM_PROMPT_GUARD_PATTERN`` (one pattern a line, since patterns hold spaces),
- ``prompt_guard_pattern = ["..."]`` in the ``[prompt-guard]`` table of ``forgellm run --config``.

A matching request is answered 400 before it is queued, in the error shape of the API it came
through; the prompt is never logged.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import click

from forgellm import ApiError, Option, hookimpl

PLUGIN = "prompt-guard"  # the entry point's name: server.plugin_state is keyed by it
REFUSAL_CODE = "content_policy_violation"  # the code OpenAI's API gives a refused prompt

logger = logging.getLogger("forgellm.prompt_guard")


class RegularExpression(click.ParamType):
    """A pattern in Python's ``re`` syntax, compiled once when the option is read so a typo fails at start."""

    name = "REGEX"
    envvar_list_splitter = "\n"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        try:
            re.compile(value)
        except (re.error, TypeError) as exc:
            self.fail(f"{value!r} is not a regular expression: {exc}", param, ctx)
        return value


@hookimpl
def register_options(register):
    register(
        Option(
            "prompt_guard_pattern",
            "Refuse generations whose prompt contains a match for this regular expression; repeatable. "
            "(FORGELLM_PROMPT_GUARD_PATTERN takes one a line.)",
            type=RegularExpression(),
            multiple=True,
        )
    )
    register(
        Option(
            "prompt_guard_ignore_case",
            "Match the prompt guard's patterns without regard to case.",
            is_flag=True,
            default=False,
        )
    )


@hookimpl
def startup(server):
    flags = re.IGNORECASE if server.settings.prompt_guard_ignore_case else 0
    server.plugin_state[PLUGIN] = [re.compile(pattern, flags) for pattern in server.settings.prompt_guard_pattern]
    if server.plugin_state[PLUGIN]:
        logger.info("prompt guard: %d patterns", len(server.plugin_state[PLUGIN]))


@hookimpl
def before_generate(job, server):
    for number, pattern in enumerate(server.plugin_state[PLUGIN], start=1):
        if pattern.search(job.prompt_text):
            # Which pattern, never the prompt: prompts stay out of logs.
            logger.info("prompt guard: refused a prompt matching pattern #%d", number)
            raise ApiError(400, "The prompt was refused by the server's prompt guard", code=REFUSAL_CODE)
