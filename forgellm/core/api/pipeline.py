"""The one generation pipeline every API dialect uses.

A route translates its dialect's request into a ``GenerationRequest`` and hands it, with the
``Caller`` (who asks, and how to tell when they leave), to the ``GenerationService``. The service
checks it, admits it (``Admission``: the caller's in-flight limit, then the plugins'
``before_generate`` hooks, so rate limits come before any work), renders and tokenizes the prompt
against the serving model (``prompt``: bounded by --template-timeout, abandoned when the caller
leaves), and queues it on that model's scheduler. It returns a ``Generation`` (or, for a request's
choices, a ``GenerationGroup``): the route either awaits the whole ``Completion`` or iterates the text
as it is generated, and encodes either in its dialect. Either way the plugins' ``after_generate`` hooks
account for the job exactly once, and a caller that leaves or outlasts --request-timeout stops it.

The service is wired with its collaborators (the registry, admission, the limits, and a way to ask
whether a caller may load models), not with the server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from forgellm.core.api.admission import Admission
from forgellm.core.api.embeddings import EmbeddingRequest, Embeddings, check_inputs, embedded
from forgellm.core.api.generation import Generation, GenerationGroup
from forgellm.core.api.prompt import tokenized, with_tools
from forgellm.core.api.request import MAX_STOP_STRINGS, Caller, GenerationRequest
from forgellm.core.engine.backend import EmbeddingModel, LoadedModel
from forgellm.core.engine.generation import GenerationJob, SamplingParams, Usage
from forgellm.core.engine.sequence_handle import SequenceHandle
from forgellm.core.errors import bad_request, service_unavailable
from forgellm.core.models.registry import ModelRegistry
from forgellm.core.models.resident import Resident


@dataclass(frozen=True)
class GenerationLimits:
    """What one request may ask for and take (the core settings of the same names)."""

    max_tokens_cap: int
    max_request_tokens: int  # n times max_tokens (0: no limit); at least max_tokens_cap
    max_prompt_tokens: int
    template_timeout: float
    max_embedding_tokens: int
    request_timeout: float  # 0: none


# Whether a caller may load models (the LOAD action), asked only when a request names one not resident.
MayLoad = Callable[[Caller], Awaitable[bool]]


class GenerationService:
    """The pipeline, one per server."""

    def __init__(
        self, registry: ModelRegistry, admission: Admission, limits: GenerationLimits, may_load: MayLoad
    ) -> None:
        self._registry = registry
        self._admission = admission
        self._limits = limits
        self._may_load = may_load

    async def start_group(self, caller: Caller, requests: list[GenerationRequest]) -> GenerationGroup:
        """Start a request's generations (its choices) within one request's token budget; if one is refused,
        those started are stopped."""
        started: list[Generation] = []
        try:
            for request in self._within_request_budget(requests):
                started.append(await self._start(caller, request))
        except BaseException:
            for generation in started:
                await generation.stop()
            raise
        return GenerationGroup(started)

    async def start(self, caller: Caller, request: GenerationRequest) -> Generation:
        """Check, admit, tokenize and queue a generation. Every refusal happens before any body is sent.

        Once the before_generate hooks have run, after_generate runs exactly once for the job: here, with no
        tokens, when the job is refused later; else when it ends."""
        (request,) = self._within_request_budget([request])
        return await self._start(caller, request)

    async def count_prompt_tokens(self, caller: Caller, request: GenerationRequest) -> int:
        """How many tokens the request's prompt is, as a generation would see it (template applied, tools
        described). Rendering a prompt is work, so it is admitted as a generation is (the in-flight limit and
        the before_generate hooks, rate limits among them) with a job of max_tokens 0, and accounted with no
        tokens generated."""
        resident, model = await self._serving(caller, request)
        caller.record.model = resident.name
        request = with_tools(request, model.output_format)
        job = GenerationJob(prompt_tokens=[], max_tokens=0, prompt_text=request.prompt_text)
        await self._admission.admit(caller, job)
        try:
            job.prompt_tokens = (await tokenized(caller, model, request, self._limits.template_timeout)).prompt
            caller.record.prompt_tokens = len(job.prompt_tokens)
            return len(job.prompt_tokens)
        finally:
            await self._admission.settle(caller, job, Usage(len(job.prompt_tokens), 0))

    async def ready(self, caller: Caller, model: str | None) -> Resident:
        """The resident model a request names, loaded first as a generation naming it would load it (Ollama's
        requests with no prompt, which only load a model)."""

        async def may_load() -> bool:
            return await self._may_load(caller)

        resident, _ = await self._registry.serving(model, may_load, task=None)
        resident.touch()
        return resident

    async def embed(self, caller: Caller, request: EmbeddingRequest) -> Embeddings:
        """Check, admit, encode and embed a request's inputs on an embedding model, batched with other requests'
        inputs; accounted once, as a job of max_tokens 0."""
        check_inputs(request)

        async def may_load() -> bool:
            return await self._may_load(caller)

        resident, model = await self._registry.serving(request.model, may_load, task="embed")
        assert isinstance(model, EmbeddingModel)
        resident.pending += 1
        try:
            limits = (self._limits.max_embedding_tokens, self._limits.request_timeout)
            return await embedded(resident, model, caller, request, self._admission, limits)
        finally:
            resident.pending -= 1
            resident.touch()

    # -- one generation ----------------------------------------------------------------------------
    async def _start(self, caller: Caller, request: GenerationRequest) -> Generation:
        resident, model = await self._serving(caller, request)
        resident.pending += 1  # chosen: not to be unloaded while its prompt is prepared
        try:
            return await self._start_on(resident, model, caller, request)
        finally:
            resident.pending -= 1
            resident.touch()

    async def _serving(self, caller: Caller, request: GenerationRequest) -> tuple[Resident, LoadedModel]:
        async def may_load() -> bool:
            return await self._may_load(caller)

        return await self._registry.serving(request.model, may_load)

    async def _start_on(
        self, resident: Resident, model: LoadedModel, caller: Caller, request: GenerationRequest
    ) -> Generation:
        caller.record.model = resident.name
        request = with_tools(request, model.output_format)
        job = GenerationJob(
            prompt_tokens=[],
            max_tokens=self._max_tokens(request),
            sampling=self._sampling(request, resident),
            stop=self._stop_strings(request.stop),
            prompt_text=request.prompt_text,
            constraint=request.constraint,
            logprobs=request.logprobs,
            client=caller.client_key,
        )
        await self._admission.admit(caller, job)
        try:
            job.prompt_tokens, job.prediction = await tokenized(caller, model, request, self._limits.template_timeout)
            if not job.prompt_tokens:
                raise bad_request("The prompt is empty")
            limit = self._limits.max_prompt_tokens
            if len(job.prompt_tokens) > limit:
                raise bad_request(f"The prompt is {len(job.prompt_tokens)} tokens; the limit is {limit}")
            if job.prediction is not None and len(job.prediction) > limit:
                raise bad_request(f"prediction: the content is {len(job.prediction)} tokens; the limit is {limit}")
            if resident.model is not model:
                raise service_unavailable("The model changed while the request was prepared; retry")
            if request.max_tokens is None and model.context_length:
                # Left unbounded, a generation stops where the model's context ends.
                job.max_tokens = max(1, min(job.max_tokens, model.context_length - len(job.prompt_tokens)))
            caller.record.prompt_tokens = len(job.prompt_tokens)
            handle = resident.scheduler.submit(job)
        except BaseException:
            await self._admission.settle(caller, job, Usage(len(job.prompt_tokens), 0))
            raise

        async def finish(ended: SequenceHandle) -> None:
            record, usage = caller.record, ended.usage
            record.completion_tokens = usage.completion_tokens
            record.accepted_draft_tokens = usage.accepted_draft_tokens
            if ended.first_token_at is not None:
                record.time_to_first_token_ms = (ended.first_token_at - ended.submitted_at) * 1000
            await self._admission.settle(caller, ended.job, usage)

        output_format = model.output_format
        return Generation(handle, request, output_format, resident.name, caller, finish, self._limits.request_timeout)

    # -- what a request may ask for ----------------------------------------------------------------
    def _within_request_budget(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        """The choices of one request, refused (400) when together they ask for more than --max-request-tokens,
        and, when they name no max_tokens, each given an equal share of it. One choice may always ask for
        --max-tokens-cap: the budget bounds what n multiplies."""
        limits = self._limits
        for request in requests:
            self._max_tokens(request)  # one choice past --max-tokens-cap is refused as such
        if not limits.max_request_tokens or not requests:
            return requests
        budget = max(limits.max_request_tokens, limits.max_tokens_cap)
        asked = sum(request.max_tokens or 0 for request in requests)
        if asked > budget:
            raise bad_request(
                f"The request asks for {asked} tokens over its {len(requests)} choice(s) (n times max_tokens); "
                f"the limit is {budget}"
            )
        share = max(1, budget // len(requests))
        return [
            request
            if request.max_tokens is not None
            else replace(request, default_max_tokens=min(request.default_max_tokens or share, share))
            for request in requests
        ]

    def _sampling(self, request: GenerationRequest, resident: Resident) -> SamplingParams:
        """The request's sampling, with the model's defaults for the fields the client left out."""
        if request.sampling_given is None:
            return request.sampling
        defaults = self._registry.sampling_defaults(resident)
        left_out: dict[str, Any] = {n: v for n, v in defaults.items() if n not in request.sampling_given}
        return replace(request.sampling, **left_out) if left_out else request.sampling

    def _max_tokens(self, request: GenerationRequest) -> int:
        cap = self._limits.max_tokens_cap
        if request.max_tokens is None:
            return min(request.default_max_tokens or cap, cap)
        if request.max_tokens > cap:
            raise bad_request(f"max_tokens must be at most {cap}")
        return request.max_tokens

    @staticmethod
    def _stop_strings(stops: tuple[str, ...]) -> tuple[str, ...]:
        if len(stops) > MAX_STOP_STRINGS:
            raise bad_request(f"At most {MAX_STOP_STRINGS} stop strings are allowed")
        return tuple(stop for stop in stops if stop)
