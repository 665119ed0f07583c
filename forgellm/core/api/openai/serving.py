"""What the chat and completion endpoints share: a request's sampling fields and its choices, usage,
logprobs, finish reasons, and server-sent events interleaving a request's choices as they are generated."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from litestar.response import Stream

from forgellm.core.api.generation import Generation, GenerationGroup
from forgellm.core.api.openai.protocol import (
    DONE,
    ChatCompletionChunk,
    CompletionChunk,
    CompletionTokensDetails,
    OpenAIError,
    PromptTokensDetails,
    SamplingFields,
    TokenLogprobBody,
    TopLogprob,
    UsageBody,
    error_body,
    event,
)
from forgellm.core.api.request import GenerationRequest, client_sampling
from forgellm.core.engine.generation import Delta, SamplingParams, TokenLogprob
from forgellm.core.errors import ApiError, bad_request
from forgellm.core.http.openapi import error_responses
from forgellm.core.http.streaming import streamed


def openai_errors(*statuses: int) -> dict[int, Any]:
    return error_responses(OpenAIError, *statuses)


# -- request translation -------------------------------------------------------------------------


def refuse_unsupported(fields: dict[str, Any]) -> None:
    """Fields this server cannot honour: each set one is a 400 naming it, never silently dropped."""
    for name, value in fields.items():
        if value is not None:
            raise bad_request(f"{name} is not supported by this server")


# mlx_lm.server's name for the model it serves, which its clients send: here, the default model.
MLX_LM_DEFAULT_MODEL = "default_model"
# OpenAI's defaults, for what neither the request nor the model's defaults set.
OPENAI_SAMPLING = SamplingParams(temperature=1.0)


def _sampling(data: SamplingFields) -> tuple[SamplingParams, frozenset[str]]:
    logit_bias = []
    for key, bias in (data.logit_bias or {}).items():
        if not key.isdigit():
            raise bad_request(f"logit_bias keys are token ids; {key!r} is not one")
        logit_bias.append((int(key), bias))
    sampling, given = client_sampling(
        OPENAI_SAMPLING,
        temperature=data.temperature,
        top_p=data.top_p,
        top_k=data.top_k,
        min_p=data.min_p,
        repetition_penalty=data.repetition_penalty or None,  # mlx_lm.server's 0: no penalty
    )
    windows = {
        name: value
        for name, value in (
            ("repetition_context_size", data.repetition_context_size),
            ("presence_context_size", data.presence_context_size),
            ("frequency_context_size", data.frequency_context_size),
        )
        if value is not None
    }
    sampling = replace(
        sampling,
        presence_penalty=data.presence_penalty,
        frequency_penalty=data.frequency_penalty,
        xtc_probability=data.xtc_probability,
        xtc_threshold=data.xtc_threshold,
        logit_bias=tuple(logit_bias),
        **windows,
    )
    return sampling, given


def choice_requests(data: SamplingFields, base: GenerationRequest) -> list[GenerationRequest]:
    """The request's choices (n of them) for one prompt or conversation: base, with the request's sampling."""
    if data.stream_options is not None and not data.stream:
        raise bad_request("stream_options is only allowed when stream is true")
    if data.draft_model not in (None, MLX_LM_DEFAULT_MODEL):
        raise bad_request("draft_model: a request cannot choose one; the server's --draft-model drafts for all")
    if data.adapters is not None:
        raise bad_request("adapters: an adapter is served as a model of its own; name that model instead")
    stop = data.stop if data.stop is None or isinstance(data.stop, list) else [data.stop]
    model = None if data.model == MLX_LM_DEFAULT_MODEL else data.model
    sampling, given = _sampling(data)
    base = replace(base, stop=tuple(stop or ()), model=model, sampling_given=given)
    # n choices of one seeded request differ from each other, and each is reproducible.
    seeds = [None if data.seed is None else data.seed + choice for choice in range(data.n)]
    return [replace(base, sampling=replace(sampling, seed=seed)) for seed in seeds]


# -- response translation ------------------------------------------------------------------------


def usage_of(generations: GenerationGroup, prompts: int) -> UsageBody:
    """Prompt tokens once per prompt (its n choices share it), completion tokens of every choice."""
    completions = [generation.completion() for generation in generations]
    per_prompt = len(generations) // max(prompts, 1)
    prompt_tokens = sum(c.usage.prompt_tokens for c in completions[::per_prompt]) if completions else 0
    completion_tokens = sum(c.usage.completion_tokens for c in completions)
    cached = sum(g.cached_prompt_tokens for g in generations[::per_prompt]) if generations else 0
    predicted = CompletionTokensDetails(
        sum(c.usage.accepted_prediction_tokens for c in completions),
        sum(c.usage.rejected_prediction_tokens for c in completions),
    )
    total = prompt_tokens + completion_tokens
    return UsageBody(prompt_tokens, completion_tokens, total, PromptTokensDetails(cached), predicted)


def token_body(logprob: TokenLogprob) -> TokenLogprobBody:
    return TokenLogprobBody(
        logprob.token,
        logprob.logprob,
        list(logprob.token_bytes),
        [TopLogprob(token, value, list(raw)) for token, raw, value in logprob.top],
    )


def finish_reason(generation: Generation, called: bool) -> Any:
    completion = generation.completion()
    return "tool_calls" if called and not completion.cut_short else completion.finish_reason


def include_usage(data: SamplingFields) -> bool:
    return bool(data.stream_options and data.stream_options.include_usage)


Chunk = CompletionChunk | ChatCompletionChunk


def sse_events(
    group: GenerationGroup,
    on_delta: Callable[[int, Delta, bool], list[Any]],
    on_end: Callable[[int, Generation], list[Any]],
    usage: Callable[[], Chunk] | None,
) -> Stream:
    """Every choice's deltas as server-sent events, interleaved as they are generated, then the usage chunk
    (when asked for) and [DONE]; a failure is an error event, then [DONE], as OpenAI's servers send it."""

    async def events() -> AsyncIterator[bytes]:
        first = [True] * len(group)
        async for index, delta in group.interleaved():
            if delta is None:
                for item in on_end(index, group[index]):
                    yield event(item)
                continue
            for item in on_delta(index, delta, first[index]):
                yield event(item)
            first[index] = False
        if usage is not None:
            yield event(usage())
        yield DONE

    def failed(error: ApiError) -> list[bytes]:
        return [event(error_body(error)), DONE]

    return streamed(events(), on_failure=failed)
