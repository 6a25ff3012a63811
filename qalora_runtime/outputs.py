"""What the engine hands back to callers: per-step deltas of each request's completions."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Log-probability of one token, with its decoded text."""

    token_id: int
    logprob: float
    text: str


@dataclass
class PositionLogprobs:
    """Logprob of the sampled token at one position plus the top alternatives there."""

    sampled: TokenLogprob
    top: list[TokenLogprob] = field(default_factory=list)


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request, as of this step.

    ``text_delta``/``token_ids_delta``/``logprobs_delta`` hold only what is new
    since the previous output for this completion (what a stream sends);
    ``text`` and ``token_ids`` are cumulative.
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs_delta: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it


@dataclass
class RequestMetrics:
    """Timestamps (``time.monotonic``) of a request's life, for latency metrics."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    #: Seconds between consecutive steps that produced tokens for this request.
    inter_token_latencies: list[float] = field(default_factory=list)


@dataclass
class RequestOutput:
    """The state of one request after an engine step: only completions that changed are listed."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    #: With ``SamplingParams.prompt_logprobs``: one entry per prompt token (the first is
    #: None, it has no context), on the request's first output only.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
