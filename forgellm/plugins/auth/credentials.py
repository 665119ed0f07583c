"""Where a request's credentials come from: ``Authorization: Bearer ...`` or ``X-API-Key``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from litestar.datastructures import Headers

from forgellm import Unauthorized

AUTHORIZATION = "authorization"
API_KEY_HEADER = "x-api-key"

# A compact JWS: header.payload.signature, each base64url (an unsigned token has an empty signature).
_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Credential:
    value: str
    bearer: bool  # True: from Authorization (an API key or a JWT); False: from X-API-Key (an API key)


def _single(headers: Headers, name: str) -> str | None:
    values = headers.getall(name, [])
    if len(values) > 1:
        raise Unauthorized(f"Send one {name} header, not {len(values)}")
    return values[0] if values else None


def credential_of(headers: Headers) -> Credential:
    """The one credential a request carries; none, several, or a malformed header is a 401."""
    authorization = _single(headers, AUTHORIZATION)
    api_key = _single(headers, API_KEY_HEADER)
    if authorization is not None and api_key is not None:
        raise Unauthorized("Send credentials in either the Authorization or the X-API-Key header, not both")
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthorized("Unsupported authorization scheme; use Authorization: Bearer <key or token>")
        value = value.strip()
        if not value:
            raise Unauthorized("The Bearer credential is empty")
        return Credential(value, bearer=True)
    if api_key is not None:
        value = api_key.strip()
        if not value:
            raise Unauthorized("The X-API-Key header is empty")
        return Credential(value, bearer=False)
    raise Unauthorized("Missing credentials: send Authorization: Bearer <key or token>, or X-API-Key: <key>")


def looks_like_jwt(value: str) -> bool:
    return _JWT_SHAPE.match(value) is not None
