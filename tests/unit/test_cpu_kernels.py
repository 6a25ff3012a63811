"""CPU kernels (cpu_fused C++ extension, cpu_int4pack) against the reference dequantizer.

Tolerances (max |y - ref| / max |ref|, ref computed in float64):

* exact fp32 paths (``f32`` GEMV, tiled ``gemm``, scalar fallback): 1e-5. They
  dequantize exactly (one fp32 rounding of s*q - s*z) and only the fp32
  summation order differs from the reference (observed ~1e-7).
Each layout has its GEMV: quad the exact ``f32`` one, dot (repack_dot) the ``q8``
one; an exact request on a dot layer runs the GEMM, a q8 request on a quad layer
its exact GEMV, so every exact check below holds on both layouts.

* ``q8`` path: activations are quantized to int8 per 32-block on purpose
  (llama.cpp's approach), which changes the result by ~0.5-1.5% of max|y| on
  random data (about 2x a dense bf16 matmul's error). We test it two ways: against
  a float64 reference fed the *same* int8-quantized activations (1e-5: the
  kernel's arithmetic is exact), and against the true reference (3e-2: the
  quantization error is bounded).
* bf16 activations/outputs add bf16 rounding of x and y (2**-9 relative each):
  the reference uses the bf16-rounded x and the bound is 1.5e-2 on top of the
  path's own error.
"""

from __future__ import annotations

import pytest
import torch
from random_layers import random_layer as shared_random_layer

from qalora_runtime.kernels import registry
from qalora_runtime.kernels.cpu_fused_build import load_extension
from qalora_runtime.kernels.reference import dequantize
from qalora_runtime.quant.packing import pack_int32
from qalora_runtime.quant.spec import QuantSpec

if load_extension() is None:
    pytest.skip("qalora C++ CPU extension could not be built (see warning log)", allow_module_level=True)

from qalora_runtime.kernels import cpu_fused

CPU = torch.device("cpu")
BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
MODES = {"q8": cpu_fused.MODE_Q8, "f32": cpu_fused.MODE_F32, "gemm": cpu_fused.MODE_GEMM,
         "dense": cpu_fused.MODE_DENSE}
# K spans more than one 512-wide GEMM k-tile with a remainder; N spans more than one
# 16-quad GEMM column tile and is not a multiple of 4 (padded quad).
K, N = 640, 70


def random_layer(k: int, n: int, spec: QuantSpec, seed: int):
    return shared_random_layer(k, n, spec, seed)[1:]  # (qweight, scales, zeros)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.to(torch.float64) - ref).abs().max() / ref.abs().max())


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """Python emulation of the kernel's per-32-block int8 activation quantization."""
    xb = x.to(torch.float32).reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv)
    return (q.to(torch.float64) * (amax / 127.0).to(torch.float64)).reshape(x.shape)


LAYOUTS = {"quad": cpu_fused.LAYOUT_QUAD, "dot": cpu_fused.LAYOUT_DOT}


@pytest.fixture(scope="module", params=[(b, g) for b in BITS for g in GROUPS], ids=lambda p: f"{p[0]}b-g{p[1]}")
def layer(request):
    """spec, {layout name: (layout, qw, ss)}, float64 reference weight."""
    bits, group = request.param
    spec = QuantSpec(bits, group)
    qweight, scales, zeros = random_layer(K, N, spec, seed=bits * 1000 + group)
    packed = {"quad": (cpu_fused.LAYOUT_QUAD, *cpu_fused.repack(qweight, scales, zeros, spec)),
              "dot": (cpu_fused.LAYOUT_DOT, *cpu_fused.repack_dot(qweight, scales, zeros, spec))}
    return spec, packed, dequantize(qweight, scales, zeros, spec, torch.float64)


#: Every SIMD level this CPU runs (AVX2, and AVX-512 where present): each path is checked on each.
SIMD_ISAS = [isa for isa in cpu_fused.supported_isas() if isa != "scalar"]


def linear(x: torch.Tensor, layer, layout: str, mode: str, isa: str | None = None) -> torch.Tensor:
    spec, packed, _ = layer
    code, qw, ss = packed[layout]
    return cpu_fused.fused_linear(x, qw, ss, spec, N, mode=MODES[mode], isa=isa, layout=code)


