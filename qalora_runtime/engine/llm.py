"""LLM: offline batch generation on the same engine core the server uses (no thread, no HTTP)."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

from ..outputs import CompletionOutput, RequestOutput
from ..sampling_params import SamplingParams
from .engine_core import EngineCore


class LLM:
    """Generate completions for a batch of prompts with continuous batching.

    >>> llm = LLM()                        # the default model
    >>> [o.outputs[0].text for o in llm.generate(["Hello"], SamplingParams(max_tokens=8))]
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.core = EngineCore.from_model(model, **engine_args)
        self.tokenizer = self.core.tokenizer
        self._ids = itertools.count()

    def encode_chat(self, user_message: str, system: str | None = None) -> list[int]:
        """Token ids of a one-turn chat prompt under the model's chat template."""
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_message}
        ]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding here; older versions a plain list.
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        on_output: Callable[[int, RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; returns one final output per prompt, in order.

        ``on_output(prompt_index, delta)`` is called for every step's delta (for
        streaming to a terminal).
        """
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids: dict[str, int] = {}
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = f"offline-{next(self._ids)}"
            self.core.add_request(rid, token_ids, p)
            ids[rid] = i
        latest: dict[str, dict[int, CompletionOutput]] = {rid: {} for rid in ids}
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.core.step():
                if out.request_id not in ids:
                    continue
                if on_output is not None:
                    on_output(ids[out.request_id], out)
                for c in out.outputs:
                    latest[out.request_id][c.index] = c
                if out.finished:
                    comps = [latest[out.request_id][k] for k in sorted(latest[out.request_id])]
                    final[out.request_id] = RequestOutput(
                        out.request_id, out.prompt_token_ids, comps, True, out.metrics
                    )
        return [final[rid] for rid in sorted(ids, key=ids.get)]
