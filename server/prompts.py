"""Turn request inputs (chat messages, prompt strings, token-id lists) into prompt token ids.

Everything a client can get wrong here (an empty prompt, a token id outside
the vocabulary, a template that fails to render) is an APIError(400).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from .errors import APIError
from .protocol import ChatMessage

logger = logging.getLogger(__name__)


def render_chat(
    tokenizer: Any,
    messages: Sequence[ChatMessage],
    *,
    chat_template: str | None,
    add_generation_prompt: bool = True,
) -> str:
    """Apply the chat template (the override if given, else the tokenizer's) to ``messages``."""
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise APIError(
            400,
            "this model has no chat template; use /v1/completions or start the server with --chat-template",
            param="messages",
            code="no_chat_template",
        )
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except Exception as exc:  # jinja raises many kinds (incl. raise_exception in templates)
        raise APIError(400, f"the chat template rejected these messages: {exc}", param="messages") from exc
    if not isinstance(text, str):
        raise APIError(500, "chat template rendering did not return text", code="internal_error")
    return text


def encode_text(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    """Tokenize ``text`` to a plain list of ids."""
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def chat_prompt_ids(
    tokenizer: Any,
    messages: Sequence[ChatMessage],
    *,
    chat_template: str | None,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of a rendered chat prompt (the template already holds BOS, so none is added)."""
    text = render_chat(
        tokenizer, messages, chat_template=chat_template, add_generation_prompt=add_generation_prompt
    )
    return encode_text(tokenizer, text, add_special_tokens=False)


def vocab_size(tokenizer: Any) -> int:
    """The number of valid token ids (added tokens included)."""
    return len(tokenizer)


def check_token_ids(tokenizer: Any, ids: Sequence[int], param: str) -> list[int]:
    """Reject ids outside the vocabulary: the embedding lookup would fail on them."""
    size = vocab_size(tokenizer)
    for tok in ids:
        if not 0 <= tok < size:
            raise APIError(400, f"token id {tok} is outside the vocabulary [0, {size})", param=param)
    return list(ids)


def completion_prompts(tokenizer: Any, prompt: str | list[Any]) -> list[list[int]]:
    """One token-id list per prompt: a string, a list of strings, a list of ids or a list of id lists."""
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    elif all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    result = []
    for item in prompts:
        if isinstance(item, str):
            ids = encode_text(tokenizer, item, add_special_tokens=True)
        else:
            ids = check_token_ids(tokenizer, item, "prompt")
        if not ids:
            raise APIError(400, "prompt must contain at least one token", param="prompt")
        result.append(ids)
    return result


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int, param: str) -> int:
    """The number of tokens that may be generated; 400 saying by how much the request overflows.

    With no ``max_tokens`` the request may run to the end of the context, which
    must leave room for at least one generated token.
    """
    if prompt_len >= max_model_len:
        over = prompt_len - max_model_len + 1
        raise APIError(
            400,
            f"this model's maximum context length is {max_model_len} tokens, but the prompt is "
            f"{prompt_len} tokens: {over} token(s) too many (at least 1 token must be left to generate)",
            param=param,
            code="context_length_exceeded",
        )
    room = max_model_len - prompt_len
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise APIError(
            400,
            f"this model's maximum context length is {max_model_len} tokens, but {prompt_len + max_tokens} "
            f"were requested ({prompt_len} in the prompt, {max_tokens} to generate): "
            f"{max_tokens - room} token(s) too many; lower max_tokens to at most {room}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens
