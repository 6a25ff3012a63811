"""BlockPool: exact block ids, ref counts, free-list (eviction) order, hash map."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qalora_runtime.core.block_pool import BlockPool
from qalora_runtime.core.kv_cache_manager import hash_block


def test_core_does_not_import_torch() -> None:
    # A fresh interpreter: other tests in this process may have imported torch.
    code = "import sys, qalora_runtime.core, qalora_runtime.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_fresh_pool_allocates_in_ascending_order() -> None:
    pool = BlockPool(8)
    assert [b.block_id for b in pool.allocate(3)] == [0, 1, 2]
    assert [b.block_id for b in pool.allocate(2)] == [3, 4]
    assert pool.num_free_blocks == 3
    assert pool.usage == pytest.approx(5 / 8)


def test_allocate_more_than_free_is_a_bug() -> None:
    pool = BlockPool(2)
    pool.allocate(2)
    with pytest.raises(RuntimeError, match="only 0 free"):
        pool.allocate(1)


def test_ref_counts_and_double_free() -> None:
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    pool.touch([b])
    assert b.ref_cnt == 2
    pool.free([b])
    assert b.ref_cnt == 1 and pool.num_free_blocks == 3
    pool.free([b])
    assert b.ref_cnt == 0 and pool.num_free_blocks == 4
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([b])


def test_uncached_blocks_are_reused_before_cached_ones() -> None:
    pool = BlockPool(6)
    blocks = pool.allocate(4)  # 0 1 2 3
    h = hash_block(None, [1, 2])
    assert pool.cache_block(blocks[0], h, None, (1, 2))
    pool.free(blocks[::-1])
    # Uncached 1, 2, 3 go to the head (in table order), cached 0 to the tail.
    assert pool.free_block_ids() == [1, 2, 3, 4, 5, 0]
    assert [b.block_id for b in pool.allocate(5)] == [1, 2, 3, 4, 5]
    assert pool.get_cached_block(h) is blocks[0]  # not evicted yet
    (last,) = pool.allocate(1)
    assert last.block_id == 0 and pool.get_cached_block(h) is None and pool.num_evictions == 1
    assert not last.is_cached


def test_cached_free_blocks_are_evicted_least_recently_used_first() -> None:
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    for i, blk in enumerate((a, b, c)):
        pool.cache_block(blk, hash_block(None, [i]), None, (i,))
    pool.free([b])
    pool.free([a])
    pool.free([c])  # LRU order: b, a, c
    assert pool.free_block_ids() == [1, 0, 2]
    # A hit on a takes it off the free list; freed again it becomes most recent.
    pool.touch([a])
    pool.free([a])
    assert pool.free_block_ids() == [1, 2, 0]
    assert [x.block_id for x in pool.allocate(2)] == [1, 2]


def test_duplicate_content_keeps_first_block_canonical() -> None:
    pool = BlockPool(4)
    x, y = pool.allocate(2)
    h = hash_block(None, [7, 7])
    assert pool.cache_block(x, h, None, (7, 7))
    assert not pool.cache_block(y, h, None, (7, 7))
    assert pool.get_cached_block(h) is x and not y.is_cached


def test_caching_disabled_never_caches() -> None:
    pool = BlockPool(2, enable_caching=False)
    (x,) = pool.allocate(1)
    assert not pool.cache_block(x, hash_block(None, [1]), None, (1,))
    assert pool.num_cached_blocks == 0


def test_reset_prefix_cache_only_when_idle() -> None:
    pool = BlockPool(2)
    (x,) = pool.allocate(1)
    h = hash_block(None, [3])
    pool.cache_block(x, h, None, (3,))
    assert not pool.reset_prefix_cache()
    pool.free([x])
    assert pool.reset_prefix_cache()
    assert pool.get_cached_block(h) is None


def test_hash_chain_depends_on_parent() -> None:
    a = hash_block(None, [1, 2])
    b = hash_block(None, [3, 4])
    assert hash_block(a, [5, 6]) != hash_block(b, [5, 6])
    assert hash_block(a, [5, 6]) == hash_block(hash_block(None, [1, 2]), (5, 6))


def test_invalid_pool_size() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)
