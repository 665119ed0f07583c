"""The keys file: named API keys, stored as digests, that ``forgellm keys`` manages and the server watches.

The file is JSON, written atomically (a temporary file renamed over the old one) with mode 0600,
so the server never reads a half-written file and other users cannot read it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from forgellm.plugins.auth.api_keys import ApiKey, key_digest, new_api_key
from forgellm.plugins.auth.scopes import ALL_SCOPES

logger = logging.getLogger("forgellm.auth")

FORMAT_VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_RACY_WINDOW_NS = 2_000_000_000


class KeysFileError(ValueError):
    """The keys file cannot be read or changed as asked; the message says why."""


def default_keys_path() -> Path:
    """``$XDG_CONFIG_HOME/forgellm/keys.json``, that is ``~/.config/forgellm/keys.json`` by default."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "forgellm" / "keys.json"


@dataclass(frozen=True)
class KeyRecord:
    """One named key as stored: its digest, never the key."""

    name: str
    digest: str
    scopes: tuple[str, ...]
    rate_limit: str | None = None  # e.g. "10/minute", read by the ratelimit plugin
    token_limit: str | None = None  # e.g. "20000/hour", read by the ratelimit plugin
    created: str | None = None

    @property
    def subject(self) -> str:
        return f"key:{self.name}"

    def api_key(self) -> ApiKey:
        claims = {"key_name": self.name}
        if self.rate_limit:
            claims["rate_limit"] = self.rate_limit
        if self.token_limit:
            claims["token_limit"] = self.token_limit
        return ApiKey(subject=self.subject, digest=self.digest, scopes=frozenset(self.scopes), claims=claims)

    @classmethod
    def from_json(cls, data: object) -> KeyRecord:
        if not isinstance(data, dict):
            raise ValueError("each key must be an object")
        name, digest, scopes = data.get("name"), data.get("digest"), data.get("scopes")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"invalid key name {name!r}")
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            raise ValueError(f"key {name!r} has no sha256 digest")
        if not isinstance(scopes, list) or not all(isinstance(scope, str) for scope in scopes):
            raise ValueError(f"key {name!r}: scopes must be a list of strings")
        limits = {field: data.get(field) for field in ("rate_limit", "token_limit", "created")}
        if not all(value is None or isinstance(value, str) for value in limits.values()):
            raise ValueError(f"key {name!r}: rate_limit, token_limit and created must be strings")
        # Scopes this version does not know grant nothing.
        return cls(name, digest, tuple(scope for scope in scopes if scope in ALL_SCOPES), **limits)


def read_records(path: Path) -> list[KeyRecord]:
    """Every key in the file; a missing file holds none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise KeysFileError(f"cannot read keys file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
        if (
            not isinstance(data, dict)
            or data.get("version") != FORMAT_VERSION
            or not isinstance(data.get("keys"), list)
        ):
            raise ValueError(f'expected {{"version": {FORMAT_VERSION}, "keys": [...]}}')
        records = [KeyRecord.from_json(item) for item in data["keys"]]
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise KeysFileError(f"keys file {path} is not valid: {exc}") from None
    names = [record.name for record in records]
    if len(set(names)) != len(names):
        raise KeysFileError(f"keys file {path} is not valid: a key name appears twice")
    return records


def _keep_owner(fd: int, path: Path) -> None:
    """Give the new file the old one's owner, so root running ``forgellm keys`` on a service
    user's file does not lock that service out of it (only root may change an owner)."""
    try:
        old = os.stat(path)
    except FileNotFoundError:
        return
    if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()) and os.geteuid() == 0:
        os.fchown(fd, old.st_uid, old.st_gid)


