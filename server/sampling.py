"""Build the runtime's SamplingParams from an API request (the one place the two meet)."""

from __future__ import annotations

from typing import Any

from qalora_runtime.sampling_params import SamplingParams

from .errors import APIError
from .protocol import ChatCompletionRequest, CompletionRequest


def build_sampling_params(
    request: ChatCompletionRequest | CompletionRequest, max_tokens: int
) -> SamplingParams:
    """SamplingParams for ``request``; ``max_tokens`` is already checked against the context."""
    kwargs: dict[str, Any] = {
        "n": request.n,
        "max_tokens": max_tokens,
        "min_tokens": request.min_tokens,
        "seed": request.seed,
        "stop": request.stop,
        "stop_token_ids": request.stop_token_ids,
        "ignore_eos": request.ignore_eos,
        "logprobs": request.num_logprobs,
        "logit_bias": request.logit_bias,
        "skip_special_tokens": request.skip_special_tokens,
        "include_stop_str_in_output": request.include_stop_str_in_output,
    }
    if getattr(request, "echo", False) and request.num_logprobs is not None:
        # Completions with echo + logprobs score the prompt too (lm-eval-harness loglikelihood).
        kwargs["prompt_logprobs"] = request.num_logprobs
    # Only pass what the client set, so SamplingParams' defaults stay the single source.
    optional = (
        "temperature", "top_p", "top_k", "min_p",
        "presence_penalty", "frequency_penalty", "repetition_penalty",
    )
    for name in optional:
        value = getattr(request, name)
        if value is not None:
            kwargs[name] = value
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise APIError(400, str(exc), param=_param_of(str(exc))) from exc


def _param_of(message: str) -> str | None:
    # SamplingParams messages start with the field name ("top_p must be ...").
    head = message.split(" ", 1)[0].split("[", 1)[0]
    return head if head.isidentifier() else None
