"""Streamed responses: NDJSON and server-sent events, with the media type a client sees."""

from __future__ import annotations

from collections.abc import AsyncIterator

from litestar.response import Stream

from forgellm.core.http.openapi import EVENT_STREAM


def streamed(body: AsyncIterator[bytes], media_type: str = EVENT_STREAM) -> Stream:
    """A streamed body of this media type (server-sent events unless told), never cached on the way."""
    # A header, not media_type=: Litestar lets the route's default (JSON) override a Stream's media_type.
    return Stream(body, headers={"Content-Type": media_type, "Cache-Control": "no-cache"})
