"""Fused decoder-layer ops (C++ extension) against float64 references and the PyTorch fallback.

Tolerances: fp32 paths compute in fp32 with a different summation order than the
float64 reference, so ~1e-6 relative; bf16 results are one rounding of an fp32
value, so they must be within one bf16 step (2**-8 relative) of the reference.
"""

from __future__ import annotations

import pytest
import torch

from qalora_runtime.kernels import layer_ops
from qalora_runtime.layers.rotary import RopeConfig, RotaryEmbedding
from qalora_runtime.worker.attention import build_metadata, paged_attention

pytestmark = pytest.mark.skipif(layer_ops._EXT is None, reason="C++ extension not built")

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 2e-6, torch.bfloat16: 2.0 ** -8}


@pytest.fixture
def torch_ops(monkeypatch):
    """Run layer_ops on its PyTorch fallback."""
    monkeypatch.setattr(layer_ops, "_EXT", None)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    err = ((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-3)).max().item()
    scale_err = (got.double() - want.double()).abs().max().item() / want.double().abs().max().item()
    assert min(err, scale_err * 4) <= TOL[dtype], (err, scale_err)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_rms_norm_with_and_without_residual(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=g).to(dtype)
    res = (3 * torch.randn(rows, 576, generator=g)).to(dtype)
    w = (1 + 0.1 * torch.randn(576, generator=g)).to(dtype)

    def ref(v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()

    _close(layer_ops.rms_norm(x, w, 1e-5), ref(x), dtype)
    summed = (res.float() + x.float()).to(dtype)  # torch's add: one rounding of the fp32 sum
    r2 = res.clone()
    out = layer_ops.rms_norm(x, w, 1e-5, r2)
    assert torch.equal(r2, summed)
    _close(out, ref(summed), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gu = (4 * torch.randn(3, 2 * 1539, generator=torch.Generator().manual_seed(0))).to(dtype)
    g, u = gu.double().chunk(2, dim=-1)
    want = g * torch.sigmoid(g) * u
    _close(layer_ops.silu_mul(gu), want, dtype)
    extreme = torch.tensor([[-100.0, -20.0, 0.0, 90.0, 1.0, 1.0, 1.0, 1.0]], dtype=dtype)
    out = layer_ops.silu_mul(extreme)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_matches_transformers_formula(dtype):
    head_dim, heads, extra = 64, 12, 3 * 64  # 12 rotated heads, then 3 untouched (v) heads
    rope = RotaryEmbedding(RopeConfig(head_dim=head_dim, theta=10000.0), dtype, initial_positions=64)
    rope.ensure_positions(5000)
    pos = torch.tensor([0, 1, 17, 4999, 300])
    x = torch.randn(5, heads * head_dim + extra, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = x.clone()
    rope.rotate_(got, heads, pos)
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = pos.double()[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :]
    v = x[:, : heads * head_dim].double().view(5, heads, head_dim)
    rot_half = torch.cat([-v[..., head_dim // 2:], v[..., : head_dim // 2]], -1)
    want = (v * cos + rot_half * sin).view(5, -1)
    # The table's angles are fp32 (as in transformers), so position 4999 carries ~1e-4 phase error.
    err = (got[:, : heads * head_dim].double() - want).abs().max().item()
    assert err < (3e-3 if dtype == torch.float32 else 3e-2)
    assert torch.equal(got[:, heads * head_dim:], x[:, heads * head_dim:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_fused_equals_fallback(dtype, monkeypatch):
    rope = RotaryEmbedding(RopeConfig(head_dim=64), dtype, initial_positions=512)
    pos = torch.arange(7) * 50
    x = torch.randn(7, 20 * 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    fused = x.clone()
    rope.rotate_(fused, 16, pos)
    monkeypatch.setattr(layer_ops, "_EXT", None)
    plain = x.clone()
    rope.rotate_(plain, 16, pos)
    tol = 1e-6 if dtype == torch.float32 else 2.0 ** -7  # fallback rounds twice in bf16
    assert (fused.double() - plain.double()).abs().max().item() <= tol * plain.abs().max().item()


def _paged(lengths: list[int], window: int | None, dtype: torch.dtype, heads: int = 9, kv_heads: int = 3,
           dim: int = 64):
    """A shuffled paged cache holding ``lengths`` sequences and one query per sequence."""
    g = torch.Generator().manual_seed(sum(lengths) + (window or 0))
    bs = 16
    need = [-(-n // bs) for n in lengths]
    perm = torch.randperm(sum(need) + 3, generator=g).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(perm[at:at + n])
        at += n
    cache = torch.randn(len(perm), bs, 2, kv_heads, dim, generator=g).to(dtype)
    q = torch.randn(len(lengths), heads, dim, generator=g).to(dtype)
    starts = [n - 1 for n in lengths]
    slots = torch.tensor([tables[i][s // bs] * bs + s % bs for i, s in enumerate(starts)])
    meta = build_metadata([1] * len(lengths), starts, tables, bs, window, "cpu", slots)
    return q, cache, tables, meta


def _reference_attention(q, cache, tables, lengths, window, scale):
    bs = cache.shape[1]
    out = []
    for b, n in enumerate(lengths):
        pos = torch.arange(max(0, n - window) if window else 0, n)
        kv = cache[torch.tensor(tables[b])[pos // bs], pos % bs].double()  # [L, 2, kvh, D]
        k = kv[:, 0].repeat_interleave(q.shape[1] // cache.shape[3], dim=1)  # [L, heads, D]
        v = kv[:, 1].repeat_interleave(q.shape[1] // cache.shape[3], dim=1)
        p = torch.softmax(torch.einsum("hd,lhd->hl", q[b].double(), k) * scale, -1)
        out.append(torch.einsum("hl,lhd->hd", p, v).reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", DTYPES)
# One long sequence on 2-3 threads is cut into token spans whose partial softmaxes
# are merged; a window moves the first span's start.
@pytest.mark.parametrize("lengths,window", [([1], None), ([37], None), ([300, 5, 64, 17, 1], None),
                                            ([300, 40], 32), ([10], 32), ([300], None), ([300], 100),
                                            ([250, 97], None)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decode_attention_matches_reference_and_fallback(dtype, lengths, window, threads, monkeypatch):
    q, cache, tables, meta = _paged(lengths, window, dtype)
    assert layer_ops.decode_attention_available(q, cache)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused = paged_attention(q, cache, meta, 0.125)
    finally:
        torch.set_num_threads(prev)
    want = _reference_attention(q, cache, tables, lengths, window, 0.125)
    _close(fused, want, dtype)
    monkeypatch.setattr(layer_ops, "_EXT", None)
    plain = paged_attention(q, cache, meta, 0.125)
    assert (fused.double() - plain.double()).abs().max().item() <= 2 * TOL[dtype] * want.abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
# 64 and 128 have AVX-512 span kernels (on CPUs with AVX-512); 80 always takes the AVX2 one.
@pytest.mark.parametrize("dim,heads,kv_heads", [(128, 8, 2), (80, 6, 6), (64, 4, 1)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lengths", [[300], [200, 3]])  # one sequence in spans; one span per sequence
def test_decode_attention_head_shapes(dtype, dim, heads, kv_heads, threads, lengths):
    q, cache, tables, meta = _paged(lengths, None, dtype, heads, kv_heads, dim)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused = paged_attention(q, cache, meta, dim ** -0.5)
    finally:
        torch.set_num_threads(prev)
    want = _reference_attention(q, cache, tables, lengths, None, dim ** -0.5)
    if dtype == torch.bfloat16:
        _close(fused, want, dtype)
    else:
        # fp32 sums over 300 keys with a ~2e-7 expf: up to ~5e-7 of max |out| measured; a
        # wrong span boundary or merge is off by ~1e-1.
        assert (fused.double() - want).abs().max().item() <= 2e-6 * want.abs().max().item()


def test_bad_inputs_raise_clear_errors():
    ext = layer_ops._EXT
    x = torch.randn(2, 64)
    cos = torch.zeros(10, 1, 64)
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        ext.rope_(x, 1, 64, cos, cos, torch.tensor([0, 10]))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ext.rms_norm(x.double(), None, torch.ones(64, dtype=torch.float64), 1e-5)
    with pytest.raises(RuntimeError, match="weight must be"):
        ext.rms_norm(x, None, torch.ones(63), 1e-5)
    cache = torch.zeros(4, 16, 2, 3, 64)
    q = torch.zeros(1, 9, 64)
    with pytest.raises(RuntimeError, match="outside its block table"):
        ext.decode_attention(q, cache, torch.zeros(1, 1, dtype=torch.long), torch.tensor([17]), 0, 1.0)
    with pytest.raises(RuntimeError, match="block id outside the cache"):
        ext.decode_attention(q, cache, torch.tensor([[7]]), torch.tensor([3]), 0, 1.0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_columns_from_the_packed_head_layout(bits, dtype):
    from qalora_runtime.kernels.cpu_fused import CpuFusedKernel
    from qalora_runtime.kernels.reference import dequantize
    from qalora_runtime.quant.quantize import quantize_rtn
    from qalora_runtime.quant.spec import QuantSpec

    spec = QuantSpec(bits, 32)
    table = torch.randn(50, 96, generator=torch.Generator().manual_seed(bits))  # [vocab, hidden]
    qweight, scales, zeros = quantize_rtn(table, spec, name="embed")
    kernel = CpuFusedKernel()
    weights = kernel.prepare(qweight, scales, zeros, spec, dtype, torch.device("cpu"))
    ids = torch.tensor([0, 49, 7, 7, 13])  # first, last (padded quad), repeated
    got = kernel.columns(ids, weights, spec, 96, dtype)
    want = dequantize(qweight, scales, zeros, spec, torch.float64).t()[ids]  # [T, hidden]
    _close(got, want, dtype)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        kernel.columns(torch.tensor([50]), weights, spec, 96, dtype)


def test_long_kernel_calls_release_the_gil():
    """While a linear runs (the engine thread), another Python thread (the server's event loop) runs too."""
    import threading
    import time

    from qalora_runtime.kernels.cpu_fused import CpuFusedKernel
    from qalora_runtime.quant.packing import pack_int32
    from qalora_runtime.quant.spec import QuantSpec

    spec, k = QuantSpec(4, 32), 2048
    gen = torch.Generator().manual_seed(0)
    qw = pack_int32(torch.randint(0, 16, (k, k), dtype=torch.int32, generator=gen), 4, dim=0)
    kernel = CpuFusedKernel()
    weights = kernel.prepare(qw, torch.rand(k // 32, k), torch.rand(k // 32, k), spec, torch.float32,
                             torch.device("cpu"))
    # 256 rows: long enough (> 5 ms) on the AVX-512 GEMM too, which does 96 rows in ~4 ms.
    x = torch.randn(256, k, generator=gen)
    ticks, done = [0], threading.Event()

    def other_thread() -> None:
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0.0005)

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        start = time.perf_counter()
        kernel.forward(x, weights, spec)
        elapsed = time.perf_counter() - start
        before = ticks[0]
    finally:
        done.set()
        thread.join()
    # Holding the GIL for the whole call would allow at most a tick or two.
    assert elapsed > 0.005 and before >= 3, (elapsed, before)
