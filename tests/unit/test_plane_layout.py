"""cpu_fused's plane layout (2/3-bit layers with fp32 activations) against the reference dequantizer.

The plane GEMV sums table entries [0, a, b, a+b] of activation pairs weighted by
powers of two (exact), then applies the fp32 scale and the zero term like the
quad path: only the fp32 summation order differs from the float64 reference, so
the bound is the exact paths' 1e-5 (max |y - ref| / max |ref|; observed ~3e-7).
"""

from __future__ import annotations

import pytest
import torch
from random_layers import random_layer

from qalora_runtime.kernels import cpu_fused
from qalora_runtime.kernels.reference import dequantize
from qalora_runtime.quant.packing import pack_int32
from qalora_runtime.quant.spec import QuantSpec

pytestmark = pytest.mark.skipif(not cpu_fused.extension_available(), reason="cpu_fused extension not built")

CPU = torch.device("cpu")
K = 256


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module", params=[(b, g, n) for b in (2, 3) for g in (32, 64, 128) for n in (8, 20, 72)],
                ids=lambda p: f"{p[0]}b-g{p[1]}-n{p[2]}")
def plane_layer(request):
    bits, group, n = request.param
    spec = QuantSpec(bits, group)
    _, qweight, scales, zeros = random_layer(K, n, spec, seed=bits * 100 + group + n)
    weights = cpu_fused.CpuFusedKernel().prepare(qweight, scales, zeros, spec, torch.float32, CPU)
    return spec, n, weights, dequantize(qweight, scales, zeros, spec, torch.float64)


@pytest.mark.parametrize("isa", [isa for isa in cpu_fused.supported_isas() if isa != "scalar"])
@pytest.mark.parametrize("m", [1, 2, 3, 7])
@pytest.mark.parametrize("mode", ["f32", "gemm", "q8", "dense"])
def test_plane_paths_are_exact(plane_layer, mode: str, m: int, isa: str) -> None:
    spec, n, weights, w_ref = plane_layer
    assert cpu_fused.layout_of(weights) == cpu_fused.LAYOUT_PLANE
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m))
    # A q8 request on the plane layout runs the exact plane GEMV (the layout has no int8 path).
    modes = {"f32": cpu_fused.MODE_F32, "gemm": cpu_fused.MODE_GEMM, "q8": cpu_fused.MODE_Q8,
             "dense": cpu_fused.MODE_DENSE}
    y = cpu_fused.fused_linear(x, weights["qw"], weights["ss"], spec, n, mode=modes[mode], isa=isa,
                               layout=cpu_fused.LAYOUT_PLANE)
    assert y.shape == (m, n)
    assert _rel_err(y, x.double() @ w_ref) < 1e-5


def test_plane_scalar_fallback_and_kernel_forward(plane_layer) -> None:
    spec, n, weights, w_ref = plane_layer
    x = torch.randn(3, K)
    ref = x.double() @ w_ref
    y = cpu_fused.fused_linear(x, weights["qw"], weights["ss"], spec, n, isa="scalar",
                               layout=cpu_fused.LAYOUT_PLANE)
    assert _rel_err(y, ref) < 1e-5
    y2 = cpu_fused.CpuFusedKernel().forward(x.reshape(3, 1, K), weights, spec)  # leading dims
    assert y2.shape == (3, 1, n)
    assert _rel_err(y2.reshape(3, n), ref) < 1e-5


