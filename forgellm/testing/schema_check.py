"""Every response checked against the server's own OpenAPI schema, with extra keys forbidden.

The schema at /docs/openapi.json is generated from each API's wire types; what the routes send is
encoded from the same types. This check holds the two together: for a route, status and media type
the schema declares, the body (a JSON body, every NDJSON line, every server-sent event and its JSON
data) must validate against the declared schema, in which no object may carry a key it does not
declare. A field added on the wire but not to the schema (or the other way round) fails the test
that produced it.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from jsonschema import Draft202012Validator


def forbid_extra_keys(node: Any) -> Any:
    """A copy of a JSON schema in which every object with declared properties allows no others."""
    if isinstance(node, list):
        return [forbid_extra_keys(item) for item in node]
    if not isinstance(node, dict):
        return node
    copied = {key: forbid_extra_keys(value) for key, value in node.items()}
    if "properties" in copied and "additionalProperties" not in copied:
        copied["additionalProperties"] = False
    return copied


def media_type(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").split(";")[0].strip()


def items(response: httpx.Response) -> list[Any]:
    """The JSON values a response carries: its body, or each line of NDJSON, or each event of SSE ({"data": ...})."""
    kind = media_type(response)
    if kind == "application/x-ndjson":
        return [json.loads(line) for line in response.text.splitlines() if line]
    if kind == "text/event-stream":
        return [{"data": line[len("data: ") :]} for line in response.text.splitlines() if line.startswith("data: ")]
    if kind == "text/plain":
        return [response.text]
    return [response.json()]


class ResponseSchemaCheck:
    """Validates responses against one app's schema; ``check(method, path, response)`` raises AssertionError."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self._components = forbid_extra_keys(spec.get("components", {}))

    def declared(self, method: str, path: str, response: httpx.Response) -> dict[str, Any] | None:
        """The schema the route declares for this response's status and media type, or None."""
        operation = self.spec["paths"].get(path, {}).get(method.lower())
        if operation is None:
            return None
        declared = operation["responses"].get(str(response.status_code))
        if declared is None:
            return None
        content = declared.get("content", {}).get(media_type(response))
        return None if content is None else content["schema"]

    def check(self, method: str, path: str, response: httpx.Response) -> None:
        schema = self.declared(method, path, response)
        if schema is None or method.upper() == "HEAD":  # a HEAD answer has the GET answer's headers, no body
            return
        validator = Draft202012Validator({**forbid_extra_keys(schema), "components": self._components})
        for item in items(response):
            errors = sorted(validator.iter_errors(item), key=str)
            assert not errors, f"{method} {path} {response.status_code}: {errors[0].message} in {item!r}"
            if media_type(response) == "text/event-stream" and item["data"] != "[DONE]":
                # jsonschema reads contentSchema as an annotation only: check each event's JSON data against it.
                declared_data = schema["properties"]["data"]
                document = declared_data["anyOf"][0] if "anyOf" in declared_data else declared_data  # [DONE] or not
                data_schema = forbid_extra_keys(document["contentSchema"])
                data = json.loads(item["data"])
                errors = sorted(Draft202012Validator(data_schema).iter_errors(data), key=str)
                assert not errors, f"{method} {path} event: {errors[0].message} in {data!r}"
