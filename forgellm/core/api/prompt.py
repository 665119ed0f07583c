"""A request's prompt as the model is to see it, and its tokens.

Tools are described in the prompt when the model's chat template does not render them, and a forced call
becomes the request's constraint (a grammar). Rendering runs the model's chat template, a program, so it
runs on a thread of its own that is abandoned when the client leaves or it outlasts --template-timeout.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any, NamedTuple

from forgellm.core.api.assistant_turn import forced_call_schema, tool_prompt
from forgellm.core.api.request import Caller, GenerationRequest
from forgellm.core.engine.backend import LoadedModel, OutputFormat
from forgellm.core.engine.generation import Constraint
from forgellm.core.errors import ApiError, TemplateRefused, bad_request
from forgellm.core.interruptible import run_interruptibly


def with_tools(request: GenerationRequest, output_format: OutputFormat) -> GenerationRequest:
    """The request as the model is to see it: tools described in the prompt when its template does not, and a
    forced call's grammar as the constraint."""
    choice = request.tool_choice
    if not request.tools or choice.mode == "none":
        return replace(request, tools=None) if request.tools else request
    names = {tool["function"]["name"] for tool in request.tools}
    if choice.name is not None and choice.name not in names:
        raise bad_request(f"tool_choice names the function {choice.name!r}, which is not among the tools")
    changes: dict[str, Any] = {}
    if choice.forced:
        if request.constraint is not None:
            raise bad_request("A forced tool call and a response format cannot both apply")
        changes["constraint"] = Constraint(forced_call_schema(request.tools, choice.name, choice.parallel))
    if not output_format.renders_tools and request.messages is not None:
        described = {"role": "system", "content": tool_prompt(request.tools, output_format)}
        changes["messages"] = _with_system_text(request.messages, described)
    return replace(request, **changes) if changes else request


def _with_system_text(messages: list[dict[str, Any]], system: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation with this system text first (after the conversation's own, if it has one)."""
    if messages and messages[0]["role"] == "system":
        merged = {**messages[0], "content": f"{messages[0]['content']}\n\n{system['content']}"}
        return [merged, *messages[1:]]
    return [system, *messages]


def render_without_template(messages: list[dict[str, Any]]) -> str:
    """A conversation as plain text, for models that have no chat template."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return str(messages[0]["content"])
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


class Tokenized(NamedTuple):
    prompt: list[int]
    prediction: list[int] | None  # the output the client predicted, when it did


async def tokenized(caller: Caller, model: LoadedModel, request: GenerationRequest, timeout: float) -> Tokenized:
    """The prompt's tokens (and the prediction's), rendered on a thread that is abandoned when the client leaves
    or the template outlasts timeout seconds (--template-timeout)."""

    def work() -> Tokenized:
        return Tokenized(prompt(), model.encode(request.prediction) if request.prediction else None)

    def prompt() -> list[int]:
        if request.constraint is not None:
            model.check_constraint(request.constraint)  # compiled here, off the event loop
        checked_ids([token for token, _ in request.sampling.logit_bias], model.vocab_size, "logit_bias")
        if isinstance(request.prompt, list):
            return checked_ids(request.prompt, model.vocab_size)
        if request.messages is None:
            return model.encode(request.prompt or "")
        if model.has_chat_template:
            options = request.template_options
            return model.encode_chat(request.messages, tools=request.tools, template_options=options)
        return model.encode(render_without_template(request.messages))

    rendering = asyncio.ensure_future(run_interruptibly(work, timeout=timeout))
    disconnected = asyncio.ensure_future(caller.disconnected())
    try:
        await asyncio.wait({rendering, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
        if not rendering.done():
            rendering.cancel()  # interrupts the rendering thread
    if not rendering.done() or rendering.cancelled():
        raise ApiError(499, "Client closed the request")
    try:
        tokens: Tokenized = rendering.result()
        return tokens
    except TimeoutError:
        raise bad_request(f"Rendering the prompt took longer than {timeout:g}s (--template-timeout)") from None
    except TemplateRefused as exc:
        raise bad_request(f"The model's chat template rejected the conversation: {exc}") from None
    except ValueError as exc:  # a constraint the model cannot enforce, or token ids out of its vocabulary
        raise bad_request(str(exc)) from None


def checked_ids(tokens: list[int], vocab_size: int, field: str = "prompt") -> list[int]:
    # An id out of range would index past the logits (MLX does not check; the process would crash).
    for token in tokens:
        if not 0 <= token < vocab_size:
            raise ValueError(f"{field}: token id {token} is not in the model's vocabulary (0 to {vocab_size - 1})")
    return tokens
