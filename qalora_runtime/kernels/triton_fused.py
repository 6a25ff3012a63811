"""NVIDIA GPU kernel in Triton for group-wise quantized linears with float zero-points.

``triton_fused`` computes ``y = x @ W`` with ``W[k, n] = s[g, n] * (q[k, n] - z[g, n])``,
``g = k // G``, for 2/3/4/8-bit levels, any group size that is a multiple of
32, and fp16/bf16/fp32 activations, without ever materializing ``W``: weight
tiles are dequantized in registers (kernel bodies in ``triton_kernels.py``).

* ``M <= GEMV_MAX_M`` (decode): a split-K GEMV kernel, fp32 FMAs, deterministic
  (partials summed on the host, no atomics).
* larger ``M`` (prefill): a tiled GEMM kernel on ``tl.dot`` with the dequantized
  tile rounded to the activation dtype, fp32 accumulation.

The tile sizes are chosen so that every launched variant compiles for sm_80,
sm_86, sm_89 and sm_90, fits each one's shared memory and spills no registers
in its loop, which ``triton_aot.py`` checks on any machine (no GPU needed) by
compiling them ahead of time. Their speed, the split-K target and ``GEMV_MAX_M``
are **still to be measured on a GPU** (``scripts/gpu_check.py`` prints the
numbers); no GPU was available when they were written. Correctness is tested on
CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``,
``tests/unit/test_triton_kernels.py``).

Importing this module raises ImportError when ``triton`` is not installed; the
registry ignores that, so nothing depends on Triton or CUDA being present.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton  # ImportError here = kernel not registered (the registry ignores it)

from ..quant.packing import pack_int32, unpack_int32
from ..quant.spec import QuantSpec
from . import triton_kernels
from .registry import LinearKernel, register_kernel

#: ``forward`` uses the GEMV kernel for ``M <= GEMV_MAX_M`` and the GEMM kernel
#: above. A guess (GEMM tiles need >= 16 rows for ``tl.dot``; below that they
#: waste most of the MMA) -- to be measured on a GPU with ``scripts/gpu_check.py``.
GEMV_MAX_M = 8

#: Dtypes the kernels accept for activations (and produce).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Split-K aims for about this many programs per SM so small-N decode layers
#: (e.g. 576 outputs = 9 column blocks) still fill the GPU. A guess, to be measured.
_PROGRAMS_PER_SM = 2
#: Largest GEMV row block (a power of two); bigger M runs several row blocks.
_GEMV_BLOCK_M_MAX = 8
#: Stand-in SM count when not on CUDA (interpreter): enough to exercise split-K.
_FALLBACK_SMS = 4


# --------------------------------------------------------------------------- launching


def interpreted() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when triton was imported).

    ``@triton.jit`` fixes the mode when it decorates, for our kernels and for
    ``triton.language``'s own jitted library alike, so the kernel object itself is
    the truth, not the current environment.
    """
    return type(triton_kernels.qlinear_gemm_kernel).__name__ == "InterpretedFunction"


def _block_k(k: int, preferred: int) -> int:
    """Largest of preferred, preferred/2, ... >= 32 that divides K (K % 32 == 0), so no k mask."""
    b = preferred
    while b > 32 and k % b:
        b //= 2
    return b


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _FALLBACK_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:  # cached: this runs on every decode call
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _check(x: torch.Tensor, weights: dict[str, torch.Tensor], spec: QuantSpec) -> tuple[int, int, int]:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"triton_fused: unsupported activation dtype {x.dtype}")
    m, k = x.shape
    groups, n = weights["scales"].shape
    if groups * spec.group_size != k:
        raise ValueError(f"x has K={k} but the layer has {groups} groups of {spec.group_size}")
    if (m + 64) * max(n, k) >= 2**31:  # + the padding rows of the last row tile
        raise ValueError(f"triton_fused: M={m} x {max(n, k)} is too large for the kernels' int32 offsets")
    return m, n, k


