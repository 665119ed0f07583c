"""``json_post``: one way to declare a POST route that takes a JSON body, for the core's APIs and every dialect;
``generation_post``: the same for a route that generates, with the responses every such route declares.

The handler's first parameter, ``data``, receives the body decoded strictly (a wrong JSON type is a 400,
never a silent coercion: ``strict_body``); its other parameters are Litestar dependencies by name
(``caller``, ``generations``, ``server``). The route Litestar sees still declares ``data`` with the body's
type, so the OpenAPI schema names the request body, and the preamble every route would repeat is here once.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from litestar import Request, post
from litestar.handlers.http_handlers import HTTPRouteHandler
from litestar.params import JSONBody

from forgellm.core.http.openapi import GENERATION_ERRORS, error_responses, json_body, streamed_as
from forgellm.core.http.strict_body import strict_body
from forgellm.core.identity import GENERATE

Body = TypeVar("Body")
Handler = Callable[..., Awaitable[Any]]


def json_post(path: str, body: type[Body], **route: Any) -> Callable[[Handler], HTTPRouteHandler]:
    """A POST route at path (Litestar's ``post`` options in route) whose handler takes the body as ``data``."""

    def declare(handler: Handler) -> HTTPRouteHandler:
        hints = typing.get_type_hints(handler, include_extras=True)
        parameters = list(inspect.signature(handler).parameters.values())
        if not parameters or parameters[0].name != "data":
            raise TypeError(f"{handler.__name__}: a json_post handler takes the body as its first parameter, data")
        dependencies = [parameter.replace(annotation=hints[parameter.name]) for parameter in parameters[1:]]

        @functools.wraps(handler)
        async def decoded(request: Request[Any, Any, Any], data: Any, **given: Any) -> Any:
            return await handler(await strict_body(request, body), **given)

        keyword = inspect.Parameter.KEYWORD_ONLY
        signature = inspect.Signature(
            [
                inspect.Parameter("request", keyword, annotation=Request[Any, Any, Any]),
                inspect.Parameter("data", keyword, annotation=JSONBody[body]),  # type: ignore[valid-type,misc]
                *(parameter.replace(kind=keyword) for parameter in dependencies),
            ],
            return_annotation=hints["return"],
        )
        decoded.__signature__ = signature  # type: ignore[attr-defined]
        decoded.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        decoded.__annotations__["return"] = hints["return"]
        del decoded.__wrapped__  # type: ignore[attr-defined]  # Litestar must read this signature, not handler's
        return post(path, **route)(decoded)

    return declare


def generation_post(
    path: str,
    body: type[Body],
    *,
    summary: str,
    answer: tuple[type, str],
    error_body: type,
    stream: tuple[str, dict[str, Any], str],
) -> Callable[[Handler], HTTPRouteHandler]:
    """A route that generates, in any dialect: the generate action, its JSON answer (type, description), the
    generation errors in the dialect's error body, and its streamed form (media type, item schema, description)."""
    answer_type, answer_description = answer
    media_type, item_schema, stream_description = stream
    return json_post(
        path,
        body,
        opt={"action": GENERATE},
        status_code=200,
        summary=summary,
        responses={
            **json_body(answer_type, answer_description),
            **error_responses(error_body, *GENERATION_ERRORS),
        },
        operation_class=streamed_as(media_type, item_schema, stream_description),
    )