def write_records(path: Path, records: list[KeyRecord]) -> None:
    """Replace the file atomically; the new file is readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    payload = {
        "version": FORMAT_VERSION,
        "keys": [{**asdict(record), "scopes": list(record.scopes)} for record in records],
    }
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        _keep_owner(fd, path)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(payload, file, indent=2)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Serialise read-modify-write cycles, so two ``forgellm keys`` runs cannot lose each other's change."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def add_key(
    path: Path,
    name: str,
    scopes: tuple[str, ...],
    rate_limit: str | None = None,
    token_limit: str | None = None,
) -> str:
    """Create a key named name and return it: the only time the key itself exists outside the client."""
    if not _NAME.fullmatch(name):
        raise KeysFileError(
            f"invalid key name {name!r}: use up to 64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    key = new_api_key()
    with _exclusive(path):
        records = read_records(path)
        if any(record.name == name for record in records):
            raise KeysFileError(f"a key named {name!r} already exists; revoke it first or pick another name")
        created = datetime.now(UTC).isoformat(timespec="seconds")
        records.append(KeyRecord(name, key_digest(key), scopes, rate_limit, token_limit, created))
        write_records(path, records)
    return key


def revoke_key(path: Path, name: str) -> None:
    with _exclusive(path):
        records = read_records(path)
        kept = [record for record in records if record.name != name]
        if len(kept) == len(records):
            raise KeysFileError(f"no key named {name!r} in {path}")
        write_records(path, kept)


def insecure_reason(path: Path) -> str | None:
    """Why a server must not trust the keys file, as ssh's StrictModes: the file or its directory is writable
    by group or others, or owned by a user other than the server's own (or root). None when it is safe."""
    me = os.geteuid()
    for target in (path, path.parent):
        info = os.stat(target)
        if info.st_uid not in (me, 0):
            return f"{target} is owned by another user (uid {info.st_uid}); the server runs as uid {me}"
        if info.st_mode & 0o022:
            return (
                f"{target} is writable by group or others (mode {oct(info.st_mode & 0o777)}), so anyone could "
                f"add a key; run chmod go-w {target}"
            )
    return None


def read_trusted_records(path: Path) -> list[KeyRecord]:
    """read_records, for a server: a file that is not safe to trust is refused (KeysFileError)."""
    try:
        reason = insecure_reason(path)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise KeysFileError(f"cannot read keys file {path}: {exc.strerror}") from None
    if reason:
        raise KeysFileError(f"keys file {path} is refused: {reason}")
    return read_records(path)


class WatchedKeysFile:
    """The keys a running server accepts from the file, re-read whenever the file changes.

    Each lookup costs one stat(); a change (``forgellm keys add`` or ``revoke``, which replace
    the file) is seen by the next request, so revocation needs no restart. A file that
    disappears, becomes invalid, or becomes writable by others (``insecure_reason``) accepts no
    key (fail closed) until it is fixed; at startup any of these stops the server.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature = self._stat()
        self._keys = [record.api_key() for record in read_trusted_records(path)]  # at startup, errors are fatal
        self._racy = self._recent(self._signature)

    def _stat(self) -> tuple[int, ...] | None:
        try:
            stat, directory = os.stat(self.path), os.stat(self.path.parent)
        except OSError:
            return None
        # The owners and modes too: a chmod that makes the file writable by others must be seen at once.
        return (
            stat.st_ino,
            stat.st_mtime_ns,
            stat.st_size,
            stat.st_mode,
            stat.st_uid,
            directory.st_mode,
            directory.st_uid,
        )

    @staticmethod
    def _recent(signature: tuple[int, ...] | None) -> bool:
        """Whether another write could still go unseen by stat(), as git's "racy clean" entries.

        File timestamps are coarse (milliseconds on some filesystems), and a replaced file may
        reuse the old inode number: two changes in one tick with equal sizes would look alike.
        So a file written in the last moments is re-read on every lookup until it is older.
        """
        return signature is not None and time.time_ns() - signature[1] < _RACY_WINDOW_NS

    def keys(self) -> list[ApiKey]:
        signature = self._stat()
        if signature != self._signature or self._racy:
            changed = signature != self._signature
            self._signature = signature
            self._keys = self._reload(signature, changed)
            self._racy = self._recent(signature)
        return self._keys

    def _reload(self, signature: tuple[int, ...] | None, changed: bool) -> list[ApiKey]:
        if signature is None:
            if changed:
                logger.warning("keys file %s is gone: no key from it is accepted", self.path)
            return []
        try:
            keys = [record.api_key() for record in read_trusted_records(self.path)]
        except KeysFileError as exc:
            if changed:
                logger.error("%s; no key from it is accepted until it is fixed", exc)
            return []
        if changed:
            logger.info("keys file %s reloaded: %d keys", self.path, len(keys))
        return keys
