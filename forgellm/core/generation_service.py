"""The request side of a generation, shared by the guide's API and the OpenAI-compatible API.

Tokenize against the serving model, let plugins refuse or account (before/after hooks),
submit to the scheduler, then either wait for the whole text or stream it, stopping the
sequence when the client leaves or the request times out.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Optional

import anyio
import jinja2
from litestar import Request

from forgellm.backends.base import LoadedModel
from forgellm.core.access_control import identity_of
from forgellm.core.errors import ApiError, bad_request, service_unavailable
from forgellm.core.generation import Completion, GenerationJob
from forgellm.core.plugins import await_me_maybe
from forgellm.core.request_context import record_of
from forgellm.core.scheduler import SequenceHandle


def server_of(request: Request):
    return request.app.state.server


def render_without_template(messages: list[dict]) -> str:
    """A conversation as plain text, for models that have no chat template."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


async def tokenize(
    request: Request, *, text: Optional[str] = None, messages: Optional[list[dict]] = None
) -> tuple[LoadedModel, list[int]]:
    """The serving model and the prompt's tokens: raw text as is, messages through the chat template."""
    model = server_of(request).models.require_model()
    if messages is not None and model.has_chat_template:
        try:
            tokens = await anyio.to_thread.run_sync(model.encode_chat, messages)
        except (jinja2.TemplateError, ValueError) as exc:
            # Templates refuse conversations they cannot render ("roles must alternate"): the client's input.
            raise bad_request(f"The model's chat template rejected the conversation: {exc}") from None
    else:
        raw = text if messages is None else render_without_template(messages)
        tokens = await anyio.to_thread.run_sync(model.encode, raw)
    return model, tokens


async def start(request: Request, model: LoadedModel, job: GenerationJob) -> SequenceHandle:
    """Check the job, let plugins refuse it, and queue it; every refusal happens before any body is sent."""
    server = server_of(request)
    if not job.prompt_tokens:
        raise bad_request("The prompt is empty")
    limit = server.settings.max_prompt_tokens
    if len(job.prompt_tokens) > limit:
        raise bad_request(f"The prompt is {len(job.prompt_tokens)} tokens; the limit is {limit}")
    if server.models.current is not model:
        raise service_unavailable("The model changed while the request was prepared; retry")
    record_of(request).prompt_tokens = len(job.prompt_tokens)
    identity = identity_of(request)
    for result in server.hook.before_generate(identity=identity, request=request, job=job, server=server):
        await await_me_maybe(result)
    return server.scheduler.submit(job)


async def _account(request: Request, handle: SequenceHandle) -> None:
    server = server_of(request)
    record = record_of(request)
    record.completion_tokens = handle.completion_tokens
    if handle.first_token_at is not None:
        record.time_to_first_token_ms = (handle.first_token_at - handle.submitted_at) * 1000
    for result in server.hook.after_generate(
        identity=record.identity, request=request, job=handle.job, usage=handle.usage, server=server
    ):
        await await_me_maybe(result)


def _deadline(request: Request) -> Optional[float]:
    """When the request times out, in the event loop's clock (what asyncio.timeout_at takes)."""
    timeout = server_of(request).settings.request_timeout
    return asyncio.get_running_loop().time() + timeout if timeout and timeout > 0 else None


def _timed_out(request: Request) -> ApiError:
    seconds = server_of(request).settings.request_timeout
    return ApiError(504, f"Generation took longer than the {seconds:g}s request timeout", code="timeout")


async def _client_disconnects(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def complete(request: Request, handle: SequenceHandle) -> Completion:
    """Wait for the whole generation; stop it if the client disconnects or the timeout passes."""
    deadline = _deadline(request)
    finished = asyncio.ensure_future(handle.wait())
    disconnected = asyncio.ensure_future(_client_disconnects(request))
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
    if not handle.done:
        if handle.completion_tokens:  # stopped early: what was generated is spent all the same
            await _account(request, handle)
        if disconnected.done():
            raise ApiError(499, "Client closed the request")
        raise _timed_out(request)
    await _account(request, handle)
    return handle.completion()


async def stream(request: Request, handle: SequenceHandle) -> AsyncIterator[str]:
    """Text chunks as they are generated; the sequence is stopped when the client leaves (the generator closes)."""
    deadline = _deadline(request)
    try:
        async with asyncio.timeout_at(deadline):
            async for text in handle.chunks():
                yield text
    except TimeoutError:
        raise _timed_out(request) from None
    finally:
        handle.cancel()
        if handle.done or handle.completion_tokens:  # a stream the client abandoned is charged too
            await _account(request, handle)
