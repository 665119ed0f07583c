"""``POST /v1/embeddings``: OpenAI's embeddings endpoint over the pipeline, its wire shapes defined here once.

``input`` is a string, a list of strings, a list of token ids or a list of token-id lists (the model's
own ids, taken as they are); ``encoding_format`` ``base64`` sends each vector as little-endian float32
bytes, as OpenAI's clients (which ask for it by default) decode them.
"""

from __future__ import annotations

import base64
import struct
from typing import Annotated, Literal

import msgspec

from forgellm.core.api.embeddings import EmbeddingRequest
from forgellm.core.api.pipeline import GenerationService
from forgellm.core.api.request import Caller
from forgellm.core.errors import bad_request


class EmbeddingsRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # One list type only in a msgspec union: embedding_inputs() checks which kind of list it is.
    input: str | list[str | int | list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None  # accepted and ignored, as on the other routes
    # Extension (vLLM's truncate_prompt_tokens, as a switch): cut an input longer than the model's window to
    # fit, instead of the 400 it gets by default.
    truncate: bool = False


class EmbeddingData(msgspec.Struct):
    embedding: list[float] | str  # a string: base64 of little-endian float32
    index: int
    object: Literal["embedding"] = "embedding"


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(msgspec.Struct):
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
    object: Literal["list"] = "list"


def embedding_inputs(value: str | list[str | int | list[int]]) -> list[str] | list[list[int]]:
    """The request's inputs as texts or as token-id lists; a list mixing kinds is a 400."""
    if isinstance(value, str):
        return [value]
    if all(isinstance(item, str) for item in value):
        return [item for item in value if isinstance(item, str)]
    if all(isinstance(item, int) for item in value):
        return [[item for item in value if isinstance(item, int)]] if value else []
    if all(isinstance(item, list) for item in value):
        return [item for item in value if isinstance(item, list)]
    raise bad_request("input: a list of strings, of token ids, or of token-id lists, not a mix of them")


def encoded_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


async def serve_embeddings(
    data: EmbeddingsRequest, caller: Caller, generations: GenerationService
) -> EmbeddingsResponse:
    request = EmbeddingRequest(embedding_inputs(data.input), data.model, data.truncate, data.dimensions)
    result = await generations.embed(caller, request)
    return EmbeddingsResponse(
        data=[
            EmbeddingData(encoded_vector(vector, data.encoding_format), index)
            for index, vector in enumerate(result.vectors)
        ],
        model=result.model_name,
        usage=EmbeddingUsage(result.prompt_tokens, result.prompt_tokens),
    )
