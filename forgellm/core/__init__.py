"""The server's core: app factory, hooks, plugin manager, settings, model manager and scheduler."""
