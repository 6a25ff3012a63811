// Dot-layout block -> bf16 weights, shared by the AMX and AVX512-BF16 GEMMs. Include
// after the translation unit's `#pragma GCC target` enabling AVX-512 and AVX512-BF16.
#pragma once
#include <immintrin.h>

#include "qalora_layout.h"
#include "qalora_unpack_avx2.h"

namespace qalora {

// Block b (inputs 32b .. 32b+31) of quad nq: column c's 32 weights s * q - s*z, each
// rounded once to bf16 (nearest even), to dst + c * col_stride.
template <int BITS>
static inline void dequant_quad_block_bf16(const LayerView& L, int64_t nq, int64_t b, uint16_t* dst,
                                           int64_t col_stride) {
  __m256i v[4];
  unpack_dot<BITS>(L.quad_q(nq) + b * 16 * BITS, v);
  // Column c's 8 inputs of dot vector j to qword c (as in dequant_tile_dot).
  const __m256i by_column = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int j = 0; j < 4; ++j) v[j] = _mm256_permutevar8x32_epi32(v[j], by_column);
  // 4x4 qword transpose: cols[c] = column c's inputs 0..31 in order.
  const __m256i l01 = _mm256_unpacklo_epi64(v[0], v[1]), h01 = _mm256_unpackhi_epi64(v[0], v[1]);
  const __m256i l23 = _mm256_unpacklo_epi64(v[2], v[3]), h23 = _mm256_unpackhi_epi64(v[2], v[3]);
  const __m256i cols[4] = {_mm256_permute2x128_si256(l01, l23, 0x20), _mm256_permute2x128_si256(h01, h23, 0x20),
                           _mm256_permute2x128_si256(l01, l23, 0x31), _mm256_permute2x128_si256(h01, h23, 0x31)};
  const float* sg = L.quad_s(nq) + (b / L.bpg()) * 8;
  for (int c = 0; c < 4; ++c) {
    const __m128i lo8 = _mm256_castsi256_si128(cols[c]), hi8 = _mm256_extracti128_si256(cols[c], 1);
    const __m512i lo = BITS == 8 ? _mm512_cvtepi8_epi32(lo8) : _mm512_cvtepu8_epi32(lo8);
    const __m512i hi = BITS == 8 ? _mm512_cvtepi8_epi32(hi8) : _mm512_cvtepu8_epi32(hi8);
    const __m512 s = _mm512_set1_ps(sg[c]), sz = _mm512_set1_ps(sg[4 + c]);
    const __m512 wl = _mm512_fmsub_ps(_mm512_cvtepi32_ps(lo), s, sz);
    const __m512 wh = _mm512_fmsub_ps(_mm512_cvtepi32_ps(hi), s, sz);
    _mm512_storeu_si512(dst + c * col_stride, (__m512i)_mm512_cvtne2ps_pbh(wh, wl));
  }
}

}  // namespace qalora
