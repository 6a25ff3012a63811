"""Triton kernels (``triton_fused``) against the float64 reference, on CPU under the interpreter.

Without CUDA the kernels run on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``, set by ``tests/conftest.py`` before triton is
imported); with CUDA the same tests run the compiled kernels on the GPU.
Shapes are small because the interpreter executes every program in Python.

Tolerances, as ``max |y - ref| / max |ref|`` with ``ref`` in float64; ``u`` is
the unit roundoff of the activation dtype (fp16 2**-11, bf16 2**-8, fp32 0):

* GEMV: dequantizes and accumulates in fp32 and rounds ``y`` once, so
  ``|y - ref| <= u |ref| + fp32 error`` -> bound ``u + 1e-5`` (fp32: 1e-5,
  observed ~1e-7).
* GEMM: additionally rounds every dequantized weight to the activation dtype for
  ``tl.dot``. Against a reference built from the same rounded weight (emulated
  bit for bit: fp32 ``(q - z) * s``, then the cast) the bound is again
  ``u + 1e-5``. Against the true reference the weight rounding adds at most
  ``u * max_n sum_k |x_k W_kn|``, which is the (rigorous, loose) bound used there.

Interpreter caveats (triton 3.9), both about bf16:

* it computes ``tl.dot`` on bf16 *bit patterns* (triton-lang/triton#11584), so
  under it the GEMM kernel widens the same bf16 operands to fp32 for the dot
  (``DOT_IN_FP32``, exact products, same values);
* its fp32 -> bf16 cast truncates instead of rounding to nearest, so a bf16
  result is off by up to one ulp (``2u``) instead of half an ulp: the output
  bound becomes ``2u``, and the emulated GEMM weight is truncated the same way.

The real bf16 paths are checked on a GPU by ``scripts/gpu_check.py`` (and by
this file on a CUDA machine, with the round-to-nearest bounds).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from random_layers import random_layer

from qalora_runtime.kernels import registry
from qalora_runtime.kernels import triton_fused as tf
from qalora_runtime.kernels.reference import dequantize, reference_linear
from qalora_runtime.quant.packing import unpack_int32
from qalora_runtime.quant.spec import QuantSpec

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MS = (1, 3, 17)


# tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported when there is no
# CUDA device (the mode is fixed at import; see the comment there). If a user forced
# TRITON_INTERPRET=0 on such a machine, nothing here can run.
if not CUDA and not tf.interpreted():
    pytest.skip("no CUDA device and Triton's interpreter is off (TRITON_INTERPRET=0)", allow_module_level=True)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.cpu().to(torch.float64) - ref).abs().max() / ref.abs().max())


def bf16_truncates() -> bool:
    """Triton's interpreter casts fp32 -> bf16 by truncation; compiled kernels round to nearest."""
    return tf.interpreted()


def out_rounding(dtype: torch.dtype) -> float:
    """Largest relative error of the kernel's final fp32 -> ``dtype`` cast."""
    u = UNIT_ROUNDOFF[dtype]
    return 2 * u if dtype == torch.bfloat16 and bf16_truncates() else u


def kernel_weight(qweight, scales, zeros, spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    """The weight the GEMM kernel feeds to tl.dot: fp32 ``(q - z) * s`` cast to ``dtype`` as the kernel casts."""
    q = unpack_int32(qweight, spec.bits, dim=0).to(torch.float32)
    s = scales.to(torch.float32).repeat_interleave(spec.group_size, dim=0)
    z = zeros.to(torch.float32).repeat_interleave(spec.group_size, dim=0)
    w = (q - z) * s
    if dtype == torch.bfloat16 and bf16_truncates():
        w = (w.view(torch.int32) & -65536).view(torch.float32)  # now exactly representable in bf16
    return w.to(dtype)


def _cases():
    """bits x group x dtype, each on one of K in {64, 128, 256} x N in {32, 64, 96}, plus G=96."""
    cases = []
    for i, (bits, group, dtype) in enumerate((b, g, d) for b in BITS for g in GROUPS for d in DTYPES):
        ks = [k for k in (64, 128, 256) if k % group == 0]
        cases.append((bits, group, dtype, ks[i % len(ks)], (32, 64, 96)[i % 3]))
    # A group size that is a multiple of 32 but neither divides nor is divided by the k tile.
    cases += [(bits, 96, torch.float16, 192, 40) for bits in BITS]
    return cases


CASES = _cases()


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}b-g{c[1]}-{str(c[2])[6:]}-{c[3]}x{c[4]}")
def layer(request):
    bits, group, dtype, k, n = request.param
    spec = QuantSpec(bits, group)
    _, qweight, scales, zeros = random_layer(k, n, spec, seed=bits * 1000 + group + k + n)
    weights = tf.TritonFusedKernel().prepare(qweight, scales, zeros, spec, dtype, DEVICE)
    return spec, dtype, qweight, scales, zeros, weights


