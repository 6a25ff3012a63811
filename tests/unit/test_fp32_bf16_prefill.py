"""The opt-in bf16-product prefill of fp32 layers (``MODE_BF16_GEMM``).

With ``torch.set_float32_matmul_precision("medium")`` an fp32 model's large-M
calls round x and the dequantized weights to bf16 and sum in fp32, on whatever
layout the layer has (quad, plane or dot). The result is the float64 product of
the bf16-rounded x and weights up to:

* fp32 summation order (~1e-6 of max |y|);
* a weight whose fp32 value s*q - s*z lies within an fp32 ulp of a bf16 rounding
  boundary may round the other way than the float64 reference does: one bf16 ulp
  (2**-8) on that weight. Over K = 4608 random inputs this measured up to 1e-4.

So the bound is 1e-3 for the kernel (fp32 output). The ATen fallback (CPUs
without AVX512-BF16) returns ATen's bf16 product, rounded to bf16 (2**-9): 5e-3.
"""

from __future__ import annotations

import pytest
import torch
from random_layers import random_layer

from qalora_runtime.kernels.cpu_fused_build import load_extension
from qalora_runtime.kernels.reference import dequantize
from qalora_runtime.quant.spec import QuantSpec

if load_extension() is None:
    pytest.skip("qalora C++ CPU extension could not be built (see warning log)", allow_module_level=True)

from qalora_runtime.kernels import cpu_fused

CPU = torch.device("cpu")
HAS_KERNEL = cpu_fused.bf16_prefill_kernel() is not None


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.to(torch.float64) - ref).abs().max() / ref.abs().max())


def bf16_reference(x: torch.Tensor, qweight, scales, zeros, spec: QuantSpec) -> torch.Tensor:
    w = dequantize(qweight, scales, zeros, spec, torch.float64).to(torch.bfloat16).to(torch.float64)
    return x.to(torch.bfloat16).to(torch.float64) @ w


def _isas() -> list[str]:
    """avx2 runs the ATen fallback; avx512 (with AVX512-BF16) our kernel."""
    return ["avx2", "avx512"] if HAS_KERNEL else ["avx2"]


# The plane layout holds 2/3-bit layers only.
LAYOUT_BITS = [(layout, bits) for layout in ("quad", "dot") for bits in (2, 3, 4, 8)] + [
    ("plane", 2), ("plane", 3)]


@pytest.mark.parametrize("layout,bits", LAYOUT_BITS)
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("k,n,m", [(256, 70, 37), (256, 40, 9), (4608, 130, 5)])
def test_bf16_gemm_matches_the_bf16_rounded_reference(layout: str, bits: int, group: int, k: int, n: int,
                                                      m: int) -> None:
    """Every layout an fp32 layer can have; K across the 2048-input bf16 tile and the 512-input fp32 tile."""
    spec = QuantSpec(bits, group)
    _, qweight, scales, zeros = random_layer(k, n, spec, seed=bits * 7 + group)
    code, pack = {"quad": (cpu_fused.LAYOUT_QUAD, cpu_fused.repack),
                  "plane": (cpu_fused.LAYOUT_PLANE, cpu_fused.repack_planes),
                  "dot": (cpu_fused.LAYOUT_DOT, cpu_fused.repack_dot)}[layout]
    qw, ss = pack(qweight, scales, zeros, spec)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k))
    ref = bf16_reference(x, qweight, scales, zeros, spec)
    for isa in _isas():
        y = cpu_fused.fused_linear(x, qw, ss, spec, n, mode=cpu_fused.MODE_BF16_GEMM, isa=isa, layout=code)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        assert rel_err(y, ref) < (1e-3 if isa == "avx512" else 5e-3), (isa, layout)
    # bf16 x in this mode is the bf16 model's dense path: same bf16 weights, bf16 output.
    if code == cpu_fused.LAYOUT_DOT:
        yb = cpu_fused.fused_linear(x.to(torch.bfloat16), qw, ss, spec, n, mode=cpu_fused.MODE_BF16_GEMM,
                                    layout=code)
        assert yb.dtype == torch.bfloat16 and rel_err(yb, ref) < 5e-3


@pytest.fixture
def matmul_precision():
    """Sets torch's fp32 matmul precision for one test and restores it."""
    kept = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(kept)


def test_choose_mode_takes_bf16_products_only_when_torch_allows_them(matmul_precision) -> None:
    f32 = torch.float32
    for layout in (cpu_fused.LAYOUT_QUAD, cpu_fused.LAYOUT_PLANE):
        switch = cpu_fused.gemm_min_m(layout, f32)
        matmul_precision("highest")
        assert cpu_fused.choose_mode(switch, layout, f32) == cpu_fused.MODE_GEMM
        matmul_precision("medium")
        want = cpu_fused.MODE_BF16_GEMM if HAS_KERNEL else cpu_fused.MODE_GEMM
        assert cpu_fused.choose_mode(switch, layout, f32) == want
        assert cpu_fused.choose_mode(switch - 1, layout, f32) == cpu_fused.MODE_F32  # decode stays exact
        matmul_precision("high")
        assert cpu_fused.choose_mode(switch, layout, f32) == cpu_fused.MODE_GEMM
    # bf16 layers do not look at the fp32 switch.
    assert cpu_fused.large_m_mode(torch.bfloat16) == (cpu_fused.MODE_DENSE if HAS_KERNEL else cpu_fused.MODE_GEMM)


def test_the_new_torch_api_switches_it_too() -> None:
    """``torch.backends.mkldnn.matmul.fp32_precision = "bf16"`` (after which the legacy getter raises)."""
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if mkldnn_matmul is None or not hasattr(mkldnn_matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy API")
    kept = mkldnn_matmul.fp32_precision
    quad, f32 = cpu_fused.LAYOUT_QUAD, torch.float32
    try:
        mkldnn_matmul.fp32_precision = "bf16"
        assert cpu_fused.fp32_matmul_allows_bf16()
        want = cpu_fused.MODE_BF16_GEMM if HAS_KERNEL else cpu_fused.MODE_GEMM
        assert cpu_fused.choose_mode(64, quad, f32) == want
        mkldnn_matmul.fp32_precision = "ieee"
        assert cpu_fused.choose_mode(64, quad, f32) == cpu_fused.MODE_GEMM
    finally:
        mkldnn_matmul.fp32_precision = kept


@pytest.mark.slow
def test_real_smollm2_prefill_in_bf16_products(smollm2_dir, matmul_precision) -> None:
    """A real fp32 layer through the model's kernel object: medium precision takes the bf16 products."""
    if not HAS_KERNEL:
        pytest.skip("this CPU has no AVX512-BF16")
    from qalora_runtime.formats.checkpoint import MergedCheckpoint

    layer = MergedCheckpoint(smollm2_dir).quantized("model.layers.3.mlp.gate_proj")
    spec = layer.spec
    kernel = cpu_fused.CpuFusedKernel()
    weights = kernel.prepare(layer.qweight, layer.scales, layer.zeros, spec, torch.float32, CPU)
    x = torch.randn(64, layer.in_features, generator=torch.Generator().manual_seed(3))
    exact = x.to(torch.float64) @ dequantize(layer.qweight, layer.scales, layer.zeros, spec, torch.float64)
    ref = bf16_reference(x, layer.qweight, layer.scales, layer.zeros, spec)
    matmul_precision("highest")
    assert rel_err(kernel.forward(x, weights, spec), exact) < 1e-5
    matmul_precision("medium")
    y = kernel.forward(x, weights, spec)
    assert rel_err(y, ref) < 1e-3
    assert rel_err(y, exact) > 1e-5  # it really ran in bf16
