"""KVCacheManager: per-request block tables on top of a BlockPool, with prefix caching.

Prefix caching: every *full* block of a request's tokens has a chained hash,
``hash_block(parent_hash, tokens_of_block)``, so equal content under a different
prefix gets a different hash. A block is registered once its KV has been computed
(:meth:`KVCacheManager.cache_blocks`, called by the scheduler after each step) — never
earlier, so a request never reads KV that another request in the same step is still
writing. Hits are verified against the stored token ids and parent hash.

A hit never covers a request's last token: the model must run on at least one token
to produce logits, so a fully cached prompt still recomputes its last block.

Sharing between the ``n`` samples of one request (:meth:`KVCacheManager.fork`):
the child shares the parent's *full* blocks that hold the common prefix (ref count
+1 each, no copy) and recomputes the partial tail block itself — at most
``block_size - 1`` tokens (``block_size`` when the prompt is block aligned, since
the last token is always recomputed). No copy-on-write is needed because shared
blocks are full and therefore never written again. This works with prefix caching
on or off.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from qalora_runtime.core.block_pool import BlockHash, BlockPool, KVBlock
from qalora_runtime.request import Request

_ROOT_HASH = b"\x00" * 32


def hash_block(parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Chained hash of one full block: sha256(parent_hash || int64 token ids).

    A cryptographic hash rather than Python's ``hash``: prefix-cache hits are shared
    between users, and a crafted collision must not let one user read another's KV.
    """
    h = hashlib.sha256(parent_hash if parent_hash is not None else _ROOT_HASH)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass(frozen=True)
class ComputedPrefix:
    """Result of a prefix-cache lookup: cached blocks covering ``num_tokens`` leading tokens."""

    blocks: tuple[KVBlock, ...]
    num_tokens: int
    #: Tokens the lookup was asked about (for the hit-rate statistics).
    num_query_tokens: int


_EMPTY_PREFIX = ComputedPrefix((), 0, 0)


