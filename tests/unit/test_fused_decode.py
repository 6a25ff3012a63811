"""FusedDecodeStack (all decoder layers of a decode step in one C++ call) vs the module path.

Both paths run the same kernels and fused ops in the same order, so their
logits must be bit-identical; the tiny-model tests in test_models_tiny.py
separately tie the runtime to transformers. Every variant (GQA, sliding window,
qkv bias, llama3 rope, tied embeddings) runs a batch of sequences at different
lengths with scattered block tables, in fp32 and bf16.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_models_tiny import BLOCK, VARIANTS, VOCAB, PagedSequence, _runner, build_pair

from qalora_runtime.kernels import layer_ops
from qalora_runtime.models.fused_decode import FUSED_DECODE_ENV, FusedDecodeStack
from qalora_runtime.worker.model_runner import ModelRunner

pytestmark = pytest.mark.skipif(layer_ops._EXT is None, reason="C++ extension not built")


def _decode_logits(runner: ModelRunner, use_fused: bool, seed: int) -> torch.Tensor:
    fused = runner.fused_decode
    gen = torch.Generator().manual_seed(seed)
    lengths = [9, 3, 14]
    seqs = [PagedSequence(torch.randint(0, VOCAB, (n + 6,), generator=gen).tolist(), i, 3)
            for i, n in enumerate(lengths)]
    runner.fused_decode = None  # prefill always takes the module path
    runner.execute([s.item(0, n) for s, n in zip(seqs, lengths)])
    runner.fused_decode = fused if use_fused else None
    out = []
    for step in range(6):
        out.append(runner.execute([s.item(n + step, n + step + 1) for s, n in zip(seqs, lengths)]))
    runner.fused_decode = fused
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_decode_is_bit_identical_to_module_path(variant, dtype, tmp_path: Path) -> None:
    ckpt, _ = build_pair(variant, tmp_path)
    runner = _runner(ckpt, dtype)
    assert runner.fused_decode is not None, "every tiny variant runs on cpu_fused kernels"
    fused = _decode_logits(runner, True, seed=3)
    plain = _decode_logits(_runner(ckpt, dtype), False, seed=3)
    assert fused.shape == (6, 3, VOCAB)
    assert torch.equal(fused, plain)


def test_fused_decode_falls_back_when_disabled_or_unsupported(tmp_path: Path, monkeypatch) -> None:
    ckpt, _ = build_pair("llama_4bit", tmp_path)
    monkeypatch.setenv(FUSED_DECODE_ENV, "0")
    assert _runner(ckpt).fused_decode is None
    monkeypatch.delenv(FUSED_DECODE_ENV)
    monkeypatch.setenv("QALORA_KERNEL", "dequant_fallback")  # projections not on cpu_fused
    assert _runner(ckpt).fused_decode is None
    monkeypatch.delenv("QALORA_KERNEL")
    runner = _runner(ckpt)
    # A cache in another dtype than the model cannot be handed to the native stack.
    caches = [c.to(torch.bfloat16) for c in runner.kv_cache.layers]
    assert FusedDecodeStack.build(runner.model, caches) is None


def test_fused_decode_rejects_slots_outside_the_cache(tmp_path: Path) -> None:
    ckpt, _ = build_pair("llama_4bit", tmp_path)
    runner = _runner(ckpt, num_blocks=8)
    stack = runner.fused_decode
    one = torch.tensor([1])
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        stack.hidden_states(one, torch.tensor([0]), torch.tensor([8 * BLOCK]),
                            torch.tensor([[0]]), one)