@pytest.mark.parametrize("isa", SIMD_ISAS)
@pytest.mark.parametrize("m", [1, 2, 7])
@pytest.mark.parametrize("mode", ["f32", "gemm", "dense"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_exact_paths_fp32(layer, layout: str, mode: str, m: int, isa: str) -> None:
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m))
    y = linear(x, layer, layout, mode, isa)
    assert y.dtype == torch.float32 and y.shape == (m, N)
    assert rel_err(y, x.to(torch.float64) @ layer[2]) < 1e-5


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scalar_fallback_exact(layer, layout: str, m: int) -> None:
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(10 + m))
    y = linear(x, layer, layout, "q8", isa="scalar")
    assert rel_err(y, x.to(torch.float64) @ layer[2]) < 1e-5


@pytest.mark.parametrize("isa", SIMD_ISAS)
@pytest.mark.parametrize("m", [1, 2, 5])
def test_q8_path(layer, m: int, isa: str) -> None:
    w = layer[2]
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(20 + m))
    y = linear(x, layer, "dot", "q8", isa)
    assert rel_err(y, int8_activations(x) @ w) < 1e-5  # arithmetic exact given int8 x
    assert rel_err(y, x.to(torch.float64) @ w) < 3e-2  # quantization error bounded


def test_q8_request_on_quad_layout_is_exact(layer) -> None:
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(25))
    assert rel_err(linear(x, layer, "quad", "q8"), x.to(torch.float64) @ layer[2]) < 1e-5


@pytest.mark.parametrize(("mode", "layout"), [("q8", "dot"), ("gemm", "dot"), ("gemm", "quad"), ("dense", "dot"),
                                              ("dense", "quad")])
def test_bf16_activations(layer, mode: str, layout: str) -> None:
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(30)).to(torch.bfloat16)
    y = linear(x, layer, layout, mode)
    assert y.dtype == torch.bfloat16 and y.shape == (4, N)
    # dense rounds the dequantized weight to bf16 (2**-9 relative per weight) before the GEMM.
    path_tol = {"q8": 3e-2, "dense": 4e-3}.get(mode, 1e-5)
    assert rel_err(y, x.to(torch.float64) @ layer[2]) < path_tol + 1.5e-2


def test_odd_group_size_and_leading_dims() -> None:
    spec = QuantSpec(3, 96)
    qweight, scales, zeros = random_layer(576, 40, spec, seed=7)
    kernel = cpu_fused.CpuFusedKernel()
    weights = kernel.prepare(qweight, scales, zeros, spec, torch.float32, CPU)
    x = torch.randn(2, 3, 576)
    y = kernel.forward(x, weights, spec)
    ref = x.reshape(6, 576).to(torch.float64) @ dequantize(qweight, scales, zeros, spec, torch.float64)
    assert y.shape == (2, 3, 40)
    assert rel_err(y.reshape(6, 40), ref) < 1e-5


def test_weights_stay_packed() -> None:
    spec = QuantSpec(4, 64)
    qweight, scales, zeros = random_layer(K, N, spec, seed=1)
    weights = cpu_fused.CpuFusedKernel().prepare(qweight, scales, zeros, spec, torch.float32, CPU)
    packed = sum(t.numel() * t.element_size() for t in weights.values())
    quads = (N + 3) // 4
    assert packed == quads * 4 * K // 2 + quads * 4 * (K // 64) * 8  # half a byte per weight + s, s*z


def test_registry_prefers_cpu_fused() -> None:
    assert "cpu_fused" in registry.available_kernels()
    for bits in BITS:
        for dtype in (torch.float32, torch.bfloat16):
            kernel = registry.select_kernel(QuantSpec(bits, 32), 576, 1536, CPU, dtype)
            assert kernel.name == "cpu_fused"
    assert not cpu_fused.CpuFusedKernel.supports(QuantSpec(4, 48), 576, 576, CPU, torch.float32)
    assert not cpu_fused.CpuFusedKernel.supports(QuantSpec(4, 32), 576, 576, CPU, torch.float16)


