"""Generation backends: the protocol the core drives, and the MLX backend.

Importing this package first selects the BLAS MLX's CPU backend will use (``cpu_blas``), which
must happen before MLX itself is imported.
"""

from forgellm.backends.cpu_blas import select_blas

select_blas()
