"""Scheduler with tiny specs: budgets, chunked prefill, prefix hits, preemption, abort, n>1.

A fake model checks the scheduler's bookkeeping end to end: it writes each token into
the KV slot the scheduler assigned, reads a request's context back through its block
table (seeing only KV written in *earlier* steps plus its own new tokens, as a real
attention layer does) and "predicts" a token that is a hash of that context. Any wrong
block table, slot, prefix hit or fork changes the output compared to running alone.
"""

from __future__ import annotations

import zlib

import pytest

from qalora_runtime.config import CacheConfig, SchedulerConfig
from qalora_runtime.core import Scheduler, SchedulerOutput, SchedulerQueueFullError
from qalora_runtime.request import FinishReason, Request, RequestStatus
from qalora_runtime.sampling_params import SamplingParams

VOCAB = 50


def next_token(context: list[int]) -> int:
    return zlib.crc32(bytes(str(context), "ascii")) % VOCAB


def reference(prompt: list[int], max_tokens: int, max_len: int, eos: tuple[int, ...] = ()) -> list[int]:
    """What a request generates alone (no min_tokens/ignore_eos)."""
    seq, out = list(prompt), []
    while True:
        t = next_token(seq)
        seq.append(t)
        out.append(t)
        if t in eos or len(out) >= max_tokens or len(seq) >= max_len:
            return out


class FakeModel:
    """A KV cache of (position, token) per slot; see the module docstring."""

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.slots: dict[int, tuple[int, int]] = {}

    def run(self, out: SchedulerOutput) -> dict[str, int]:
        before = dict(self.slots)
        sampled = {}
        for e in out.scheduled:
            assert len(e.slot_mapping) == len(e.token_ids) == e.end_position - e.start_position
            context = []
            for p in range(e.start_position):
                slot = e.block_table[p // self.bs] * self.bs + p % self.bs
                pos, tok = before[slot]
                assert pos == p, f"{e.request_id}: slot {slot} holds position {pos}, wanted {p}"
                context.append(tok)
            context.extend(e.token_ids)
            assert context == list(e.request.all_token_ids[: e.end_position])
            for p, slot, tok in zip(e.positions, e.slot_mapping, e.token_ids):
                assert slot == e.block_table[p // self.bs] * self.bs + p % self.bs
                self.slots[slot] = (p, tok)
            if e.sample:
                sampled[e.request_id] = next_token(context)
        return sampled


def make_scheduler(
    num_blocks: int = 8, block_size: int = 4, budget: int = 16, max_seqs: int = 8,
    max_len: int = 64, chunked: bool = True, caching: bool = True, **kw
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len,
                        enable_chunked_prefill=chunked, **kw),
        CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=caching),
    )


def req(rid: str, prompt: list[int] | int, max_tokens: int = 4, **kw) -> Request:
    if isinstance(prompt, int):
        prompt = [(7 * i + len(rid)) % VOCAB for i in range(prompt)]
    params = kw.pop("params", None) or SamplingParams(max_tokens=max_tokens, temperature=0)
    return Request(rid, prompt, params, **kw)


def run_to_end(s: Scheduler, model: FakeModel, max_steps: int = 500) -> dict[str, Request]:
    done = {}
    for _ in range(max_steps):
        if not s.has_unfinished_requests():
            return done
        out = s.schedule()
        for r in s.update_from_output(out, model.run(out)):
            done[r.request_id] = r
    raise AssertionError("scheduler did not finish: deadlock or livelock")


