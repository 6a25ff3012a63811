// AVX-512 exact fp32 GEMV over the quad layout (qalora_layout.h), 4-bit layers
// with fp32 activations: the AVX2 kernel (qalora_gemv_avx2.cpp) with 16-lane
// vectors. A block-column of 32 levels is one zero-extending byte load (vpmovzxbd
// of 16 bytes) and two mask+convert pairs (the high nibbles stay at 16x, undone
// by f32_prepare_avx2's scaled copy of x); two FMAs with x, one FMA per group by
// the weight scale and one per group for the float zero-point (- s*z * sum(x_group)).
// Per 32 weights that is half the AVX2 kernel's instructions, which were the
// bottleneck there (its 4-bit path ran at ~15 GB/s against the ~30 GB/s this host
// streams). An 8-bit version of the same loop ran 0.88-0.92x of the AVX2 kernel
// (scripts/bench_isa.py), so 8-bit layers keep the AVX2 one.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include <immintrin.h>

#include "qalora_layout.h"

namespace qalora {
namespace {

template <int BITS, int MR>
void f32_quad512(const LayerView& L, int64_t nq, const float* xw, const float* xs, int64_t m0, float* y) {
  static_assert(BITS == 4, "8-bit stays on AVX2 (faster there), 2/3-bit use the plane layout");
  const int64_t K = L.K, G = L.groups(), bpg = L.bpg(), BB = 4 * BITS;
  const uint8_t* wq = L.quad_q(nq);
  const float* ss = L.quad_s(nq);
  xw += m0 * K;
  xs += m0 * G;
  __m512 facc[MR][4];
  __m128 zacc[MR];
  for (int m = 0; m < MR; ++m) {
    for (int c = 0; c < 4; ++c) facc[m][c] = _mm512_setzero_ps();
    zacc[m] = _mm_setzero_ps();
  }
  const __m512i lo = _mm512_set1_epi32(0x0F), hi = _mm512_set1_epi32(0xF0);
  for (int64_t g = 0; g < G; ++g) {
    __m512 gacc[MR][4];
    for (int m = 0; m < MR; ++m)
      for (int c = 0; c < 4; ++c) gacc[m][c] = _mm512_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const uint8_t* blk = wq + b * 4 * BB;
      _mm_prefetch(reinterpret_cast<const char*>(blk + 8192), _MM_HINT_T0);
      for (int c = 0; c < 4; ++c) {
        const uint8_t* p = blk + c * BB;
        // Levels of inputs 0-15, and 16x those of inputs 16-31.
        const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        const __m512 w0 = _mm512_cvtepi32_ps(_mm512_and_si512(d, lo));
        const __m512 w1 = _mm512_cvtepi32_ps(_mm512_and_si512(d, hi));
        for (int m = 0; m < MR; ++m) {
          const float* xb = xw + m * K + b * 32;
          const __m512 t = _mm512_mul_ps(w0, _mm512_loadu_ps(xb));
          gacc[m][c] = _mm512_add_ps(gacc[m][c], _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), t));
        }
      }
    }
    const float* sg = ss + g * 8;
    _mm_prefetch(reinterpret_cast<const char*>(sg) + 1024, _MM_HINT_T0);  // the scale stream, too
    for (int c = 0; c < 4; ++c) {
      const __m512 sc = _mm512_set1_ps(sg[c]);
      for (int m = 0; m < MR; ++m) facc[m][c] = _mm512_fmadd_ps(gacc[m][c], sc, facc[m][c]);
    }
    const __m128 sz = _mm_loadu_ps(sg + 4);
    for (int m = 0; m < MR; ++m) zacc[m] = _mm_fmadd_ps(sz, _mm_set1_ps(xs[m * G + g]), zacc[m]);
  }
  const int64_t n0 = nq * 4, ncols = L.N - n0 < 4 ? L.N - n0 : 4;
  for (int m = 0; m < MR; ++m) {
    alignas(16) float r[4];
    _mm_store_ps(r, _mm_sub_ps(_mm_setr_ps(_mm512_reduce_add_ps(facc[m][0]), _mm512_reduce_add_ps(facc[m][1]),
                                           _mm512_reduce_add_ps(facc[m][2]), _mm512_reduce_add_ps(facc[m][3])),
                               zacc[m]));
    for (int64_t c = 0; c < ncols; ++c) y[(m0 + m) * L.N + n0 + c] = r[c];
  }
}

template <int BITS>
void f32_range512(const LayerView& L, const float* xa, int64_t M, float* y, int64_t q0, int64_t q1) {
  const float* xw = xa + M * L.groups();  // x scaled for the unshifted high nibbles
  for (int64_t nq = q0; nq < q1; ++nq) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) f32_quad512<BITS, 2>(L, nq, xw, xa, m, y);
    if (m < M) f32_quad512<BITS, 1>(L, nq, xw, xa, m, y);
  }
}

}  // namespace

void f32_gemv_avx512(const LayerView& L, const float* xa, int64_t M, float* y, int64_t q0, int64_t q1) {
  f32_range512<4>(L, xa, M, y, q0, q1);
}

}  // namespace qalora
