"""The plugin manager: built-in plugins by name, third-party ones by entry point.

Default plugins are always on unless disabled with ``no:NAME``; opt-in plugins are
enabled by name (``--plugins auth,ratelimit``). Plugins installed by other packages
through the ``forgellm`` entry-point group are on by default, as with llm and pytest.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from forgellm.core import hookspecs

PROJECT = "forgellm"

DEFAULT_PLUGINS = {
    "mlx": "forgellm.backends.mlx.plugin",
    "console": "forgellm.plugins.console",
}
OPT_IN_PLUGINS: dict[str, str] = {
    "ratelimit": "forgellm.plugins.ratelimit",
    "logging": "forgellm.plugins.access_log",
    "auth": "forgellm.plugins.auth",
    "metrics": "forgellm.plugins.metrics",
    "responses": "forgellm.plugins.responses",
    "anthropic": "forgellm.plugins.anthropic",
    "ollama": "forgellm.plugins.ollama",
}


class UnknownPlugin(ValueError):
    """An operator named a plugin that is not installed."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    version: str
    default: bool
    source: str  # "builtin" or the distribution that provides it
    load: Any  # () -> plugin object

    def plugin(self) -> Any:
        return self.load()


def _builtin(name: str, module: str, default: bool) -> PluginInfo:
    from forgellm.version import __version__

    return PluginInfo(name, __version__, default, "builtin", lambda: importlib.import_module(module))


def available_plugins() -> dict[str, PluginInfo]:
    """Every installed plugin by name: built-ins first, then entry points."""
    found = {name: _builtin(name, module, True) for name, module in DEFAULT_PLUGINS.items()}
    found.update({name: _builtin(name, module, False) for name, module in OPT_IN_PLUGINS.items()})
    for entry_point in importlib.metadata.entry_points(group=PROJECT):
        if entry_point.name in found:
            continue  # a built-in name cannot be taken over by a package
        dist = entry_point.dist
        found[entry_point.name] = PluginInfo(
            entry_point.name,
            dist.version if dist else "unknown",
            True,
            dist.metadata["Name"] if dist else "unknown",
            entry_point.load,
        )
    return found


def parse_plugin_names(spec: str | Iterable[str]) -> tuple[set[str], set[str]]:
    """Split ``auth,ratelimit,no:mlx`` into (enabled, disabled) name sets."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    enabled, disabled = set(), set()
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name.startswith("no:"):
            disabled.add(name[3:])
        else:
            enabled.add(name)
    return enabled, disabled


def enabled_plugin_names(spec: str | Iterable[str], available: dict[str, PluginInfo] | None = None) -> list[str]:
    """The plugins a ``--plugins`` value switches on, in discovery order; unknown names raise UnknownPlugin."""
    available = available_plugins() if available is None else available
    enabled, disabled = parse_plugin_names(spec)
    unknown = sorted((enabled | disabled) - set(available))
    if unknown:
        raise UnknownPlugin(f"unknown plugin {', '.join(unknown)}; available plugins: {', '.join(sorted(available))}")
    return [name for name, info in available.items() if name not in disabled and (info.default or name in enabled)]


def create_plugin_manager(
    names: Iterable[str] | None = None,
    *,
    extra_plugins: Iterable[tuple[str, Any]] = (),
    available: dict[str, PluginInfo] | None = None,
) -> pluggy.PluginManager:
    """A plugin manager holding the named plugins (every installed one when names is None) and any extras."""
    available = available_plugins() if available is None else available
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in available if names is None else names:
        pm.register(available[name].plugin(), name=name)
    for name, plugin in extra_plugins:
        pm.register(plugin, name=name)
    return pm


def plugin_hooks(pm: pluggy.PluginManager, name: str) -> list[str]:
    """The hook names a registered plugin implements."""
    plugin = pm.get_plugin(name)
    return sorted(caller.name for caller in pm.get_hookcallers(plugin) or ())


async def await_me_maybe(value: Any) -> Any:
    """Resolve a hook result that may be a plain value or an awaitable."""
    if inspect.isawaitable(value):
        value = await value
    return value
