// Register shuffles shared by the AVX-512 GEMMs (the fp32 tiled GEMM's column
// reduction; the 16 x 16 transpose of the AMX output and of the vdpbf16ps weight
// tiles). Include after the translation unit's `#pragma GCC target` enabling AVX-512.
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

// t[j][i] = c[i][j] for a 16 x 16 fp32 tile (64 shuffles, no gathers): 4x4 transposes
// inside each 128-bit lane of four rows at a time, then a 4x4 transpose of lanes.
static inline void transpose16(const float* c, __m512 t[16]) {
  __m512 b[4][4];  // b[g][k] lane L: rows 4g..4g+3 at column 4L + k
  for (int g = 0; g < 4; ++g) {
    const float* r = c + g * 64;
    const __m512 r0 = _mm512_load_ps(r), r1 = _mm512_load_ps(r + 16), r2 = _mm512_load_ps(r + 32),
                 r3 = _mm512_load_ps(r + 48);
    const __m512 a0 = _mm512_unpacklo_ps(r0, r1), a1 = _mm512_unpackhi_ps(r0, r1);
    const __m512 a2 = _mm512_unpacklo_ps(r2, r3), a3 = _mm512_unpackhi_ps(r2, r3);
    b[g][0] = _mm512_shuffle_ps(a0, a2, 0x44);
    b[g][1] = _mm512_shuffle_ps(a0, a2, 0xEE);
    b[g][2] = _mm512_shuffle_ps(a1, a3, 0x44);
    b[g][3] = _mm512_shuffle_ps(a1, a3, 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 c0 = _mm512_shuffle_f32x4(b[0][k], b[1][k], 0x44), c1 = _mm512_shuffle_f32x4(b[0][k], b[1][k], 0xEE);
    const __m512 c2 = _mm512_shuffle_f32x4(b[2][k], b[3][k], 0x44), c3 = _mm512_shuffle_f32x4(b[2][k], b[3][k], 0xEE);
    t[k] = _mm512_shuffle_f32x4(c0, c2, 0x88);
    t[4 + k] = _mm512_shuffle_f32x4(c0, c2, 0xDD);
    t[8 + k] = _mm512_shuffle_f32x4(c1, c3, 0x88);
    t[12 + k] = _mm512_shuffle_f32x4(c1, c3, 0xDD);
  }
}

}  // namespace qalora
