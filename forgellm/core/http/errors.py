"""Any exception as the ApiError a client sees, answered in the error shape of the API it called.

Each API's router installs ``exception_handler(its shape)``; requests that matched no route, and
refusals made before routing, take the shape of the API whose path prefix they fall under
(``ErrorShapes``), the guide's envelope otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from forgellm.core.errors import ApiError, bad_request

logger = logging.getLogger("forgellm")

ErrorShape = Callable[[ApiError], Any]  # an ApiError as the body an API sends (a Struct or a dict)


def _validation_message(exc: ValidationException) -> str:
    problems = exc.extra if isinstance(exc.extra, list) else []
    parts = []
    for problem in problems:
        if isinstance(problem, dict) and problem.get("message"):
            key = problem.get("key")
            located = key and key != "data"  # "data" is Litestar's name for the whole body
            parts.append(f"{problem['message']} (field: {key})" if located else str(problem["message"]))
    return "Invalid request: " + ("; ".join(parts) if parts else str(exc.detail))


def as_api_error(exc: BaseException) -> ApiError:
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


def exception_handler(shape: ErrorShape) -> Callable[[Request[Any, Any, Any], Exception], Response[Any]]:
    """A Litestar exception handler answering in this shape."""

    def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        error = as_api_error(exc)
        return Response(shape(error), status_code=error.status_code, headers=error.headers)

    return handle


class ErrorShapes:
    """Which error shape a path gets when no route's own handler answers: by path prefix, longest first."""

    def __init__(self, default: ErrorShape) -> None:
        self._default = default
        self._by_prefix: dict[str, ErrorShape] = {}

    def register(self, prefix: str, shape: ErrorShape) -> None:
        self._by_prefix[prefix.rstrip("/")] = shape

    def for_path(self, path: str, root_path: str = "") -> ErrorShape:
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        for prefix in sorted(self._by_prefix, key=len, reverse=True):
            if path == prefix or path.startswith(prefix + "/"):
                return self._by_prefix[prefix]
        return self._default

    def handler(self) -> Callable[[Request[Any, Any, Any], Exception], Response[Any]]:
        """The app-wide exception handler: the shape of the path's API."""

        def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
            shape = self.for_path(request.scope["path"], request.scope.get("root_path", ""))
            return exception_handler(shape)(request, exc)

        return handle
