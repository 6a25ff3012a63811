// AVX-512 tiled GEMM (exact fp32 prefill of layers with fp32 activations): the
// AVX2 kernel's tiles (dequant_tile_avx2, L2-sized, any layout) multiplied by a
// 6-row (then 4, 1) x 4-column register-blocked micro-kernel over 16 inputs per
// FMA instead of 8 (the AVX2 micro-kernel is FMA-bound: its GEMM ran at 0.5-0.65x
// of MKL's AVX-512 sgemm on this host). 6 rows use 24 of the 32 registers for
// sums: 10% faster than 4 on 4096x4096 at M = 256; quad-outer loop order was slower.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include <immintrin.h>

#include "qalora_layout.h"
#include "qalora_shuffle_avx512.h"

namespace qalora {
namespace {

// y[m, c] += sum_k x[m, k] * w[c, k] for MR rows and 4 columns over kc inputs (kc % 32 == 0).
template <int MR>
void micro512(const float* x, int64_t ldx, const float* w, int64_t kc, float* y, int64_t ldy, int64_t ncols) {
  __m512 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < 4; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; k += 16) {
    __m512 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_loadu_ps(x + m * ldx + k);
    for (int c = 0; c < 4; ++c) {
      const __m512 wv = _mm512_loadu_ps(w + c * kGemmKC + k);
      for (int m = 0; m < MR; ++m) acc[m][c] = _mm512_fmadd_ps(xv[m], wv, acc[m][c]);
    }
  }
  for (int m = 0; m < MR; ++m) add_column_sums4(acc[m], y + m * ldy, ncols);
}

}  // namespace

void f32_gemm_avx512(const LayerView& L, const float* x, int64_t M, float* y, int64_t q0, int64_t q1,
                     float* buf) {
  const int64_t K = L.K;
  for (int64_t qt = q0; qt < q1; qt += kGemmQuads) {
    const int64_t nquads = q1 - qt < kGemmQuads ? q1 - qt : kGemmQuads;
    for (int64_t k0 = 0; k0 < K; k0 += kGemmKC) {
      const int64_t kc = K - k0 < kGemmKC ? K - k0 : kGemmKC;
      dequant_tile_avx2(L, qt, nquads, k0, kc, buf);
      int64_t m = 0;
      for (; m + 6 <= M; m += 6)
        for (int64_t qi = 0; qi < nquads; ++qi) {
          const int64_t n0 = (qt + qi) * 4, ncols = L.N - n0 < 4 ? L.N - n0 : 4;
          micro512<6>(x + m * K + k0, K, buf + qi * 4 * kGemmKC, kc, y + m * L.N + n0, L.N, ncols);
        }
      for (; m + 4 <= M; m += 4)
        for (int64_t qi = 0; qi < nquads; ++qi) {
          const int64_t n0 = (qt + qi) * 4, ncols = L.N - n0 < 4 ? L.N - n0 : 4;
          micro512<4>(x + m * K + k0, K, buf + qi * 4 * kGemmKC, kc, y + m * L.N + n0, L.N, ncols);
        }
      for (; m < M; ++m)
        for (int64_t qi = 0; qi < nquads; ++qi) {
          const int64_t n0 = (qt + qi) * 4, ncols = L.N - n0 < 4 ? L.N - n0 : 4;
          micro512<1>(x + m * K + k0, K, buf + qi * 4 * kGemmKC, kc, y + m * L.N + n0, L.N, ncols);
        }
    }
  }
}

}  // namespace qalora
