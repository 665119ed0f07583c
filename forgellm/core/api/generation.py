"""One admitted generation, as the API dialects read it: its text as deltas or as an assistant's turn, its
whole completion, and its counts; and a group of them (a request's ``n`` choices).

A generation is stopped when the client leaves or --request-timeout passes. Cut by the timeout, it is
answered with what it generated (finish_reason "timeout"); only one that generated nothing is a 504.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

from forgellm.core.api.assistant_turn import TurnEvent, TurnSplitter
from forgellm.core.api.request import Caller, GenerationRequest
from forgellm.core.engine.backend import OutputFormat
from forgellm.core.engine.generation import Completion, Delta, SamplingParams, TokenLogprob
from forgellm.core.engine.sequence_handle import SequenceHandle
from forgellm.core.errors import ApiError


@dataclass(frozen=True)
class TurnChunk:
    """What one engine step adds to an assistant's turn: its events (content, reasoning, tool calls) and the
    logprobs of the tokens behind them. The last chunk of a turn holds what its end completes."""

    events: list[TurnEvent]
    logprobs: tuple[TokenLogprob, ...] = ()


def request_timed_out(seconds: float, work: str = "Generation") -> ApiError:
    return ApiError(504, f"{work} took longer than the {seconds:g}s request timeout", code="timeout")


class Generation:
    """One admitted generation: await ``complete()``, or iterate ``deltas()`` (or ``turn()``); not both."""

    def __init__(
        self,
        handle: SequenceHandle,
        request: GenerationRequest,
        output_format: OutputFormat,
        served_as: str,
        caller: Caller,
        finish: Callable[[SequenceHandle], Awaitable[None]],
        timeout: float,
    ) -> None:
        self._handle = handle
        self._request = request
        self.output_format = output_format
        self.model_name = served_as  # the name clients know the model by (--model NAME=...), not its path
        self._caller = caller
        self._finish = finish  # accounts for the job once it ends (after_generate, the in-flight slot)
        self._timeout = timeout
        # When it times out, in the event loop's clock (what asyncio.timeout_at takes).
        self._deadline = asyncio.get_running_loop().time() + timeout if timeout > 0 else None
        self._accounted = False
        self._timed_out = False  # --request-timeout ended it: what it generated stands, with finish_reason "timeout"
        opens_reasoning = output_format.opens_reasoning
        self._starts_in_reasoning = bool(
            opens_reasoning and request.messages is not None and opens_reasoning(handle.job.prompt_tokens)
        )

    # -- what it is ------------------------------------------------------------------------------
    @property
    def sampling(self) -> SamplingParams:
        """What the generation samples with: the request's fields, the model's defaults for the rest."""
        return self._handle.job.sampling

    @property
    def prompt_tokens(self) -> int:
        return len(self._handle.job.prompt_tokens)

    @property
    def cached_prompt_tokens(self) -> int:
        """Prompt tokens whose KV the engine reused from an earlier request instead of computing them."""
        return self._handle.cached_prompt_tokens

    @property
    def logprobs(self) -> list[TokenLogprob]:
        """One per generated token, when the request asked for them."""
        return self._handle.logprobs

    # -- its text ---------------------------------------------------------------------------------
    def splitter(self) -> TurnSplitter:
        """A fresh splitter for this generation's text, read as an assistant's turn."""
        request = self._request
        choice = request.tool_choice
        tools = request.tools if choice.mode != "none" else None
        if tools and choice.name is not None:  # the grammar allows this one only
            tools = [tool for tool in tools if tool["function"]["name"] == choice.name]
        return TurnSplitter(
            self.output_format,
            tools=tools,
            forced=bool(tools) and choice.forced,
            in_reasoning=self._starts_in_reasoning,
        )

    def turn_events(self) -> list[TurnEvent]:
        """The finished generation's whole text read as an assistant's turn (what a route that does not stream
        returns)."""
        splitter = self.splitter()
        return splitter.feed(self.completion().text) + splitter.finish()

    async def turn(self) -> AsyncIterator[TurnChunk]:
        """The turn as it is generated, one chunk per engine step, then one for what its end completes."""
        splitter = self.splitter()
        async for delta in self.deltas():
            yield TurnChunk(splitter.feed(delta.text), delta.logprobs)
        yield TurnChunk(splitter.finish())

    async def complete(self) -> Completion:
        """The whole generation; stopped if the client disconnects or the timeout passes."""
        handle, deadline = self._handle, self._deadline
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
            await self._account()  # stopped early: charged what it generated
        if not handle.done:
            if disconnected.done():
                raise ApiError(499, "Client closed the request")
            self._time_out()
        return self.completion()

    async def deltas(self) -> AsyncIterator[Delta]:
        """Text (and logprobs) as generated, one delta per engine step; stopped when the iteration is closed (the
        client left) or the timeout passes (the stream then ends, its completion saying "timeout")."""
        try:
            async with asyncio.timeout_at(self._deadline):
                async for delta in self._handle.chunks():
                    yield delta
        except TimeoutError:
            self._time_out()
        finally:
            self._handle.cancel()
            await self._account()  # a stream the client abandoned is charged

    def completion(self) -> Completion:
        """The finished generation, once ``deltas()`` is exhausted; cut by --request-timeout, its finish_reason is
        "timeout"."""
        completion = self._handle.completion()
        return replace(completion, finish_reason="timeout") if self._timed_out else completion

    async def stop(self) -> None:
        """Stop generating (its batch slot frees at the next step), charged for what it generated."""
        self._handle.cancel()
        await self._account()

    async def _account(self) -> None:
        if not self._accounted:  # once, however it ends
            self._accounted = True
            await self._finish(self._handle)

    def _time_out(self) -> None:
        """--request-timeout has passed: the text so far is the answer, unless there is none (a 504)."""
        if self._handle.completion_tokens == 0:
            raise request_timed_out(self._timeout)
        self._timed_out = True


class GenerationGroup(list[Generation]):
    """The generations of one request (its ``n`` choices, or its prompts): awaited together, or streamed
    interleaved as each is generated. The first failure stops the others."""

    @property
    def model_name(self) -> str:
        return self[0].model_name

    async def complete(self) -> list[Completion]:
        """Every generation's completion; the first failure is raised (the others' completions raise too)."""
        results = await asyncio.gather(*(generation.complete() for generation in self), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [generation.completion() for generation in self]

    async def interleaved(self) -> AsyncIterator[tuple[int, Delta | None]]:
        """(index, delta) as each generation produces them; (index, None) when one ends. A generation that
        fails raises its error here, and the rest are stopped."""
        queue: asyncio.Queue[tuple[int, Delta | None]] = asyncio.Queue()

        async def pump(index: int, generation: Generation) -> None:
            try:
                async for delta in generation.deltas():
                    await queue.put((index, delta))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.ensure_future(pump(index, generation)) for index, generation in enumerate(self)]
        try:
            remaining = len(tasks)
            while remaining:
                index, delta = await queue.get()
                if delta is None:
                    remaining -= 1
                    await tasks[index]  # raises what ended the generation's stream, if it failed
                yield index, delta
        finally:
            for task in tasks:
                task.cancel()
