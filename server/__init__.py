"""qalora-serve's OpenAI-compatible HTTP front end.

The server talks to the runtime only through ``qalora_runtime.engine.protocol``
(``EngineClient``), ``qalora_runtime.outputs`` and ``qalora_runtime.sampling_params``.
Build an app with :func:`server.app.build_app`.
"""

from .settings import ServerSettings

__all__ = ["ServerSettings", "build_app"]


def __getattr__(name: str):  # lazy: importing settings must not pull in FastAPI
    if name == "build_app":
        from .app import build_app

        return build_app
    raise AttributeError(name)
