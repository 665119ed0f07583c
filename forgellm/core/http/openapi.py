"""What the OpenAPI schema (/docs/openapi.json) says beyond the route handlers' signatures.

Litestar derives request bodies and JSON responses from the msgspec Structs that routes take and
return. These helpers add what a signature cannot say, from the same Structs each API's
``protocol`` module defines: the error bodies a route may answer with, and the streaming
variants of the generate routes, documented beside the JSON body of the same 200 response:

- ``application/x-ndjson`` (``/api/model/generate`` with ``streaming: true``): one JSON object a line;
- ``text/event-stream`` (``/v1/...`` with ``stream: true``): each event's ``data:`` holds one JSON
  object, and the stream ends with ``data: [DONE]``.

A sequence has no JSON schema of its own in OpenAPI 3.1, so a streaming media type's schema
describes one item: an NDJSON line, or one server-sent event. An event is an object whose ``data``
is a JSON document (``contentMediaType``/``contentSchema``) or the closing ``[DONE]``, as OpenAPI
3.2's ``itemSchema`` models event streams and as schema-driven tools (schemathesis) read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIResponse, Operation, Schema
from litestar.openapi.spec.media_type import OpenAPIMediaType

NDJSON = "application/x-ndjson"
EVENT_STREAM = "text/event-stream"

ERROR_DESCRIPTIONS = {
    400: "Invalid request: malformed JSON, a field out of range, an empty or too long prompt, or no model loaded",
    401: "Missing or invalid credentials (an auth plugin is on); see the WWW-Authenticate header",
    403: "The credentials lack the scope this route needs, a plugin refused the request, the model is not allowed, "
    "or a request without credentials came from another web origin",
    404: "The model named in the request is not resident (nor loaded on demand), or no such item exists",
    409: "A model is loading already; wait for it to finish",
    413: "The request body is larger than the server accepts (--max-body-size)",
    415: "A request without credentials sent a body that is not application/json",
    429: "A rate or token limit is reached (ratelimit plugin); see the Retry-After header",
    500: "The generation failed inside the engine",
    503: "The server is at capacity or the model is loading; retry after the Retry-After header's seconds",
    504: "The generation ran longer than the request timeout (--request-timeout)",
}


# What a route that generates may answer besides 200, in its API's error shape.
GENERATION_ERRORS = (400, 401, 403, 404, 413, 415, 429, 500, 503, 504)


def error_responses(body: type, *statuses: int) -> dict[int, ResponseSpec]:
    """Response specs for these statuses, answered with this error body (an API's error shape)."""
    return {
        status: ResponseSpec(data_container=body, description=ERROR_DESCRIPTIONS[status], generate_examples=False)
        for status in statuses
    }


def json_body(data: Any, description: str) -> dict[int, ResponseSpec]:
    """The 200 response of a route that answers JSON or a stream: its JSON body (the stream is added by
    ``streamed_as``)."""
    return {200: ResponseSpec(data_container=data, description=description, generate_examples=False)}


def any_of(*types: type) -> dict[str, Any]:
    """A self-contained JSON schema accepting any of these Structs (their definitions inlined)."""
    return {"anyOf": [_inlined(msgspec.json.schema(t)) for t in types]}


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def server_sent_event(data_schema: dict[str, Any], done_marker: bool = True) -> dict[str, Any]:
    """One server-sent event: its data is a JSON document matching data_schema, or (with done_marker) the closing
    [DONE]."""
    document = {"type": "string", "contentMediaType": "application/json", "contentSchema": data_schema}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"type": "string"},
            "data": {"anyOf": [document, {"const": "[DONE]"}]} if done_marker else document,
        },
    }


def streamed_as(media_type: str, item_schema: dict[str, Any], description: str) -> type[Operation]:
    """An Operation class (a route's ``operation_class``) that adds the streaming body to its 200 response."""
    schema = {"description": description, **item_schema}

    @dataclass
    class StreamingOperation(Operation):
        def __post_init__(self) -> None:
            ok = cast(OpenAPIResponse, (self.responses or {})["200"])
            cast(dict[str, OpenAPIMediaType], ok.content)[media_type] = OpenAPIMediaType(schema=cast(Schema, schema))

    return StreamingOperation
