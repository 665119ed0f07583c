"""The OpenAI-compatible routes: /v1/models, /v1/completions and /v1/chat/completions.

Each handler translates OpenAI's wire format (``protocol``) into GenerationRequests for the one
pipeline (one per choice: ``n`` of them, times the prompts of a completion), and the generations
back: a chat answer is read as an assistant's turn (content, reasoning, tool calls); errors use
OpenAI's error object; streams are server-sent events ending in ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from litestar import Request, Router, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from litestar.response import Stream

from forgellm.core.api.assistant_turn import (
    AssistantTurn,
    ContentDelta,
    ReasoningDelta,
    ToolCallArguments,
    ToolCallStart,
    TurnEvent,
    TurnSplitter,
    template_tool,
    template_tool_call,
)
from forgellm.core.api.openai.protocol import (
    CHAT_COMPLETION_EVENTS,
    COMPLETION_EVENTS,
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    DONE,
    PREFIX,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    FunctionCall,
    FunctionCallDelta,
    ModelCard,
    ModelList,
    NamedToolChoice,
    OpenAIError,
    PromptTokensDetails,
    SamplingFields,
    TokenLogprobBody,
    ToolCallDelta,
    ToolCallResponse,
    TopLogprob,
    UsageBody,
    error_body,
    event,
)
from forgellm.core.api.pipeline import (
    Caller,
    Generation,
    GenerationRequest,
    GenerationService,
    ToolChoice,
    client_sampling,
)
from forgellm.core.api.template_variables import template_variables
from forgellm.core.engine.generation import Constraint, Delta, SamplingParams, TokenLogprob
from forgellm.core.errors import ApiError, bad_request
from forgellm.core.http.errors import as_api_error, exception_handler
from forgellm.core.http.openapi import EVENT_STREAM, GENERATION_ERRORS, error_responses, json_body, streamed_as
from forgellm.core.http.streaming import streamed
from forgellm.core.http.strict_body import strict_body
from forgellm.core.identity import GENERATE, STATUS
from forgellm.core.server import Server


def openai_errors(*statuses: int) -> dict[int, Any]:
    return error_responses(OpenAIError, *statuses)


# -- request translation -------------------------------------------------------------------------


def _refuse_unsupported(fields: dict[str, Any]) -> None:
    """Fields this server cannot honour: each set one is a 400 naming it, never silently dropped."""
    for name, value in fields.items():
        if value is not None:
            raise bad_request(f"{name} is not supported by this server")


# mlx_lm.server's name for the model it serves, which its clients send: here, the default model.
MLX_LM_DEFAULT_MODEL = "default_model"
# OpenAI's defaults, for what neither the request nor the model's defaults set.
OPENAI_SAMPLING = SamplingParams(temperature=1.0)


def _sampling(data: SamplingFields) -> tuple[SamplingParams, frozenset[str]]:
    logit_bias = []
    for key, bias in (data.logit_bias or {}).items():
        if not key.isdigit():
            raise bad_request(f"logit_bias keys are token ids; {key!r} is not one")
        logit_bias.append((int(key), bias))
    if data.draft_model not in (None, MLX_LM_DEFAULT_MODEL):
        raise bad_request("draft_model: this server has no draft models")
    if data.adapters is not None:
        raise bad_request("adapters: an adapter is served as a model of its own; name that model instead")
    sampling, given = client_sampling(
        OPENAI_SAMPLING,
        temperature=data.temperature,
        top_p=data.top_p,
        top_k=data.top_k,
        min_p=data.min_p,
        repetition_penalty=data.repetition_penalty or None,  # mlx_lm.server's 0: no penalty
    )
    windows = {
        name: value
        for name, value in (
            ("repetition_context_size", data.repetition_context_size),
            ("presence_context_size", data.presence_context_size),
            ("frequency_context_size", data.frequency_context_size),
        )
        if value is not None
    }
    sampling = replace(
        sampling,
        presence_penalty=data.presence_penalty,
        frequency_penalty=data.frequency_penalty,
        xtc_probability=data.xtc_probability,
        xtc_threshold=data.xtc_threshold,
        logit_bias=tuple(logit_bias),
        **windows,
    )
    return sampling, given


def _choices(data: SamplingFields, base: GenerationRequest) -> list[GenerationRequest]:
    if data.stream_options is not None and not data.stream:
        raise bad_request("stream_options is only allowed when stream is true")
    stop = data.stop if data.stop is None or isinstance(data.stop, list) else [data.stop]
    model = None if data.model == MLX_LM_DEFAULT_MODEL else data.model
    sampling, given = _sampling(data)
    base = replace(base, stop=tuple(stop or ()), model=model, sampling_given=given)
    # n choices of one seeded request differ from each other, and each is reproducible.
    seeds = [None if data.seed is None else data.seed + choice for choice in range(data.n)]
    return [replace(base, sampling=replace(sampling, seed=seed)) for seed in seeds]


def _template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation as chat templates take it (tool calls' arguments as objects, as templates expect)."""
    rendered = []
    for number, message in enumerate(messages):
        parts = message.content if isinstance(message.content, list) else []
        for part in parts:
            if part.type != "text":
                raise bad_request(
                    f"Message {number} has a {part.type} part; only text content is supported by this server"
                )
        text = message.content if isinstance(message.content, str) else "".join(p.text or "" for p in parts)
        item: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": text or message.refusal or "",
        }
        if message.tool_calls:
            item["tool_calls"] = [
                template_tool_call(call.id, call.function.name, _arguments(call.function.arguments, number))
                for call in message.tool_calls
            ]
        if message.role == "tool":
            if message.tool_call_id is None:
                raise bad_request(f"Message {number} is a tool result without a tool_call_id")
            item["tool_call_id"] = message.tool_call_id
        rendered.append(item)
    return rendered