@pytest.mark.parametrize("m", MS)
def test_gemv_matches_reference(layer, m: int) -> None:
    spec, dtype, qweight, scales, zeros, weights = layer
    k = scales.shape[0] * spec.group_size
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    ref = reference_linear(x.double(), qweight, scales, zeros, spec)  # float64 in, float64 out
    y = tf.gemv(x.to(DEVICE), weights, spec)
    assert y.dtype == dtype and y.shape == ref.shape
    assert rel_err(y, ref) <= out_rounding(dtype) + 1e-5


@pytest.mark.parametrize("m", MS)
def test_gemm_matches_reference(layer, m: int) -> None:
    spec, dtype, qweight, scales, zeros, weights = layer
    k = scales.shape[0] * spec.group_size
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = tf.gemm(x.to(DEVICE), weights, spec)
    assert y.dtype == dtype and y.shape == (m, scales.shape[1])
    u = out_rounding(dtype)
    w_dot = kernel_weight(qweight, scales, zeros, spec, dtype).double()
    assert rel_err(y, x.double() @ w_dot) <= u + 1e-5
    w = dequantize(qweight, scales, zeros, spec, torch.float64)
    ref = x.double() @ w
    weight_rounding = float((x.double().abs() @ w.abs()).max() / ref.abs().max())
    assert rel_err(y, ref) <= u * (1 + weight_rounding) + 1e-5


@pytest.mark.parametrize("split_k", [1, 2, 3, 8])
def test_gemv_split_k(split_k: int) -> None:
    """Direct store (1 split), even and uneven splits, one k tile per split: same result."""
    spec = QuantSpec(3, 64)
    _, qweight, scales, zeros = random_layer(256, 48, spec, seed=7)
    weights = tf.TritonFusedKernel().prepare(qweight, scales, zeros, spec, torch.float32, DEVICE)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(5))
    ref = reference_linear(x.double(), qweight, scales, zeros, spec)
    assert rel_err(tf.gemv(x.to(DEVICE), weights, spec, split_k=split_k), ref) <= 1e-5


def test_forward_dispatches_on_m(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = QuantSpec(4, 32)
    _, qweight, scales, zeros = random_layer(128, 32, spec, seed=3)
    kernel = tf.TritonFusedKernel()
    weights = kernel.prepare(qweight, scales, zeros, spec, torch.float16, DEVICE)
    calls: list[tuple[str, int]] = []
    real_gemv, real_gemm = tf.gemv, tf.gemm
    monkeypatch.setattr(tf, "gemv", lambda x, w, s: calls.append(("gemv", x.shape[0])) or real_gemv(x, w, s))
    monkeypatch.setattr(tf, "gemm", lambda x, w, s: calls.append(("gemm", x.shape[0])) or real_gemm(x, w, s))
    for m in (1, tf.GEMV_MAX_M, tf.GEMV_MAX_M + 1):
        x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m)).half()
        y = kernel.forward(x.to(DEVICE), weights, spec)
        ref = reference_linear(x.double(), qweight, scales, zeros, spec)
        assert rel_err(y, ref) <= 4 * UNIT_ROUNDOFF[torch.float16]
    assert calls == [("gemv", 1), ("gemv", tf.GEMV_MAX_M), ("gemm", tf.GEMV_MAX_M + 1)]


