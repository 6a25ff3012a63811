// AVX512-BF16 tiled GEMM: the large-M (prefill) path of bf16 models on CPUs that
// have AVX512_BF16 but no AMX (AMD Zen 4/5, Intel Cooper Lake).
//
// There oneDNN runs dense bf16 GEMM with vdpbf16ps (two multiply-adds per fp32
// lane and instruction), 2-4x its fp32 GEMM, so the exact fp32 tiled GEMM reached
// only ~0.5x of dense bf16. Here a tile of 64 output columns x kBf16KC inputs is
// dequantized per call straight from the dot layout into bf16 (each weight rounded
// once, to nearest even, as a bf16 dense weight is) in pair-interleaved order
// w[input pair][column][2], and an outer-product micro-kernel multiplies it with
// 6 rows at a time: per input pair, 4 vector loads of the tile (64 columns), one
// broadcast of each row's pair and 24 vdpbf16ps into 6 x 64 fp32 sums. Lanes run
// over columns, so no horizontal reduction is needed (a K-lane kernel's per-call
// reductions were ~14% of its instructions at K = 576, and it measured 4-10%
// slower). Sums go to a per-call fp32 y (stored by the first K tile, added by the
// rest, so y is never zero-filled); each finished column tile is
// rounded to bf16 by the thread that computed it.
//
// The same kernel is the opt-in bf16 prefill of fp32 models (MODE_BF16_GEMM,
// torch.set_float32_matmul_precision("medium")), whose fp32 sums are the result.
// Their 4/8-bit quad-layout blocks are rounded to bf16 straight from the packed
// bytes like the dot layout's; the plane layout (and 2/3-bit quads) is first
// dequantized to an exact fp32 tile by the fp32 GEMM's code, then rounded.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "qalora_dequant_bf16.h"
#include "qalora_layout.h"
#include "qalora_shuffle_avx512.h"

namespace qalora {
namespace {

constexpr int64_t kTileCols = kGemmQuads * 4;  // 64 columns: 4 vectors of 16
constexpr int64_t kPairRow = kTileCols * 2;    // bf16 elements of one input pair's row of the tile

// y[m, :ncols] (+)= x[m, 2p .. 2p+1] . w[p] over npairs input pairs, for MR rows and
// the tile's first NV vectors of 16 columns; `first` (the first K tile) stores, so y
// needs no zero fill.
template <int MR, int NV>
void micro_pairs(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t npairs, float* y, int64_t ldy,
                 int64_t ncols, bool first) {
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < npairs; ++p) {
    __m512bh wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = (__m512bh)_mm512_load_si512(w + p * kPairRow + 32 * j);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * ldx + 2 * p, sizeof pair);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < NV; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xb, wv[j]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV && 16 * j < ncols; ++j) {
      const int64_t left = ncols - 16 * j;
      const __mmask16 keep = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
      float* dst = y + m * ldy + 16 * j;
      _mm512_mask_storeu_ps(dst, keep, first ? acc[m][j] : _mm512_add_ps(_mm512_maskz_loadu_ps(keep, dst), acc[m][j]));
    }
}

// micro_pairs over only the vectors that hold live columns: a narrow last tile (N
// not a multiple of 64, or a thread's range ending mid-tile, as at N = 576 on 2
// threads) costs its width, not a whole tile's.
template <int MR>
void micro_rows(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t npairs, float* y, int64_t ldy,
                int64_t ncols, bool first) {
  switch ((ncols + 15) / 16) {
    case 1: micro_pairs<MR, 1>(x, ldx, w, npairs, y, ldy, ncols, first); break;
    case 2: micro_pairs<MR, 2>(x, ldx, w, npairs, y, ldy, ncols, first); break;
    case 3: micro_pairs<MR, 3>(x, ldx, w, npairs, y, ldy, ncols, first); break;
    default: micro_pairs<MR, 4>(x, ldx, w, npairs, y, ldy, ncols, first); break;
  }
}

// Quads [qt, qt + nquads) x blocks [b0, b0 + nb) of a dot-layout layer (kFromQuad:
// a 4/8-bit quad-layout layer) -> the
// pair-interleaved tile w[(b - b0) * 16 + p][column][2]: per 16 columns and block,
// 16 columns x 16 pairs (dwords) dequantized, then transposed in registers.
template <int BITS, bool kFromQuad>
void dequant_tile_pairs(const LayerView& L, int64_t qt, int64_t nquads, int64_t b0, int64_t nb, uint16_t* w) {
  alignas(64) uint16_t rows[16 * 32];  // column r's 32 inputs at rows + 32 r
  __m512 t[16];
  for (int64_t cg = 0; cg * 4 < nquads; ++cg) {
    const int64_t live = nquads - cg * 4 < 4 ? nquads - cg * 4 : 4;
    if (live < 4) std::memset(rows, 0, sizeof rows);  // the tile's missing quads as zero columns
    for (int64_t b = b0; b < b0 + nb; ++b) {
      for (int64_t qi = 0; qi < live; ++qi) {
        const int64_t q = qt + cg * 4 + qi;
        // Each quad's blocks are one contiguous stream: keep 1 KB of it in flight.
        _mm_prefetch(reinterpret_cast<const char*>(L.quad_q(q) + b * 16 * BITS) + 1024, _MM_HINT_T0);
        if constexpr (kFromQuad) dequant_quad_layout_block_bf16<BITS>(L, q, b, rows + qi * 4 * 32, 32);
        else dequant_quad_block_bf16<BITS>(L, q, b, rows + qi * 4 * 32, 32);
      }
      transpose16(reinterpret_cast<const float*>(rows), t);  // t[p] lane c: column c's pair p
      uint16_t* dst = w + (b - b0) * 16 * kPairRow + cg * 32;
      for (int p = 0; p < 16; ++p) _mm512_store_si512(dst + p * kPairRow, _mm512_castps_si512(t[p]));
    }
  }
}