def _arguments(text: str, number: int) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise bad_request(f"Message {number} has a tool call whose arguments are not JSON") from None


def _tool_choice(data: ChatCompletionRequest) -> ToolChoice:
    choice = data.tool_choice
    parallel = data.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        return ToolChoice("auto", choice.function.name, parallel)
    if choice is not None and not data.tools and choice != "none":
        raise bad_request(f"tool_choice {choice!r} needs tools")
    return ToolChoice(choice or "auto", None, parallel)


def _response_format(data: ChatCompletionRequest) -> Constraint | None:
    format = data.response_format
    if format is None or format.type == "text":
        return None
    if format.type == "json_object":
        return Constraint({"type": "object"})
    if format.json_schema is None or format.json_schema.schema is None:
        raise bad_request("response_format json_schema needs json_schema.schema")
    return Constraint(format.json_schema.schema)


def _chat_requests(data: ChatCompletionRequest) -> list[GenerationRequest]:
    _refuse_unsupported(
        {name: getattr(data, name) for name in ("audio", "prediction", "web_search_options", "functions", "moderation")}
    )
    if data.function_call is not None:
        raise bad_request("function_call is not supported by this server; use tools and tool_choice")
    if data.modalities not in (None, ["text"]):
        raise bad_request('modalities: only ["text"] is supported by this server')
    if data.top_logprobs is not None and not data.logprobs:
        raise bad_request("top_logprobs needs logprobs: true")
    base = GenerationRequest(
        messages=_template_messages(data.messages),
        tools=[_function(tool) for tool in data.tools or ()] or None,
        tool_choice=_tool_choice(data),
        template_options=template_variables(data.chat_template_kwargs),
        max_tokens=data.max_completion_tokens if data.max_completion_tokens is not None else data.max_tokens,
        constraint=_response_format(data),
        logprobs=(data.top_logprobs or 0) if data.logprobs else None,
    )
    return _choices(data, base)


def _function(tool: Any) -> dict[str, Any]:
    function = tool.function
    return template_tool(function.name, function.parameters, function.description)


def _completion_prompts(data: CompletionRequest) -> list[str | list[int]]:
    """OpenAI's four prompt forms: a string, strings, token ids, lists of token ids; one choice per prompt."""
    prompt = data.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt is empty")
    if all(isinstance(item, int) for item in prompt):
        return [[int(item) for item in prompt]]  # type: ignore[arg-type]  # one prompt, as token ids
    if all(isinstance(item, str) for item in prompt) or all(isinstance(item, list) for item in prompt):
        return list(prompt)  # type: ignore[arg-type]
    raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of such lists")


