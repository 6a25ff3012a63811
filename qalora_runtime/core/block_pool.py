"""BlockPool: a fixed set of KV cache blocks with ref counts, an LRU free list and a
hash -> block map for prefix caching.

Free-list order decides what gets evicted, so it is a policy:

* blocks that hold no cached content go to the *head* of the free list, and
  allocation takes from the head — a block with a reusable prefix is never evicted
  while a worthless one is free;
* cached blocks (full, hashed) go to the *tail* when their last user frees them,
  so among cached blocks the least recently used is evicted first;
* a cached block that gets a prefix hit while free leaves the free list (ref 1).

No torch here: the pool hands out block ids, the worker owns the tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: A chained block hash (sha256 digest), see ``kv_cache_manager.hash_block``.
BlockHash = bytes


@dataclass(slots=True, eq=False)
class KVBlock:
    """One block of ``block_size`` token slots.

    ``block_hash``/``token_ids``/``parent_hash`` are set only while the block is in
    the prefix cache; ``token_ids`` is kept so a hit is verified, not just trusted.
    """

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    parent_hash: BlockHash | None = None
    token_ids: tuple[int, ...] | None = None

    @property
    def is_cached(self) -> bool:
        """True while the block is registered in the prefix cache."""
        return self.block_hash is not None


class BlockPool:
    """Owns ``num_blocks`` KV blocks: allocation, ref counting, LRU eviction, hash map.

    Blocks are numbered ``0 .. num_blocks-1`` and a fresh pool allocates them in
    ascending order.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks: list[KVBlock] = [KVBlock(i) for i in range(num_blocks)]
        # OrderedDict gives O(1) removal from the middle (a prefix hit on a free
        # cached block) plus FIFO order at both ends.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, KVBlock] = {}
        self.num_evictions = 0

    # -- queries -------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0 (cached or not): what allocation can hand out."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently registered in the prefix cache (in use or free)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by at least one request, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    def free_block_ids(self) -> list[int]:
        """Free block ids in eviction order (next to be allocated first)."""
        return list(self._free)

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        """The block registered under ``block_hash``, or None."""
        return self._cached.get(block_hash)

    # -- allocation ----------------------------------------------------------------

    def allocate(self, num: int) -> list[KVBlock]:
        """Take ``num`` blocks from the head of the free list, each with ref count 1.

        Raises RuntimeError if fewer are free: callers check :attr:`num_free_blocks`
        first, so this is a bug, never a user error.
        """
        if num > len(self._free):
            raise RuntimeError(f"cannot allocate {num} blocks: only {len(self._free)} free")
        out = []
        for _ in range(num):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Add one reference to each block (a prefix hit or a fork shares it)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Sequence[KVBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 rejoin the free list.

        Pass a request's blocks in reverse table order: a chain's tail then becomes
        evictable before its head, and the head (shared by more prompts) lives longest.
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {block.block_id} freed more often than referenced")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                if not block.is_cached:
                    self._free.move_to_end(block.block_id, last=False)

    # -- prefix cache --------------------------------------------------------------

    def cache_block(
        self, block: KVBlock, block_hash: BlockHash, parent_hash: BlockHash | None, token_ids: tuple[int, ...]
    ) -> bool:
        """Register a full, computed block under ``block_hash``.

        Returns False (and leaves the block uncached) when caching is off, the block
        is already cached, or another block already holds this content — the first
        copy stays canonical so lookups stay deterministic.
        """
        if not self.enable_caching or block.is_cached or block_hash in self._cached:
            return False
        block.block_hash = block_hash
        block.parent_hash = parent_hash
        block.token_ids = token_ids
        self._cached[block_hash] = block
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; only allowed when no block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            self._uncache(block)
        return True

    def _evict(self, block: KVBlock) -> None:
        if block.is_cached:
            self.num_evictions += 1
            self._uncache(block)

    def _uncache(self, block: KVBlock) -> None:
        if block.block_hash is not None and self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
        block.block_hash = None
        block.parent_hash = None
        block.token_ids = None
