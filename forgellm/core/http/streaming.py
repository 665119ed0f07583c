"""Streamed responses: NDJSON and server-sent events, with the media type a client sees.

Once a stream has begun its status line is sent, so a failure can only be told inside it: each API ends
its streams in its own way (an error line, an error event then ``[DONE]``, ...), and ``streamed`` is given
that ending once, rather than each route catching failures around its own loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable

from litestar.response import Stream

from forgellm.core.errors import ApiError
from forgellm.core.http.errors import as_api_error
from forgellm.core.http.openapi import EVENT_STREAM

# What a stream sends in place of the rest when it fails: the API's error, in the stream's own format.
FailureEnding = Callable[[ApiError], Iterable[bytes]]


def streamed(
    body: AsyncIterator[bytes], media_type: str = EVENT_STREAM, on_failure: FailureEnding | None = None
) -> Stream:
    """A streamed body of this media type (server-sent events unless told), never cached on the way; a failure
    mid-way ends it with on_failure's bytes (without one, the failure ends the connection)."""
    # A header, not media_type=: Litestar lets the route's default (JSON) override a Stream's media_type.
    headers = {"Content-Type": media_type, "Cache-Control": "no-cache"}
    return Stream(body if on_failure is None else _ending(body, on_failure), headers=headers)


async def _ending(body: AsyncIterator[bytes], on_failure: FailureEnding) -> AsyncIterator[bytes]:
    try:
        async for chunk in body:
            yield chunk
    except Exception as exc:  # the status line is sent already: report the failure in-band
        for chunk in on_failure(as_api_error(exc)):
            yield chunk