def _completion_requests(data: CompletionRequest) -> tuple[list[str | list[int]], list[GenerationRequest]]:
    if data.suffix is not None:
        raise bad_request("suffix is not supported by this server")
    if data.role_mapping is not None:
        raise bad_request("role_mapping is not supported by this server: a completion's prompt is sent as it is")
    if data.best_of not in (None, 1):
        raise bad_request("best_of is not supported by this server (only 1)")
    prompts = _completion_prompts(data)
    if len(prompts) * data.n > 16:
        raise bad_request("At most 16 choices (prompts times n) per request are supported")
    if data.echo and (data.logprobs is not None or any(not isinstance(p, str) for p in prompts)):
        raise bad_request("echo is supported for text prompts without logprobs")
    requests = []
    for prompt in prompts:
        base = GenerationRequest(
            prompt=prompt,
            max_tokens=data.max_tokens,
            default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS,
            logprobs=data.logprobs,
        )
        requests += _choices(data, base)
    return prompts, requests


# -- response translation ------------------------------------------------------------------------


def _usage(generations: list[Generation], prompts: int) -> UsageBody:
    """Prompt tokens once per prompt (its n choices share it), completion tokens of every choice."""
    completions = [generation.completion() for generation in generations]
    per_prompt = len(generations) // max(prompts, 1)
    prompt_tokens = sum(c.usage.prompt_tokens for c in completions[::per_prompt]) if completions else 0
    completion_tokens = sum(c.usage.completion_tokens for c in completions)
    cached = sum(g.cached_prompt_tokens for g in generations[::per_prompt]) if generations else 0
    return UsageBody(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, PromptTokensDetails(cached))


def _token_body(logprob: TokenLogprob) -> TokenLogprobBody:
    return TokenLogprobBody(
        logprob.token,
        logprob.logprob,
        list(logprob.token_bytes),
        [TopLogprob(token, value, list(raw)) for token, raw, value in logprob.top],
    )


def _chat_logprobs(logprobs: Sequence[TokenLogprob], asked: bool) -> ChatLogprobs | None:
    return ChatLogprobs([_token_body(entry) for entry in logprobs]) if asked else None


def _completion_logprobs(logprobs: Sequence[TokenLogprob], asked: bool, offset: int = 0) -> CompletionLogprobs | None:
    if not asked:
        return None
    offsets, position = [], offset
    for entry in logprobs:
        offsets.append(position)
        position += len(entry.token)
    return CompletionLogprobs(
        tokens=[entry.token for entry in logprobs],
        token_logprobs=[entry.logprob for entry in logprobs],
        top_logprobs=[{token: value for token, _, value in entry.top} for entry in logprobs],
        text_offset=offsets,
    )


# Limits that cut a generation short: its finish_reason says so even when it was making a tool call.
CUT_SHORT = ("length", "timeout")


def _finish_reason(generation: Generation, called: bool) -> Any:
    reason = generation.completion().finish_reason
    return "tool_calls" if called and reason not in CUT_SHORT else reason


# -- routes --------------------------------------------------------------------------------------


@get(
    f"{PREFIX}/models",
    opt={"action": STATUS},
    summary="The models this server can serve now",
    responses=openai_errors(401, 403),
)
async def list_models(server: NamedDependency[Server]) -> ModelList:
    """Each model under the name it is served as (its source stays visible in /api/models)."""
    return ModelList(data=[ModelCard(id=name) for name in server.registry.names()])


@get(
    f"{PREFIX}/models/{{model_id:path}}",
    opt={"action": STATUS},
    summary="One model this server can serve now",
    responses=openai_errors(400, 401, 403, 404),
)
async def get_model(model_id: FromPath[str], server: NamedDependency[Server]) -> ModelCard:
    name = model_id.lstrip("/")
    resident = server.registry.find(name)
    if resident is None or resident.model is None:
        raise ApiError(404, f"The model '{name}' is not loaded", code="model_not_found")
    return ModelCard(id=resident.name)