// The same tile from a quad- or plane-layout layer, through the exact fp32 tile of
// dequant_tile_avx2 (kGemmKC inputs at a time, in f32buf) rounded to bf16.
void dequant_tile_pairs_any(const LayerView& L, int64_t qt, int64_t nquads, int64_t b0, int64_t nb, uint16_t* w,
                            float* f32buf) {
  alignas(64) uint16_t rows[16 * 32];
  __m512 t[16];
  for (int64_t c0 = b0 * 32; c0 < (b0 + nb) * 32; c0 += kGemmKC) {
    const int64_t kc = (b0 + nb) * 32 - c0 < kGemmKC ? (b0 + nb) * 32 - c0 : kGemmKC;
    dequant_tile_avx2(L, qt, nquads, c0, kc, f32buf);
    for (int64_t cg = 0; cg * 4 < nquads; ++cg) {
      const int64_t live = (nquads - cg * 4 < 4 ? nquads - cg * 4 : 4) * 4;  // columns of this group
      if (live < 16) std::memset(rows, 0, sizeof rows);
      for (int64_t b = c0 / 32; b < (c0 + kc) / 32; ++b) {
        for (int64_t r = 0; r < live; ++r) {
          const float* src = f32buf + (cg * 16 + r) * kGemmKC + (b * 32 - c0);
          const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
          _mm512_store_si512(rows + 32 * r, (__m512i)v);
        }
        transpose16(reinterpret_cast<const float*>(rows), t);
        uint16_t* dst = w + (b - b0) * 16 * kPairRow + cg * 32;
        for (int p = 0; p < 16; ++p) _mm512_store_si512(dst + p * kPairRow, _mm512_castps_si512(t[p]));
      }
    }
  }
}

// The heads of a quad- or dot-layout tile's streams (quads [qt, qt + nquads), blocks
// [b0, b0 + nb)), pulled into L2 a slice at a time while the micro-kernel works on
// the tile before it. dequant_tile_pairs prefetches each quad's levels 1 KB ahead of
// where it reads, so the first 1 KB of every stream (and the scales) was left to
// demand misses and the hardware prefetchers, which have no time to train on
// streams this short (K = 576: 18 lines of 4-bit levels per quad). Cold, that made
// an 8-bit 576x1536 layer 0.87-1.02x dense bf16 at M = 64; with the heads prefetched
// during the previous tile's compute, 1.24-1.30x (A/B in docs/BENCHMARKS.md). Each
// quad contributes two segments, the head of its levels and of its scales.
class TilePrefetcher {
 public:
  static constexpr int64_t kStreamHead = 1024;  // dequant_tile_pairs' prefetch distance
  TilePrefetcher(const LayerView& L, int64_t qt, int64_t nquads, int64_t b0, int64_t nb)
      : L_(L), qt_(qt), nquads_(nquads), b0_(b0) {
    const int64_t g0 = b0 / L.bpg(), g1 = (b0 + nb + L.bpg() - 1) / L.bpg();
    // Heads only: prefetching whole tiles measured 5-10% slower at K = 4096, whose
    // long streams the hardware prefetchers already follow.
    q_bytes_ = std::min<int64_t>(nb * 16 * L.bits, kStreamHead);
    s_bytes_ = std::min<int64_t>((g1 - g0) * 8 * static_cast<int64_t>(sizeof(float)), kStreamHead);
    s_first_ = g0 * 8;
    total_lines_ = nquads * ((q_bytes_ + 63) / 64 + (s_bytes_ + 63) / 64);
  }
  int64_t total_lines() const { return total_lines_; }
  // Issue the next `lines` line prefetches (fewer at the end).
  void advance(int64_t lines) {
    for (; lines > 0 && quad_ < nquads_; --lines) {
      const int64_t q = qt_ + quad_;
      const char* base = in_scales_ ? reinterpret_cast<const char*>(L_.quad_s(q) + s_first_)
                                    : reinterpret_cast<const char*>(L_.quad_q(q) + b0_ * 16 * L_.bits);
      _mm_prefetch(base + offset_, _MM_HINT_T1);
      offset_ += 64;
      if (offset_ >= (in_scales_ ? s_bytes_ : q_bytes_)) {
        offset_ = 0;
        in_scales_ = !in_scales_;
        if (!in_scales_) ++quad_;
      }
    }
  }

