// Shared AVX-512 epilogue of the tiled GEMM micro-kernels (fp32 and bf16): include
// after the translation unit's `#pragma GCC target` that enables AVX-512.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace qalora {

// dst[c] += sum of the 16 lanes of acc[c], c < ncols (<= 4). The four columns are
// reduced together (four separate reductions cost a quarter of a K=576 tile's
// FMAs): after two shuffle levels each 128-bit lane holds [c0 c1 c2 c3] partial sums.
static inline void add_column_sums4(const __m512 acc[4], float* dst, int64_t ncols) {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(acc[0], acc[1]), _mm512_unpackhi_ps(acc[0], acc[1]));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(acc[2], acc[3]), _mm512_unpackhi_ps(acc[2], acc[3]));
  const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
  const __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  if (ncols >= 4) {
    _mm_storeu_ps(dst, _mm_add_ps(_mm_loadu_ps(dst), r));
  } else {
    alignas(16) float tmp[4];
    _mm_store_ps(tmp, r);
    for (int64_t c = 0; c < ncols; ++c) dst[c] += tmp[c];
  }
}

}  // namespace qalora
