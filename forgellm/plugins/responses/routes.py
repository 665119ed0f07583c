"""``POST /v1/responses`` (and reading or deleting a stored response): OpenAI's Responses API over the pipeline.

A request's input items become a conversation of chat-template messages (after the stored conversation
of ``previous_response_id``, if given); the generation's text is read as an assistant's turn and
returned as output items, whole or as typed server-sent events.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from litestar import Router, delete, get
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import Stream

from forgellm import (
    EVENT_STREAM,
    GENERATE,
    ApiError,
    Caller,
    Constraint,
    Generation,
    GenerationRequest,
    GenerationService,
    OpenAIError,
    SamplingParams,
    Server,
    ToolChoice,
    bad_request,
    client_sampling,
    error_responses,
    exception_handler,
    generation_post,
    openai_error_body,
    streamed,
    template_tool,
    template_tool_call,
)
from forgellm.plugins.responses.output import OutputBuilder, new_id
from forgellm.plugins.responses.protocol import (
    PATH,
    STREAM_EVENTS,
    DeletedResponse,
    ErrorEvent,
    FunctionCallItem,
    IncompleteDetails,
    InputItem,
    InputTokensDetails,
    MessageItem,
    OutputItem,
    ResponseErrorDetail,
    ResponseLifecycleEvent,
    ResponseObject,
    ResponseRequest,
    ResponseUsage,
    StreamEvent,
    TextOptions,
    encode_event,
)
from forgellm.plugins.responses.store import ResponseStore, StoredResponse

STATE_KEY = "responses"
# Values of ``include`` this server can honour: logprobs, and encrypted reasoning (none is ever encrypted: a
# reasoning item carries its text in the clear, so there is nothing to add).
INCLUDABLE = {"message.output_text.logprobs", "reasoning.encrypted_content"}


def store_of(server: Server) -> ResponseStore:
    store: ResponseStore = server.plugin_state[STATE_KEY]
    return store


# -- request translation -------------------------------------------------------------------------


def _refuse_unsupported(data: ResponseRequest) -> None:
    for name in ("background", "conversation", "prompt", "max_tool_calls"):
        if getattr(data, name) is not None:
            raise bad_request(f"{name} is not supported by this server")
    for value in data.include or ():
        if value not in INCLUDABLE:
            raise bad_request(f"include: {value!r} is not supported by this server")


def _text(parts: str | list[Any] | None, where: str) -> str:
    if parts is None or isinstance(parts, str):
        return parts or ""
    texts = []
    for part in parts:
        if part.type in ("input_text", "output_text", "reasoning_text", "summary_text"):
            texts.append(part.text or "")
        elif part.type == "refusal":
            texts.append(part.refusal or "")
        else:
            raise bad_request(f"{where} has a {part.type} part; only text is supported by this server")
    return "".join(texts)


def _arguments(text: str | None) -> Any:
    try:
        return json.loads(text or "{}")
    except ValueError:
        return text  # a malformed call the model made is passed back as it was


def conversation_of(items: str | list[InputItem]) -> list[dict[str, Any]]:
    """The input as chat-template messages: calls join the assistant message before them, outputs are tool
    messages, reasoning items are left out (chat templates drop earlier turns' reasoning)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for number, item in enumerate(items):
        where = f"input[{number}]"
        if item.type == "message":
            if item.role is None:
                raise bad_request(f"{where} is a message without a role")
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": _text(item.content, where)})
        elif item.type == "function_call":
            if not item.call_id or not item.name:
                raise bad_request(f"{where} is a function_call without call_id and name")
            call = template_tool_call(item.call_id, item.name, _arguments(item.arguments))
            if not messages or messages[-1]["role"] != "assistant":
                messages.append({"role": "assistant", "content": ""})
            messages[-1].setdefault("tool_calls", []).append(call)
        elif item.type == "function_call_output":
            if not item.call_id:
                raise bad_request(f"{where} is a function_call_output without call_id")
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output, where)})
    return messages


