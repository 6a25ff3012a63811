"""Triton kernel bodies for group-wise quantized linears (``W = s * (q - z)``, float zeros).

Two kernels, both computing ``y[M, N] = x[M, K] @ W`` with fp32 accumulation:

* :func:`qlinear_gemv_kernel` -- decode-sized ``M``: every program owns a
  ``BLOCK_N`` column block, a ``BLOCK_M`` row block and one split of ``K``; it
  dequantizes each ``[BLOCK_K, BLOCK_N]`` weight tile to fp32 in registers and
  does a broadcast multiply + reduction (no ``tl.dot``, which wants >= 16 rows).
  Split-K partial sums go to an fp32 ``[SPLIT_K, M, N]`` buffer that the host
  sums; that keeps the result deterministic (no atomics).
* :func:`qlinear_gemm_kernel` -- prefill-sized ``M``: classic tiled GEMM with a
  grouped program order for L2 reuse; the dequantized tile is rounded to the
  activation dtype and fed to ``tl.dot`` (fp32 accumulator).

Weight layout read by both (prepared by ``triton_fused.prepare``): for 2/4/8
bits the GPTQ ``qweight[K*bits/32, N]`` unchanged (word ``k // (32/bits)``,
bits ``[bits*(k % (32/bits)), +bits)``); for 3 bits two planes, a GPTQ-style
2-bit plane ``[K/16, N]`` with the low two bits of every level and a 1-bit plane
``[K/32, N]`` with the top bit, so no level straddles a word (GPTQ's 3-bit
stream does) and both planes unpack with one aligned shift-and-mask. Scales and
zeros are fp32 ``[K/G, N]``. All tensors are contiguous with row stride ``N``.

Interpreter: ``@triton.jit`` (here and in ``triton.language``'s own library,
e.g. ``tl.sum``) chooses compiled vs interpreted when it decorates, i.e. when
``triton`` is imported, so ``TRITON_INTERPRET=1`` must be set before that
(``tests/conftest.py`` does it on machines without CUDA).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _unpack_rows(words, LEVEL_BITS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[ROWS / (32 / LEVEL_BITS), BLOCK_N]`` int32 words -> ``[ROWS, BLOCK_N]`` levels.

    Level ``p`` of word ``r`` is row ``r * (32 / LEVEL_BITS) + p``: the shifts make a
    ``[words, per word, BLOCK_N]`` tensor whose row-major order is exactly k. Each word
    is loaded once and unpacked in registers (a ``[ROWS, BLOCK_N]`` gather of the words
    loads every word 32/LEVEL_BITS times and, in the GEMM's pipeline, keeps that many
    copies in shared memory).
    """
    PER_WORD: tl.constexpr = 32 // LEVEL_BITS
    shifts = tl.arange(0, PER_WORD) * LEVEL_BITS
    # Arithmetic shifts of negative words only smear the sign above the mask.
    levels = (words[:, None, :] >> shifts[None, :, None]) & ((1 << LEVEL_BITS) - 1)
    return tl.reshape(levels, (ROWS, BLOCK_N))