def _weight_ptrs(weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    qw = weights["qweight"]
    return qw, weights.get("qweight_hi", qw)  # the 1-bit plane exists for 3-bit only


# --------------------------------------------------------------------------- entry points


@dataclass(frozen=True)
class LaunchConfig:
    """The compile-time tile sizes and launch options of one kernel launch.

    ``gemv_config`` and ``gemm_config`` are the only places they are chosen, so the
    launches here and the ahead-of-time resource check (``triton_aot.py``) see the same
    variants.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 3


def gemv_config(m: int, k: int) -> LaunchConfig:
    """Tiles of the split-K GEMV for ``x[m, k]``."""
    block_m = min(triton.next_power_of_2(m), _GEMV_BLOCK_M_MAX)
    # Keeps the broadcast product [BLOCK_M, BLOCK_K, BLOCK_N] at 4-8k fp32 values per
    # program: 64-100 registers a thread, no spills (triton_aot.py). Speed unmeasured.
    return LaunchConfig(block_m, 64, _block_k(k, max(32, 128 // block_m)), num_warps=4)


def gemm_config(m: int, k: int, dtype: torch.dtype) -> LaunchConfig:
    """Tiles of the ``tl.dot`` GEMM for ``x[m, k]`` in ``dtype``.

    Chosen from the range Triton's matmul tutorial tunes over so that every variant
    fits the shared memory of sm_86/sm_89 (99 KB a block) and spills no registers on
    sm_80/86/89/90, as compiled by ``python -m qalora_runtime.kernels.triton_aot``;
    their speed is unmeasured (no GPU yet).
    """
    if dtype == torch.float32:
        # An exact fp32 tl.dot runs on FMAs and needs 186-254 registers a thread even
        # for these tiles; a 64x64 tile spills.
        if m <= 16:
            return LaunchConfig(16, 64, _block_k(k, 32), num_warps=4)
        return LaunchConfig(32, 64, _block_k(k, 32), num_warps=8)
    if m <= 16:
        return LaunchConfig(16, 64, _block_k(k, 64), num_warps=4)
    if m <= 32:
        return LaunchConfig(32, 64, _block_k(k, 64), num_warps=4)
    # 8 warps: with 4, a thread needs 168-255 registers here, at the 255 cap (sm_80
    # spills) when N is not a multiple of 16 and the JIT cannot assume alignment.
    return LaunchConfig(64, 128, _block_k(k, 64), num_warps=8)


def gemv(
    x: torch.Tensor,
    weights: dict[str, torch.Tensor],
    spec: QuantSpec,
    split_k: int | None = None,
) -> torch.Tensor:
    """``x[M, K] @ W`` with the split-K GEMV kernel (any ``M``; meant for small ones).

    ``split_k`` forces the number of K splits (tests use it); by default it is
    chosen so that ``column blocks * splits`` is about ``_PROGRAMS_PER_SM`` per SM.
    """
    m, n, k = _check(x, weights, spec)
    x = x.contiguous()
    cfg = gemv_config(m, k)
    n_blocks = triton.cdiv(n, cfg.block_n)
    k_blocks = k // cfg.block_k
    if split_k is None:
        split_k = triton.cdiv(_PROGRAMS_PER_SM * _sm_count(x.device), n_blocks)
    # The partials buffer [split_k, M, N] is indexed with int32 as well.
    split_k = max(1, min(split_k, k_blocks, (2**31 - 1) // ((m + cfg.block_m) * n)))
    k_per_split = triton.cdiv(k_blocks, split_k) * cfg.block_k
    split_k = triton.cdiv(k, k_per_split)  # no empty splits
    if split_k == 1:
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    else:
        out = torch.empty(split_k, m, n, device=x.device, dtype=torch.float32)
    qw, qh = _weight_ptrs(weights)
    grid = (n_blocks, split_k, triton.cdiv(m, cfg.block_m))
    triton_kernels.qlinear_gemv_kernel[grid](
        x, qw, qh, weights["scales"], weights["zeros"], out,
        m, n, k, k_per_split, x.stride(0),
        BITS=spec.bits, GROUP_SIZE=spec.group_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if split_k == 1:
        return out
    return out.sum(dim=0).to(x.dtype)


def gemm_constants(dtype: torch.dtype) -> dict[str, object]:
    """The GEMM's constexprs that depend on the activation dtype only."""
    return {
        "GROUP_M": 8,
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "DOT_IN_FP32": dtype == torch.bfloat16 and interpreted(),
    }


def gemm(x: torch.Tensor, weights: dict[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """``x[M, K] @ W`` with the tiled ``tl.dot`` GEMM kernel (any ``M``; meant for large ones)."""
    m, n, k = _check(x, weights, spec)
    x = x.contiguous()
    cfg = gemm_config(m, k, x.dtype)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    qw, qh = _weight_ptrs(weights)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    triton_kernels.qlinear_gemm_kernel[grid](
        x, qw, qh, weights["scales"], weights["zeros"], y,
        m, n, k, x.stride(0),
        BITS=spec.bits, GROUP_SIZE=spec.group_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        **gemm_constants(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def pack_1bit(bits: torch.Tensor) -> torch.Tensor:
    """Pack 0/1 values ``[K, N]`` along K into int32 words ``[K/32, N]`` (bit ``k % 32`` of word ``k // 32``)."""
    k, n = bits.shape
    if k % 32:
        raise ValueError(f"K={k} is not a multiple of 32")
    shifts = torch.arange(32, dtype=torch.int64).view(1, 32, 1)
    words = (bits.to(torch.int64).view(k // 32, 32, n) << shifts).sum(dim=1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def repack_weight(qweight: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """GPTQ ``qweight`` -> the kernels' layout (on the CPU): unchanged for 2/4/8 bits, planes for 3.

    3-bit becomes a GPTQ 2-bit plane of the low bits (``qweight``, ``[K/16, N]``)
    plus a 1-bit plane of the top bits (``qweight_hi``, ``[K/32, N]``): still 3
    bits per weight, but every level sits inside one word.
    """
    if bits != 3:
        return {"qweight": qweight.contiguous()}
    levels = unpack_int32(qweight.cpu(), 3, dim=0)
    return {"qweight": pack_int32(levels & 3, 2, dim=0), "qweight_hi": pack_1bit(levels >> 2)}


@register_kernel
class TritonFusedKernel(LinearKernel):
    """Fused dequantizing GEMV/GEMM on NVIDIA GPUs (Triton), 2/3/4/8 bits, float zeros.

    Memory: the weight stays packed at exactly ``bits/8`` bytes per weight (3-bit
    as two bit planes); scales and zeros are kept in **fp32** whatever the
    activation dtype, because the zero-point is real-valued and carries the
    merged QA-LoRA update: bf16 has an ulp of 1.0 at z = 128 (8-bit) and fp16
    0.125, either of which would erase or distort the adapter. The cost is
    ``8/G`` bytes per weight (0.25 B at G = 32, next to 0.5 B of 4-bit levels).

    Accuracy: the GEMV path dequantizes and accumulates in fp32 (only the final
    rounding to the activation dtype differs from the float64 reference); the
    GEMM path also rounds each dequantized weight to the activation dtype for
    ``tl.dot`` (fp32 activations use ``input_precision="ieee"``, exact).
    """

    name = "triton_fused"
    priority = 30

    @classmethod
    def supports(
        cls,
        spec: QuantSpec,
        in_features: int,
        out_features: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> bool:
        return (
            torch.device(device).type == "cuda"
            and dtype in SUPPORTED_DTYPES
            and spec.bits in (2, 3, 4, 8)
            and spec.group_size % 32 == 0
            and in_features % 32 == 0
            and in_features % spec.group_size == 0
            and out_features > 0
        )

    def prepare(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        spec: QuantSpec,
        dtype: torch.dtype,
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        if qweight.dtype != torch.int32 or qweight.dim() != 2:
            raise ValueError(f"qweight must be 2-D int32, got {qweight.dtype} {tuple(qweight.shape)}")
        k = qweight.shape[0] * 32 // spec.bits
        spec.check_in_features(k)
        if scales.shape != (k // spec.group_size, qweight.shape[1]) or zeros.shape != scales.shape:
            raise ValueError(
                f"scales/zeros must be [{k // spec.group_size}, {qweight.shape[1]}], got "
                f"{tuple(scales.shape)} and {tuple(zeros.shape)}"
            )
        out = {name: t.to(device).contiguous() for name, t in repack_weight(qweight, spec.bits).items()}
        out["scales"] = scales.to(device=device, dtype=torch.float32).contiguous()
        out["zeros"] = zeros.to(device=device, dtype=torch.float32).contiguous()
        return out

    def forward(
        self, x: torch.Tensor, weights: dict[str, torch.Tensor], spec: QuantSpec
    ) -> torch.Tensor:
        if x.shape[0] <= GEMV_MAX_M:
            return gemv(x, weights, spec)
        return gemm(x, weights, spec)
