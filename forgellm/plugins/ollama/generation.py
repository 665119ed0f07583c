"""``/api/chat``, ``/api/generate`` and ``/api/embed``: Ollama's generation and embedding requests over the
pipeline, answered whole or as NDJSON lines ending with Ollama's statistics.

A request with no messages (or no prompt) only loads its model, as Ollama's clients preload one; its
``keep_alive`` then says how long the model stays once idle (0: unloaded at once).
"""

from __future__ import annotations

import datetime
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import partial_json_parser
from litestar.response import Stream

from forgellm import (
    AssistantTurn,
    Caller,
    Constraint,
    ContentDelta,
    EmbeddingRequest,
    Generation,
    GenerationRequest,
    GenerationService,
    ReasoningDelta,
    Server,
    TurnEvent,
    bad_request,
    client_sampling,
    streamed,
    template_tool,
    template_tool_call,
)
from forgellm.plugins.ollama.protocol import (
    NDJSON,
    OLLAMA_SAMPLING,
    ChatLine,
    ChatRequest,
    EmbedRequest,
    EmbedResponse,
    Format,
    GenerateLine,
    GenerateRequest,
    KeepAlive,
    Message,
    Options,
    Reply,
    ToolCall,
    ToolFunctionCall,
    error_lines,
    ndjson_line,
)

_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: KeepAlive) -> float | None:
    """Ollama's keep_alive in seconds: a number of seconds or a Go duration ("5m", "1h30m"); negative: forever."""
    if value is None or isinstance(value, float | int):
        return None if value is None else float(value)
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise bad_request(f"keep_alive: {value!r} is not a duration (seconds, or such as 5m, 1h30m, -1)")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def served_name(model: str) -> str:
    """Ollama's clients name a model's default tag (":latest"); this server's names have no tags."""
    return model.removesuffix(":latest")


def now_text() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def nanoseconds(seconds: float) -> int:
    return int(seconds * 1e9)


# -- requests ------------------------------------------------------------------------------------------


def _constraint(format_: Format) -> Constraint | None:
    if format_ is None or format_ == "":
        return None
    if format_ == "json":
        return Constraint({"type": "object"})
    if isinstance(format_, dict):
        return Constraint(format_)
    raise bad_request('format must be "json" or a JSON schema')


def _template_options(think: bool | str | None) -> dict[str, Any] | None:
    if think is None:
        return None
    if isinstance(think, str):  # gpt-oss's levels ("low", "medium", "high"): thinking on
        return {"enable_thinking": True, "reasoning_effort": think}
    return {"enable_thinking": think}


def _common(
    model: str, options: Options | None, format_: Format, think: bool | str | None, logprobs: bool | None
) -> dict[str, Any]:
    """The GenerationRequest fields /api/chat and /api/generate share."""
    options = options or Options()
    options.check()
    if logprobs:
        raise bad_request("logprobs are not available on Ollama's routes here; /v1/chat/completions has them")
    sampling, given = client_sampling(OLLAMA_SAMPLING, **options.sampling())
    predict = options.num_predict
    if predict == 0:
        raise bad_request("options.num_predict 0 generates nothing; use -1 for no limit, or a positive count")
    return {
        "model": served_name(model),
        "max_tokens": predict if predict is not None and predict > 0 else None,
        "sampling": sampling,
        "sampling_given": given,
        "stop": tuple(options.stop or ()),
        "constraint": _constraint(format_),
        "template_options": _template_options(think),
    }


def _conversation(messages: list[Message]) -> list[dict[str, Any]]:
    conversation = []
    for index, message in enumerate(messages):
        if message.images:
            raise bad_request(f"messages[{index}] has images; this server serves text models")
        entry: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            entry["tool_calls"] = [
                template_tool_call(call.id or f"call_{index}_{number}", call.function.name, call.function.arguments)
                for number, call in enumerate(message.tool_calls)
            ]
        if message.tool_name:
            entry["name"] = message.tool_name
        conversation.append(entry)
    return conversation


def chat_request(data: ChatRequest) -> GenerationRequest:
    tools = [template_tool(t.function.name, t.function.parameters, t.function.description) for t in data.tools or ()]
    fields = _common(data.model, data.options, data.format, data.think, data.logprobs)
    return GenerationRequest(messages=_conversation(data.messages), tools=tools or None, **fields)


def generate_request(data: GenerateRequest) -> GenerationRequest:
    for field, value in (("suffix", data.suffix), ("template", data.template), ("context", data.context)):
        if value:
            raise bad_request(f"{field} is not supported here; send the conversation to /api/chat instead")
    if data.images:
        raise bad_request("images are not supported; this server serves text models")
    fields = _common(data.model, data.options, data.format, data.think, data.logprobs)
    if data.raw:
        return GenerationRequest(prompt=data.prompt, **fields)
    system = [{"role": "system", "content": data.system}] if data.system else []
    return GenerationRequest(messages=[*system, {"role": "user", "content": data.prompt}], **fields)


# -- keep_alive ------------------------------------------------------------------------------------------


async def start_kept(
    server: Server, caller: Caller, generations: GenerationService, request: GenerationRequest, keep_alive: KeepAlive
) -> Generation:
    """Start a generation, and apply the request's keep_alive to the model it runs on."""
    seconds = keep_alive_seconds(keep_alive)
    generation = await generations.start(caller, request)
    await keep(server, generation.model_name, seconds)
    return generation


