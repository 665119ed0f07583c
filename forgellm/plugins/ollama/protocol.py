"""Ollama's API on the wire: requests, answers, stream lines, the error object, and a request's ``options``.

Each shape is defined once here; the routes decode and encode these and the OpenAPI schema is generated
from them. Answers leave out what is unset (``omit_defaults``), as Ollama's do.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from forgellm import ApiError, SamplingParams, bad_request

NDJSON = "application/x-ndjson"
# The Ollama release whose API this dialect follows: clients gate features on /api/version's answer.
OLLAMA_API_VERSION = "0.12.0"

# Ollama's own sampling defaults (a Modelfile's, when it sets none); a model's generation_config.json and the
# operator's per-model defaults take their place for the fields a request leaves out.
OLLAMA_SAMPLING = SamplingParams(
    temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.1, repetition_context_size=64
)


class OllamaError(msgspec.Struct):
    """Ollama's error body, and a stream's line when it fails half-way."""

    error: str


def error_body(error: ApiError) -> OllamaError:
    return OllamaError(error.message)


def ndjson_line(payload: msgspec.Struct) -> bytes:
    return msgspec.json.encode(payload) + b"\n"


def error_lines(error: ApiError) -> list[bytes]:
    """How a stream that fails half-way ends: one error line, which Ollama's clients raise."""
    return [ndjson_line(error_body(error))]


# -- options ---------------------------------------------------------------------------------------


class Options(msgspec.Struct, forbid_unknown_fields=True):
    """A request's ``options``. Sampling and stopping are honoured; what Ollama sets when it loads a model
    (threads, GPU layers, memory mapping, the context size) is accepted and ignored, as this server sizes
    models itself (docs/ollama.md); a sampler this server does not have is a 400 unless it is left off."""

    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    seed: int | None = None
    stop: list[str] | None = None
    num_predict: int | None = None  # -1: until the model stops; -2: until the context is full
    repeat_penalty: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None
    repeat_last_n: Annotated[int, msgspec.Meta(ge=-1)] | None = None  # 0: off; -1: the whole context
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    # Samplers this server does not have: their neutral values only.
    typical_p: float | None = None
    tfs_z: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    penalize_newline: bool | None = None
    # Load-time settings: accepted and ignored.
    num_ctx: int | None = None
    num_keep: int | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    num_thread: int | None = None
    numa: bool | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    embedding_only: bool | None = None

    def check(self) -> None:
        unsupported = {
            "typical_p": self.typical_p not in (None, 1.0),
            "tfs_z": self.tfs_z not in (None, 1.0),
            "mirostat": self.mirostat not in (None, 0),
            "penalize_newline": self.penalize_newline is True,
        }
        for name, asked in unsupported.items():
            if asked:
                raise bad_request(f"options.{name} is not supported by this server; leave it out")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad_request("options.seed must be between 0 and 2**63 - 1")
        if self.num_predict is not None and self.num_predict < -2:
            raise bad_request("options.num_predict must be -1 (no limit), -2 (fill the context) or at least 0")

    def sampling(self) -> dict[str, Any]:
        """The sampling fields the request set, by SamplingParams' names (None: left out)."""
        window = self.repeat_last_n
        penalty = self.repeat_penalty
        if window == 0:  # Ollama's "disabled"
            penalty, window = None, None
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "seed": self.seed,
            "repetition_penalty": penalty,
            "repetition_context_size": None if window is None or window < 0 else window,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }


# -- requests --------------------------------------------------------------------------------------

KeepAlive = float | str | None  # seconds, or a duration ("5m", "1h30m"); negative: forever; 0: unload after
Format = str | dict[str, Any] | None  # "json", or a JSON schema


class ToolFunctionCall(msgspec.Struct):
    name: str
    arguments: dict[str, Any]


class ToolCall(msgspec.Struct, omit_defaults=True):
    function: ToolFunctionCall
    id: str | None = None


class Message(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    role: str
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None  # refused: no vision
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None  # the tool a "tool" message answers


class ToolFunction(msgspec.Struct):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(msgspec.Struct):
    function: ToolFunction
    type: str = "function"


class ChatRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: list[Message] = msgspec.field(default_factory=list)
    tools: list[Tool] | None = None
    format: Format = None
    options: Options | None = None
    stream: bool = True
    keep_alive: KeepAlive = None
    think: bool | str | None = None
    logprobs: bool | None = None  # refused when true
    top_logprobs: int | None = None


class GenerateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    prompt: str = ""
    system: str | None = None
    raw: bool = False  # the prompt as it is, no chat template
    format: Format = None
    options: Options | None = None
    stream: bool = True
    keep_alive: KeepAlive = None
    think: bool | str | None = None
    # Refused when set (docs/ollama.md says why).
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class EmbedRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: str | list[str]
    truncate: bool = True  # Ollama's default: an input past the model's window is cut to fit
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    options: Options | None = None  # accepted; nothing in it changes an embedding
    keep_alive: KeepAlive = None


class ModelRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    name: str | None = None  # the older clients' field for model
    verbose: bool = False
    insecure: bool = False  # /api/pull's; built-in models come through pip, checked by their sha256
    stream: bool = True

    def model_name(self) -> str:
        name = self.model or self.name
        if not name:
            raise bad_request("model is required")
        return name


# -- answers ---------------------------------------------------------------------------------------


class Statistics(msgspec.Struct, omit_defaults=True):
    """What a finished request's last line adds: Ollama's counts and durations (nanoseconds)."""

    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class Reply(msgspec.Struct, omit_defaults=True):
    """The assistant's message in an answer: its content always present (empty on the last line)."""

    role: str
    content: str
    thinking: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatLine(Statistics, kw_only=True, omit_defaults=True):
    model: str
    created_at: str
    message: Reply
    done: bool


class GenerateLine(Statistics, kw_only=True, omit_defaults=True):
    model: str
    created_at: str
    response: str
    done: bool
    thinking: str | None = None


class EmbedResponse(msgspec.Struct, omit_defaults=True):
    model: str
    embeddings: list[list[float]]
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None


class ModelDetails(msgspec.Struct):
    format: str = "mlx"
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""
    parent_model: str = ""


class ListedModel(msgspec.Struct, omit_defaults=True):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str | None = None  # /api/ps: when it unloads if left idle
    size_vram: int | None = None
    context_length: int | None = None


class ModelList(msgspec.Struct):
    models: list[ListedModel]


class ShowResponse(msgspec.Struct):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class Version(msgspec.Struct):
    version: str


class PullStatus(msgspec.Struct, omit_defaults=True):
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None
