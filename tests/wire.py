"""What the tests read off the wire, decoded one way everywhere: streams, credentials, the guide's status."""

from __future__ import annotations

import json
from typing import Any


def ndjson(response) -> list[dict[str, Any]]:
    """The lines of a newline-delimited JSON body (the guide's stream), decoded."""
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def sse_data(response) -> list[str]:
    """The data payloads of a server-sent event stream, in order, as sent."""
    return [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]


def sse(response) -> list[Any]:
    """A server-sent event stream's data, decoded, ending with the literal [DONE]."""
    return [event if event == "[DONE]" else json.loads(event) for event in sse_data(response)]


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def loaded_status(model_name: str, adapter_path: str | None = None) -> dict[str, Any]:
    """The guide's status body for a model that loaded."""
    return {
        "success": True,
        "loaded": True,
        "is_loading": False,
        "model_name": model_name,
        "adapter_path": adapter_path,
        "error": None,
        "progress": None,
    }
