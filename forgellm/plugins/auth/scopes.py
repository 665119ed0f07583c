"""Scopes: what an identity may do, and the scope each route action needs."""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from forgellm import ADMIN, GENERATE, LOAD, STATUS

GENERATE_SCOPE = "generate"  # /api/model/generate, /v1/completions, /v1/chat/completions
LOAD_SCOPE = "models:load"  # /api/model/load, /api/model/unload
ADMIN_SCOPE = "admin"  # everything, including actions added later
ALL_SCOPES = frozenset({GENERATE_SCOPE, LOAD_SCOPE, ADMIN_SCOPE})

# None: any authenticated identity may do it.
REQUIRED_SCOPE = {
    STATUS: None,
    GENERATE: GENERATE_SCOPE,
    LOAD: LOAD_SCOPE,
    ADMIN: ADMIN_SCOPE,
}


def permits(scopes: AbstractSet[str], action: str) -> bool:
    """Whether an identity holding scopes may perform action; admin may do anything."""
    if ADMIN_SCOPE in scopes:
        return True
    if action not in REQUIRED_SCOPE:
        return False  # an action this plugin does not know (a third-party route): admins only
    needed = REQUIRED_SCOPE[action]
    return needed is None or needed in scopes


def parse_scopes(text: str) -> tuple[str, ...]:
    """``generate,models:load`` (commas or spaces) as a sorted tuple; an unknown scope is a ValueError."""
    scopes = {part for part in text.replace(",", " ").split()}
    unknown = scopes - ALL_SCOPES
    if unknown:
        raise ValueError(f"unknown scope {', '.join(sorted(unknown))}; scopes are {', '.join(sorted(ALL_SCOPES))}")
    if not scopes:
        raise ValueError(f"give at least one scope: {', '.join(sorted(ALL_SCOPES))}")
    return tuple(sorted(scopes))
