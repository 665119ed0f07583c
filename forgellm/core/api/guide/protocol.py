"""The integration guide's wire format: every body its routes take or send, streamed lines and errors too.

These Structs are the one definition of each shape: the routes decode and encode them, the NDJSON
stream is encoded from them line by line, and the OpenAPI schema is generated from them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

import msgspec

from forgellm.core.engine.generation import Completion
from forgellm.core.errors import ApiError
from forgellm.core.http.openapi import any_of
from forgellm.core.models.slot import ModelState

NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]


class ErrorEnvelope(msgspec.Struct):
    """The integration guide's error body, on every route outside the other APIs' prefixes."""

    success: bool  # always false
    error: str


def error_body(error: ApiError) -> ErrorEnvelope:
    return ErrorEnvelope(success=False, error=error.message)


class Message(msgspec.Struct):
    role: Literal["system", "user", "assistant"]
    content: str


class StatusResponse(msgspec.Struct):
    success: bool
    loaded: bool
    is_loading: bool
    model_name: str | None
    adapter_path: str | None
    error: str | None
    progress: str | None  # what a running load is doing; null otherwise

    @classmethod
    def of(cls, state: ModelState) -> StatusResponse:
        """The guide's status body for the default model's state."""
        return cls(
            success=True,
            loaded=state.loaded,
            is_loading=state.is_loading,
            model_name=state.model_name,
            adapter_path=state.adapter_path,
            error=state.error,
            progress=state.progress,
        )


class LoadRequest(msgspec.Struct):
    model_name: NonEmptyStr
    adapter_path: NonEmptyStr | None = None


class LoadResponse(msgspec.Struct):
    success: bool
    message: str
    model_name: str
    adapter_path: str | None


class UnloadResponse(msgspec.Struct):
    success: bool
    message: str


class GenerateRequest(msgspec.Struct):
    prompt: str
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # The guide names no default. Left out: the model's defaults (the operator's, its generation_config.json),
    # else greedy, as mlx_lm.server's default: its clients send no temperature, and a small model sampled at
    # 0.7 often answers wrongly what it knows.
    temperature: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0, le=100)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None
    stop: str | list[str] | None = None
    system_prompt: str | None = None
    history: list[Message] | None = None
    streaming: bool = False
    # The text is a JSON value valid against this JSON Schema, enforced by constrained decoding.
    json_schema: dict[str, Any] | None = None


class GenerateResponse(msgspec.Struct):
    success: bool
    text: str
    generation_time: float
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    tokens_per_sec: float
    finish_reason: str

    @classmethod
    def of(cls, completion: Completion) -> Self:
        usage = completion.usage
        return cls(
            success=True,
            text=completion.text,
            generation_time=completion.generation_time,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            tokens_per_sec=completion.tokens_per_sec,
            finish_reason=completion.finish_reason,
        )


class NdjsonChunk(msgspec.Struct, tag_field="type", tag="chunk"):
    """A streamed line: text as it is generated."""

    text: str


class NdjsonComplete(GenerateResponse, tag_field="type", tag="complete"):
    """The last streamed line of a successful generation: the plain response's body, tagged."""


class NdjsonError(msgspec.Struct, tag_field="type", tag="error"):
    """The last streamed line of a generation that failed after the stream began."""

    success: bool  # always false
    error: str


NDJSON_STREAM = any_of(NdjsonChunk, NdjsonComplete, NdjsonError)

_encoder = msgspec.json.Encoder()


def ndjson_line(line: NdjsonChunk | NdjsonComplete | NdjsonError) -> bytes:
    return _encoder.encode(line) + b"\n"
