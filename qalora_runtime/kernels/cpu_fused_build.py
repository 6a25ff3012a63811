"""JIT build and load of the qalora C++ CPU extension (``csrc/``), compiled once and cached.

The build directory is ``$QALORA_CACHE_DIR/torch_ext/...`` (default ``~/.cache/qalora``),
keyed by torch version, Python ABI and a hash of ``csrc/``, so two checkouts with
different kernel sources (a work tree and a CI clone) never rebuild over each
other; ``torch.utils.cpp_extension.load`` serializes concurrent builds of one
directory with a lock file.
If there is no compiler or the build fails, :func:`load_extension` logs a warning
and returns ``None`` so callers register nothing and the registry falls back.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("qalora_cpu.cpp", "qalora_gemv_avx2.cpp", "qalora_gemv_avx512.cpp", "qalora_dot_avx2.cpp",
           "qalora_dot_avx512.cpp", "qalora_gemm_avx2.cpp", "qalora_gemm_avx512.cpp", "qalora_gemm_bf16.cpp",
           "qalora_plane_avx2.cpp", "qalora_plane_avx512.cpp", "qalora_amx.cpp", "qalora_ops.cpp",
           "qalora_attention.cpp", "qalora_decode.cpp")
EXT_NAME = "qalora_cpu_fused"
CACHE_ENV = "QALORA_CACHE_DIR"


def cache_dir() -> Path:
    """Root of qalora's on-disk caches."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "qalora"


def sources_digest() -> str:
    """Short hash of every file in ``csrc/`` (sources and headers)."""
    h = hashlib.sha256()
    for f in sorted(CSRC.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def build_dir() -> Path:
    """Where this torch / Python / source combination's compiled extension lives."""
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"
    return cache_dir() / "torch_ext" / f"{EXT_NAME}-{tag}-{sources_digest()}"


@functools.cache
def load_extension() -> ModuleType | None:
    """Build (first call only) and import the extension; ``None`` if it cannot be built."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        logger.info("qalora cpu_fused: x86-64 only, not building on %s", platform.machine())
        return None
    try:
        from torch.utils.cpp_extension import load

        out = build_dir()
        out.mkdir(parents=True, exist_ok=True)
        # -fopenmp: at::parallel_for is header code that only runs in parallel when
        # the extension itself is compiled with OpenMP, like torch's CPU build.
        module = load(
            name=EXT_NAME,
            sources=[str(CSRC / s) for s in SOURCES],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(out),
            verbose=False,
        )
    except Exception as exc:  # no compiler, missing headers, build error: fall back
        logger.warning(
            "qalora cpu_fused kernels unavailable (extension build failed: %s); "
            "falling back to slower kernels",
            str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__,
        )
        return None
    if not module.has_avx2():
        logger.warning("qalora cpu_fused: CPU lacks AVX2/FMA; using the exact scalar path (slow)")
    return module
