"""Speculative decoding inside the continuous batch: each row verifies its own draft in the shared step.

mlx-lm's ``GenerationBatch`` decodes one token per sequence per step. ``SpeculativeBatch`` takes its place in
the ``BatchGenerator`` and, on a step where drafting pays (``draft_policy``), feeds every row its pending
token followed by its own draft tokens, right-padded to the step's draft width; one forward pass gives the
target's logits at every position. Each row keeps its accepted prefix plus one token of the target's, and
hands back the rest of its positions: its KV cache row is rolled right by that many and its left padding
grows to match (``BatchKVCache`` expresses both), so no row waits on another's acceptance.

Exactness. A draft token is accepted when it is the token the row's own sampler draws from the target's
distribution at that position (after the row's logits processors: penalties, logit bias, its grammar); the
first token drawn that differs ends the row's step and is kept. For a greedy row that is the argmax, so the
output is the one decoding without drafts gives. For a sampled row, with deterministic drafts (every draft
source here is), it is the standard speculative-sampling rule: a draft token d is accepted with probability
p(d), and on rejection the kept token is distributed as p without d, renormalised (the residual); every
token kept is a draw from the target's distribution, so the output distribution is unchanged. Logprobs are
the target's. A row with logits processors or XTC (whose draw is itself random per position) is verified
position by position, each processor seeing exactly the tokens before it: a grammar's matcher consumes only
accepted tokens, so it never needs to roll back, and a draft token the grammar forbids is never drawn, so it
is rejected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationBatch
from mlx_lm.sample_utils import greedy_sampler

from forgellm import DraftTokens
from forgellm.backends.mlx.draft_model import DRAFT_MODEL, DraftModel
from forgellm.backends.mlx.draft_policy import Acceptance, SpeculationSettings, draft_width
from forgellm.backends.mlx.drafts import DraftSource
from forgellm.backends.mlx.kv_rollback import roll_back


class DraftRow:
    """One sequence's draft sources, tried in order, each with its acceptance so far; and what its drafts
    achieved since the engine last asked."""

    def __init__(self, sources: list[DraftSource], verify_in_order: bool, draft_model: bool = False) -> None:
        self.sources = [(source, Acceptance()) for source in sources]
        # The batch's draft model drafts for the row when none of its own sources has a draft.
        self.model_acceptance = Acceptance() if draft_model else None
        self.verify_in_order = verify_in_order  # it has logits processors, or a random draw per position
        self._last_step: DraftTokens | None = None  # what its draft achieved in the step just taken

    @property
    def best_rate(self) -> float:
        rates = [acceptance.rate for _, acceptance in self.sources]
        if self.model_acceptance is not None:
            rates.append(self.model_acceptance.rate)
        return max(rates, default=0.0)

    def propose(self, tokens: list[int], limit: int) -> tuple[list[int], Acceptance | None, str]:
        for source, acceptance in self.sources:
            draft = source.propose(tokens, limit)
            if draft:
                return draft, acceptance, source.source
            acceptance.idle()
        return [], None, ""

    def idle(self) -> None:
        for _, acceptance in self.sources:
            acceptance.idle()
        if self.model_acceptance is not None:
            self.model_acceptance.idle()

    def record(self, source: str, acceptance: Acceptance, drafted: int, accepted: int) -> None:
        acceptance.record(drafted, accepted)
        self._last_step = DraftTokens(source, drafted, accepted)

    def take_drafts(self) -> tuple[DraftTokens, ...]:
        """What its draft achieved in the step just taken (nothing if it did not draft), once."""
        last, self._last_step = self._last_step, None
        return (last,) if last is not None else ()


class SpeculativeBatch(GenerationBatch):
    """mlx-lm's generation batch, with a speculating step used whenever drafting pays."""

    def __init__(
        self,
        model: nn.Module,
        fallback_sampler: Callable[[mx.array], mx.array],
        settings: SpeculationSettings,
        draft_rows: Callable[[int], DraftRow | None],
        draft_model: DraftModel | None = None,
    ) -> None:
        super().__init__(model, [], mx.array([], dtype=mx.uint32), [], [], [], fallback_sampler, [], [], [])
        self._settings = settings
        self._draft_rows = draft_rows  # the row state of a uid joining the batch
        self._draft_model = draft_model
        self.rows: list[DraftRow | None] = []

    def extend(self, batch: GenerationBatch) -> None:
        super().extend(batch)
        self.rows.extend(self._draft_rows(uid) for uid in batch.uids)
        if self._draft_model is not None:
            self._draft_model.join([list(tokens) for tokens in batch.tokens])

    def filter(self, keep: list[int]) -> None:
        super().filter(keep)
        self.rows = [self.rows[index] for index in keep]
        if self._draft_model is not None:
            self._draft_model.filter(keep)

    def next(self) -> list[GenerationBatch.Response]:
        if not self.uids or not self._worth_drafting():
            return super().next()
        return self._speculative_next()

    def _worth_drafting(self) -> bool:
        """Whether drafting could pay this step if every row had a full draft: decided without waiting for the
        pending tokens, so a batch that would not speculate keeps mlx-lm's overlapped steps."""
        longest = self._settings.max_draft_tokens
        rates = [(row.best_rate, longest) if row is not None else (0.0, 0) for row in self.rows]
        if draft_width(rates, self._settings) > 0:
            return True
        for row in self.rows:
            if row is not None:
                row.idle()
        return False

    def _speculative_next(self) -> list[GenerationBatch.Response]:
        mx.eval(self._next_tokens)
        pending: list[int] = self._next_tokens.tolist()  # type: ignore[assignment]
        proposals = [
            row.propose([*self.tokens[i], pending[i]], self._draft_limit(i)) if row is not None else ([], None, "")
            for i, row in enumerate(self.rows)
        ]
        modelled = self._model_drafts(pending, proposals)
        width = draft_width(
            [(acceptance.rate if acceptance else 0.0, len(draft)) for draft, acceptance, _ in proposals],
            self._settings,
        )
        if width == 0:
            if modelled:
                self._draft_model.kept([1] * len(self.uids), modelled)  # type: ignore[union-attr]  # it ran
            return super().next()
        drafts = [draft[:width] for draft, _, _ in proposals]
        inputs = mx.array(
            [[token, *draft, *[0] * (width - len(draft))] for token, draft in zip(pending, drafts, strict=True)]
        )
        logits = self.model(inputs, cache=self.prompt_cache)
        kept, kept_logprobs = self._verify(logits, pending, drafts)
        responses, emitted, finished = self._emit(pending, kept, kept_logprobs, width)
        if self._draft_model is not None and modelled:
            # A row that took another source's draft keeps only its pending token in the draft cache.
            drafted_by_model = [source == DRAFT_MODEL for _, _, source in proposals]
            counts = [count if by_model else 1 for count, by_model in zip(emitted, drafted_by_model, strict=True)]
            self._draft_model.kept(counts, modelled)
        for (_, acceptance, source), row, draft, count in zip(proposals, self.rows, drafts, emitted, strict=True):
            if acceptance is not None and row is not None:
                # The pending token is emitted too; a draft token cut off by the end token was not kept.
                row.record(source, acceptance, len(draft), count - 1)
        if finished:
            self.filter([i for i in range(len(self.uids)) if i not in finished])
        return responses

    def _model_drafts(self, pending: list[int], proposals: list[tuple[list[int], Acceptance | None, str]]) -> int:
        """Runs the draft model, if the batch has one and it pays, filling in the rows that have no draft of
        their own; returns how many tokens it drafted for each row (0: it did not run)."""
        if self._draft_model is None:
            return 0
        wanting = {
            i: row.model_acceptance
            for i, (row, (draft, _, _)) in enumerate(zip(self.rows, proposals, strict=True))
            if row is not None and row.model_acceptance is not None and not draft
        }
        rates = [(wanting[i].rate, self._draft_limit(i)) if i in wanting else (0.0, 0) for i in range(len(self.rows))]
        width = draft_width(rates, self._settings)
        if width == 0:
            return 0
        drafts = self._draft_model.propose(self.tokens, pending, width)
        for i, acceptance in wanting.items():
            proposals[i] = (drafts[i][: self._draft_limit(i)], acceptance, DRAFT_MODEL)
        return width

    def _draft_limit(self, i: int) -> int:
        """Draft tokens row i may use: no more than it may still generate after its pending token."""
        return max(0, min(self._settings.max_draft_tokens, self.max_tokens[i] - self._num_tokens[i] - 1))

    def _verify(
        self, logits: mx.array, pending: list[int], drafts: list[list[int]]
    ) -> tuple[list[list[int]], list[list[mx.array]]]:
        """Per row: the tokens the step keeps (the pending one, the accepted draft tokens, then the target's
        next token), and the log-probability vectors each was drawn from."""
        given: list[Any] = self.samplers or [None] * len(self.uids)
        samplers = [self.fallback_sampler if s is None else s for s in given]
        kept: list[list[int]] = [[] for _ in self.uids]
        kept_logprobs: list[list[mx.array]] = [[] for _ in self.uids]
        in_order = [bool(row and row.verify_in_order or self._processors(i)) for i, row in enumerate(self.rows)]
        free = [i for i in range(len(self.uids)) if not in_order[i]]
        if free:
            block = logits[mx.array(free)]
            logprobs = block - mx.logsumexp(block, axis=-1, keepdims=True)
            greedy = [n for n, i in enumerate(free) if samplers[i] is greedy_sampler]
            draws: dict[int, mx.array] = {}
            if greedy:
                best = mx.argmax(logprobs[mx.array(greedy)], axis=-1)
                draws.update({free[n]: best[m] for m, n in enumerate(greedy)})
            for n, i in enumerate(free):
                if i not in draws:
                    draws[i] = samplers[i](logprobs[n])
            mx.eval(list(draws.values()))
            for n, i in enumerate(free):
                drawn: list[int] = draws[i].tolist()  # type: ignore[assignment]
                accepted = _accepted_prefix(drafts[i], drawn)
                kept[i] = [pending[i], *drafts[i][:accepted], drawn[accepted]]
                kept_logprobs[i] = [self._next_logprobs[i], *(logprobs[n, j] for j in range(accepted + 1))]
        for i in (i for i in range(len(self.uids)) if in_order[i]):
            kept[i], kept_logprobs[i] = self._verify_in_order(i, logits[i], pending[i], drafts[i], samplers[i])
        return kept, kept_logprobs

    def _processors(self, i: int) -> list[Callable[[mx.array, mx.array], mx.array]]:
        return self.logits_processors[i] if self.logits_processors else []

    def _verify_in_order(
        self, i: int, logits: mx.array, token: int, draft: list[int], sampler: Callable[[mx.array], mx.array]
    ) -> tuple[list[int], list[mx.array]]:
        processors = self._processors(i)
        context = self._token_context[i].tokens if processors else None
        kept, kept_logprobs = [token], [self._next_logprobs[i]]
        for position in range(len(draft) + 1):
            row = logits[position : position + 1]
            if context is not None:
                context = mx.concatenate([context, mx.array(kept[-1:], dtype=context.dtype)])
                for processor in processors:
                    row = processor(context, row)
            logprobs = row - mx.logsumexp(row, axis=-1, keepdims=True)
            drawn = int(sampler(logprobs).item())  # type: ignore[arg-type]  # one token id
            kept.append(drawn)
            kept_logprobs.append(logprobs[0])
            if position == len(draft) or drawn != draft[position]:
                break
        return kept, kept_logprobs

    def _emit(
        self, pending: list[int], kept: list[list[int]], kept_logprobs: list[list[mx.array]], width: int
    ) -> tuple[list[GenerationBatch.Response], list[int], set[int]]:
        """The step's responses (every kept token but the last, which is the next step's pending one), the
        finished rows' stops applied, and every row's surplus positions handed back; how many tokens each row
        emitted, and which rows finished."""
        responses: list[GenerationBatch.Response] = []
        finished: list[tuple[int, int, str]] = []
        counts = []
        for i, (tokens, logprobs) in enumerate(zip(kept, kept_logprobs, strict=True)):
            emitted = tokens[:-1]
            reason = None
            for count, token in enumerate(emitted, start=1):
                self._num_tokens[i] += 1
                if self._num_tokens[i] >= self.max_tokens[i]:
                    reason = "length"
                if self._matchers[i].advance(token):
                    reason = "stop"
                if reason is not None:
                    emitted = emitted[:count]
                    finished.append((i, len(responses) + count - 1, reason))
                    break
            for token, token_logprobs in zip(emitted, logprobs, strict=False):
                responses.append(self.Response(self.uids[i], token, token_logprobs, None, None, None))
            counts.append(len(emitted))
            self.tokens[i].extend(emitted)
            if self._processors(i):
                self._token_context[i].update_and_fetch(mx.array(emitted, dtype=mx.int32))
        roll_back(self.prompt_cache, [width + 1 - count for count in counts])
        self._next_tokens = mx.array([tokens[-1] for tokens in kept], dtype=mx.uint32)
        self._next_logprobs = [logprobs[-1] for logprobs in kept_logprobs]
        self._current_tokens = mx.array(pending, dtype=mx.uint32)  # type: ignore[assignment]  # mlx-lm's None
        for i, index, reason in finished:
            response = responses[index]
            response.finish_reason = reason
            response.prompt_cache = self.extract_cache(i)
            response.all_tokens = self.tokens[i]
        return responses, counts, {i for i, _, _ in finished}


def _accepted_prefix(draft: list[int], drawn: list[int]) -> int:
    """How many draft tokens lead the drawn ones."""
    accepted = 0
    while accepted < len(draft) and draft[accepted] == drawn[accepted]:
        accepted += 1
    return accepted
