"""ServerSettings: everything the HTTP layer needs to know that is not the engine."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """Front-end configuration, validated on construction.

    ``served_model_names``: the names clients may put in ``model``; the first is
    the one reported by /v1/models and in responses. Empty means "use the
    engine's model name". ``api_key``: when set, /v1/*, /tokenize and
    /detokenize require ``Authorization: Bearer <key>``. ``chat_template``: a
    Jinja template (text, not a path) that overrides the tokenizer's.
    ``drain_timeout_s``: on shutdown, how long in-flight requests may run on
    before they are aborted. ``retry_after_s``: the Retry-After sent with 429.
    """

    served_model_names: tuple[str, ...] = ()
    api_key: str | None = None
    chat_template: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    drain_timeout_s: float = 30.0
    retry_after_s: int = 1
    sse_ping_s: float = 15.0

    def __post_init__(self) -> None:
        if isinstance(self.served_model_names, str):
            object.__setattr__(self, "served_model_names", (self.served_model_names,))
        for name in self.served_model_names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"served model names must be non-empty strings, got {name!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be non-empty when set (use None to disable auth)")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {self.retry_after_s}")
        if self.sse_ping_s <= 0:
            raise ValueError(f"sse_ping_s must be > 0, got {self.sse_ping_s}")
