// Packed layout shared by every CPU path of the qalora fused kernels.
//
// A layer W[K, N] (w = s[g,n] * (q[k,n] - z[g,n])) is repacked at load time to:
//   qw: uint8 [N/4, K/32, 4, BB]   BB = 4*bits bytes per 32-weight block.
//       Columns are interleaved in quads so one thread streams one contiguous
//       buffer per 4 output features, and the activation block is loaded once
//       for the 4 columns.
//       4-bit: byte i = q[i] | q[i+16] << 4                       (i < 16)
//       2-bit: byte i = q[i] | q[i+8] << 2 | q[i+16] << 4 | q[i+24] << 6 (i < 8)
//       3-bit: the 4 columns' blocks are one 48-byte quad-block (not 4 x 12 bytes),
//              laid out so that AVX2 decodes all 128 levels in 8 vector ops
//              (unpack3q_scaled). With q0..q3 the columns' levels, i < 32, j < 16:
//                byte i      = q0[i] | q1[i] << 3 | (q2[i] & 3) << 6
//                byte 32 + j = q3[j] | (q2[j] >> 2) << 3 | q3[j+16] << 4 | (q2[j+16] >> 2) << 7
//       8-bit: byte i = q[i] ^ 0x80, i.e. the signed value q[i] - 128
//   ss: float [N/4, K/G, 2, 4]: ss[.,g,0,c] = s, ss[.,g,1,c] = s * (z - off),
//       off = 128 for 8-bit, else 0, so that  y = sum_g s*(sum q'x) - sz*sum x
//       with q' the stored (possibly signed) level.
// N is padded to a multiple of 4 with zero columns; outputs beyond N are dropped.
//
// Plane layout (2/3-bit layers with fp32 activations, the exact path only):
//   qw: uint32 [N/16, K/32, bits, 16]: dword c of plane j holds bit j of the levels of
//       column c for the block's 32 inputs (bit r = input r). 16 columns (an oct
//       pair) per row, so the AVX-512 GEMV reads one 64-byte line per plane and a
//       pair is one sequential stream; the AVX2 GEMV and the tile dequant take 8
//       columns (one oct, half a row) at a time (qalora_plane_avx2.cpp).
//   ss: float [N/16, K/G, 2, 16] (s, s * z), N padded to a multiple of 16.
//
// Dot layout (layers whose activations are quantized to int8: bf16 models, or
// QALORA_CPU_INT8_ACT=1): the quad layout's sizes and ss, but each quad-block's
// 128 levels are reordered into four 32-byte "dot vectors" V0..V3: byte p of V_j
// is the level of column (p/4)%4 at input 8j + 4*(p/16) + p%4. One maddubs of V_j
// with the activation bytes [x[8j..8j+3] x4 | x[8j+4..8j+7] x4] (prepared once per
// call) and one madd then give int32 lanes [c0 c1 c2 c3 | c0 c1 c2 c3]: the four
// columns' sums without horizontal adds (vphaddw costs 4 multiplies' throughput here).
//   8-bit: V0..V3 one after another, signed (q - 128)
//   4-bit: bytes 0-31 = V0 | V1 << 4, bytes 32-63 = V2 | V3 << 4
//   2-bit: byte p = V0 | V1 << 2 | V2 << 4 | V3 << 6
//   3-bit: the 48-byte 3-bit quad-block format above, vector j in place of column j
#pragma once
#include <cstdint>

namespace qalora {

enum Layout : int64_t { kQuadLayout = 0, kPlaneLayout = 1, kDotLayout = 2 };
// Columns per row of the plane layout (two octs side by side).
constexpr int64_t kPlaneCols = 16;
// Instruction-set levels of the kernels (cpu_isa() in qalora_cpu.cpp picks one). The
// AMX level differs from AVX-512 only in the bf16 large-M kernel (AMX tiles instead
// of vdpbf16ps), so capping at avx512 on an AMX host runs and tests the other one.
enum Isa : int64_t { kIsaScalar = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kIsaAmx = 3 };

struct LayerView {
  const uint8_t* qw;
  const float* ss;
  int64_t K;      // input features (multiple of 32 and of group)
  int64_t N;      // real output features (output row stride)
  int64_t bits;   // 2, 3, 4, 8 (plane layout: 2, 3)
  int64_t group;  // multiple of 32
  int64_t layout = kQuadLayout;  // kQuadLayout, kPlaneLayout or kDotLayout