def _tool_choice(data: ResponseRequest) -> ToolChoice:
    choice, parallel = data.tool_choice, data.parallel_tool_calls is not False
    if choice is not None and choice != "none" and not data.tools:
        raise bad_request("tool_choice needs tools")
    if choice is None or isinstance(choice, str):
        return ToolChoice(choice or "auto", None, parallel)
    return ToolChoice("auto", choice.name, parallel)


def _constraint(text: TextOptions | None) -> Constraint | None:
    format = text.format if text is not None else None
    if format is None or format.type == "text":
        return None
    if format.type == "json_object":
        return Constraint({"type": "object"})
    if format.schema is None:
        raise bad_request("text.format of type json_schema needs a schema")
    return Constraint(format.schema)


# OpenAI's defaults, for what neither the request nor the model's defaults set.
RESPONSES_SAMPLING = SamplingParams(temperature=1.0)


def generation_request(data: ResponseRequest, conversation: list[dict[str, Any]]) -> GenerationRequest:
    instructions = [{"role": "system", "content": data.instructions}] if data.instructions else []
    logprobs = "message.output_text.logprobs" in (data.include or ())
    effort = data.reasoning.effort if data.reasoning is not None else None
    sampling, given = client_sampling(RESPONSES_SAMPLING, temperature=data.temperature, top_p=data.top_p)
    return GenerationRequest(
        messages=instructions + conversation,
        tools=[template_tool(tool.name, tool.parameters, tool.description) for tool in data.tools or ()] or None,
        tool_choice=_tool_choice(data),
        template_options={"reasoning_effort": effort} if effort else None,
        max_tokens=data.max_output_tokens,
        sampling=sampling,
        sampling_given=given,
        model=data.model,
        constraint=_constraint(data.text),
        logprobs=(data.top_logprobs or 0) if logprobs else None,
    )


# -- the response --------------------------------------------------------------------------------


@dataclass
class Reply:
    """One response being made: what it echoes of the request, and how to describe it at each stage."""

    data: ResponseRequest
    model: str
    sampling: SamplingParams  # what the generation runs with: the request's, else the model's defaults
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def object(
        self,
        status: Any,
        output: list[OutputItem],
        generation: Generation | None = None,
        error: ResponseErrorDetail | None = None,
    ) -> ResponseObject:
        data = self.data
        usage = None
        if generation is not None and status != "failed":
            used = generation.completion().usage
            usage = ResponseUsage(
                used.prompt_tokens,
                used.completion_tokens,
                used.total_tokens,
                InputTokensDetails(generation.cached_prompt_tokens),
            )
        tool_choice: Any = data.tool_choice or "auto"
        incomplete = None
        if status == "incomplete":
            timed_out = generation is not None and generation.completion().finish_reason == "timeout"
            incomplete = IncompleteDetails("timeout" if timed_out else "max_output_tokens")
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            model=self.model,
            status=status,
            output=output,
            usage=usage,
            error=error,
            incomplete_details=incomplete,
            instructions=data.instructions,
            max_output_tokens=data.max_output_tokens,
            previous_response_id=data.previous_response_id,
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            parallel_tool_calls=data.parallel_tool_calls is not False,
            tool_choice=tool_choice,
            tools=data.tools or [],
            text=data.text or TextOptions(),
            store=data.store,
            metadata=data.metadata or {},
        )


def _status(generation: Generation) -> Any:
    return "incomplete" if generation.completion().cut_short else "completed"


def _assistant_messages(output: list[OutputItem]) -> list[dict[str, Any]]:
    """A response's output as the conversation continues it: one assistant message with its calls."""
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in output:
        if isinstance(item, MessageItem):
            message["content"] += "".join(part.text for part in item.content)
        elif isinstance(item, FunctionCallItem):
            call = template_tool_call(item.call_id, item.name, _arguments(item.arguments))
            message.setdefault("tool_calls", []).append(call)
    return [message]


# -- routes --------------------------------------------------------------------------------------


def _errors(*statuses: int) -> dict[int, Any]:
    return error_responses(OpenAIError, *statuses)


