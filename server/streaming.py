"""Server-sent event streams for chat and completions (sse-starlette).

Frame format, as OpenAI clients expect: ``data: {chunk}\\n\\n`` frames; chat
streams open with the role (one chunk per choice), content chunks follow and
the last content chunk of a choice carries its ``finish_reason``; with
``stream_options.include_usage`` a chunk with empty ``choices`` and the usage
comes next; ``data: [DONE]`` ends the stream. An error after the stream has
started is sent as ``event: error`` with an OpenAI error body, and the stream
ends there. Whatever ends the stream (the last token, an error, the client
hanging up), the request group is closed, which aborts unfinished requests.

Each endpoint has its own small formatter; :func:`stream_events` is the one
driver shared by both.
"""

from __future__ import annotations

import json
import logging
import time
from typing import AsyncIterator, Protocol, Sequence

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from .errors import APIError, error_body
from .generation import ChoiceDelta, RequestGroup
from .logprobs import chat_logprobs, completion_logprobs
from .responses import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    UsageInfo,
)
from .settings import ServerSettings

logger = logging.getLogger(__name__)

DONE = "[DONE]"


class ChunkFormatter(Protocol):
    """Turns a group's progress into the ``data:`` payloads of one endpoint."""

    def opening(self) -> list[str]:
        """Frames sent before any token (chat: the role)."""

    def step(self, deltas: Sequence[ChoiceDelta]) -> list[str]:
        """Frames for one engine step's changes."""

    def usage(self, usage: UsageInfo) -> str:
        """The usage frame."""


class ChatChunkFormatter:
    """``chat.completion.chunk`` frames."""

    def __init__(self, request_id: str, model: str, num_choices: int, top_logprobs: int | None) -> None:
        self._id = request_id
        self._model = model
        self._created = int(time.time())
        self._num_choices = num_choices
        self._top_logprobs = top_logprobs

    def _chunk(self, choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
        chunk = ChatCompletionChunk(id=self._id, object="chat.completion.chunk", created=self._created,
                                    model=self._model, choices=choices)
        if usage is not None:
            chunk.usage = usage
        return chunk.model_dump_json(exclude_unset=True)

    def opening(self) -> list[str]:
        return [
            self._chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""),
                                         logprobs=None, finish_reason=None)])
            for i in range(self._num_choices)
        ]

    def step(self, deltas: Sequence[ChoiceDelta]) -> list[str]:
        frames = []
        for d in deltas:
            if not d.text and d.finish_reason is None and not d.logprobs:
                continue  # e.g. a token held back while it might start a stop string
            delta = DeltaMessage(content=d.text) if d.text else DeltaMessage()
            logprobs = None
            if self._top_logprobs is not None and d.logprobs:
                logprobs = chat_logprobs(d.logprobs, self._top_logprobs)
            frames.append(self._chunk([ChatChunkChoice(index=d.index, delta=delta, logprobs=logprobs,
                                                       finish_reason=d.finish_reason)]))
        return frames

    def usage(self, usage: UsageInfo) -> str:
        return self._chunk([], usage)


class CompletionChunkFormatter:
    """``text_completion`` frames; ``echo`` sends each prompt's text first.

    With ``echo`` and ``logprobs`` the prompt frame carries the prompt's logprobs, so
    it waits for the engine's first output of that choice (``first_texts``: each
    prompt's first token, which has a null logprob).
    """

    def __init__(
        self, request_id: str, model: str, n: int, prompt_texts: list[str] | None, logprobs: int | None,
        first_texts: list[str] | None = None,
    ) -> None:
        self._id = request_id
        self._model = model
        self._created = int(time.time())
        self._n = n
        self._prompt_texts = prompt_texts
        self._logprobs = logprobs
        self._first_texts = first_texts
        self._echoed: set[int] = set()  # choices whose prompt frame went out (echo + logprobs)
        self._offsets: dict[int, int] = {}  # text offset of the next token, per choice

    def _chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        chunk = CompletionResponse(id=self._id, object="text_completion", created=self._created,
                                   model=self._model, choices=choices)
        if usage is not None:
            chunk.usage = usage
        return chunk.model_dump_json(exclude_unset=True)

    def opening(self) -> list[str]:
        if not self._prompt_texts or self._first_texts is not None:
            return []
        frames = []
        for p, text in enumerate(self._prompt_texts):
            for i in range(self._n):
                index = p * self._n + i
                self._offsets[index] = len(text)
                frames.append(self._chunk([CompletionChoice(index=index, text=text, logprobs=None,
                                                            finish_reason=None)]))
        return frames

    def _prompt_frame(self, d: ChoiceDelta) -> str:
        """The echoed prompt of ``d``'s choice with its logprobs (echo + logprobs)."""
        p = d.index // self._n
        logprobs = completion_logprobs(d.prompt_logprobs or [], self._logprobs or 0, 0, self._first_texts[p])
        self._echoed.add(d.index)
        self._offsets[d.index] = sum(len(t) for t in logprobs.tokens)
        return self._chunk([CompletionChoice(index=d.index, text=self._prompt_texts[p], logprobs=logprobs,
                                             finish_reason=None)])

    def step(self, deltas: Sequence[ChoiceDelta]) -> list[str]:
        frames = []
        for d in deltas:
            if self._first_texts is not None and d.index not in self._echoed and d.prompt_logprobs is not None:
                frames.append(self._prompt_frame(d))
            if not d.text and d.finish_reason is None and not d.logprobs:
                continue
            logprobs = None
            if self._logprobs is not None and d.logprobs:
                start = self._offsets.get(d.index, 0)
                logprobs = completion_logprobs(d.logprobs, self._logprobs, start)
                self._offsets[d.index] = start + sum(len(p.sampled.text) for p in d.logprobs)
            frames.append(self._chunk([CompletionChoice(index=d.index, text=d.text, logprobs=logprobs,
                                                        finish_reason=d.finish_reason)]))
        return frames

    def usage(self, usage: UsageInfo) -> str:
        return self._chunk([], usage)


async def stream_events(
    group: RequestGroup, formatter: ChunkFormatter, include_usage: bool
) -> AsyncIterator[str | ServerSentEvent]:
    """The SSE payloads of one streamed request; always closes ``group``."""
    try:
        for frame in formatter.opening():
            yield frame
        async for deltas in group.deltas():
            for frame in formatter.step(deltas):
                yield frame
        if include_usage:
            yield formatter.usage(group.usage())
        yield DONE
    except Exception as exc:  # headers are sent: the error can only travel as an event
        if isinstance(exc, APIError):
            body = exc.body()
        else:
            logger.exception("error while streaming")
            body = error_body(f"internal server error ({type(exc).__name__})", "server_error", None, "internal_error")
        yield ServerSentEvent(data=json.dumps(body), event="error", sep="\n")
    finally:
        await group.close()


def sse_response(
    events: AsyncIterator[str | ServerSentEvent], group: RequestGroup, settings: ServerSettings
) -> EventSourceResponse:
    """An EventSourceResponse with ``\\n`` separators, keep-alive pings and a drain grace period."""
    return EventSourceResponse(
        events,
        sep="\n",
        ping=settings.sse_ping_s,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        # If the stream never starts (client gone first), the group is still closed.
        background=BackgroundTask(group.close),
        # On SIGTERM let running streams finish, up to the drain timeout.
        shutdown_grace_period=settings.drain_timeout_s,
    )
