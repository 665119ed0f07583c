"""Generation backends: the protocol the core drives, and the MLX backend.

Importing this package prepares the process for MLX before anything imports it: the BLAS MLX's
CPU backend binds to (``cpu_blas``) is chosen, and mlx-lm is imported without the change to the
open-file limit its import would make (``open_file_limit``).
"""

from forgellm.backends.cpu_blas import select_blas
from forgellm.backends.open_file_limit import import_mlx_lm

select_blas()
import_mlx_lm()