def test_first_steps_exact_blocks_slots_and_sampling() -> None:
    s = make_scheduler(budget=8)
    s.add_request(req("a", 10))
    s.add_request(req("b", 3))
    out = s.schedule()  # a's prompt is chunked to the budget; b waits
    (a,) = out.scheduled
    assert (a.request_id, a.start_position, a.end_position, list(a.block_table), a.sample, a.is_new) == (
        "a", 0, 8, [0, 1], False, True)
    assert list(a.slot_mapping) == list(range(8))
    s.update_from_output(out, {})
    out = s.schedule()
    a, b = out.scheduled
    assert (a.start_position, a.num_tokens, list(a.block_table), list(a.slot_mapping), a.sample) == (
        8, 2, [0, 1, 2], [8, 9], True)
    assert (b.start_position, b.num_tokens, list(b.block_table), list(b.slot_mapping), b.sample, b.is_new) == (
        0, 3, [3], [12, 13, 14], True, True)
    assert out.num_scheduled_tokens == 5
    s.update_from_output(out, {"a": 1, "b": 2})
    out = s.schedule()
    a, b = out.scheduled
    assert (list(a.token_ids), a.start_position, list(a.slot_mapping), a.is_decode) == ([1], 10, [10], True)
    assert (list(b.token_ids), b.start_position, list(b.slot_mapping), b.is_new) == ([2], 3, [15], False)


def test_chunked_prefill_shares_budget_with_running_decodes() -> None:
    s, model = make_scheduler(num_blocks=16, budget=6, max_seqs=4), FakeModel(4)
    s.add_request(req("dec", 3, max_tokens=20))
    out = s.schedule()
    s.update_from_output(out, model.run(out))
    s.add_request(req("long", 20))
    chunks = []
    for _ in range(4):
        out = s.schedule()
        assert [e.request_id for e in out.scheduled] == ["dec", "long"]
        assert out.scheduled[0].num_tokens == 1  # the decode runs every step
        chunks.append(out.scheduled[1].num_tokens)
        assert out.num_scheduled_tokens <= 6
        s.update_from_output(out, model.run(out))
    assert chunks == [5, 5, 5, 5] and s.get_request("long").num_output_tokens == 1
    done = run_to_end(s, model)
    assert done["long"].output_token_ids == reference(done["long"].prompt_token_ids, 4, 64)


def test_without_chunked_prefill_a_prompt_runs_whole_or_waits() -> None:
    s, model = make_scheduler(num_blocks=16, budget=16, max_len=16, chunked=False), FakeModel(4)
    s.add_request(req("dec", 3, max_tokens=10))
    s.add_request(req("long", 15))
    out = s.schedule()
    assert [e.request_id for e in out.scheduled] == ["dec"]  # 3 + 15 > 16: long waits whole
    s.update_from_output(out, model.run(out))
    s.finish_request("dec", FinishReason.STOP)
    out = s.schedule()
    assert [(e.request_id, e.num_tokens) for e in out.scheduled] == [("long", 15)]


def test_chunked_prefill_disabled_requires_budget_for_max_model_len() -> None:
    with pytest.raises(ValueError, match="chunked prefill"):
        SchedulerConfig(max_model_len=4096, max_num_batched_tokens=2048, enable_chunked_prefill=False)


def test_max_num_seqs_caps_the_batch() -> None:
    s = make_scheduler(max_seqs=2)
    for i in range(3):
        s.add_request(req(f"r{i}", 2))
    out = s.schedule()
    assert [e.request_id for e in out.scheduled] == ["r0", "r1"] and s.num_waiting == 1


def test_prefix_hit_skips_cached_tokens() -> None:
    s, model = make_scheduler(), FakeModel(4)
    prompt = list(range(11))
    s.add_request(req("a", prompt))
    run_to_end(s, model)
    s.add_request(req("b", prompt))
    out = s.schedule()
    (b,) = out.scheduled
    assert (b.start_position, list(b.token_ids), list(b.block_table[:2])) == (8, [8, 9, 10], [0, 1])
    stats = s.make_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (22, 8)
    assert stats.prefix_cache_hit_rate == pytest.approx(8 / 22)
    s.update_from_output(out, model.run(out))
    assert run_to_end(s, model)["b"].output_token_ids == reference(prompt, 4, 64)


