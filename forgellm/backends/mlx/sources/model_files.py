"""What a model load may read: regular files, and configuration files of bounded size.

A load reads every file of a model directory it needs (mlx-lm and transformers choose which),
so a directory whose ``config.json`` is a FIFO blocked the load forever, and one whose
``config.json`` links to ``/dev/zero`` was read until the process was killed for memory. Before
anything reads a local model or adapter directory, each of its entries must be a directory or a
regular file (symbolic links followed, as the Hugging Face cache uses them), and the files that
are parsed whole (JSON, templates, vocabularies) at most 64 MiB; weights are mapped, not read.
"""

from __future__ import annotations

import os
import stat

PARSED_WHOLE = (".json", ".jinja", ".txt", ".model", ".tiktoken", ".vocab", ".py")
MAX_PARSED_BYTES = 64 << 20


class UnsafeModelFile(ValueError):
    """A model directory holds something a load must not read; the message names it."""


def check_model_directory(directory: str) -> None:
    """Raise UnsafeModelFile unless every entry of directory is a directory or a fitting regular file."""
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                info = os.stat(entry.path)  # follows symbolic links
            except OSError as exc:
                raise UnsafeModelFile(f"{entry.name} in {directory} cannot be read: {exc.strerror}") from None
            if stat.S_ISDIR(info.st_mode):
                continue
            if not stat.S_ISREG(info.st_mode):
                raise UnsafeModelFile(f"{entry.name} in {directory} is not a regular file")
            if entry.name.lower().endswith(PARSED_WHOLE) and info.st_size > MAX_PARSED_BYTES:
                raise UnsafeModelFile(
                    f"{entry.name} in {directory} is {info.st_size} bytes; files read whole may be at most "
                    f"{MAX_PARSED_BYTES} bytes"
                )
