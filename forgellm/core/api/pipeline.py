"""The one generation pipeline every API dialect uses.

A route translates its dialect's request into a ``GenerationRequest`` and hands it, with the
``Caller`` (who asks, and how to tell when they leave), to the ``GenerationService``. The service
checks it, admits it (the caller's in-flight limit, then the plugins' ``before_generate`` hooks,
so rate limits come before any work), renders and tokenizes the prompt against the serving model
(bounded by --template-timeout, abandoned when the caller leaves), and queues it. It returns a
``Generation``: the route either awaits the whole ``Completion`` or iterates the text as it is
generated, and encodes either in its dialect. Either way the plugins' ``after_generate`` hooks
account for the job exactly once, and a caller that leaves or outlasts --request-timeout stops it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from forgellm.core.api.assistant_turn import TurnEvent, TurnSplitter, forced_call_schema, tool_prompt
from forgellm.core.engine.backend import LoadedModel, OutputFormat
from forgellm.core.engine.generation import (
    Completion,
    Constraint,
    Delta,
    GenerationJob,
    SamplingParams,
    Usage,
)
from forgellm.core.engine.scheduler import SequenceHandle
from forgellm.core.errors import ApiError, TemplateRefused, bad_request, service_unavailable
from forgellm.core.http.request_context import RequestRecord
from forgellm.core.identity import Identity
from forgellm.core.interruptible import run_interruptibly
from forgellm.core.models.registry import Resident
from forgellm.core.plugin_manager import await_me_maybe

if TYPE_CHECKING:
    from forgellm.core.server import Server

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class ToolChoice:
    """Whether the model may call the request's tools: as it sees fit ("auto"), not at all ("none"), or it must
    ("required", or a call to the function ``name``): a forced call is generated under a grammar."""

    mode: Literal["auto", "none", "required"] = "auto"
    name: str | None = None
    parallel: bool = True  # a forced call may be several calls (required, no name)

    @property
    def forced(self) -> bool:
        return self.mode == "required" or self.name is not None


@dataclass(frozen=True)
class GenerationRequest:
    """What every dialect asks of the engine, in neutral terms: a raw prompt or a conversation, and limits."""

    prompt: str | list[int] | None = None  # raw text (or token ids), taken as it is
    messages: list[dict[str, Any]] | None = None  # a conversation, rendered with the model's chat template
    tools: list[dict[str, Any]] | None = None  # OpenAI-format function tools the conversation may call
    tool_choice: ToolChoice = field(default_factory=lambda: ToolChoice())
    template_options: dict[str, Any] | None = None  # passed to the chat template (enable_thinking, ...)
    max_tokens: int | None = None  # None: default_max_tokens
    # The dialect's default; None: until the model stops, bounded by --max-tokens-cap and the model's context.
    default_max_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # The sampling fields the client set (client_sampling); the rest take the model's defaults where it has
    # some. None: every field is the request's own.
    sampling_given: frozenset[str] | None = None
    stop: tuple[str, ...] = ()
    model: str | None = None  # the model the client named; None: whichever serves
    constraint: Constraint | None = None  # what the output must be (constrained decoding)
    logprobs: int | None = None  # report each token's logprob and this many alternatives'

    @property
    def prompt_text(self) -> str:
        """The whole prompt as text, for plugins that inspect it: every message, system prompt and history too."""
        if self.messages is not None:
            return "\n".join(str(message.get("content") or "") for message in self.messages)
        return self.prompt if isinstance(self.prompt, str) else ""


def client_sampling(dialect_defaults: SamplingParams, **asked: Any) -> tuple[SamplingParams, frozenset[str]]:
    """A dialect's sampling: the fields the client asked for (None: left out) over the dialect's defaults, and
    which it asked for, so that the model's defaults take the place of the dialect's for the rest
    (GenerationRequest.sampling_given)."""
    given = {name: value for name, value in asked.items() if value is not None}
    return replace(dialect_defaults, **given), frozenset(given)


@dataclass
class Caller:
    """Who asks, as the pipeline needs to know them; built by the HTTP layer for each request."""

    identity: Identity | None
    client_key: str  # whose in-flight limit the request counts against
    record: RequestRecord  # what the access log will say about the request
    disconnected: Callable[[], Awaitable[None]]  # completes when the client goes away
    request: Any  # the framework's request, handed to the plugin hooks as they receive it


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


class Generation:
    """One admitted generation: await ``complete()``, or iterate ``deltas()``; not both. ``splitter()`` reads its
    text as an assistant's turn (content, reasoning, tool calls)."""

    def __init__(
        self,
        service: GenerationService,
        caller: Caller,
        model: LoadedModel,
        handle: SequenceHandle,
        request: GenerationRequest,
        served_as: str,
    ) -> None:
        self._service = service
        self._caller = caller
        self.model_name = served_as  # the name clients know the model by (--model NAME=...), not its path
        self.output_format = model.output_format
        self.handle = handle
        self._request = request
        self._timed_out = False  # --request-timeout ended it: what it generated stands, with finish_reason "timeout"
        opens_reasoning = self.output_format.opens_reasoning
        self._starts_in_reasoning = bool(
            opens_reasoning and request.messages is not None and opens_reasoning(handle.job.prompt_tokens)
        )

    def splitter(self) -> TurnSplitter:
        """A fresh splitter for this generation's text."""
        request = self._request
        choice = request.tool_choice
        tools = request.tools if choice.mode != "none" else None
        if tools and choice.name is not None:  # the grammar allows this one only
            tools = [tool for tool in tools if tool["function"]["name"] == choice.name]
        return TurnSplitter(
            self.output_format,
            tools=tools,
            forced=bool(tools) and request.tool_choice.forced,
            in_reasoning=self._starts_in_reasoning,
        )

    def turn_events(self) -> list[TurnEvent]:
        """The finished generation's whole text read as an assistant's turn (what a route that does not stream
        returns)."""
        splitter = self.splitter()
        return splitter.feed(self.completion().text) + splitter.finish()

    @property
    def sampling(self) -> SamplingParams:
        """What the generation samples with: the request's fields, the model's defaults for the rest."""
        return self.handle.job.sampling

    @property
    def cached_prompt_tokens(self) -> int:
        """Prompt tokens whose KV the engine reused from an earlier request instead of computing them."""
        return self.handle.cached_prompt_tokens

    async def complete(self) -> Completion:
        """The whole generation; stopped if the client disconnects or the timeout passes."""
        handle, deadline = self.handle, self._service.deadline()
        finished = asyncio.ensure_future(handle.wait())
        disconnected = asyncio.ensure_future(self._caller.disconnected())
        try:
            await asyncio.wait(
                {finished, disconnected},
                timeout=None if deadline is None else deadline - asyncio.get_running_loop().time(),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            finished.cancel()
            disconnected.cancel()
            handle.cancel()  # no-op when it finished
            await self._service.account(self._caller, handle)  # stopped early: charged what it generated
        if not handle.done:
            if disconnected.done():
                raise ApiError(499, "Client closed the request")
            self._time_out()
        return self.completion()

    async def deltas(self) -> AsyncIterator[Delta]:
        """Text (and logprobs) as generated, one delta per engine step; stopped when the iteration is closed (the
        client left) or the timeout passes (the stream then ends, its completion saying "timeout")."""
        try:
            async with asyncio.timeout_at(self._service.deadline()):
                async for delta in self.handle.chunks():
                    yield delta
        except TimeoutError:
            self._time_out()
        finally:
            self.handle.cancel()
            await self._service.account(self._caller, self.handle)  # a stream the client abandoned is charged

    def _time_out(self) -> None:
        """--request-timeout has passed: the text so far is the answer, unless there is none (a 504)."""
        if self.handle.completion_tokens == 0:
            raise self._service.timed_out()
        self._timed_out = True

    def completion(self) -> Completion:
        """The finished generation, once ``deltas()`` is exhausted; cut by --request-timeout, its finish_reason is
        "timeout"."""
        completion = self.handle.completion()
        return replace(completion, finish_reason="timeout") if self._timed_out else completion


class GenerationService:
    """The pipeline, one per server."""

    def __init__(self, server: Server) -> None:
        self._server = server

    async def start_all(self, caller: Caller, requests: list[GenerationRequest]) -> list[Generation]:
        """Start several generations (a request's choices) within one request's token budget; if one is
        refused, those started are stopped."""
        started: list[Generation] = []
        try:
            for request in self._within_request_budget(requests):
                started.append(await self._start(caller, request))
        except BaseException:
            for generation in started:
                generation.handle.cancel()
                await self.account(caller, generation.handle)
            raise
        return started

    async def start(self, caller: Caller, request: GenerationRequest) -> Generation:
        """Check, admit, tokenize and queue a generation. Every refusal happens before any body is sent.

        Once the before_generate hooks have run, after_generate runs exactly once for the job: here, with no
        tokens, when the job is refused later; else when it ends."""
        (request,) = self._within_request_budget([request])
        return await self._start(caller, request)

    def _within_request_budget(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        """The choices of one request, refused (400) when together they ask for more than --max-request-tokens,
        and, when they name no max_tokens, each given an equal share of it. One choice may always ask for
        --max-tokens-cap: the budget bounds what n multiplies."""
        settings = self._server.settings
        for request in requests:
            self._max_tokens(request)  # one choice past --max-tokens-cap is refused as such
        if not settings.max_request_tokens or not requests:
            return requests
        budget: int = max(settings.max_request_tokens, settings.max_tokens_cap)
        asked = sum(request.max_tokens or 0 for request in requests)
        if asked > budget:
            raise bad_request(
                f"The request asks for {asked} tokens over its {len(requests)} choice(s) (n times max_tokens); "
                f"the limit is {budget}"
            )
        share = max(1, budget // len(requests))
        return [
            request
            if request.max_tokens is not None
            else replace(request, default_max_tokens=min(request.default_max_tokens or share, share))
            for request in requests
        ]

    async def _start(self, caller: Caller, request: GenerationRequest) -> Generation:
        server = self._server
        resident, model = await server.registry.serving(request.model, caller)
        resident.pending += 1  # chosen: not to be unloaded while its prompt is prepared
        try:
            return await self._start_on(resident, model, caller, request)
        finally:
            resident.pending -= 1
            resident.touch()

    async def _start_on(
        self, resident: Resident, model: LoadedModel, caller: Caller, request: GenerationRequest
    ) -> Generation:
        server = self._server
        caller.record.model = resident.name
        request = self._with_tools(request, model.output_format)
        job = GenerationJob(
            prompt_tokens=[],
            max_tokens=self._max_tokens(request),
            sampling=self._sampling(request, resident),
            stop=self._stop_strings(request.stop),
            prompt_text=request.prompt_text,
            constraint=request.constraint,
            logprobs=request.logprobs,
            client=caller.client_key,
        )
        await self._admit(caller, job)
        try:
            job.prompt_tokens = await self._tokenize(caller, model, request)
            if not job.prompt_tokens:
                raise bad_request("The prompt is empty")
            limit = server.settings.max_prompt_tokens
            if len(job.prompt_tokens) > limit:
                raise bad_request(f"The prompt is {len(job.prompt_tokens)} tokens; the limit is {limit}")
            if resident.manager.current is not model:
                raise service_unavailable("The model changed while the request was prepared; retry")
            if request.max_tokens is None and model.context_length:
                # Left unbounded, a generation stops where the model's context ends.
                job.max_tokens = max(1, min(job.max_tokens, model.context_length - len(job.prompt_tokens)))
            caller.record.prompt_tokens = len(job.prompt_tokens)
            return Generation(self, caller, model, resident.scheduler.submit(job), request, resident.name)
        except BaseException:
            await self._finish(caller, job, Usage(len(job.prompt_tokens), 0))
            raise

    async def count_prompt_tokens(self, caller: Caller, request: GenerationRequest) -> int:
        """How many tokens the request's prompt is, as a generation would see it (template applied, tools
        described). Rendering a prompt is work, so it is admitted as a generation is (the in-flight limit and
        the before_generate hooks, rate limits among them) with a job of max_tokens 0, and accounted with no
        tokens generated."""
        server = self._server
        resident, model = await server.registry.serving(request.model, caller)
        caller.record.model = resident.name
        request = self._with_tools(request, model.output_format)
        job = GenerationJob(prompt_tokens=[], max_tokens=0, prompt_text=request.prompt_text)
        await self._admit(caller, job)
        try:
            job.prompt_tokens = await self._tokenize(caller, model, request)
            caller.record.prompt_tokens = len(job.prompt_tokens)
            return len(job.prompt_tokens)
        finally:
            await self._finish(caller, job, Usage(len(job.prompt_tokens), 0))

    async def _admit(self, caller: Caller, job: GenerationJob) -> None:
        """The caller's in-flight slot, then the plugins' before_generate hooks; a refusal frees the slot."""
        server = self._server
        server.in_flight.acquire(caller.client_key)
        try:
            hooks = server.hook.before_generate(
                identity=caller.identity, request=caller.request, job=job, server=server
            )
            for result in hooks:
                await await_me_maybe(result)
        except BaseException:
            server.in_flight.release(caller.client_key)
            raise

    @staticmethod
    def _with_tools(request: GenerationRequest, output_format: OutputFormat) -> GenerationRequest:
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
            schema = forced_call_schema(request.tools, choice.name, choice.parallel)
            changes["constraint"] = Constraint(schema)
        if not output_format.renders_tools and request.messages is not None:
            described = {"role": "system", "content": tool_prompt(request.tools, output_format)}
            changes["messages"] = _with_system_text(request.messages, described)
        return replace(request, **changes) if changes else request

    def _sampling(self, request: GenerationRequest, resident: Resident) -> SamplingParams:
        """The request's sampling, with the model's defaults for the fields the client left out."""
        if request.sampling_given is None:
            return request.sampling
        defaults = self._server.registry.sampling_defaults(resident)
        left_out: dict[str, Any] = {n: v for n, v in defaults.items() if n not in request.sampling_given}
        return replace(request.sampling, **left_out) if left_out else request.sampling

    def _max_tokens(self, request: GenerationRequest) -> int:
        settings = self._server.settings
        cap: int = settings.max_tokens_cap
        if request.max_tokens is None:
            return min(request.default_max_tokens or cap, cap)
        if request.max_tokens > cap:
            raise bad_request(f"max_tokens must be at most {cap}")
        return request.max_tokens

    @staticmethod
    def _stop_strings(stops: tuple[str, ...]) -> tuple[str, ...]:
        if len(stops) > MAX_STOP_STRINGS:
            raise bad_request(f"At most {MAX_STOP_STRINGS} stop strings are allowed")
        return tuple(stop for stop in stops if stop)

    async def _tokenize(self, caller: Caller, model: LoadedModel, request: GenerationRequest) -> list[int]:
        """The prompt's tokens, rendered on a thread that is abandoned when the client leaves or the template outlasts
        --template-timeout."""

        def work() -> list[int]:
            if request.constraint is not None:
                model.check_constraint(request.constraint)  # compiled here, off the event loop
            self._checked_ids([token for token, _ in request.sampling.logit_bias], model.vocab_size, "logit_bias")
            if isinstance(request.prompt, list):
                return self._checked_ids(request.prompt, model.vocab_size)
            if request.messages is None:
                return model.encode(request.prompt or "")
            if model.has_chat_template:
                options = request.template_options
                return model.encode_chat(request.messages, tools=request.tools, template_options=options)
            return model.encode(render_without_template(request.messages))

        timeout = self._server.settings.template_timeout
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
            tokens: list[int] = rendering.result()
            return tokens
        except TimeoutError:
            raise bad_request(f"Rendering the prompt took longer than {timeout:g}s (--template-timeout)") from None
        except TemplateRefused as exc:
            raise bad_request(f"The model's chat template rejected the conversation: {exc}") from None
        except ValueError as exc:  # a constraint the model cannot enforce, or token ids out of its vocabulary
            raise bad_request(str(exc)) from None

    @staticmethod
    def _checked_ids(tokens: list[int], vocab_size: int, field: str = "prompt") -> list[int]:
        # An id out of range would index past the logits (MLX does not check; the process would crash).
        for token in tokens:
            if not 0 <= token < vocab_size:
                raise ValueError(f"{field}: token id {token} is not in the model's vocabulary (0 to {vocab_size - 1})")
        return tokens

    async def account(self, caller: Caller, handle: SequenceHandle) -> None:
        record = caller.record
        record.completion_tokens = handle.completion_tokens
        if handle.first_token_at is not None:
            record.time_to_first_token_ms = (handle.first_token_at - handle.submitted_at) * 1000
        await self._finish(caller, handle.job, handle.usage)

    async def _finish(self, caller: Caller, job: GenerationJob, usage: Usage) -> None:
        """The end of an admitted job: after_generate for the plugins, and the client's in-flight slot freed."""
        server = self._server
        try:
            hooks = server.hook.after_generate(
                identity=caller.identity, request=caller.request, job=job, usage=usage, server=server
            )
            for result in hooks:
                await await_me_maybe(result)
        finally:
            server.in_flight.release(caller.client_key)

    def deadline(self) -> float | None:
        """When a generation starting now times out, in the event loop's clock (what asyncio.timeout_at takes)."""
        timeout = self._server.settings.request_timeout
        return asyncio.get_running_loop().time() + timeout if timeout and timeout > 0 else None

    def timed_out(self) -> ApiError:
        seconds = self._server.settings.request_timeout
        return ApiError(504, f"Generation took longer than the {seconds:g}s request timeout", code="timeout")