 private:
  const LayerView& L_;
  int64_t qt_, nquads_, b0_;
  int64_t q_bytes_ = 0, s_bytes_ = 0, s_first_ = 0, total_lines_ = 0;
  int64_t quad_ = 0, offset_ = 0;
  bool in_scales_ = false;
};

// Columns [n0, n0 + ncols) of every row of the fp32 y rounded into the bf16 output.
void store_rows_bf16(const float* y, int64_t M, int64_t N, int64_t n0, int64_t ncols, uint16_t* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* src = y + m * N + n0;
    uint16_t* dst = out + m * N + n0;
    for (int64_t c = 0; c < ncols; c += 16) {
      const __mmask16 keep =
          ncols - c >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (ncols - c)) - 1u);
      _mm256_mask_storeu_epi16(dst + c, keep, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(keep, src + c)));
    }
  }
}

template <int BITS>
void bf16_gemm_range(const LayerView& L, const uint16_t* x, int64_t M, float* y, uint16_t* out, int64_t q0,
                     int64_t q1, uint16_t* w, float* f32buf) {
  const int64_t K = L.K;
  // The plane layout's tiles go through the fp32 tile code, which has its own access order.
  const bool prefetch_next = L.layout != kPlaneLayout;
  for (int64_t qt = q0; qt < q1; qt += kGemmQuads) {
    const int64_t nquads = q1 - qt < kGemmQuads ? q1 - qt : kGemmQuads;
    const int64_t n0 = qt * 4, ncols = L.N - n0 < nquads * 4 ? L.N - n0 : nquads * 4;
    for (int64_t k0 = 0; k0 < K; k0 += kBf16KC) {
      const int64_t kc = K - k0 < kBf16KC ? K - k0 : kBf16KC;
      const bool first = k0 == 0;
      if (L.layout == kDotLayout) dequant_tile_pairs<BITS, false>(L, qt, nquads, k0 / 32, kc / 32, w);
      else if constexpr (BITS == 4 || BITS == 8) {
        if (L.layout == kQuadLayout) dequant_tile_pairs<BITS, true>(L, qt, nquads, k0 / 32, kc / 32, w);
        else dequant_tile_pairs_any(L, qt, nquads, k0 / 32, kc / 32, w, f32buf);
      } else {
        dequant_tile_pairs_any(L, qt, nquads, k0 / 32, kc / 32, w, f32buf);
      }
      // This thread's next tile: the next K tile of these quads, else the next quads' first.
      const int64_t next_k0 = k0 + kBf16KC < K ? k0 + kBf16KC : 0;
      const int64_t next_qt = next_k0 ? qt : qt + kGemmQuads;
      const int64_t next_nq = q1 - next_qt < kGemmQuads ? q1 - next_qt : kGemmQuads;
      const int64_t next_kc = K - next_k0 < kBf16KC ? K - next_k0 : kBf16KC;
      TilePrefetcher next(L, next_qt, prefetch_next && next_nq > 0 ? next_nq : 0, next_k0 / 32, next_kc / 32);
      // Spread its lines over the micro-kernel calls of this tile (one per 6 rows, about).
      const int64_t per_call = (next.total_lines() + (M + 5) / 6 - 1) / ((M + 5) / 6);
      int64_t m = 0;
      for (; m + 6 <= M; m += 6) {
        next.advance(per_call);
        micro_rows<6>(x + m * K + k0, K, w, kc / 2, y + m * L.N + n0, L.N, ncols, first);
      }
      for (; m + 4 <= M; m += 4) {
        next.advance(per_call);
        micro_rows<4>(x + m * K + k0, K, w, kc / 2, y + m * L.N + n0, L.N, ncols, first);
      }
      for (; m < M; ++m) micro_rows<1>(x + m * K + k0, K, w, kc / 2, y + m * L.N + n0, L.N, ncols, first);
      next.advance(next.total_lines());  // whatever the row blocks left (small M)
    }
    if (out != nullptr) store_rows_bf16(y, M, L.N, n0, ncols, out);
  }
}

}  // namespace

void bf16_gemm_avx512(const LayerView& L, const uint16_t* x, int64_t M, float* y, uint16_t* out, int64_t q0,
                      int64_t q1, uint16_t* wbuf, float* f32buf) {
  switch (L.bits) {
    case 2: bf16_gemm_range<2>(L, x, M, y, out, q0, q1, wbuf, f32buf); break;
    case 3: bf16_gemm_range<3>(L, x, M, y, out, q0, q1, wbuf, f32buf); break;
    case 4: bf16_gemm_range<4>(L, x, M, y, out, q0, q1, wbuf, f32buf); break;
    default: bf16_gemm_range<8>(L, x, M, y, out, q0, q1, wbuf, f32buf); break;
  }
}

}  // namespace qalora