def test_choose_mode_thresholds() -> None:
    quad, plane, dot = cpu_fused.LAYOUT_QUAD, cpu_fused.LAYOUT_PLANE, cpu_fused.LAYOUT_DOT
    f32, bf16 = torch.float32, torch.bfloat16
    assert cpu_fused.choose_mode(1, quad, f32) == cpu_fused.MODE_F32
    assert cpu_fused.choose_mode(1, plane, f32) == cpu_fused.MODE_F32
    assert cpu_fused.choose_mode(1, dot, bf16) == cpu_fused.MODE_Q8
    assert cpu_fused.choose_mode(1, dot, f32) == cpu_fused.MODE_Q8  # QALORA_CPU_INT8_ACT's case
    for layout, dtype in ((quad, f32), (plane, f32), (dot, bf16), (dot, f32)):
        assert cpu_fused.choose_mode(256, layout, dtype) == cpu_fused.large_m_mode(dtype)
        # Each layout switches where its GEMV stops winning (qalora bench crossover).
        switch = cpu_fused.gemm_min_m(layout, dtype)
        assert cpu_fused.choose_mode(switch - 1, layout, dtype) in (cpu_fused.MODE_Q8, cpu_fused.MODE_F32)
        assert cpu_fused.choose_mode(switch, layout, dtype) == cpu_fused.large_m_mode(dtype)
    assert cpu_fused.large_m_mode(f32) == cpu_fused.MODE_GEMM
    kernel = cpu_fused.bf16_prefill_kernel()
    assert kernel in (None, "amx", "avx512_bf16")
    assert cpu_fused.large_m_mode(bf16) == (cpu_fused.MODE_GEMM if kernel is None else cpu_fused.MODE_DENSE)
    assert cpu_fused.gemm_min_m(dot, bf16) == (
        cpu_fused.GEMM_MIN_M[dot] if kernel is None else cpu_fused.DENSE_BF16_MIN_M_BY_KERNEL[kernel])


def test_isa_choice_is_validated() -> None:
    spec = QuantSpec(4, 32)
    qw, ss = cpu_fused.repack(*random_layer(64, 8, spec, seed=2), spec)
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="isa must be one of"):
        cpu_fused.fused_linear(x, qw, ss, spec, 8, isa="sse2")
    assert cpu_fused.supported_isas()[:2] == ["scalar", "avx2"] or cpu_fused.supported_isas() == ["scalar"]
    if "avx512" not in cpu_fused.supported_isas():
        with pytest.raises(RuntimeError, match="not supported by this CPU"):
            cpu_fused.fused_linear(x, qw, ss, spec, 8, isa="avx512")