@generation_post(
    PATH,
    ResponseRequest,
    summary="OpenAI Responses API: create a model response",
    answer=(ResponseObject, "The response; with stream: true, typed server-sent events instead"),
    error_body=OpenAIError,
    stream=(EVENT_STREAM, STREAM_EVENTS, "With stream: true, each event is one of these"),
)
async def create_response(
    data: ResponseRequest,
    caller: NamedDependency[Caller],
    generations: NamedDependency[GenerationService],
    server: NamedDependency[Server],
) -> ResponseObject | Stream:
    _refuse_unsupported(data)
    store = store_of(server)
    history: list[dict[str, Any]] = []
    if data.previous_response_id is not None:
        previous = store.get(data.previous_response_id, caller.client_key)
        if previous is None:
            raise ApiError(
                404,
                f"Previous response with id '{data.previous_response_id}' not found "
                "(it was never stored, was deleted, or has been evicted)",
                code="previous_response_not_found",
            )
        history = previous.conversation
    conversation = history + conversation_of(data.input)
    generation = await generations.start(caller, generation_request(data, conversation))
    reply = Reply(data, generation.model_name, generation.sampling)

    def keep(response: ResponseObject) -> None:
        if data.store:
            whole = conversation + _assistant_messages(response.output)
            store.put(StoredResponse(caller.client_key, response, whole))

    if data.stream:
        return _stream(reply, generation, keep)
    await generation.complete()
    status, builder = _status(generation), OutputBuilder()
    builder.feed(generation.turn_events(), generation.logprobs)
    builder.finish(status)
    response = reply.object(status, builder.items, generation)
    keep(response)
    return response


def _stream(reply: Reply, generation: Generation, keep: Any) -> Stream:
    builder, numbers = OutputBuilder(), itertools.count()

    def encoded(event: StreamEvent) -> bytes:
        event.sequence_number = next(numbers)
        return encode_event(event)

    async def events() -> AsyncIterator[bytes]:
        for kind in ("response.created", "response.in_progress"):
            yield encoded(
                ResponseLifecycleEvent(type=kind, sequence_number=0, response=reply.object("in_progress", []))
            )
        async for chunk in generation.turn():
            for event in builder.feed(chunk.events, chunk.logprobs):
                yield encoded(event)
        status = _status(generation)
        for event in builder.finish(status):
            yield encoded(event)
        response = reply.object(status, builder.items, generation)
        keep(response)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        yield encoded(ResponseLifecycleEvent(type=kind, sequence_number=0, response=response))

    def failed(error: ApiError) -> list[bytes]:  # in-band, as OpenAI's streams report a failure
        code = error.code or "server_error"
        failure = reply.object("failed", builder.items, error=ResponseErrorDetail(code, error.message))
        return [
            encoded(ErrorEvent(sequence_number=0, code=code, message=error.message)),
            encoded(ResponseLifecycleEvent(type="response.failed", sequence_number=0, response=failure)),
        ]

    return streamed(events(), on_failure=failed)


def _stored(server: Server, caller: Caller, response_id: str) -> StoredResponse:
    entry = store_of(server).get(response_id, caller.client_key)
    if entry is None:
        raise ApiError(404, f"No stored response with id '{response_id}'", code="not_found")
    return entry


@get(
    f"{PATH}/{{response_id:str}}",
    opt={"action": GENERATE},
    summary="A stored response (only to the client that created it)",
    responses=_errors(401, 403, 404),
)
async def get_response(
    response_id: FromPath[str], caller: NamedDependency[Caller], server: NamedDependency[Server]
) -> ResponseObject:
    return _stored(server, caller, response_id).response


@delete(
    f"{PATH}/{{response_id:str}}",
    opt={"action": GENERATE},
    status_code=200,
    summary="Delete a stored response",
    responses=_errors(401, 403, 404),
)
async def delete_response(
    response_id: FromPath[str], caller: NamedDependency[Caller], server: NamedDependency[Server]
) -> DeletedResponse:
    _stored(server, caller, response_id)
    store_of(server).delete(response_id, caller.client_key)
    return DeletedResponse(response_id)


def responses_router() -> Router:
    return Router(
        "/",
        route_handlers=[create_response, get_response, delete_response],
        exception_handlers={Exception: exception_handler(openai_error_body)},
    )