async def keep(server: Server, name: str, seconds: float | None) -> bool:
    """Apply a request's keep_alive to the model it used; True when that unloaded it (0, and not pinned)."""
    resident = server.registry.find(name)
    if seconds is None or resident is None or resident.pinned:
        return False  # a pinned model is the operator's: it stays
    resident.keep_alive = seconds
    if seconds == 0 and not resident.busy:
        await server.registry.unload(resident.name)
        return True
    return False


async def load_only(
    server: Server, caller: Caller, generations: GenerationService, model: str, keep_alive: KeepAlive
) -> tuple[str, str]:
    """A request with nothing to generate: load the model; (its served name, Ollama's done_reason)."""
    seconds = keep_alive_seconds(keep_alive)
    resident = await generations.ready(caller, served_name(model))
    unloaded = await keep(server, resident.name, seconds)
    return resident.name, "unload" if unloaded else "load"


# -- answers -----------------------------------------------------------------------------------------------


def _arguments(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        value = partial_json_parser.loads(text) if text.strip() else {}
    return value if isinstance(value, dict) else {"value": value}


def tool_calls(turn: AssistantTurn) -> list[ToolCall] | None:
    calls = [ToolCall(ToolFunctionCall(call.name, _arguments(call.arguments)), call.id) for call in turn.tool_calls]
    return calls or None


def statistics(generation: Generation, started: float) -> dict[str, Any]:
    completion = generation.completion()
    reason = "length" if completion.finish_reason in ("length", "timeout") else "stop"
    return {
        "done_reason": reason,
        "total_duration": nanoseconds(time.monotonic() - started),
        "load_duration": 0,
        "prompt_eval_count": completion.usage.prompt_tokens,
        "prompt_eval_duration": nanoseconds(completion.time_to_first_token),
        "eval_count": completion.usage.completion_tokens,
        "eval_duration": nanoseconds(max(0.0, completion.generation_time - completion.time_to_first_token)),
    }


async def _whole_turn(generation: Generation) -> AssistantTurn:
    await generation.complete()
    turn = AssistantTurn()
    turn.add(generation.turn_events())
    return turn


def _texts(events: list[TurnEvent]) -> tuple[str, str | None]:
    """What one step adds to the answer's content, and to its thinking (None: nothing)."""
    content = "".join(event.text for event in events if isinstance(event, ContentDelta))
    thinking = "".join(event.text for event in events if isinstance(event, ReasoningDelta))
    return content, thinking or None


async def answer_chat(generation: Generation, stream: bool, started: float) -> ChatLine | Stream:
    model = generation.model_name
    if not stream:
        turn = await _whole_turn(generation)
        message = Reply("assistant", turn.content, turn.reasoning or None, tool_calls(turn))
        stats = statistics(generation, started)
        return ChatLine(model=model, created_at=now_text(), message=message, done=True, **stats)

    async def lines() -> AsyncIterator[bytes]:
        turn = AssistantTurn()
        async for chunk in generation.turn():
            turn.add(chunk.events)
            content, thinking = _texts(chunk.events)
            if content or thinking:
                message = Reply("assistant", content, thinking)
                yield ndjson_line(ChatLine(model=model, created_at=now_text(), message=message, done=False))
        calls = tool_calls(turn)
        if calls:
            message = Reply("assistant", "", tool_calls=calls)
            yield ndjson_line(ChatLine(model=model, created_at=now_text(), message=message, done=False))
        final = ChatLine(model=model, created_at=now_text(), message=Reply("assistant", ""), done=True,
                         **statistics(generation, started))  # fmt: skip
        yield ndjson_line(final)

    return streamed(lines(), NDJSON, on_failure=error_lines)


async def answer_generate(generation: Generation, stream: bool, started: float) -> GenerateLine | Stream:
    model = generation.model_name
    if not stream:
        turn = await _whole_turn(generation)
        return GenerateLine(model=model, created_at=now_text(), response=turn.content, done=True,
                            thinking=turn.reasoning or None, **statistics(generation, started))  # fmt: skip

    async def lines() -> AsyncIterator[bytes]:
        async for chunk in generation.turn():
            content, thinking = _texts(chunk.events)
            if content or thinking:
                yield ndjson_line(GenerateLine(model=model, created_at=now_text(), response=content, done=False,
                                               thinking=thinking))  # fmt: skip
        yield ndjson_line(GenerateLine(model=model, created_at=now_text(), response="", done=True,
                                       **statistics(generation, started)))  # fmt: skip

    return streamed(lines(), NDJSON, on_failure=error_lines)


async def embed(data: EmbedRequest, caller: Caller, generations: GenerationService, server: Server) -> EmbedResponse:
    started = time.monotonic()
    seconds = keep_alive_seconds(data.keep_alive)
    inputs = [data.input] if isinstance(data.input, str) else data.input
    request = EmbeddingRequest(inputs, served_name(data.model), data.truncate, data.dimensions)
    result = await generations.embed(caller, request)
    await keep(server, result.model_name, seconds)
    return EmbedResponse(
        model=result.model_name,
        embeddings=result.vectors,
        total_duration=nanoseconds(time.monotonic() - started),
        load_duration=0,
        prompt_eval_count=result.prompt_tokens,
    )