def test_isa_env_cap_runs_the_lower_level_in_a_fresh_process() -> None:
    import os
    import subprocess
    import sys
    code = "from qalora_runtime.kernels.cpu_fused_build import load_extension as l; print(l().isa())"
    for name, level in (("avx2", 1), ("scalar", 0)):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "QALORA_CPU_ISA": name},
                             capture_output=True, text=True, timeout=300, check=True).stdout
        assert int(out.split()[-1]) == min(level, load_extension().isa_supported())
    bad = subprocess.run([sys.executable, "-c", code], env={**os.environ, "QALORA_CPU_ISA": "mmx"},
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "QALORA_CPU_ISA must be scalar, avx2, avx512 or amx" in bad.stderr


@pytest.mark.parametrize("bits", [4])
def test_int4pack_agrees_with_cpu_fused(bits: int) -> None:
    int4pack = pytest.importorskip("qalora_runtime.kernels.cpu_int4pack")
    spec = QuantSpec(bits, 32)
    qweight, scales, zeros = random_layer(K, 64, spec, seed=5)
    x = torch.randn(3, K).to(torch.bfloat16)
    a = int4pack.CpuInt4PackKernel()
    b = cpu_fused.CpuFusedKernel()
    ya = a.forward(x, a.prepare(qweight, scales, zeros, spec, torch.bfloat16, CPU), spec)
    yb = b.forward(x, b.prepare(qweight, scales, zeros, spec, torch.bfloat16, CPU), spec)
    ref = x.to(torch.float64) @ dequantize(qweight, scales, zeros, spec, torch.float64)
    assert rel_err(ya, ref) < 2e-2 and rel_err(yb, ref) < 4.5e-2


def test_3bit_quad_block_layout() -> None:
    """The 48-byte 3-bit quad-block (qalora_layout.h) byte for byte, from known levels."""
    spec = QuantSpec(3, 32)
    levels = torch.randint(0, 8, (32, 4), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    qw, _ = cpu_fused.repack(pack_int32(levels, 3, dim=0), torch.ones(1, 4), torch.zeros(1, 4), spec)
    q = levels.t()  # [column, i]
    a = q[0] | (q[1] << 3) | ((q[2] & 3) << 6)
    h = q[2] >> 2
    b = q[3][:16] | (h[:16] << 3) | (q[3][16:] << 4) | (h[16:] << 7)
    assert qw.tolist() == torch.cat([a, b]).tolist()


def _decode_dot_vectors(qb: list[int], bits: int) -> list[list[int]]:
    """The dot vectors V0..V3 of one quad-block, decoded from the format documented in qalora_layout.h."""
    if bits == 8:
        return [[(qb[32 * j + p] ^ 0x80) for p in range(32)] for j in range(4)]
    if bits == 4:
        return [[(qb[32 * (j // 2) + p] >> (4 * (j % 2))) & 0xF for p in range(32)] for j in range(4)]
    if bits == 2:
        return [[(qb[p] >> (2 * j)) & 3 for p in range(32)] for j in range(4)]
    hi = [(qb[32 + p % 16] >> (0 if p < 16 else 4)) & 0xF for p in range(32)]
    return [[qb[p] & 7 for p in range(32)], [(qb[p] >> 3) & 7 for p in range(32)],
            [(qb[p] >> 6) | ((hi[p] >> 3) << 2) for p in range(32)], [hi[p] & 7 for p in range(32)]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dot_layout_byte_order(bits: int) -> None:
    """Byte p of dot vector j holds column (p/4)%4 at input 8j + 4(p/16) + p%4 (qalora_layout.h)."""
    spec = QuantSpec(bits, 32)
    levels = torch.randint(0, 2 ** bits, (64, 4), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    qw, ss = cpu_fused.repack_dot(pack_int32(levels, bits, dim=0), torch.ones(2, 4), torch.zeros(2, 4), spec)
    assert qw.numel() == 64 * 4 * bits // 8 and ss.shape == (1, 2, 2, 4)
    rebuilt = torch.full_like(levels, -1)
    for block, qb in enumerate(qw.reshape(2, -1).tolist()):
        for j, vector in enumerate(_decode_dot_vectors(qb, bits)):
            for p, level in enumerate(vector):
                rebuilt[32 * block + 8 * j + 4 * (p // 16) + p % 4, (p // 4) % 4] = level
    assert torch.equal(rebuilt, levels)


def test_dot_layout_columns_and_choice() -> None:
    """bf16 layers get the dot layout; its columns (tied embeddings) decode through the scalar accessor."""
    spec = QuantSpec(3, 64)
    qweight, scales, zeros = random_layer(K, N, spec, seed=11)
    kernel = cpu_fused.CpuFusedKernel()
    weights = kernel.prepare(qweight, scales, zeros, spec, torch.bfloat16, CPU)
    assert cpu_fused.layout_of(weights) == cpu_fused.LAYOUT_DOT
    ids = torch.tensor([0, N - 1, 37, 0])
    cols = kernel.columns(ids, weights, spec, K, torch.float32)
    w = dequantize(qweight, scales, zeros, spec, torch.float64)
    assert torch.allclose(cols.double(), w[:, ids].t(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("mode", ["q8", "f32", "gemm"])
def test_extreme_levels_no_saturation(bits: int, mode: str) -> None:
    """All levels at max_q (or 0 for 8-bit's -128) and |x| at the int8 limit: no int16 overflow."""
    spec = QuantSpec(bits, 64)
    k, n = 256, 8
    fill = 0 if bits == 8 else spec.max_q
    levels = torch.full((k, n), fill, dtype=torch.int32)
    scales, zeros = torch.full((k // 64, n), 0.01), torch.full((k // 64, n), 0.5)
    pack, layout = (cpu_fused.repack_dot, cpu_fused.LAYOUT_DOT) if mode == "q8" else (cpu_fused.repack, 0)
    qw, ss = pack(pack_int32(levels, bits, dim=0), scales, zeros, spec)
    w = dequantize(pack_int32(levels, bits, dim=0), scales, zeros, spec, torch.float64)
    x = torch.where(torch.arange(k) % 3 == 0, -1.0, 1.0).repeat(3, 1).to(torch.float32)
    y = cpu_fused.fused_linear(x, qw, ss, spec, n, mode=MODES[mode], layout=layout)
    ref = (int8_activations(x) if mode == "q8" else x.to(torch.float64)) @ w
    assert rel_err(y, ref) < 1e-5


def test_build_dir_is_keyed_by_the_sources(tmp_path, monkeypatch) -> None:
    """Two checkouts with different kernel sources must not share (and rebuild over) one build dir."""
    import shutil

    from qalora_runtime.kernels import cpu_fused_build

    copy = tmp_path / "csrc"
    shutil.copytree(cpu_fused_build.CSRC, copy)
    monkeypatch.setattr(cpu_fused_build, "CSRC", copy)
    before = cpu_fused_build.build_dir()
    assert before == cpu_fused_build.build_dir()  # deterministic
    (copy / "qalora_layout.h").write_text((copy / "qalora_layout.h").read_text() + "\n// changed\n")
    assert cpu_fused_build.build_dir() != before


@pytest.mark.slow
@pytest.mark.parametrize("module", ["model.layers.0.mlp.down_proj", "model.layers.29.self_attn.q_proj",
                                    "model.embed_tokens"])
def test_real_smollm2_layers(smollm2_dir, module: str) -> None:
    """Real SmolLM2 layers (4-bit g32 from Q4_1; the 8-bit g32 tied embedding/head from Q8_0, first
    256 vocabulary columns) on both layouts and every path, against the float64 reference."""
    from qalora_runtime.formats.checkpoint import MergedCheckpoint

    layer = MergedCheckpoint(smollm2_dir).quantized(module)
    spec = layer.spec
    cols = min(256, layer.out_features)
    qweight, scales, zeros = (t[:, :cols].contiguous() for t in (layer.qweight, layer.scales, layer.zeros))
    w = dequantize(qweight, scales, zeros, spec, torch.float64)
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(4))
    ref = x.to(torch.float64) @ w
    for code, pack in ((cpu_fused.LAYOUT_QUAD, cpu_fused.repack), (cpu_fused.LAYOUT_DOT, cpu_fused.repack_dot)):
        qw, ss = pack(qweight, scales, zeros, spec)
        for mode in ("f32", "gemm"):
            y = cpu_fused.fused_linear(x, qw, ss, spec, cols, mode=MODES[mode], layout=code)
            assert rel_err(y, ref) < 1e-5, (spec.bits, code, mode)
    qw, ss = cpu_fused.repack_dot(qweight, scales, zeros, spec)
    y = cpu_fused.fused_linear(x, qw, ss, spec, cols, mode=MODES["q8"], layout=cpu_fused.LAYOUT_DOT)
    assert rel_err(y, int8_activations(x) @ w) < 1e-5
    assert rel_err(y, ref) < 3e-2


def test_set_gemm_min_m_moves_the_switch_choose_mode_reads() -> None:
    for layout, dtype in ((cpu_fused.LAYOUT_QUAD, torch.float32), (cpu_fused.LAYOUT_DOT, torch.bfloat16)):
        kept = cpu_fused.set_gemm_min_m(layout, dtype, 5)
        try:
            assert cpu_fused.gemm_min_m(layout, dtype) == 5
            assert cpu_fused.choose_mode(5, layout, dtype) == cpu_fused.large_m_mode(dtype)
            assert cpu_fused.choose_mode(4, layout, dtype) != cpu_fused.large_m_mode(dtype)
        finally:
            assert cpu_fused.set_gemm_min_m(layout, dtype, kept) == 5
        assert cpu_fused.gemm_min_m(layout, dtype) == kept