@pytest.mark.parametrize("bits", BITS)
def test_prepare_keeps_weight_packed(bits: int) -> None:
    k, n, group = 256, 96, 64
    spec = QuantSpec(bits, group)
    levels, qweight, scales, zeros = random_layer(k, n, spec, seed=bits)
    weights = tf.TritonFusedKernel().prepare(qweight, scales, zeros.half(), spec, torch.bfloat16, torch.device("cpu"))
    packed = {name: t for name, t in weights.items() if name not in ("scales", "zeros")}
    assert all(t.dtype == torch.int32 for t in packed.values())
    assert sum(t.numel() * t.element_size() for t in packed.values()) == k * n * bits // 8
    # fp32 whatever the activation/checkpoint dtype: the float zero carries the merged adapter.
    for name in ("scales", "zeros"):
        assert weights[name].dtype == torch.float32 and weights[name].shape == (k // group, n)
    assert torch.equal(weights["zeros"], zeros.half().float())
    if bits == 3:  # two planes that reassemble the levels exactly
        assert set(packed) == {"qweight", "qweight_hi"}
        lo = unpack_int32(weights["qweight"], 2, dim=0)
        hi = torch.stack([(weights["qweight_hi"] >> j) & 1 for j in range(32)], dim=1).reshape(k, n)
        assert torch.equal(lo | (hi << 2), levels)
    else:  # GPTQ layout kept byte for byte
        assert set(packed) == {"qweight"} and torch.equal(weights["qweight"], qweight)


def test_prepare_rejects_bad_shapes() -> None:
    spec = QuantSpec(4, 32)
    _, qweight, scales, zeros = random_layer(64, 32, spec, seed=0)
    with pytest.raises(ValueError, match="scales/zeros"):
        tf.TritonFusedKernel().prepare(qweight, scales[:1], zeros[:1], spec, torch.float16, torch.device("cpu"))
    with pytest.raises(ValueError, match="int32"):
        tf.TritonFusedKernel().prepare(qweight.long(), scales, zeros, spec, torch.float16, torch.device("cpu"))


def test_supports() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for bits in BITS:
        for group in GROUPS:
            spec = QuantSpec(bits, group)
            for dtype in DTYPES:
                assert tf.TritonFusedKernel.supports(spec, 1024, 96, cuda, dtype)
                assert not tf.TritonFusedKernel.supports(spec, 1024, 96, cpu, dtype)
    assert not tf.TritonFusedKernel.supports(QuantSpec(4, 48), 960, 96, cuda, torch.float16)  # G % 32
    assert not tf.TritonFusedKernel.supports(QuantSpec(4, 16), 1024, 96, cuda, torch.float16)
    assert not tf.TritonFusedKernel.supports(QuantSpec(4, 64), 1000, 96, cuda, torch.float16)  # G does not divide K
    assert not tf.TritonFusedKernel.supports(QuantSpec(4, 32), 1024, 96, cuda, torch.float64)
    # Registered, and never chosen for a CPU layer.
    assert registry.available_kernels()["triton_fused"] is tf.TritonFusedKernel
    chosen = registry.select_kernel(QuantSpec(4, 32), 1024, 96, cpu, torch.float32)
    assert chosen.name != "triton_fused"


def test_runs_where_it_claims() -> None:
    """On CPU the kernels really are interpreted; on CUDA really compiled (and bf16 uses the real dot)."""
    assert tf.interpreted() is not CUDA


def test_registry_without_triton() -> None:
    """Where triton cannot be imported the module raises ImportError and the registry carries on without it."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from qalora_runtime.kernels import registry\n"
        "try:\n    import qalora_runtime.kernels.triton_fused\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('triton_fused imported without triton')\n"
        "ks = registry.available_kernels()\n"
        "assert 'triton_fused' not in ks and 'dequant_fallback' in ks, sorted(ks)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_real_smollm2_layer(smollm2_dir: Path) -> None:
    """One SmolLM2 down_proj (4-bit g32 from the Q4_1 GGUF), sliced to 64 output columns."""
    from qalora_runtime.formats.checkpoint import MergedCheckpoint

    layer = MergedCheckpoint(smollm2_dir).quantized("model.layers.0.mlp.down_proj")
    spec = layer.spec
    qweight, scales, zeros = (t[:, :64].contiguous() for t in (layer.qweight, layer.scales, layer.zeros))
    k = layer.in_features
    for dtype in (torch.bfloat16, torch.float32):
        weights = tf.TritonFusedKernel().prepare(qweight, scales, zeros, spec, dtype, DEVICE)
        u = out_rounding(dtype)
        for m, fn in ((1, tf.gemv), (17, tf.gemm)):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
            ref = reference_linear(x.double(), qweight, scales, zeros, spec)
            w = dequantize(qweight, scales, zeros, spec, torch.float64)
            slack = float((x.double().abs() @ w.abs()).max() / ref.abs().max()) if fn is tf.gemm else 0.0
            assert rel_err(fn(x.to(DEVICE), weights, spec), ref) <= u * (1 + slack) + 1e-5, (dtype, m)


def test_gpu_check_script_dry_run(tmp_path: Path) -> None:
    """``scripts/gpu_check.py`` (the one prepared GPU run) works end to end, as a CPU dry run.

    Its numbers mean nothing under the interpreter; this keeps the script from rotting
    between the sessions that get a GPU: correctness sweep, timing table (dense fp32 and
    bf16 in the same run), bandwidth, crossover and the JSON dump.
    """
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "gpu_check.json"
    run = subprocess.run(
        [sys.executable, str(root / "scripts" / "gpu_check.py"), "--cpu-interpret", "--bits", "3,4",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["failures"] == [] and result["checks"] and result["crossover"]
    assert result["read_gbs"] > 0
    row = result["timings"][0]
    assert row["dense_fp32_us"] > 0 and row["dense_bf16_us"] > 0 and row["vs_fp32"] > 0
    assert "vs dense fp32 | vs dense bf16" in run.stdout
