"""Where converted and fetched models are kept: one directory per source content, written atomically.

A GGUF file is converted once into ``<cache>/converted/<sha256>-<format>-v<N>/``, a zipped model
directory unpacked once into ``<cache>/unpacked/<sha256>/``, and either is reused on every later load.
A directory appears under its final name only when complete (written beside it under a ``.partial-``
name, then renamed), so an interrupted conversion leaves nothing a later load would trust.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tempfile
import zipfile
from collections.abc import Callable

from forgellm.backends.mlx.sources import gguf

# Bumped when the converter's output changes, so directories written by an older one are not reused.
CONVERTER_VERSION = 1


def default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "forgellm"


def sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_model(
    source: pathlib.Path,
    cache_dir: pathlib.Path,
    weights: gguf.WeightFormat,
    progress: Callable[[str], None],
    known_sha256: str | None = None,
) -> pathlib.Path:
    """The MLX model directory for a GGUF file, converting it first unless the cache has it."""
    if not source.is_file():
        raise FileNotFoundError(f"{source} is not a file")
    if known_sha256 is None:
        progress(f"checksumming {source.name}")
    digest = known_sha256 or sha256_of(source)
    target = cache_dir / "converted" / f"{digest}-{weights.label}-v{CONVERTER_VERSION}"

    def convert(partial: pathlib.Path) -> None:
        gguf.convert(source, partial, weights, progress)

    return _written_once(target, convert, progress, "converted")


def unpacked_model(
    source: pathlib.Path, cache_dir: pathlib.Path, sha256: str, progress: Callable[[str], None]
) -> pathlib.Path:
    """The model directory a zip file (of known sha256) holds, unpacked first unless the cache has it; a zip
    whose members would land outside it is refused."""

    def unpack(partial: pathlib.Path) -> None:
        progress(f"unpacking {source.name}")
        with zipfile.ZipFile(source) as archive:
            for member in archive.namelist():
                if member.startswith("/") or ".." in pathlib.PurePosixPath(member).parts:
                    raise ValueError(f"{source.name}: the member {member} would land outside the model directory")
            archive.extractall(partial)

    return _written_once(cache_dir / "unpacked" / sha256, unpack, progress, "unpacked")


def _written_once(
    target: pathlib.Path, write: Callable[[pathlib.Path], None], progress: Callable[[str], None], done: str
) -> pathlib.Path:
    """target, written by write(partial) beside it and renamed into place whole, unless it is there already."""
    if (target / "config.json").is_file():
        progress(f"using the {done} model in {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = pathlib.Path(tempfile.mkdtemp(prefix=f".partial-{target.name}-", dir=target.parent))
    try:
        write(partial)
        try:
            partial.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not another process's finished work
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    progress(f"{done} into {target}")
    return target
