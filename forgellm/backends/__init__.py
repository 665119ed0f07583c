"""Generation backends: the MLX backend (``forgellm.backends.mlx``), the default backend plugin.

The protocol a backend implements is the core's (``forgellm.core.engine.backend``, in ``forgellm.__all__``).
"""
