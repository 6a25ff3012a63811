// Packed block -> bf16 weights, shared by the AMX and AVX512-BF16 GEMMs: the dot
// layout (bf16 models) and the quad layout's 4/8-bit blocks (fp32 models under
// bf16 products). Include after the translation unit's `#pragma GCC target`
// enabling AVX-512 and AVX512-BF16.
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

// The same from the quad layout, 4- or 8-bit: column c's block is 4 * BITS bytes at
// qb + c * 4 * BITS (4-bit: byte i = q[i] | q[i+16] << 4; 8-bit: q - 128, signed).
// s * q' - s*(z - off) is the fp32 GEMM's value (one fmsub), so both round alike.
template <int BITS>
static inline void dequant_quad_layout_block_bf16(const LayerView& L, int64_t nq, int64_t b, uint16_t* dst,
                                                  int64_t col_stride) {
  static_assert(BITS == 4 || BITS == 8, "the quad layout's 2/3-bit blocks take the fp32 tile path");
  const uint8_t* qb = L.quad_q(nq) + b * 16 * BITS;
  const float* sg = L.quad_s(nq) + (b / L.bpg()) * 8;
  for (int c = 0; c < 4; ++c) {
    __m512i lo, hi;
    if constexpr (BITS == 4) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + c * 16));
      const __m128i m = _mm_set1_epi8(0x0F);
      lo = _mm512_cvtepu8_epi32(_mm_and_si128(v, m));
      hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), m));
    } else {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + c * 32));
      lo = _mm512_cvtepi8_epi32(_mm256_castsi256_si128(v));
      hi = _mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1));
    }
    const __m512 s = _mm512_set1_ps(sg[c]), sz = _mm512_set1_ps(sg[4 + c]);
    const __m512 wl = _mm512_fmsub_ps(_mm512_cvtepi32_ps(lo), s, sz);
    const __m512 wh = _mm512_fmsub_ps(_mm512_cvtepi32_ps(hi), s, sz);
    _mm512_storeu_si512(dst + c * col_stride, (__m512i)_mm512_cvtne2ps_pbh(wh, wl));
  }
}

}  // namespace qalora
