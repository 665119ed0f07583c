"""The load policy: what a load may name (``--allow-model``), what is refused before a load starts, and how
much a failed load may say about the disk. One policy serves every model of the registry."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from pathlib import Path

from forgellm.core.engine.backend import Backend, on_disk
from forgellm.core.errors import ApiError, bad_request


class LoadPolicy:
    def __init__(self, backend: Backend, allow_patterns: Sequence[str] = ()) -> None:
        self._backend = backend
        self.allow_patterns = tuple(allow_patterns)

    def check_target(self, model_name: str, adapter_path: str | None) -> None:
        """Refuse a load request before it starts: a name --allow-model does not allow (403), a local file or
        directory that is not there (400).

        Without --allow-model any client that may load can name any path, so a path that is missing and one
        that exists but does not load get the same answer (here and in status), and nobody can map the disk
        through load requests; the server's log has the reasons."""
        for name in (model_name, adapter_path):
            if name is not None:
                self.require_allowed(name)  # before any file-system check
        source = self._backend.describe_source(model_name)
        missing = None
        if not source.exists:
            missing = f"{source.what} not found: {model_name}"
        elif adapter_path is not None and not on_disk(Path(os.path.expanduser(adapter_path)), Path.is_dir):
            missing = f"Adapter directory not found: {adapter_path}"
        if missing is not None:
            raise bad_request(missing if self.allow_patterns else not_loadable(model_name, adapter_path))

    def opaque(self, model_name: str, adapter_path: str | None) -> bool:
        """Whether a client's failed load of this must not say why (a local path, with no --allow-model)."""
        return not self.allow_patterns and (
            self._backend.describe_source(model_name).kind != "name" or adapter_path is not None
        )

    def require_allowed(self, name: str) -> None:
        """Refuse (403) a model or adapter that matches none of the operator's --allow-model patterns.

        Names and patterns are compared normalized, local paths made absolute, so that
        ``/models/../etc`` cannot pass for ``/models/*``. No patterns: everything is allowed.
        """
        if not self.allow_patterns:
            return
        candidate = _normalized(name)
        if not any(fnmatch.fnmatchcase(candidate, _normalized(pattern)) for pattern in self.allow_patterns):
            raise ApiError(403, f"Loading {name} is not allowed on this server", code="model_not_allowed")


def _normalized(name: str) -> str:
    expanded = os.path.expanduser(name)
    if os.path.isabs(expanded) or expanded.startswith(".") or expanded.count("/") > 1:
        return os.path.abspath(expanded)  # a local path
    return os.path.normpath(expanded)  # a Hugging Face repo id ("owner/name"), or a relative path


def not_loadable(model_name: str, adapter_path: str | None) -> str:
    what = f"Model {model_name}" + (f" with adapter {adapter_path}" if adapter_path else "")
    return f"{what} was not found or is not loadable"