@post(
    f"{PREFIX}/completions",
    opt={"action": GENERATE},
    status_code=200,
    summary="OpenAI-compatible text completion",
    responses={
        **json_body(CompletionResponse, "The completion; with stream: true, server-sent events instead"),
        **openai_errors(*GENERATION_ERRORS),
    },
    operation_class=streamed_as(
        EVENT_STREAM, COMPLETION_EVENTS, "With stream: true, each event's data is one of these, then [DONE]"
    ),
)
async def completions(
    request: Request[Any, Any, Any],
    data: JSONBody[CompletionRequest],
    caller: NamedDependency[Caller],
    generations: NamedDependency[GenerationService],
) -> CompletionResponse | Stream:
    data = await strict_body(request, CompletionRequest)
    prompts, requests = _completion_requests(data)
    started = await generations.start_all(caller, requests)
    response_id, created, asked = f"cmpl-{uuid.uuid4().hex}", int(time.time()), data.logprobs is not None
    model = started[0].model_name
    echoes = [str(prompt) if data.echo else "" for prompt in prompts for _ in range(data.n)]

    def chunk(choices: list[CompletionChunkChoice], usage: UsageBody | None = None) -> CompletionChunk:
        return CompletionChunk(response_id, "text_completion", created, model, choices, usage)

    if data.stream:

        def on_delta(index: int, delta: Delta, first: bool) -> list[CompletionChunk]:
            text = (echoes[index] if first else "") + delta.text
            return [chunk([CompletionChunkChoice(index, text, _completion_logprobs(delta.logprobs, asked), None)])]

        def on_end(index: int, generation: Generation) -> list[CompletionChunk]:
            reason = generation.completion().finish_reason
            return [chunk([CompletionChunkChoice(index, "", None, reason)])]  # type: ignore[arg-type]

        usage = (lambda: chunk([], _usage(started, len(prompts)))) if _include_usage(data) else None
        return _events(started, on_delta, on_end, usage)
    await _complete_all(started)
    return CompletionResponse(
        id=response_id,
        created=created,
        model=model,
        choices=[
            CompletionChoice(
                index,
                echoes[index] + generation.completion().text,
                generation.completion().finish_reason,  # type: ignore[arg-type]
                _completion_logprobs(generation.handle.logprobs, asked, len(echoes[index])),
            )
            for index, generation in enumerate(started)
        ],
        usage=_usage(started, len(prompts)),
    )


