"""API errors and their two wire shapes: the guide's envelope and OpenAI's error object."""

from __future__ import annotations

import logging
from typing import Mapping

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

logger = logging.getLogger("forgellm")

OPENAI_PREFIX = "/v1"

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_overloaded",
}


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
        super().__init__(
            401, message, headers={"WWW-Authenticate": 'Bearer realm="forgellm"'}, code="invalid_api_key"
        )


class Forbidden(ApiError):
    """Valid credentials without the needed permission (403)."""

    def __init__(self, message: str) -> None:
        super().__init__(403, message, code="insufficient_scope")


class TemplateRefused(ValueError):
    """A backend's chat template refused to render a conversation ("roles must alternate"): the client's input."""


def service_unavailable(message: str, retry_after: int = 1) -> ApiError:
    return ApiError(503, message, headers={"Retry-After": str(retry_after)}, code="unavailable")


def bad_request(message: str) -> ApiError:
    return ApiError(400, message, code="invalid_request")


def _validation_message(exc: ValidationException) -> str:
    problems = exc.extra if isinstance(exc.extra, list) else []
    parts = []
    for problem in problems:
        if isinstance(problem, dict) and problem.get("message"):
            key = problem.get("key")
            located = key and key != "data"  # "data" is Litestar's name for the whole body
            parts.append(f"{problem['message']} (field: {key})" if located else str(problem["message"]))
    return "Invalid request: " + ("; ".join(parts) if parts else str(exc.detail))


def as_api_error(exc: Exception) -> ApiError:
    """Translate any exception into the ApiError the client will see; never leaks internals."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnicodeDecodeError):  # raised while Litestar reads a body that is not UTF-8
        return bad_request("Request body is not valid JSON (it is not UTF-8)")
    if isinstance(exc, RecursionError) and "deserializing" in str(exc):  # msgspec, on JSON nested too deep
        return bad_request("Request body is not valid JSON (it is nested too deeply)")
    if isinstance(exc, ValidationException):
        return ApiError(400, _validation_message(exc), code="invalid_request")
    if isinstance(exc, HTTPException):
        detail = exc.detail
        if exc.status_code == 404:
            detail = "Not found"
        elif exc.status_code == 405:
            detail = "Method not allowed"
        elif exc.status_code == 413:
            detail = "Request body too large"
        elif exc.status_code == 400:
            detail = f"Request body is not valid JSON ({detail})"
        return ApiError(exc.status_code, detail, headers=exc.headers)
    logger.error("unhandled error", exc_info=exc)
    return ApiError(500, "Internal server error", code="internal_error")


def envelope(error: ApiError) -> dict:
    return {"success": False, "error": error.message}


def openai_error(error: ApiError) -> dict:
    return {
        "error": {
            "message": error.message,
            "type": _OPENAI_TYPES.get(error.status_code, "server_error"),
            "param": None,
            "code": error.code,
        }
    }


def is_openai_path(path: str, root_path: str = "") -> bool:
    path = path[len(root_path) :] if root_path and path.startswith(root_path) else path
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def error_response(request: Request, exc: Exception) -> Response:
    """Litestar exception handler: the envelope everywhere, OpenAI's shape under /v1."""
    error = as_api_error(exc)
    shape = openai_error if is_openai_path(request.scope["path"], request.scope.get("root_path", "")) else envelope
    return Response(shape(error), status_code=error.status_code, headers=error.headers)
