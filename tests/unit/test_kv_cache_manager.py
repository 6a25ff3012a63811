"""KVCacheManager with a tiny spec (8 blocks of 4 tokens): tables, slots, prefix hits, fork."""

from __future__ import annotations

import pytest

from qalora_runtime.core.kv_cache_manager import KVCacheManager
from qalora_runtime.request import Request

BS = 4


def make(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens)


def prefill(kv: KVCacheManager, req: Request) -> int:
    """Admit ``req`` like the scheduler does: prefix lookup, allocate, compute all, cache."""
    prefix = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - prefix.num_tokens, prefix)
    req.num_computed_tokens = req.num_tokens
    kv.cache_blocks(req)
    return prefix.num_tokens


def test_allocate_exact_blocks_and_slots() -> None:
    kv = KVCacheManager(8, BS)
    a = make("a", list(range(10)))
    assert kv.allocate_slots(a, 10)
    assert kv.get_block_table("a") == [0, 1, 2]
    assert kv.slot_mapping("a", 0, 10) == list(range(10))
    b = make("b", [1, 2, 3])
    assert kv.allocate_slots(b, 3)
    assert kv.get_block_table("b") == [3]
    assert kv.slot_mapping("b", 0, 3) == [12, 13, 14]
    # a decodes: positions 10, 11 fit block 2; position 12 needs a new block (4).
    a.num_computed_tokens = 10
    assert kv.allocate_slots(a, 2)
    assert kv.get_block_table("a") == [0, 1, 2]
    a.num_computed_tokens = 12
    assert kv.allocate_slots(a, 1)
    assert kv.get_block_table("a") == [0, 1, 2, 4]
    assert kv.slot_mapping("a", 12, 13) == [16]
    assert kv.usage == pytest.approx(5 / 8)


def test_allocation_failure_changes_nothing() -> None:
    kv = KVCacheManager(2, BS)
    a = make("a", list(range(12)))
    assert not kv.allocate_slots(a, 12)
    assert kv.get_block_table("a") == [] and kv.num_free_blocks == 2


def test_free_returns_blocks_and_slots_outside_table_raise() -> None:
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    a = make("a", list(range(8)))
    kv.allocate_slots(a, 8)
    with pytest.raises(RuntimeError, match="not covered"):
        kv.slot_mapping("a", 6, 9)
    kv.free("a")
    assert kv.num_free_blocks == 8 and kv.get_block_table("a") == []


def test_prefix_hit_shares_full_blocks_and_counts_tokens() -> None:
    kv = KVCacheManager(8, BS)
    a = make("a", list(range(10)))
    assert prefill(kv, a) == 0
    assert kv.get_block_table("a") == [0, 1, 2]
    b = make("b", list(range(8)) + [99, 98, 97])
    assert prefill(kv, b) == 8  # blocks 0 and 1 (tokens 0..7) hit
    assert kv.get_block_table("b") == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert kv.prefix_cache_queries == 10 + 11 and kv.prefix_cache_hits == 8


def test_same_block_content_under_different_prefix_does_not_hit() -> None:
    kv = KVCacheManager(8, BS)
    prefill(kv, make("a", [1, 1, 1, 1, 5, 6, 7, 8, 9]))
    # Block 2 of b equals block 2 of a, but block 1 differs: the chain must miss.
    b = make("b", [2, 2, 2, 2, 5, 6, 7, 8, 9])
    assert kv.get_computed_blocks(b).num_tokens == 0
    c = make("c", [1, 1, 1, 1, 5, 6, 7, 0, 9])
    assert kv.get_computed_blocks(c).num_tokens == 4


def test_last_token_is_never_a_hit() -> None:
    kv = KVCacheManager(8, BS)
    prefill(kv, make("a", list(range(8))))
    same = make("b", list(range(8)))
    prefix = kv.get_computed_blocks(same)
    assert prefix.num_tokens == 4  # block 1 is recomputed so the model yields logits


def test_blocks_are_cached_only_once_computed() -> None:
    kv = KVCacheManager(8, BS)
    a = make("a", list(range(12)))
    kv.allocate_slots(a, 12)  # scheduled, not yet computed
    b = make("b", list(range(12)))
    assert kv.get_computed_blocks(b).num_tokens == 0
    a.num_computed_tokens = 6  # a chunk of 6 computed: only block 0 is full
    kv.cache_blocks(a)
    assert kv.get_computed_blocks(b).num_tokens == 4


def test_freed_cached_blocks_hit_later_and_lru_eviction() -> None:
    kv = KVCacheManager(4, BS)
    a = make("a", list(range(9)))  # blocks 0,1 full (cached), 2 partial
    prefill(kv, a)
    kv.free("a")
    # Partial block 2 and untouched block 3 are reused before cached 1 then 0.
    assert kv.pool.free_block_ids() == [2, 3, 1, 0]
    b = make("b", [50 + i for i in range(12)])
    assert kv.allocate_slots(b, 12)
    assert kv.get_block_table("b") == [2, 3, 1]  # evicted block 1 (the tail of a's chain)
    c = make("c", list(range(9)))
    assert kv.get_computed_blocks(c).num_tokens == 4  # block 0 still cached


def test_hit_on_free_cached_block_counts_against_free_space() -> None:
    kv = KVCacheManager(3, BS)
    prefill(kv, make("a", list(range(9))))
    kv.free("a")
    b = make("b", list(range(8)) + [1, 2, 3, 4, 5])  # needs 4 blocks, 2 of them hits
    prefix = kv.get_computed_blocks(b)
    assert prefix.num_tokens == 8
    assert not kv.allocate_slots(b, 5, prefix)
    assert kv.num_free_blocks == 3 and all(blk.ref_cnt == 0 for blk in kv.pool.blocks)


def test_fork_shares_parent_prompt_blocks_and_recomputes_tail() -> None:
    for caching in (True, False):
        kv = KVCacheManager(8, BS, enable_prefix_caching=caching)
        parent = make("p", list(range(10)))
        kv.allocate_slots(parent, 10)
        parent.num_computed_tokens = 10
        kv.cache_blocks(parent)
        parent.append_output_token(77)
        kv.allocate_slots(parent, 1)  # decode keeps writing into its own block 2
        child = make("c", list(range(10)))
        prefix = kv.fork(parent, child)
        assert prefix.num_tokens == 8 and [b.block_id for b in prefix.blocks] == [0, 1]
        assert kv.allocate_slots(child, 2, prefix)
        assert kv.get_block_table("c") == [0, 1, 3]
        assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]
        kv.free("p")
        assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [1, 1, 0, 1]
        kv.free("c")
        assert kv.num_free_blocks == 8
        assert kv.prefix_cache_hits == 0  # forks are not prefix-cache hits


def test_fork_of_block_aligned_prompt_recomputes_last_block() -> None:
    kv = KVCacheManager(8, BS)
    parent = make("p", list(range(8)))
    kv.allocate_slots(parent, 8)
    parent.num_computed_tokens = 8
    assert kv.fork(parent, make("c", list(range(8)))).num_tokens == 4


def test_claiming_prefix_when_holding_blocks_is_a_bug() -> None:
    kv = KVCacheManager(8, BS)
    prefill(kv, make("a", list(range(9))))
    b = make("b", list(range(9)))
    prefix = kv.get_computed_blocks(b)
    kv.allocate_slots(b, 1)
    with pytest.raises(RuntimeError, match="holding no blocks"):
        kv.allocate_slots(b, 1, prefix)
