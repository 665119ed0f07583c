"""The errors a client sees: a status, a message, optional headers and a machine-readable code.

Each API dialect puts them on the wire in its own shape (its ``protocol`` module);
``forgellm.core.http.errors`` turns any other exception into one of these.
"""

from __future__ import annotations

from collections.abc import Mapping


class ApiError(Exception):
    """An error the client sees: a status, a message, and optional headers and machine-readable code."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = dict(headers or {})
        self.code = code


INVALID_CREDENTIALS = "Invalid API key or token"


class Unauthorized(ApiError):
    """Missing or invalid credentials (401, with a WWW-Authenticate challenge)."""

    def __init__(self, message: str = "Missing or invalid credentials") -> None:
        super().__init__(401, message, headers={"WWW-Authenticate": 'Bearer realm="forgellm"'}, code="invalid_api_key")


class Forbidden(ApiError):
    """Valid credentials without the needed permission (403)."""

    def __init__(self, message: str) -> None:
        super().__init__(403, message, code="insufficient_scope")


class TemplateRefused(ValueError):
    """A backend's chat template refused to render a conversation ("roles must alternate"): the client's input."""


def service_unavailable(message: str, retry_after: int = 1) -> ApiError:
    return ApiError(503, message, headers={"Retry-After": str(retry_after)}, code="unavailable")


def bad_request(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, code=code)