def test_plane_columns_are_the_dequantized_columns(plane_layer) -> None:
    spec, n, weights, w_ref = plane_layer
    ids = torch.tensor([0, n - 1, n // 2, 0])
    cols = cpu_fused.CpuFusedKernel().columns(ids, weights, spec, K, torch.float32)
    assert torch.allclose(cols.double(), w_ref[:, ids].t(), rtol=0, atol=1e-6)


PLANE, QUAD, DOT = cpu_fused.LAYOUT_PLANE, cpu_fused.LAYOUT_QUAD, cpu_fused.LAYOUT_DOT


@pytest.mark.parametrize(("bits", "dtype", "int8_forced", "layout"), [
    (2, torch.float32, False, PLANE), (3, torch.float32, False, PLANE),
    (4, torch.float32, False, QUAD), (8, torch.float32, False, QUAD),
    (3, torch.bfloat16, False, DOT), (4, torch.bfloat16, False, DOT), (3, torch.float32, True, DOT),
])
def test_layout_choice(bits, dtype, int8_forced, layout, monkeypatch) -> None:
    monkeypatch.setattr(cpu_fused, "_INT8_ACT_ALWAYS", int8_forced)
    spec = QuantSpec(bits, 32)
    _, qweight, scales, zeros = random_layer(64, 16, spec, seed=1)
    weights = cpu_fused.CpuFusedKernel().prepare(qweight, scales, zeros, spec, dtype, CPU)
    assert cpu_fused.layout_of(weights) == layout
    assert weights["qw"].numel() == 64 * 16 * bits // 8  # still bits/8 bytes per weight


def test_plane_bit_positions() -> None:
    """Bit r of column c's dword in plane j is bit j of the level of input r (qalora_layout.h)."""
    spec = QuantSpec(3, 32)
    levels = torch.zeros(32, 8, dtype=torch.int32)
    levels[5, 3] = 0b101
    levels[31, 7] = 0b011
    qw, ss = cpu_fused.repack_planes(pack_int32(levels, 3, dim=0), torch.ones(1, 8), torch.zeros(1, 8), spec)
    planes = qw.view(torch.int32).reshape(3, 16)  # one row (N padded to 16), one block: [plane, column]
    expect = torch.zeros(3, 16, dtype=torch.int64)
    expect[0, 3] = expect[2, 3] = 1 << 5
    expect[0, 7] = expect[1, 7] = 1 << 31
    assert torch.equal(planes.to(torch.int64) & 0xFFFFFFFF, expect)
    assert ss.shape == (1, 1, 2, 16)
    assert torch.equal(ss[0, 0, 0], torch.tensor([1.0] * 8 + [0.0] * 8))  # padding columns have s = 0


def test_extreme_levels_and_bad_calls() -> None:
    spec = QuantSpec(3, 32)
    levels = torch.full((K, 8), 7, dtype=torch.int32)
    levels[::2] = 0
    qw, ss = cpu_fused.repack_planes(pack_int32(levels, 3, dim=0), torch.full((K // 32, 8), 0.5),
                                     torch.full((K // 32, 8), 3.5), spec)
    x = torch.randn(2, K)
    ref = x.double() @ (0.5 * (levels.double() - 3.5))
    for mode in (cpu_fused.MODE_F32, cpu_fused.MODE_GEMM):
        y = cpu_fused.fused_linear(x, qw, ss, spec, 8, mode=mode, layout=cpu_fused.LAYOUT_PLANE)
        assert _rel_err(y, ref) < 1e-5
    with pytest.raises(RuntimeError, match="layout"):
        cpu_fused.fused_linear(x, qw, ss, QuantSpec(4, 32), 8, layout=cpu_fused.LAYOUT_PLANE)
    with pytest.raises(RuntimeError, match="layout"):
        cpu_fused.fused_linear(x, qw, ss, spec, 8, layout=7)
    # N = 12: one 16-column row of planes (N padded to 16) vs 3 quads, so the sizes tell the layouts apart.
    qw12, ss12 = cpu_fused.repack_planes(pack_int32(levels[:, :4].repeat(1, 3), 3, dim=0),
                                         torch.ones(K // 32, 12), torch.zeros(K // 32, 12), spec)
    with pytest.raises(RuntimeError, match="qw size"):
        cpu_fused.fused_linear(x, qw12, ss12, spec, 12)  # plane bytes read as the quad layout
    with pytest.raises(ValueError, match="2- and 3-bit"):
        cpu_fused.repack_planes(pack_int32(levels, 4, dim=0), torch.ones(K // 32, 8), torch.zeros(K // 32, 8),
                                QuantSpec(4, 32))
