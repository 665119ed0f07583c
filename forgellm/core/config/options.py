"""Every option a server has: the core's, then each enabled or installed plugin's (``register_options``)."""

from __future__ import annotations

from functools import partial

import click
import pluggy

from forgellm.core.config.settings import CORE_OPTIONS, Option


def collect_options(pm: pluggy.PluginManager) -> list[Option]:
    """The core's options, then every plugin's, each tagged with the plugin that declared it."""
    options = {option.name: option for option in CORE_OPTIONS}

    def register(option: Option, *, plugin: str) -> None:
        if option.name in options:
            raise click.ClickException(
                f"plugin {plugin!r} declares option --{option.name}, which {options[option.name].plugin!r} already has"
            )
        options[option.name] = Option(**{**option.__dict__, "plugin": plugin})

    for impl in pm.hook.register_options.get_hookimpls():
        impl.function(register=partial(register, plugin=impl.plugin_name))
    return list(options.values())
