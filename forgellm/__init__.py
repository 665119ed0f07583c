"""ForgeLLM: a model server for MLX language models, extended through pluggy plugins."""

from forgellm.core.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
