"""qalora_runtime: serve merged QA-LoRA low-bit (2/3/4/8-bit, float zero-point) language models.

Public API: ``LLM`` (offline batch generation), ``AsyncEngine`` (the engine behind
the server), ``SamplingParams`` and ``RequestOutput``. They are imported lazily so
that ``qalora_runtime.core`` (the scheduler) stays importable without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "LLM": "qalora_runtime.engine.llm",
    "AsyncEngine": "qalora_runtime.engine.async_engine",
    "SamplingParams": "qalora_runtime.sampling_params",
    "RequestOutput": "qalora_runtime.outputs",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'qalora_runtime' has no attribute {name!r}")