@triton.jit
def _load_rows(ptr, row0, ROWS: tl.constexpr, offs_n, n_mask, N):
    """``ptr[row0:row0+ROWS, offs_n]`` of a row-major ``[*, N]`` tensor (masked columns are 0)."""
    rows = row0 + tl.arange(0, ROWS)
    return tl.load(ptr + rows[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)


@triton.jit
def _group_rows(ptr, k0, offs_k, offs_n, n_mask, N, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The scale (or zero) of every weight of the ``[BLOCK_K, BLOCK_N]`` tile, broadcastable to it."""
    if GROUP_SIZE % BLOCK_K == 0:
        # The whole tile lies in one group: one row, broadcast over k.
        return tl.load(ptr + (k0 // GROUP_SIZE) * N + offs_n, mask=n_mask, other=0.0)[None, :]
    elif BLOCK_K % GROUP_SIZE == 0:
        # A few whole groups: load their rows once, repeat each GROUP_SIZE times along k.
        rows = _load_rows(ptr, k0 // GROUP_SIZE, BLOCK_K // GROUP_SIZE, offs_n, n_mask, N)
        per_k = tl.broadcast_to(rows[:, None, :], (BLOCK_K // GROUP_SIZE, GROUP_SIZE, rows.shape[1]))
        return tl.reshape(per_k, (BLOCK_K, rows.shape[1]))
    else:  # a group size that is not a power of two: one gathered row per k
        return tl.load(ptr + (offs_k // GROUP_SIZE)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0.0)


@triton.jit
def _dequant_tile(qw_ptr, qh_ptr, s_ptr, z_ptr, k0, offs_k, offs_n, n_mask, N,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``W[k0:k0+BLOCK_K, offs_n]`` (levels, scales, zeros loaded here; masked columns are 0)."""
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    if BITS == 3:
        lo = _load_rows(qw_ptr, k0 // 16, BLOCK_K // 16, offs_n, n_mask, N)
        hi = _load_rows(qh_ptr, k0 // 32, BLOCK_K // 32, offs_n, n_mask, N)
        q = _unpack_rows(lo, 2, BLOCK_K, BLOCK_N) | (_unpack_rows(hi, 1, BLOCK_K, BLOCK_N) << 2)
    else:
        words = _load_rows(qw_ptr, k0 // (32 // BITS), BLOCK_K // (32 // BITS), offs_n, n_mask, N)
        q = _unpack_rows(words, BITS, BLOCK_K, BLOCK_N)
    s = _group_rows(s_ptr, k0, offs_k, offs_n, n_mask, N, GROUP_SIZE, BLOCK_K)
    z = _group_rows(z_ptr, k0, offs_k, offs_n, n_mask, N, GROUP_SIZE, BLOCK_K)
    return (q.to(tl.float32) - z) * s


@triton.jit
def qlinear_gemv_kernel(
    x_ptr,  # [M, K] activations (fp16/bf16/fp32), row stride stride_xm, unit column stride
    qw_ptr,  # int32 packed levels (see module docstring)
    qh_ptr,  # int32 1-bit plane (3-bit only; any valid pointer otherwise)
    s_ptr,  # fp32 [K/G, N] scales
    z_ptr,  # fp32 [K/G, N] zeros
    out_ptr,  # [SPLIT_K, M, N] fp32 partials, or [M, N] in the output dtype when SPLIT_K == 1
    M,
    N,
    K,
    K_PER_SPLIT,  # multiple of BLOCK_K
    stride_xm,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    # K is a multiple of BLOCK_K (the host picks BLOCK_K dividing K), so no k mask.
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = _dequant_tile(qw_ptr, qh_ptr, s_ptr, z_ptr, k0, offs_k, offs_n, n_mask, N, BITS, GROUP_SIZE, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
    out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# M is not specialized (Triton would compile separate variants for M == 1 and M % 16 == 0):
# the GEMM masks its row tiles anyway, and every variant costs a compile.
@triton.jit(do_not_specialize=["M"])
def qlinear_gemm_kernel(
    x_ptr,  # [M, K] activations, row stride stride_xm, unit column stride
    qw_ptr,
    qh_ptr,
    s_ptr,
    z_ptr,
    y_ptr,  # [M, N] output in the activation dtype, row stride N
    M,
    N,
    K,
    stride_xm,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 activations (exact), "tf32" otherwise (unused for 16-bit)
    DOT_IN_FP32: tl.constexpr,  # interpreter only: see the tl.dot below
):
    # Grouped ordering: GROUP_M row blocks sweep the column blocks together, so a
    # dequantized weight column block is reused from L2 by several row blocks.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        w = _dequant_tile(qw_ptr, qh_ptr, s_ptr, z_ptr, k0, offs_k, offs_n, n_mask, N, BITS, GROUP_SIZE, BLOCK_K)
        # tl.dot takes same-typed operands: the weight is rounded to the activation dtype
        # (one rounding per weight; fp32 stays exact with input_precision="ieee").
        b = w.to(a.dtype)
        if DOT_IN_FP32:
            # Triton's CPU interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton
            # #11584, unsupported upstream). Same operand values widened to fp32: products of two
            # bf16 values are exact in fp32, so this equals the GPU's bf16 MMA up to summation order.
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    y = y_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
