"""Request models of the OpenAI-compatible API (pydantic, strict types).

Strict: ``"5"`` is not an int and ``true`` is not a number, as in OpenAI's own
API; a wrong type is a 400 that names the field. Unknown fields (``tools``,
``response_format``, vendor extensions...) are ignored with a log line, so
clients that send extras keep working. Ranges that SamplingParams also checks
are repeated here so the OpenAPI schema documents them.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)

MAX_N = 128
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 20

StopType = str | list[str] | None


class APIModel(BaseModel):
    """Base of every request model: strict types, unknown fields logged and dropped."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _log_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields)
            unknown = sorted(str(k) for k in data if k not in known)
            if unknown:
                logger.info("%s: ignoring unsupported fields %s", cls.__name__, unknown)
        return data


class StreamOptions(APIModel):
    """``stream_options``: ask for a final usage chunk."""

    include_usage: bool | None = False


class TextContentPart(APIModel):
    """A ``{"type": "text", "text": ...}`` content part (the only kind served)."""

    type: Literal["text"]
    text: str


class ChatMessage(APIModel):
    """One chat turn."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message content as one string (text parts concatenated)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class SamplingFields(APIModel):
    """Sampling parameters shared by chat and completions."""

    model: str | None = Field(default=None, description="served model name; default: the only model")
    max_tokens: int | None = Field(default=None, ge=1, description="default: up to the context length")
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    stop: StopType = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        """True when the stream should end with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="alias of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True

    @property
    def max_new_tokens(self) -> int | None:
        """max_completion_tokens (the newer name) wins over max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """Top-logprobs count for the engine, or None when logprobs are off."""
        return (self.top_logprobs or 0) if self.logprobs else None


PromptType = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    """Body of POST /v1/completions."""

    prompt: PromptType
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    @property
    def max_new_tokens(self) -> int | None:
        """Completions have only max_tokens."""
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """Top-logprobs count for the engine, or None when logprobs are off."""
        return self.logprobs


class TokenizeRequest(APIModel):
    """Body of POST /tokenize: either ``prompt`` or ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self


class DetokenizeRequest(APIModel):
    """Body of POST /detokenize."""

    model: str | None = None
    tokens: list[int]
