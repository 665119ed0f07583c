"""Who makes a request, and the actions a route may need them allowed to do.

Authentication plugins establish an ``Identity`` (the ``authenticate`` hook); authorization plugins
allow or forbid it each action (the ``authorize`` hook). A route declares the action it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STATUS = "status"  # read-only model information: any authenticated client
GENERATE = "generate"
LOAD = "load"
ADMIN = "admin"
ACTIONS = (STATUS, GENERATE, LOAD, ADMIN)


@dataclass(frozen=True)
class Identity:
    """Who made a request, as an authentication plugin established it."""

    subject: str
    scopes: frozenset[str] = frozenset()
    method: str = "unknown"  # "api_key", "jwt", ...
    claims: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
