"""The request side of a generation, shared by the guide's API and the OpenAI-compatible API.

Admit it (the client's in-flight limit, then the plugins' before hooks: rate limits before any
work is spent), tokenize against the serving model, submit to the scheduler, then either wait
for the whole text or stream it, stopping the sequence when the client leaves or the request
times out; the plugins' after hooks account for it.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Optional

from litestar import Request

from forgellm.backends.base import LoadedModel
from forgellm.core.access_control import identity_of
from forgellm.core.clients import connection_client_key
from forgellm.core.errors import ApiError, TemplateRefused, bad_request, service_unavailable
from forgellm.core.generation import Completion, GenerationJob, Usage
from forgellm.core.interruptible import run_interruptibly
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


async def start(
    request: Request, job: GenerationJob, *, text: Optional[str] = None, messages: Optional[list[dict]] = None
) -> SequenceHandle:
    """Admit a generation: the client's in-flight limit, then the plugins' checks (rate limits first, before any
    work), then the prompt tokenized (raw text as is, messages through the chat template) and queued.

    Every refusal happens before any body is sent. Once the before_generate hooks have run, after_generate runs
    exactly once for the job: here, with no tokens, when the job is refused later; else when it ends."""
    server = server_of(request)
    model = server.models.require_model()
    key = _client_key(request)
    server.in_flight.acquire(key)
    try:
        identity = identity_of(request)
        for result in server.hook.before_generate(identity=identity, request=request, job=job, server=server):
            await await_me_maybe(result)
    except BaseException:
        server.in_flight.release(key)
        raise
    try:
        job.prompt_tokens = await _tokenize(request, model, text, messages)
        if not job.prompt_tokens:
            raise bad_request("The prompt is empty")
        limit = server.settings.max_prompt_tokens
        if len(job.prompt_tokens) > limit:
            raise bad_request(f"The prompt is {len(job.prompt_tokens)} tokens; the limit is {limit}")
        if server.models.current is not model:
            raise service_unavailable("The model changed while the request was prepared; retry")
        record_of(request).prompt_tokens = len(job.prompt_tokens)
        return server.scheduler.submit(job)
    except BaseException:
        await _finish(request, job, Usage(len(job.prompt_tokens), 0))
        raise


async def _tokenize(request: Request, model: LoadedModel, text: Optional[str], messages: Optional[list[dict]]) -> list[int]:
    """The prompt's tokens, rendered on a thread that is abandoned when the client leaves or the template outlasts
    --template-timeout."""
    if messages is not None and model.has_chat_template:
        work, args = model.encode_chat, (messages,)
    else:
        work, args = model.encode, (text if messages is None else render_without_template(messages),)
    timeout = server_of(request).settings.template_timeout
    rendering = asyncio.ensure_future(run_interruptibly(work, *args, timeout=timeout))
    disconnected = asyncio.ensure_future(_client_disconnects(request))
    try:
        await asyncio.wait({rendering, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
        if not rendering.done():
            rendering.cancel()  # interrupts the rendering thread
    if not rendering.done() or rendering.cancelled():
        raise ApiError(499, "Client closed the request")
    try:
        return rendering.result()
    except TimeoutError:
        raise bad_request(f"Rendering the prompt took longer than {timeout:g}s (--template-timeout)") from None
    except TemplateRefused as exc:
        raise bad_request(f"The model's chat template rejected the conversation: {exc}") from None


def _client_key(request: Request) -> str:
    return connection_client_key(request, identity_of(request), server_of(request).settings.ipv6_client_prefix)


async def _account(request: Request, handle: SequenceHandle) -> None:
    record = record_of(request)
    record.completion_tokens = handle.completion_tokens
    if handle.first_token_at is not None:
        record.time_to_first_token_ms = (handle.first_token_at - handle.submitted_at) * 1000
    await _finish(request, handle.job, handle.usage)


async def _finish(request: Request, job: GenerationJob, usage: Usage) -> None:
    """The end of an admitted job: after_generate for the plugins, and the client's in-flight slot freed."""
    server = server_of(request)
    try:
        for result in server.hook.after_generate(
            identity=identity_of(request), request=request, job=job, usage=usage, server=server
        ):
            await await_me_maybe(result)
    finally:
        server.in_flight.release(_client_key(request))


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
        await _account(request, handle)  # a generation stopped early is charged what it generated
    if not handle.done:
        if disconnected.done():
            raise ApiError(499, "Client closed the request")
        raise _timed_out(request)
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
        await _account(request, handle)  # a stream the client abandoned is charged too
