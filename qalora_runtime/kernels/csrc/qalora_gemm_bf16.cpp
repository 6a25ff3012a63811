// AVX512-BF16 tiled GEMM: the large-M (prefill) path of bf16 models on CPUs that
// have AVX512_BF16 but no AMX (AMD Zen 4/5, Intel Cooper Lake).
//
// There oneDNN runs dense bf16 GEMM with vdpbf16ps (two multiply-adds per fp32
// lane and instruction), about 2-4x its fp32 GEMM, so the exact fp32 tiled GEMM
// reached only ~0.5x of dense bf16. This is that tiled GEMM with the tile rounded
// to bf16 (round to nearest even, the rounding a bf16 dense weight has) and the
// 16-lane FMA replaced by vdpbf16ps over 32 inputs: the same L2-sized tiles
// (dequant_tile_avx2, any layout), the same 6/4/1-row x 4-column register blocks,
// fp32 accumulation into a per-call fp32 y, and each finished column tile of y
// rounded to bf16 by the thread that computed it.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#include <immintrin.h>

#include "qalora_dequant_bf16.h"
#include "qalora_layout.h"
#include "qalora_reduce_avx512.h"

namespace qalora {
namespace {

// y[m, c] += sum_k x[m, k] * w[c, k] for MR rows and 4 columns over kc inputs (kc % 32 == 0).
template <int MR>
void micro_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t kc, float* y, int64_t ldy,
                int64_t ncols) {
  __m512 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < 4; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; k += 32) {
    __m512bh xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * ldx + k);
    for (int c = 0; c < 4; ++c) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + c * kBf16KC + k);
      for (int m = 0; m < MR; ++m) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], xv[m], wv);
    }
  }
  for (int m = 0; m < MR; ++m) add_column_sums4(acc[m], y + m * ldy, ncols);
}

// Quads [qt, qt + nquads) x blocks [b0, b0 + nb) of a dot-layout layer -> w[(qi*4 + c) * kBf16KC + k].
template <int BITS>
void dequant_tile_bf16(const LayerView& L, int64_t qt, int64_t nquads, int64_t b0, int64_t nb, uint16_t* w) {
  for (int64_t qi = 0; qi < nquads; ++qi) {
    const uint8_t* stream = L.quad_q(qt + qi);
    for (int64_t b = b0; b < b0 + nb; ++b) {
      // A quad's blocks are one contiguous stream: keep 1 KB of it in flight.
      _mm_prefetch(reinterpret_cast<const char*>(stream + (b * 16 + 1024 / BITS) * BITS), _MM_HINT_T0);
      dequant_quad_block_bf16<BITS>(L, qt + qi, b, w + qi * 4 * kBf16KC + (b - b0) * 32, kBf16KC);
    }
  }
}

// Columns [n0, n0 + ncols) of every row of the fp32 y rounded into the bf16 output.
void store_rows_bf16(const float* y, int64_t M, int64_t N, int64_t n0, int64_t ncols, uint16_t* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* src = y + m * N + n0;
    uint16_t* dst = out + m * N + n0;
    int64_t c = 0;
    for (; c + 16 <= ncols; c += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + c)));
    if (c < ncols) {
      const __mmask16 tail = static_cast<__mmask16>((1u << (ncols - c)) - 1);
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(tail, src + c));
      _mm256_mask_storeu_epi16(dst + c, tail, (__m256i)v);
    }
  }
}

template <int BITS>
void bf16_gemm_range(const LayerView& L, const uint16_t* x, int64_t M, float* y, uint16_t* out, int64_t q0,
                     int64_t q1, uint16_t* w) {
  const int64_t K = L.K;
  for (int64_t qt = q0; qt < q1; qt += kGemmQuads) {
    const int64_t nquads = q1 - qt < kGemmQuads ? q1 - qt : kGemmQuads;
    const int64_t tile_cols = L.N - qt * 4 < nquads * 4 ? L.N - qt * 4 : nquads * 4;
    for (int64_t k0 = 0; k0 < K; k0 += kBf16KC) {
      const int64_t kc = K - k0 < kBf16KC ? K - k0 : kBf16KC;
      dequant_tile_bf16<BITS>(L, qt, nquads, k0 / 32, kc / 32, w);
      int64_t m = 0;
      for (; m + 6 <= M; m += 6)
        for (int64_t qi = 0; qi < nquads; ++qi) {
          const int64_t n0 = (qt + qi) * 4, ncols = L.N - n0 < 4 ? L.N - n0 : 4;
          micro_bf16<6>(x + m * K + k0, K, w + qi * 4 * kBf16KC, kc, y + m * L.N + n0, L.N, ncols);
        }
      for (; m + 4 <= M; m += 4)
        for (int64_t qi = 0; qi < nquads; ++qi) {
          const int64_t n0 = (qt + qi) * 4, ncols = L.N - n0 < 4 ? L.N - n0 : 4;
          micro_bf16<4>(x + m * K + k0, K, w + qi * 4 * kBf16KC, kc, y + m * L.N + n0, L.N, ncols);
        }
      for (; m < M; ++m)
        for (int64_t qi = 0; qi < nquads; ++qi) {
          const int64_t n0 = (qt + qi) * 4, ncols = L.N - n0 < 4 ? L.N - n0 : 4;
          micro_bf16<1>(x + m * K + k0, K, w + qi * 4 * kBf16KC, kc, y + m * L.N + n0, L.N, ncols);
        }
    }
    store_rows_bf16(y, M, L.N, qt * 4, tile_cols, out);
  }
}

}  // namespace

void bf16_gemm_avx512(const LayerView& L, const uint16_t* x, int64_t M, float* y, uint16_t* out, int64_t q0,
                      int64_t q1, uint16_t* wbuf) {
  switch (L.bits) {
    case 2: bf16_gemm_range<2>(L, x, M, y, out, q0, q1, wbuf); break;
    case 3: bf16_gemm_range<3>(L, x, M, y, out, q0, q1, wbuf); break;
    case 4: bf16_gemm_range<4>(L, x, M, y, out, q0, q1, wbuf); break;
    default: bf16_gemm_range<8>(L, x, M, y, out, q0, q1, wbuf); break;
  }
}

}  // namespace qalora
