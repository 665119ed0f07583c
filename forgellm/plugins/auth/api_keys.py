"""API keys: how they are made, stored (as a digest) and matched (in constant time)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from forgellm import Identity
from forgellm.plugins.auth.scopes import ALL_SCOPES

# The prefix lets secret scanners (and people) recognise a leaked ForgeLLM key.
KEY_PREFIX = "fllm_"
KEY_BYTES = 32  # 256 bits of randomness
DIGEST_SCHEME = "sha256"
_SENDABLE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # visible ASCII except the comma


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def key_digest(key: str) -> str:
    """The stored form of a key: ``sha256:<hex>``.

    A single fast hash is enough here, unlike for passwords: keys made by ``forgellm keys add``
    carry 256 random bits, so there is no dictionary to try and brute force over 2**256 is out
    of reach however fast the hash. bcrypt/argon2 add cost only to defend guessable secrets,
    and would spend that cost on every request. (Keys typed with --api-key are the operator's
    choice and are never written to disk.)
    """
    return f"{DIGEST_SCHEME}:{hashlib.sha256(key.encode()).hexdigest()}"


@dataclass(frozen=True)
class ApiKey:
    """A key the server accepts, held only as its digest."""

    subject: str  # what logs and rate limits see: never the key itself
    digest: str
    scopes: frozenset[str]
    claims: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def identity(self) -> Identity:
        return Identity(subject=self.subject, scopes=self.scopes, method="api_key", claims=dict(self.claims))


def find_key(presented: str, keys: Iterable[ApiKey]) -> ApiKey | None:
    """The key whose digest matches, comparing against every key in constant time."""
    digest = key_digest(presented).encode()
    found = None
    for key in keys:
        # No early exit: the time taken does not depend on which key (if any) matched.
        if hmac.compare_digest(digest, key.digest.encode()):
            found = key
    return found


def static_keys(repeated: Sequence[str], comma_separated: str | None) -> list[ApiKey]:
    """Keys given on the command line or in the environment: every scope, labelled ``key:#N`` by position.

    A key must be printable ASCII without spaces, as it travels in an HTTP header.
    """
    given = [key.strip() for key in repeated]
    given += [key.strip() for key in (comma_separated or "").split(",")]
    given = [key for key in given if key]
    for number, key in enumerate(given, start=1):
        if not _SENDABLE.fullmatch(key):
            raise ValueError(f"API key #{number} must be printable ASCII without spaces or commas")
    return [
        ApiKey(subject=f"key:#{number}", digest=key_digest(key), scopes=ALL_SCOPES)
        for number, key in enumerate(dict.fromkeys(given), start=1)
    ]
