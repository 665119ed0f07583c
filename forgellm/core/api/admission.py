"""Admission: what a request passes before any work, and what its end settles, exactly once.

A generation (or a prompt only counted) takes its caller's in-flight slot (--max-inflight-per-client),
then the plugins' ``before_generate`` hooks run (rate limits, quotas, input checks; any may refuse);
at its end the ``after_generate`` hooks account for it and the slot is freed.
"""

from __future__ import annotations

from typing import Any

from forgellm.core.api.request import Caller
from forgellm.core.clients import InFlightLimit
from forgellm.core.engine.generation import GenerationJob, Usage
from forgellm.core.plugin_manager import await_me_maybe


class Admission:
    def __init__(self, in_flight: InFlightLimit, hook: Any, server: Any) -> None:
        self.in_flight = in_flight
        self._hook = hook  # the plugin manager's hook relay
        self._server = server  # handed to the hooks as they receive it, never used here

    async def admit(self, caller: Caller, job: GenerationJob) -> None:
        """The caller's in-flight slot, then the before_generate hooks; a refusal frees the slot."""
        self.in_flight.acquire(caller.client_key)
        try:
            results = self._hook.before_generate(
                identity=caller.identity, request=caller.request, job=job, caller=caller, server=self._server
            )
            for result in results:
                await await_me_maybe(result)
        except BaseException:
            self.in_flight.release(caller.client_key)
            raise

    async def settle(self, caller: Caller, job: GenerationJob, usage: Usage) -> None:
        """The end of an admitted job: after_generate for the plugins, and the caller's slot freed."""
        try:
            results = self._hook.after_generate(
                identity=caller.identity,
                request=caller.request,
                job=job,
                usage=usage,
                caller=caller,
                server=self._server,
            )
            for result in results:
                await await_me_maybe(result)
        finally:
            self.in_flight.release(caller.client_key)