@post(
    f"{PREFIX}/chat/completions",
    opt={"action": GENERATE},
    status_code=200,
    summary="OpenAI-compatible chat completion",
    responses={
        **json_body(ChatCompletionResponse, "The completion; with stream: true, server-sent events instead"),
        **openai_errors(*GENERATION_ERRORS),
    },
    operation_class=streamed_as(
        EVENT_STREAM, CHAT_COMPLETION_EVENTS, "With stream: true, each event's data is one of these, then [DONE]"
    ),
)
async def chat_completions(
    request: Request[Any, Any, Any],
    data: JSONBody[ChatCompletionRequest],
    caller: NamedDependency[Caller],
    generations: NamedDependency[GenerationService],
) -> ChatCompletionResponse | Stream:
    data = await strict_body(request, ChatCompletionRequest)
    started = await generations.start_all(caller, _chat_requests(data))
    response_id, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), started[0].model_name

    def chunk(choices: list[ChatChunkChoice], usage: UsageBody | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(response_id, "chat.completion.chunk", created, model, choices, usage)

    if data.stream:
        streams = [_ChatStream(index, generation, data.logprobs) for index, generation in enumerate(started)]

        def on_delta(index: int, delta: Delta, first: bool) -> list[ChatCompletionChunk]:
            return [chunk([choice]) for choice in streams[index].choices(delta, first)]

        def on_end(index: int, generation: Generation) -> list[ChatCompletionChunk]:
            return [chunk([choice]) for choice in streams[index].end()]

        usage = (lambda: chunk([], _usage(started, 1))) if _include_usage(data) else None
        return _events(started, on_delta, on_end, usage)
    await _complete_all(started)
    choices = []
    for index, generation in enumerate(started):
        turn = AssistantTurn()
        turn.add(generation.turn_events())
        message = AssistantMessage(
            role="assistant",
            content=turn.content if turn.content or not turn.tool_calls else None,
            tool_calls=[ToolCallResponse(c.id, FunctionCall(c.name, c.arguments)) for c in turn.tool_calls] or None,
            reasoning_content=turn.reasoning or None,
        )
        logprobs = _chat_logprobs(generation.handle.logprobs, data.logprobs)
        choices.append(ChatChoice(index, message, _finish_reason(generation, bool(turn.tool_calls)), logprobs))
    return ChatCompletionResponse(
        id=response_id, created=created, model=model, choices=choices, usage=_usage(started, 1)
    )


@dataclass
class _ChatStream:
    """One choice of a streamed chat completion: its text read as a turn, as OpenAI's deltas."""

    index: int
    generation: Generation
    logprobs: bool

    def __post_init__(self) -> None:
        self._splitter: TurnSplitter = self.generation.splitter()
        self._called = False

    def choices(self, delta: Delta, first: bool) -> list[ChatChunkChoice]:
        opening = [ChatChunkChoice(self.index, ChatDelta(role="assistant", content=""), None, None)] if first else []
        events = self._splitter.feed(delta.text)
        logprobs = _chat_logprobs(delta.logprobs, self.logprobs)
        if not events and logprobs is not None:
            events = [ContentDelta("")]  # tokens whose text is held back still carry their logprobs
        return opening + self._deltas(events, logprobs)

    def end(self) -> list[ChatChunkChoice]:
        deltas = self._deltas(self._splitter.finish(), None)
        reason = _finish_reason(self.generation, self._called)
        return [*deltas, ChatChunkChoice(self.index, ChatDelta(), None, reason)]

    def _deltas(self, events: list[TurnEvent], logprobs: ChatLogprobs | None) -> list[ChatChunkChoice]:
        choices = []
        for number, item in enumerate(events):
            carried = logprobs if number == 0 else None
            choices.append(ChatChunkChoice(self.index, self._delta(item), carried, None))
        return choices

    def _delta(self, item: TurnEvent) -> ChatDelta:
        if isinstance(item, ContentDelta):
            return ChatDelta(content=item.text)
        if isinstance(item, ReasoningDelta):
            return ChatDelta(reasoning_content=item.text)
        self._called = True
        if isinstance(item, ToolCallStart):
            call = ToolCallDelta(item.index, item.id, "function", FunctionCallDelta(name=item.name, arguments=""))
            return ChatDelta(tool_calls=[call])
        assert isinstance(item, ToolCallArguments)
        return ChatDelta(tool_calls=[ToolCallDelta(item.index, function=FunctionCallDelta(arguments=item.text))])


def _include_usage(data: SamplingFields) -> bool:
    return bool(data.stream_options and data.stream_options.include_usage)


async def _complete_all(started: list[Generation]) -> None:
    """Wait for every choice; the first failure stops the others (their completion raises too)."""
    results = await asyncio.gather(*(generation.complete() for generation in started), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


Chunk = CompletionChunk | ChatCompletionChunk


def _events(
    started: list[Generation],
    on_delta: Callable[[int, Delta, bool], list[Any]],
    on_end: Callable[[int, Generation], list[Any]],
    usage: Callable[[], Chunk] | None,
) -> Stream:
    """Every choice's deltas as server-sent events, interleaved as they are generated."""

    async def events() -> AsyncIterator[bytes]:
        queue: asyncio.Queue[tuple[int, Delta | None]] = asyncio.Queue()

        async def pump(index: int, generation: Generation) -> None:
            try:
                async for delta in generation.deltas():
                    await queue.put((index, delta))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.ensure_future(pump(index, generation)) for index, generation in enumerate(started)]
        first = [True] * len(started)
        try:
            remaining = len(started)
            while remaining:
                index, delta = await queue.get()
                if delta is None:
                    remaining -= 1
                    await tasks[index]  # raises what ended the choice's stream, if it failed
                    for item in on_end(index, started[index]):
                        yield event(item)
                    continue
                for item in on_delta(index, delta, first[index]):
                    yield event(item)
                first[index] = False
        except Exception as exc:  # headers are sent: report in-band as OpenAI's servers do
            yield event(error_body(as_api_error(exc)))
            yield DONE
            return
        finally:
            for task in tasks:
                task.cancel()
        if usage is not None:
            yield event(usage())
        yield DONE

    return streamed(events())


def openai_router() -> Router:
    """The OpenAI-compatible routes, answering errors in OpenAI's shape."""
    return Router(
        "/",
        route_handlers=[list_models, get_model, completions, chat_completions],
        exception_handlers={Exception: exception_handler(error_body)},
    )
