"""Built-in opt-in plugins: enable them by name with ``forgellm run --plugins NAME,...``."""