class KVCacheManager:
    """Maps request ids to block tables; allocates, shares, caches and frees blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self._req_blocks: dict[str, list[KVBlock]] = {}
        # Hashes of a request's full blocks, extended lazily as its tokens grow.
        self._req_hashes: dict[str, list[BlockHash]] = {}
        # How many leading blocks of a request were already offered to the cache.
        self._num_cached: dict[str, int] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # -- queries -------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Total blocks in the pool."""
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks not referenced by any request (cached ones included: they are evictable)."""
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests, in [0, 1]."""
        return self.pool.usage

    def has_blocks(self, request_id: str) -> bool:
        """True if the request currently holds blocks."""
        return bool(self._req_blocks.get(request_id))

    def get_block_table(self, request_id: str) -> list[int]:
        """Block ids of the request, in token order (empty if it holds none)."""
        return [b.block_id for b in self._req_blocks.get(request_id, ())]

    def slot_mapping(self, request_id: str, start: int, end: int) -> list[int]:
        """Cache slots ``block_id * block_size + offset`` for token positions [start, end)."""
        blocks = self._req_blocks.get(request_id, [])
        bs = self.block_size
        if end > len(blocks) * bs or start < 0 or start > end:
            raise RuntimeError(f"{request_id}: positions [{start}, {end}) not covered by its blocks")
        return [blocks[p // bs].block_id * bs + p % bs for p in range(start, end)]

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` token slots."""
        return -(-num_tokens // self.block_size)

    # -- prefix cache --------------------------------------------------------------

    def get_computed_blocks(self, request: Request, use_cache: bool = True) -> ComputedPrefix:
        """Longest verified cached prefix of the request's tokens (full blocks only).

        Has no side effects: the blocks are claimed by :meth:`allocate_slots`, which
        also records the hit statistics — so a request that waits several steps
        before it fits is counted once. ``use_cache=False`` finds nothing (a request
        that must compute every token).
        """
        if not self.enable_prefix_caching or not use_cache:
            return _EMPTY_PREFIX
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        hashes = self._block_hashes(request, max_blocks)
        tokens = request.all_token_ids
        hits: list[KVBlock] = []
        parent: BlockHash | None = None
        for i, h in enumerate(hashes):
            block = self.pool.get_cached_block(h)
            if (
                block is None
                or block.parent_hash != parent
                or block.token_ids != tuple(tokens[i * bs:(i + 1) * bs])
            ):
                break
            hits.append(block)
            parent = h
        return ComputedPrefix(tuple(hits), len(hits) * bs, request.num_tokens)

    def cache_blocks(self, request: Request) -> None:
        """Register the request's full blocks whose KV is computed (up to
        ``request.num_computed_tokens``) in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        blocks = self._req_blocks.get(request.request_id)
        if not blocks:
            return
        rid = request.request_id
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        start = self._num_cached.get(rid, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        tokens = request.all_token_ids
        bs = self.block_size
        for i in range(start, num_full):
            parent = hashes[i - 1] if i > 0 else None
            self.pool.cache_block(blocks[i], hashes[i], parent, tuple(tokens[i * bs:(i + 1) * bs]))
        self._num_cached[rid] = num_full

    def _block_hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        hashes = self._req_hashes.setdefault(request.request_id, [])
        tokens = request.all_token_ids
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * bs:(i + 1) * bs]))
        return hashes[:num_blocks]

    # -- allocation ----------------------------------------------------------------

    def allocate_slots(
        self, request: Request, num_new_tokens: int, prefix: ComputedPrefix | None = None
    ) -> bool:
        """Make room for ``num_new_tokens`` more tokens after the computed ones.

        ``prefix`` (from :meth:`get_computed_blocks`, only for a request holding no
        blocks) is claimed first; the caller then advances ``num_computed_tokens`` by
        ``prefix.num_tokens``. Returns False, changing nothing, when the free blocks do
        not suffice — the scheduler then preempts or waits.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        rid = request.request_id
        blocks = self._req_blocks.get(rid, [])
        prefix = prefix or _EMPTY_PREFIX
        if prefix.blocks and blocks:
            raise RuntimeError(f"{rid}: a prefix can only be claimed by a request holding no blocks")
        total = request.num_computed_tokens + prefix.num_tokens + num_new_tokens
        num_new_blocks = max(0, self.num_blocks_for(total) - len(blocks) - len(prefix.blocks))
        # Free cached blocks hit by the prefix leave the free list when claimed.
        num_reclaimed = sum(1 for b in prefix.blocks if b.ref_cnt == 0)
        if num_new_blocks + num_reclaimed > self.pool.num_free_blocks:
            return False
        if prefix.num_query_tokens:
            self.prefix_cache_queries += prefix.num_query_tokens
            self.prefix_cache_hits += prefix.num_tokens
        self.pool.touch(prefix.blocks)
        blocks = self._req_blocks.setdefault(rid, [])
        blocks.extend(prefix.blocks)
        blocks.extend(self.pool.allocate(num_new_blocks))
        if prefix.blocks:
            self._num_cached[rid] = len(prefix.blocks)
        return True

    def fork(self, parent: Request, child: Request) -> ComputedPrefix:
        """The parent's computed full blocks that hold the child's leading tokens.

        Like :meth:`get_computed_blocks` it has no side effects: claim the blocks with
        ``allocate_slots(child, n, prefix)``, which adds a reference to each. At most
        ``child.num_tokens - 1`` tokens are shared (the last is always recomputed), and
        fork hits are not counted as prefix-cache queries or hits.
        """
        parent_blocks = self._req_blocks.get(parent.request_id, [])
        bs = self.block_size
        limit = min(child.num_tokens - 1, parent.num_computed_tokens, len(parent_blocks) * bs)
        ptoks, ctoks = parent.all_token_ids, child.all_token_ids
        n = 0
        while (n + 1) * bs <= limit and ptoks[n * bs:(n + 1) * bs] == ctoks[n * bs:(n + 1) * bs]:
            n += 1
        return ComputedPrefix(tuple(parent_blocks[:n]), n * bs, 0)

    def free(self, request_id: str) -> None:
        """Release every block of the request (cached ones stay reusable until evicted)."""
        blocks = self._req_blocks.pop(request_id, [])
        self._req_hashes.pop(request_id, None)
        self._num_cached.pop(request_id, None)
        # Reverse order: the tail of a chain should be evicted before its head.
        self.pool.free(blocks[::-1])

    def reset_prefix_cache(self) -> bool:
        """Drop all cached content; returns False if blocks are still in use."""
        return self.pool.reset_prefix_cache()
