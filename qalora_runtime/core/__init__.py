"""Torch-free engine core: KV block pool, KV cache manager with prefix caching, scheduler.

Nothing in this package imports torch, so the allocator and scheduler are tested on
the CPU in milliseconds (a test checks ``sys.modules`` after importing it).
"""

from qalora_runtime.core.block_pool import BlockPool, KVBlock
from qalora_runtime.core.kv_cache_manager import ComputedPrefix, KVCacheManager, hash_block
from qalora_runtime.core.scheduler import Scheduler, SchedulerQueueFullError
from qalora_runtime.core.scheduler_output import ScheduledRequest, SchedulerOutput
from qalora_runtime.core.stats import SchedulerStats

__all__ = [
    "BlockPool",
    "ComputedPrefix",
    "KVBlock",
    "KVCacheManager",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
    "SchedulerQueueFullError",
    "SchedulerStats",
    "hash_block",
]
