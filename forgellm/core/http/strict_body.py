"""Strict request bodies: the API promises a 400 for a wrong JSON type, never a silent coercion.

Litestar converts the ``data`` parameter leniently (``"max_tokens": "10"`` becomes 10), so
routes keep ``data`` for the schema and validation messages, then re-read the body strictly.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from litestar import Request

from forgellm.core.errors import bad_request

T = TypeVar("T")


async def strict_body(request: Request[Any, Any, Any], body_type: type[T]) -> T:
    try:
        return msgspec.json.decode(await request.body(), type=body_type, strict=True)
    except msgspec.ValidationError as exc:
        raise bad_request(f"Invalid request: {_readable(str(exc))}") from None
    except RecursionError:
        raise bad_request("Request body is not valid JSON (it is nested too deeply)") from None


def _readable(message: str) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.max_tokens`"; name the field plainly.
    text, _, location = message.partition(" - at `$.")
    return f"{text} (field: {location.rstrip('`')})" if location else text
