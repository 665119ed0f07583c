"""Generation backends: the protocol the core drives, and the MLX backend."""
