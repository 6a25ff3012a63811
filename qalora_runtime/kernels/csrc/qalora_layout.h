// Packed layout shared by every CPU path of the qalora fused kernels.
//
// A layer W[K, N] (w = s[g,n] * (q[k,n] - z[g,n])) is repacked at load time to:
//   qw: uint8 [N/4, K/32, 4, BB]   BB = 4*bits bytes per 32-weight block.
//       Columns are interleaved in quads so one thread streams one contiguous
//       buffer per 4 output features, and the activation block is loaded once
//       for the 4 columns.
//       4-bit: byte i = q[i] | q[i+16] << 4                       (i < 16)
//       2-bit: byte i = q[i] | q[i+8] << 2 | q[i+16] << 4 | q[i+24] << 6 (i < 8)
//       3-bit: bytes 0..7 = low 2 bits as 2-bit; bytes 8..11 = bit i of the
//              little-endian word is bit 2 of q[i]
//       8-bit: byte i = q[i] ^ 0x80, i.e. the signed value q[i] - 128
//   ss: float [N/4, K/G, 2, 4]: ss[.,g,0,c] = s, ss[.,g,1,c] = s * (z - off),
//       off = 128 for 8-bit, else 0, so that  y = sum_g s*(sum q'x) - sz*sum x
//       with q' the stored (possibly signed) level.
// N is padded to a multiple of 4 with zero columns; outputs beyond N are dropped.
#pragma once
#include <cstdint>

namespace qalora {

struct LayerView {
  const uint8_t* qw;
  const float* ss;
  int64_t K;      // input features (multiple of 32 and of group)
  int64_t N;      // real output features (output row stride)
  int64_t bits;   // 2, 3, 4, 8
  int64_t group;  // multiple of 32

  int64_t kb() const { return K / 32; }
  int64_t groups() const { return K / group; }
  int64_t bpg() const { return group / 32; }
  int64_t bb() const { return 4 * bits; }
  int64_t quads() const { return (N + 3) / 4; }
  const uint8_t* quad_q(int64_t nq) const { return qw + nq * kb() * 4 * bb(); }
  const float* quad_s(int64_t nq) const { return ss + nq * groups() * 8; }
};

// Activations quantized to int8 per 32-block (llama.cpp Q8_0 style) for the q8 path.
struct QuantAct {
  const int8_t* xq;  // [M, K]
  const float* dx;   // [M, K/32] block scales
  const float* xs;   // [M, K/G] per-group sums of the *quantized* x (so the zero
                     // term's error cancels against the dot term's, see gemv)
};

// Scalar level decoder: stored level of element i (0..31) of a block.
inline int level_at(const uint8_t* blk, int64_t bits, int i) {
  switch (bits) {
    case 4: return (blk[i & 15] >> ((i >> 4) * 4)) & 0xF;
    case 2: return (blk[i & 7] >> ((i >> 3) * 2)) & 0x3;
    case 3: {
      int lo = (blk[i & 7] >> ((i >> 3) * 2)) & 0x3;
      int hi = (blk[8 + (i >> 3)] >> (i & 7)) & 1;
      return lo | (hi << 2);
    }
    default: return static_cast<int>(static_cast<int8_t>(blk[i]));
  }
}

// ISA-specific entry points; each covers quads [q0, q1) and writes y[M, N].
void q8_gemv_avx2(const LayerView& L, const QuantAct& A, int64_t M, float* y, int64_t q0, int64_t q1);
void f32_gemv_avx2(const LayerView& L, const float* x, const float* xs, int64_t M, float* y,
                   int64_t q0, int64_t q1);
// Prefill: dequantize a tile of kGemmQuads quads x kGemmKC inputs into `buf` (fp32,
// L2-sized) and multiply it with a register-blocked kernel. `y` must be zeroed.
constexpr int64_t kGemmQuads = 16;
constexpr int64_t kGemmKC = 512;
void f32_gemm_avx2(const LayerView& L, const float* x, int64_t M, float* y, int64_t q0, int64_t q1,
                   float* buf);
void quantize_act_avx2(const float* x, int64_t K, int64_t group, int8_t* xq, float* dx, float* xs);
bool cpu_has_avx2();

void f32_gemv_scalar(const LayerView& L, const float* x, int64_t M, float* y, int64_t q0, int64_t q1);

}  // namespace qalora