  int64_t kb() const { return K / 32; }
  int64_t groups() const { return K / group; }
  int64_t bpg() const { return group / 32; }
  int64_t bb() const { return 4 * bits; }
  int64_t quads() const { return (N + 3) / 4; }
  int64_t octs() const { return (N + 7) / 8; }
  const uint8_t* quad_q(int64_t nq) const { return qw + nq * kb() * 4 * bb(); }
  const float* quad_s(int64_t nq) const { return ss + nq * groups() * 8; }
  // Plane layout: oct `no` is half no % 2 of pair no / 2; its rows are kPlaneCols
  // dwords (planes) or floats (scales) apart.
  int64_t pairs() const { return (N + 15) / 16; }
  const uint32_t* oct_planes(int64_t no) const {
    return reinterpret_cast<const uint32_t*>(qw) + (no / 2) * kb() * bits * kPlaneCols + (no % 2) * 8;
  }
  // s of oct `no`, group g at [g * 2 * kPlaneCols], s*z kPlaneCols floats later.
  const float* oct_s(int64_t no) const { return ss + (no / 2) * groups() * 2 * kPlaneCols + (no % 2) * 8; }
  // Sizes the packed tensors must have (checked at the torch boundary).
  int64_t qw_bytes() const { return layout == kPlaneLayout ? pairs() * 2 * K * bits : quads() * K * bits / 2; }
  int64_t ss_floats() const {
    return layout == kPlaneLayout ? pairs() * groups() * 2 * kPlaneCols : quads() * groups() * 8;
  }
  // Layout-independent scalar access (fallback and embedding paths, not hot loops).
  inline int level(int64_t n, int64_t k) const;
  float scale(int64_t n, int64_t g) const {
    return layout == kPlaneLayout ? oct_s(n / 8)[g * 2 * kPlaneCols + n % 8] : quad_s(n / 4)[g * 8 + n % 4];
  }
  float scale_zero(int64_t n, int64_t g) const {
    if (layout == kPlaneLayout) return oct_s(n / 8)[g * 2 * kPlaneCols + kPlaneCols + n % 8];
    return quad_s(n / 4)[g * 8 + 4 + n % 4];
  }
};

// Activations quantized to int8 per 32-block (llama.cpp Q8_0 style) for the q8 path.
struct QuantAct {
  const int8_t* xe;  // [M, K/32, 4, 32]: each row's int8 bytes in dot-vector order (4K per row)
  const float* dx;   // [M, K/32] block scales
  const float* xs;   // [M, K/G] per-group sums of the *quantized* x (so the zero
                     // term's error cancels against the dot term's, see gemv)
};

// Scalar level decoder: stored level of element i (0..31) of column c (0..3) of
// the quad-block at `qb` (the 4 * bb() bytes of one quad and one block of 32 inputs).
inline int level_at(const uint8_t* qb, int64_t bits, int c, int i) {
  if (bits == 3) {
    const uint8_t* hb = qb + 32 + (i & 15);
    const int hs = i < 16 ? 0 : 4;  // low/high nibble of the byte: levels 0-15 / 16-31
    switch (c) {
      case 0: return qb[i] & 7;
      case 1: return (qb[i] >> 3) & 7;
      case 2: return (qb[i] >> 6) | (((*hb >> (hs + 3)) & 1) << 2);
      default: return (*hb >> hs) & 7;
    }
  }
  const uint8_t* blk = qb + c * 4 * bits;
  switch (bits) {
    case 4: return (blk[i & 15] >> ((i >> 4) * 4)) & 0xF;
    case 2: return (blk[i & 7] >> ((i >> 3) * 2)) & 0x3;
    default: return static_cast<int>(static_cast<int8_t>(blk[i]));
  }
}

// Dot layout: stored level of element i (0..31) of column c of the quad-block at `qb`.
inline int dot_level_at(const uint8_t* qb, int64_t bits, int c, int i) {
  const int j = i / 8, r = i % 8;
  const int p = 4 * (c + 4 * (r / 4)) + r % 4;  // byte of dot vector V_j
  switch (bits) {
    case 3: return level_at(qb, 3, j, p);       // the 3-bit quad format, V_j as "column" j
    case 4: return (qb[32 * (j / 2) + p] >> (4 * (j % 2))) & 0xF;
    case 2: return (qb[p] >> (2 * j)) & 0x3;
    default: return static_cast<int>(static_cast<int8_t>(qb[32 * j + p]));
  }
}

inline int LayerView::level(int64_t n, int64_t k) const {
  if (layout == kDotLayout)
    return dot_level_at(quad_q(n / 4) + (k / 32) * 4 * bb(), bits, static_cast<int>(n % 4), static_cast<int>(k % 32));
  if (layout == kPlaneLayout) {
    const uint32_t* p = oct_planes(n / 8) + (k / 32) * bits * kPlaneCols + n % 8;
    int q = 0;
    for (int64_t j = 0; j < bits; ++j) q |= static_cast<int>((p[j * kPlaneCols] >> (k % 32)) & 1u) << j;
    return q;
  }
  return level_at(quad_q(n / 4) + (k / 32) * 4 * bb(), bits, static_cast<int>(n % 4), static_cast<int>(k % 32));
}

// ISA-specific entry points; each covers quads [q0, q1) and writes y[M, N].
// q8 path (dot layout): dot_expand_act_avx2 fills `xe` ([M, K/32, 4, 32] int8, 4K
// bytes per row) with each row's activation bytes in dot-vector order (`paired`: the
// VNNI kernel's [X0 X2 X1 X3] slot order, for its 2/3/4-bit layers).
void dot_expand_act_avx2(const int8_t* xq, int64_t M, int64_t K, int8_t* xe, bool paired);
void q8_dot_gemv_avx2(const LayerView& L, const QuantAct& A, int64_t M, float* y, int64_t q0, int64_t q1);
// f32 path: y = sum_g s * sum(q'x) - s(z-off) * xs, xs the per-group sums of x.
// f32_prepare_avx2 fills `xa` (f32_prep_floats floats) once per call with xs and,
// for 2/3/4-bit, the power-of-two scaled (3-bit: permuted) copy of x the kernel
// multiplies the unshifted levels with.
inline int64_t f32_prep_floats(const LayerView& L, int64_t M) {
  return M * L.groups() + (L.bits == 8 ? 0 : M * L.K);
}
void f32_prepare_avx2(const LayerView& L, const float* x, int64_t M, float* xa);
void f32_gemv_avx2(const LayerView& L, const float* x, const float* xa, int64_t M, float* y,
                   int64_t q0, int64_t q1);
// Prefill: dequantize a tile of kGemmQuads quads x kGemmKC inputs into `buf` (fp32,
// L2-sized) and multiply it with a register-blocked kernel. `y` must be zeroed.
constexpr int64_t kGemmQuads = 16;
constexpr int64_t kGemmKC = 512;
void f32_gemm_avx2(const LayerView& L, const float* x, int64_t M, float* y, int64_t q0, int64_t q1,
                   float* buf);
// One tile of any layout as f32_gemm_avx2 dequantizes it: buf[(qi*4 + c) * kGemmKC + k - k0]
// = s*q' - s*(z - off) for quads [qt, qt + nquads), inputs [k0, k0 + kc).
void dequant_tile_avx2(const LayerView& L, int64_t qt, int64_t nquads, int64_t k0, int64_t kc, float* buf);
// The same tiled GEMM with a 16-lane micro-kernel (qalora_gemm_avx512.cpp).
void f32_gemm_avx512(const LayerView& L, const float* x, int64_t M, float* y, int64_t q0, int64_t q1,
                     float* buf);
// MODE_DENSE fallback (no bf16 kernel of ours applies) that hands the multiply to ATen:
// W^T [N, K] (row n = output feature n) dequantized exactly in fp32, or rounded to
// bf16 (round to nearest even), for quads [q0, q1). `buf` as for f32_gemm_avx2.
void dequant_dense_avx2(const LayerView& L, void* out, bool bf16, int64_t q0, int64_t q1, float* buf);
void quantize_act_avx2(const float* x, int64_t K, int64_t group, int8_t* xq, float* dx, float* xs);
bool cpu_has_avx2();

// AVX-512 (F, BW, VL, DQ, VNNI) kernels, qalora_*_avx512.cpp; same contracts as the
// AVX2 ones they replace on such CPUs.
bool cpu_has_avx512();
int64_t cpu_isa_supported();  // the best level this CPU runs
int64_t cpu_isa();            // that, capped by QALORA_CPU_ISA
// Exact fp32 GEMV over the quad layout, 4-bit layers (f32_prepare_avx2's xa).
void f32_gemv_avx512(const LayerView& L, const float* xa, int64_t M, float* y, int64_t q0, int64_t q1);
// VNNI q8 GEMV (dot layout) over quads [q0, q1); its activations are expanded by
// dot_expand_act_avx2 with paired = (bits != 8).
void q8_dot_gemv_avx512(const LayerView& L, const QuantAct& A, int64_t M, float* y, int64_t q0, int64_t q1);
// AMX-BF16 (qalora_amx.cpp): y[M, N] bf16 for bf16 x on a dot-layout layer, over
// column blocks [c0, c1) of 16 outputs (quads 4c .. 4c+3). x is packed once per call
// by amx_pack_x into xt (amx_xt_elems bf16); wbuf (amx_weight_buf_elems bf16) is
// per thread. The process must hold AMX permission (cpu_has_amx_bf16 asks for it).
bool cpu_has_amx_bf16();
int64_t amx_xt_elems(int64_t M, int64_t K);
int64_t amx_weight_buf_elems(int64_t K);
void amx_pack_x(const uint16_t* x, int64_t M, int64_t K, uint16_t* xt);
void amx_gemm_dot(const LayerView& L, const uint16_t* xt, int64_t M, uint16_t* y, int64_t c0, int64_t c1,
                  uint16_t* wbuf);
// AVX512-BF16 tiled GEMM (qalora_gemm_bf16.cpp), bf16 x [M, K], quads [q0, q1):
// fp32 sums in y (zeroed, [M, N]), each finished column tile rounded into out
// (bf16 [M, N]) unless out is null; wbuf (kBf16TileElems bf16, 64-byte aligned)
// per thread. Any layout: a plane layer or a 2/3-bit quad one also needs f32buf
// (as buf of f32_gemm_avx2, 64-byte aligned) per thread; the others ignore it.
constexpr int64_t kBf16KC = 2048;
constexpr int64_t kBf16TileElems = kGemmQuads * 4 * kBf16KC;
bool cpu_has_avx512_bf16();
void bf16_gemm_avx512(const LayerView& L, const uint16_t* x, int64_t M, float* y, uint16_t* out, int64_t q0,
                      int64_t q1, uint16_t* wbuf, float* f32buf);
// Plane layout GEMV (exact fp32, 2/3-bit) over oct *pairs* [p0, p1) (octs 2p, 2p+1),
// with its own prepared tables: 16-entry subset sums of every 4 inputs.
int64_t plane_prep_floats_avx512(const LayerView& L, int64_t M);
void plane_prepare_avx512(const LayerView& L, const float* x, int64_t M, float* prep);
void plane_gemv_avx512(const LayerView& L, const float* prep, int64_t M, float* y, int64_t p0, int64_t p1);

// Exact scalar path for any layout and CPU: output columns [n0, n1).
void f32_gemv_scalar(const LayerView& L, const float* x, int64_t M, float* y, int64_t n0, int64_t n1);

// Plane layout GEMV (exact fp32): plane_prepare_avx2 fills `prep` (plane_prep_floats
// floats) once per call with each row's 4-entry tables [0, a, b, a+b] of every
// pair of inputs (16 per 32-block) and its per-group sums of x; the GEMV covers
// octs [o0, o1).
constexpr int64_t kPlaneTables = 16;
inline int64_t plane_prep_floats(const LayerView& L, int64_t M) {
  return M * (L.kb() * kPlaneTables * 4 + L.groups());
}
void plane_prepare_avx2(const LayerView& L, const float* x, int64_t M, float* prep);
void plane_gemv_avx2(const LayerView& L, const float* prep, int64_t M, float* y, int64_t o0, int64_t o1);

}  // namespace qalora
