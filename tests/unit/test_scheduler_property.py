"""Property-based test of the scheduler + KV cache manager.

After any sequence of adds (including n>1 groups and shared prefixes), steps, aborts
and finishes: at every point each block's ref count equals the number of block tables
holding it (so no block is shared without a ref), free blocks are exactly those with
ref count 0; everything eventually finishes (no deadlock), every block is then free,
and requests that ran to a natural end produced exactly what they produce alone.
"""

from __future__ import annotations

import zlib
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qalora_runtime.config import CacheConfig, SchedulerConfig
from qalora_runtime.core import Scheduler, SchedulerOutput
from qalora_runtime.request import Request, RequestStatus
from qalora_runtime.sampling_params import SamplingParams

VOCAB, EOS = 8, (7,)


def next_token(context: list[int]) -> int:
    return zlib.crc32(bytes(str(context), "ascii")) % VOCAB


def alone(prompt: list[int], max_tokens: int, max_len: int) -> list[int]:
    seq, out = list(prompt), []
    while True:
        seq.append(next_token(seq))
        out.append(seq[-1])
        if seq[-1] in EOS or len(out) >= max_tokens or len(seq) >= max_len:
            return out


def run_model(slots: dict[int, tuple[int, int]], bs: int, out: SchedulerOutput) -> dict[str, int]:
    """Attend only over KV written by earlier steps plus the request's own new tokens."""
    before = dict(slots)
    sampled = {}
    for e in out.scheduled:
        context = []
        for p in range(e.start_position):
            pos, tok = before[e.block_table[p // bs] * bs + p % bs]
            assert pos == p
            context.append(tok)
        context.extend(e.token_ids)
        for p, slot, tok in zip(e.positions, e.slot_mapping, e.token_ids):
            slots[slot] = (p, tok)
        if e.sample:
            sampled[e.request_id] = next_token(context)
    return sampled


def check_invariants(s: Scheduler) -> None:
    kv = s.kv
    tables = {rid: kv.get_block_table(rid) for rid in kv._req_blocks}
    holders: Counter[int] = Counter()
    for rid, table in tables.items():
        assert len(table) == len(set(table)), f"{rid} holds a block twice"
        holders.update(table)
    for block in kv.pool.blocks:
        assert block.ref_cnt == holders[block.block_id], f"block {block.block_id} shared without a ref"
        if block.is_cached:
            assert kv.pool.get_cached_block(block.block_hash) is block
    assert set(kv.pool.free_block_ids()) == {b.block_id for b in kv.pool.blocks if b.ref_cnt == 0}
    for r in s.running:
        assert r.status is RequestStatus.RUNNING
        assert len(tables.get(r.request_id, [])) * kv.block_size >= r.num_computed_tokens
    for r in s.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert not kv.has_blocks(r.request_id)
    assert len(s.running) <= s.config.max_num_seqs


@st.composite
def scenarios(draw):
    block_size = draw(st.sampled_from([1, 2, 4]))
    max_seqs = draw(st.integers(1, 4))
    max_len = draw(st.integers(3, 40))
    chunked = draw(st.booleans())
    budget = draw(st.integers(max_seqs, 16))
    if not chunked:
        budget = max(budget, max_len)
    sched = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len,
                            enable_chunked_prefill=chunked, policy=draw(st.sampled_from(["fcfs", "priority"])))
    cache = CacheConfig(block_size=block_size, num_blocks=draw(st.integers(2, 12)),
                        enable_prefix_caching=draw(st.booleans()))
    op = st.one_of(
        st.tuples(st.just("add"), st.lists(st.integers(0, 3), min_size=1, max_size=12),
                  st.integers(1, 8), st.integers(1, 3), st.integers(-1, 1)),
        st.tuples(st.just("step")),
        st.tuples(st.just("step")),
        st.tuples(st.just("abort"), st.integers(0, 30)),
        st.tuples(st.just("finish"), st.integers(0, 30)),
    )
    return sched, cache, draw(st.lists(op, max_size=40))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_workloads_free_every_block_and_never_share_without_ref(scenario) -> None:
    sched_cfg, cache_cfg, ops = scenario
    s = Scheduler(sched_cfg, cache_cfg)
    slots: dict[int, tuple[int, int]] = {}
    bs = cache_cfg.block_size
    natural: dict[str, Request] = {}
    interrupted: set[str] = set()
    counter = 0

    def step() -> None:
        out = s.schedule()
        for r in s.update_from_output(out, run_model(slots, bs, out)):
            natural[r.request_id] = r
        check_invariants(s)

    for op in ops:
        live = sorted(s.requests)
        if op[0] == "add":
            _, prompt, max_tokens, n, priority = op
            params = SamplingParams(n=n, max_tokens=max_tokens, seed=1)
            parent = None
            for _ in range(n):
                counter += 1
                r = Request(f"r{counter}", prompt, params, priority=priority, eos_token_ids=EOS,
                            parent_request_id=parent)
                try:
                    s.add_request(r)
                except ValueError:
                    assert len(prompt) >= s.max_model_len
                    break
                parent = parent or r.request_id
        elif op[0] == "step":
            step()
        elif live:
            rid = live[op[1] % len(live)]
            if op[0] == "abort":
                s.abort(rid)
            else:
                s.finish_request(rid, "stop")
            interrupted.add(rid)
        check_invariants(s)

    for _ in range(2000):
        if not s.has_unfinished_requests():
            break
        step()
    assert not s.has_unfinished_requests(), "deadlock or livelock"
    assert all(b.ref_cnt == 0 for b in s.kv.pool.blocks)
    assert s.kv.num_free_blocks == cache_cfg.num_blocks and s.kv.usage == 0.0
    for rid, r in natural.items():
        assert rid not in interrupted
        assert r.output_token_ids == alone(list(r.prompt_token_ids), r.sampling_params.max_tokens, s.max_model_len)
