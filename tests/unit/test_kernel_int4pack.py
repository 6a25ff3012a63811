"""cpu_int4pack (aten int4pack op, bf16 activations) against the reference dequantizer."""

from __future__ import annotations

import pytest
import torch

from qalora_runtime.kernels import registry
from qalora_runtime.kernels.reference import dequantize
from qalora_runtime.quant.packing import pack_int32
from qalora_runtime.quant.spec import QuantSpec

int4pack = pytest.importorskip("qalora_runtime.kernels.cpu_int4pack")
if not int4pack._has_ops():
    pytest.skip("this torch build lacks _weight_int4pack_mm_for_cpu", allow_module_level=True)

CPU = torch.device("cpu")


def random_layer(k: int, n: int, spec: QuantSpec, seed: int = 0):
    """A random float-zero layer: levels uniform, scales ~1e-2, zeros anywhere in [-1, max_q+1]."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, spec.max_q + 1, (k, n), generator=gen, dtype=torch.int32)
    groups = k // spec.group_size
    scales = torch.rand(groups, n, generator=gen) * 0.02 + 0.001
    zeros = torch.rand(groups, n, generator=gen) * (spec.max_q + 2) - 1.0
    return pack_int32(levels, spec.bits, dim=0), scales, zeros


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_matches_reference_bf16(group_size: int, m: int) -> None:
    spec = QuantSpec(4, group_size)
    k, n = 512, 96
    qweight, scales, zeros = random_layer(k, n, spec, seed=group_size + m)
    kernel = int4pack.CpuInt4PackKernel()
    weights = kernel.prepare(qweight, scales, zeros, spec, torch.bfloat16, CPU)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)

    y = kernel.forward(x, weights, spec)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)

    w_ref = dequantize(qweight, scales, zeros, spec, torch.float64)
    ref = x.to(torch.float64) @ w_ref
    # bf16 path: scale and s*(8-z) are rounded to bf16 (rel 2**-9 each; the zero
    # term can be ~max_q times larger than a single weight) and the output is
    # rounded to bf16, so we bound the error relative to the output's scale and
    # also require it to be no worse than a dense bf16 matmul of the exact weight
    # by more than a small factor.
    scale = ref.abs().max()
    err = (y.to(torch.float64) - ref).abs().max() / scale
    dense_err = ((x @ w_ref.to(torch.bfloat16)).to(torch.float64) - ref).abs().max() / scale
    assert err < 2e-2, f"rel err {err:.2e}"
    assert err < 4 * dense_err + 4e-3, f"rel err {err:.2e} vs dense bf16 {dense_err:.2e}"


def test_supports_matrix() -> None:
    cls = int4pack.CpuInt4PackKernel
    ok = QuantSpec(4, 64)
    assert cls.supports(ok, 576, 1536, CPU, torch.bfloat16)
    # fp32 activations are refused on purpose (the op's fp32 path is not vectorized).
    assert not cls.supports(ok, 576, 1536, CPU, torch.float32)
    assert not cls.supports(QuantSpec(3, 64), 576, 1536, CPU, torch.bfloat16)
    assert not cls.supports(QuantSpec(4, 48), 576, 1536, CPU, torch.bfloat16)
    assert not cls.supports(ok, 576, 1544, CPU, torch.bfloat16)  # N % 16 != 0
    assert not cls.supports(ok, 576, 1536, torch.device("meta"), torch.bfloat16)


def test_registered_and_selectable() -> None:
    assert "cpu_int4pack" in registry.available_kernels()
    kernel = registry.select_kernel(QuantSpec(4, 32), 576, 576, CPU, torch.bfloat16, force="cpu_int4pack")
    assert kernel.name == "cpu_int4pack"


def test_leading_dims_and_weight_stays_packed() -> None:
    spec = QuantSpec(4, 32)
    qweight, scales, zeros = random_layer(256, 64, spec, seed=3)
    kernel = int4pack.CpuInt4PackKernel()
    weights = kernel.prepare(qweight, scales, zeros, spec, torch.bfloat16, CPU)
    # Half a byte per weight plus the scale/zero table: never a dense copy.
    assert weights["w_int4pack"].numel() * weights["w_int4pack"].element_size() == 256 * 64 // 2
    x = torch.randn(2, 3, 256).to(torch.bfloat16)
    y = kernel.forward(x, weights, spec)
    assert y.shape == (2, 3, 64)
    flat = kernel.forward(x.reshape(6, 256), weights, spec)
    assert torch.equal(y.reshape(6, 64), flat)