def test_preemption_of_latest_arrival_and_resume_by_recompute() -> None:
    # 6 blocks of 4 = 24 slots; two requests that each grow to 19 tokens cannot coexist.
    s, model = make_scheduler(num_blocks=6, budget=32, caching=False), FakeModel(4)
    s.add_request(req("old", 7, max_tokens=12))
    s.add_request(req("new", 7, max_tokens=12))
    preempted_at = None
    for step in range(40):
        out = s.schedule()
        if out.preempted_request_ids:
            assert out.preempted_request_ids == ["new"]  # never the older one
            assert [e.request_id for e in out.scheduled] == ["old"]
            assert s.get_request("new").status is RequestStatus.PREEMPTED
            assert s.get_request("new").num_computed_tokens == 0
            preempted_at = step
            break
        s.update_from_output(out, model.run(out))
    assert preempted_at is not None
    new = s.get_request("new")
    generated = list(new.output_token_ids)
    s.update_from_output(out, model.run(out))
    resumed = None
    for _ in range(40):
        out = s.schedule()
        entry = out.get("new")
        if entry is not None:
            resumed = entry
            break
        s.update_from_output(out, model.run(out))
    # It is scheduled again and recomputes prompt + earlier output from position 0.
    assert resumed is not None and resumed.is_new and resumed.start_position == 0
    assert list(resumed.token_ids)[: 7 + len(generated)] == list(new.prompt_token_ids) + generated
    s.update_from_output(out, model.run(out))
    done = run_to_end(s, model)
    for r in done.values():
        assert r.output_token_ids == reference(list(r.prompt_token_ids), 12, 64)
    assert s.make_stats().num_preemptions >= 1 and s.kv.num_free_blocks == 6


def test_resume_hits_prefix_cache_of_own_blocks() -> None:
    s, model = make_scheduler(num_blocks=6, budget=32), FakeModel(4)
    s.add_request(req("old", 7, max_tokens=12))
    s.add_request(req("new", 9, max_tokens=12))
    done = run_to_end(s, model)
    assert s.num_preemptions >= 1 and s.kv.prefix_cache_hits > 0
    for r in done.values():
        assert r.output_token_ids == reference(list(r.prompt_token_ids), 12, 64)


def test_abort_frees_everything_at_once() -> None:
    s, model = make_scheduler(), FakeModel(4)
    s.add_request(req("a", 9))
    s.add_request(req("w", 3))
    out = s.schedule()
    s.update_from_output(out, model.run(out))
    assert s.kv.get_block_table("a") == [0, 1, 2]
    assert s.abort("a").status is RequestStatus.FINISHED_ABORTED
    assert s.kv.num_free_blocks == 8 - 1 and s.num_running == 1
    assert s.abort("a") is None and s.abort("missing") is None
    s.add_request(req("q", 3))
    assert s.abort_request("q").finish_reason is FinishReason.ABORT  # aborting a waiting one
    assert s.schedule().finished_request_ids == ["a", "q"]
    assert s.schedule().finished_request_ids == []


def test_finish_request_for_stop_strings() -> None:
    s, model = make_scheduler(), FakeModel(4)
    s.add_request(req("a", 5))
    out = s.schedule()
    s.update_from_output(out, model.run(out))
    r = s.finish_request("a", "stop", stop_reason="###")
    assert (r.status, r.finish_reason, r.stop_reason) == (RequestStatus.FINISHED_STOPPED, "stop", "###")
    assert not s.has_unfinished_requests() and s.kv.num_free_blocks == 8


