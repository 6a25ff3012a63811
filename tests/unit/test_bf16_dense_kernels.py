"""bf16 large-M kernels of bf16 models (MODE_DENSE on the dot layout): AMX tiles and vdpbf16ps tiles.

Both round each dequantized weight once to bf16 (as a bf16 dense weight is) and
sum in fp32, so against the float64 product of bf16 x and bf16-rounded weights
only the fp32 summation order and the final bf16 rounding of y (2**-9) differ:
5e-3 of max |y|. The ATen fallback (dequantize to bf16, ATen GEMM) is held to
the same bound, and the two to 8e-3 of each other.
"""

from __future__ import annotations

import pytest
import torch
from random_layers import random_layer as shared_random_layer

from qalora_runtime.kernels.cpu_fused_build import load_extension
from qalora_runtime.kernels.reference import dequantize
from qalora_runtime.quant.spec import QuantSpec

if load_extension() is None:
    pytest.skip("qalora C++ CPU extension could not be built (see warning log)", allow_module_level=True)

from qalora_runtime.kernels import cpu_fused

BITS = (2, 3, 4, 8)
K = 640  # more than one 512-input tile of the fp32 GEMM, with a remainder


def random_layer(k: int, n: int, spec: QuantSpec, seed: int):
    return shared_random_layer(k, n, spec, seed)[1:]  # (qweight, scales, zeros)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.to(torch.float64) - ref).abs().max() / ref.abs().max())


def _bf16_dense_isas() -> list[str]:
    """ISA levels whose MODE_DENSE bf16 call runs a kernel of ours: avx512 (AVX512-BF16), amx."""
    ext = cpu_fused._ext
    if ext is None:
        return []
    best = ext.isa_supported()
    return (["avx512"] if best >= cpu_fused.ISAS["avx512"] and ext.has_avx512_bf16() else []) + (
        ["amx"] if best >= cpu_fused.ISAS["amx"] else [])


@pytest.mark.parametrize("isa", ["avx512", "amx"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", [1, 16, 17, 70])
# n: tiles whose live columns fill 1, 2, 3 and 4+1 of the kernel's 16-column vectors.
@pytest.mark.parametrize("n", [8, 24, 40, 70, 136])
def test_bf16_dense_kernels_match_the_aten_dense_path(isa: str, bits: int, m: int, n: int) -> None:
    """AMX tiles / vdpbf16ps tiles from the dot layout vs dequantize-to-bf16 + ATen: the same bf16 weights."""
    if isa not in _bf16_dense_isas():
        pytest.skip(f"this CPU has no {'AMX-BF16' if isa == 'amx' else 'AVX512-BF16'}")
    spec = QuantSpec(bits, 64)
    qweight, scales, zeros = random_layer(K, n, spec, seed=40 + bits)
    qw, ss = cpu_fused.repack_dot(qweight, scales, zeros, spec)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    dense = {"mode": cpu_fused.MODE_DENSE, "layout": cpu_fused.LAYOUT_DOT}
    ours = cpu_fused.fused_linear(x, qw, ss, spec, n, isa=isa, **dense)
    aten = cpu_fused.fused_linear(x, qw, ss, spec, n, isa="avx2", **dense)
    w_bf16 = dequantize(qweight, scales, zeros, spec, torch.float64).to(torch.bfloat16).to(torch.float64)
    ref = x.to(torch.float64) @ w_bf16  # the bf16-rounded weight, summed exactly
    assert ours.dtype == torch.bfloat16 and ours.shape == (m, n)
    # Only the fp32 summation order and the final bf16 rounding of y (2**-9) differ.
    assert rel_err(ours, ref) < 5e-3 and rel_err(aten, ref) < 5e-3
    assert rel_err(ours, aten.to(torch.float64)) < 8e-3


def test_bf16_dense_kernel_spans_k_tiles() -> None:
    """K beyond one vdpbf16ps tile (kBf16KC = 2048 inputs) and N not a multiple of the 64-column tile."""
    if "avx512" not in _bf16_dense_isas():
        pytest.skip("this CPU has no AVX512-BF16")
    spec, k, n = QuantSpec(4, 128), 4608, 200
    qweight, scales, zeros = random_layer(k, n, spec, seed=9)
    qw, ss = cpu_fused.repack_dot(qweight, scales, zeros, spec)
    x = torch.randn(13, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = cpu_fused.fused_linear(x, qw, ss, spec, n, mode=cpu_fused.MODE_DENSE, isa="avx512", layout=cpu_fused.LAYOUT_DOT)
    w_bf16 = dequantize(qweight, scales, zeros, spec, torch.float64).to(torch.bfloat16).to(torch.float64)
    assert rel_err(y, x.to(torch.float64) @ w_bf16) < 5e-3


@pytest.mark.slow
@pytest.mark.parametrize("module", ["model.layers.0.mlp.down_proj", "model.embed_tokens"])
def test_real_smollm2_layers_through_the_bf16_kernels(smollm2_dir, module: str) -> None:
    """Real SmolLM2 layers (4-bit g32; the 8-bit tied embedding/head, first 256 columns), every bf16 kernel here."""
    from qalora_runtime.formats.checkpoint import MergedCheckpoint

    layer = MergedCheckpoint(smollm2_dir).quantized(module)
    spec = layer.spec
    cols = min(256, layer.out_features)
    qweight, scales, zeros = (t[:, :cols].contiguous() for t in (layer.qweight, layer.scales, layer.zeros))
    w = dequantize(qweight, scales, zeros, spec, torch.float64)
    qw, ss = cpu_fused.repack_dot(qweight, scales, zeros, spec)
    xb = torch.randn(20, layer.in_features, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    ref_bf16 = xb.to(torch.float64) @ w.to(torch.bfloat16).to(torch.float64)
    for isa in ["avx2", *_bf16_dense_isas()]:
        y = cpu_fused.fused_linear(xb, qw, ss, spec, cols, mode=cpu_fused.MODE_DENSE, isa=isa,
                                   layout=cpu_fused.LAYOUT_DOT)
        assert rel_err(y, ref_bf16) < 5e-3, (spec.bits, isa)


def test_set_bf16_prefill_kernel_routes_large_m_to_the_tiled_gemm_and_back() -> None:
    dot, bf16 = cpu_fused.LAYOUT_DOT, torch.bfloat16
    with pytest.raises(ValueError, match="kernel must be None or one of"):
        cpu_fused.set_bf16_prefill_kernel("mkl")
    kept = cpu_fused.set_bf16_prefill_kernel(None)
    try:
        assert cpu_fused.large_m_mode(bf16) == cpu_fused.MODE_GEMM
        assert cpu_fused.gemm_min_m(dot, bf16) == cpu_fused.GEMM_MIN_M[dot]
        assert cpu_fused.choose_mode(cpu_fused.GEMM_MIN_M[dot], dot, bf16) == cpu_fused.MODE_GEMM
    finally:
        assert cpu_fused.set_bf16_prefill_kernel(kept) is None
    assert cpu_fused.bf16_prefill_kernel() == kept
    assert cpu_fused.large_m_mode(torch.float32) == cpu_fused.MODE_GEMM