@pytest.mark.parametrize(
    ("params", "eos", "tokens", "n_out", "status", "stop_reason"),
    [
        (SamplingParams(max_tokens=3), (9,), [1, 2, 3, 4], 3, RequestStatus.FINISHED_LENGTH, None),
        (SamplingParams(max_tokens=9), (9,), [1, 9, 3], 2, RequestStatus.FINISHED_STOPPED, None),
        (SamplingParams(max_tokens=9, min_tokens=3), (9,), [9, 9, 9, 4], 3, RequestStatus.FINISHED_STOPPED, None),
        (SamplingParams(max_tokens=4, ignore_eos=True), (9,), [9, 9, 9, 9], 4, RequestStatus.FINISHED_LENGTH, None),
        (SamplingParams(max_tokens=9, stop_token_ids=[5]), (), [1, 5, 2], 2, RequestStatus.FINISHED_STOPPED, 5),
        (SamplingParams(max_tokens=9, stop_token_ids=[5], ignore_eos=True), (), [5], 1,
         RequestStatus.FINISHED_STOPPED, 5),
        (SamplingParams(max_tokens=None), (), [1] * 20, 6, RequestStatus.FINISHED_LENGTH, None),  # max_len 10
    ],
)
def test_token_stop_conditions(params, eos, tokens, n_out, status, stop_reason) -> None:
    s = make_scheduler(max_len=10)
    s.add_request(Request("a", [1, 2, 3, 4], params, eos_token_ids=eos))
    finished = []
    for t in tokens:
        out = s.schedule()
        finished = s.update_from_output(out, {"a": t})
        if finished:
            break
    (r,) = finished
    assert (r.num_output_tokens, r.status, r.stop_reason) == (n_out, status, stop_reason)


def test_rejections_never_loop() -> None:
    s = make_scheduler(num_blocks=2, block_size=4, max_len=64, max_queued_requests=1)
    assert s.max_model_len == 8  # capped by the cache
    with pytest.raises(ValueError, match="at most 7 fit"):
        s.add_request(req("big", 8))
    s.add_request(req("a", 7, max_tokens=50))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(req("a", 2))
    with pytest.raises(SchedulerQueueFullError):
        s.add_request(req("b", 2))
    done = run_to_end(s, FakeModel(4))
    assert done["a"].finish_reason == "length" and done["a"].num_tokens == 8


def test_missing_sampled_token_is_reported() -> None:
    s = make_scheduler()
    s.add_request(req("a", 3))
    with pytest.raises(ValueError, match="no sampled token"):
        s.update_from_output(s.schedule(), {})


def test_n_samples_share_the_parent_prompt_blocks() -> None:
    s, model = make_scheduler(num_blocks=16, budget=8), FakeModel(4)
    prompt = list(range(10))
    params = SamplingParams(n=3, max_tokens=3)
    s.add_request(Request("p", prompt, params))
    s.add_request(Request("c1", prompt, params, parent_request_id="p"))
    s.add_request(Request("c2", prompt, params, parent_request_id="p"))
    s.add_request(req("other", 2))
    out = s.schedule()  # children wait for the parent's prompt; others may pass
    assert [e.request_id for e in out.scheduled] == ["p"]
    s.update_from_output(out, model.run(out))
    out = s.schedule()
    assert [e.request_id for e in out.scheduled] == ["p", "other"]
    s.update_from_output(out, model.run(out))
    out = s.schedule()
    by_id = {e.request_id: e for e in out.scheduled}
    assert by_id["c1"].start_position == by_id["c2"].start_position == 8
    assert list(by_id["c1"].block_table[:2]) == list(by_id["c2"].block_table[:2]) == [0, 1]
    assert s.kv.pool.blocks[0].ref_cnt == 3
    s.update_from_output(out, model.run(out))
    done = run_to_end(s, model)
    assert done["c1"].output_token_ids == done["p"].output_token_ids == reference(prompt, 3, 64)
    assert s.kv.num_free_blocks == 16


def test_child_with_different_prompt_is_rejected() -> None:
    s = make_scheduler()
    s.add_request(req("p", [1, 2, 3]))
    with pytest.raises(ValueError, match="prompt differs"):
        s.add_request(req("c", [1, 2], parent_request_id="p"))


def test_priority_policy_orders_waiting_and_picks_victims() -> None:
    s = make_scheduler(max_seqs=1, policy="priority")
    s.add_request(req("low", 2, priority=5))
    s.add_request(req("high", 2, priority=-1))
    s.add_request(req("mid", 2, priority=0))
    assert [e.request_id for e in s.schedule().scheduled] == ["high"]
    assert [r.request_id for r in s.waiting] == ["mid", "low"]
