// AVX2 block decoders: 32 stored levels of one block -> 32 bytes / 4x8 floats.
// Only included from translation units compiled under `#pragma GCC target("avx2,fma")`,
// which include no torch or STL headers (so no inline function is ever emitted
// with AVX2 code into a symbol a scalar-only CPU could call).
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace qalora {

// 3-bit quad-block (48 bytes = 4 columns x 32 levels, layout in qalora_layout.h) ->
// the four columns' levels as bytes, columns 1 and 2 *scaled*: v[0] = q0,
// v[1] = 8*q1, v[2] = 2*q2, v[3] = q3 (8 vector ops for 128 levels). The scales
// are powers of two, so the exact fp32 GEMV undoes them exactly.
static inline void unpack3q_scaled(const uint8_t* p, __m256i v[4]) {
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32)));
  // Low 128-bit lane: column 3's levels 0-15 and column 2's bit 2 from bits 0-3 of
  // B; high lane: levels 16-31 from bits 4-7.
  const __m256i t = _mm256_srlv_epi64(b, _mm256_set_epi64x(4, 4, 0, 0));
  v[0] = _mm256_and_si256(a, _mm256_set1_epi8(0x07));
  v[1] = _mm256_and_si256(a, _mm256_set1_epi8(0x38));
  v[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 5), _mm256_set1_epi8(0x06)),
                         _mm256_and_si256(t, _mm256_set1_epi8(0x08)));
  v[3] = _mm256_and_si256(t, _mm256_set1_epi8(0x07));
}

// Exact 3-bit levels of a quad-block (gemm tile dequantization; the dot layout's V0..V3).
static inline void unpack3q(const uint8_t* p, __m256i v[4]) {
  unpack3q_scaled(p, v);
  v[1] = _mm256_and_si256(_mm256_srli_epi16(v[1], 3), _mm256_set1_epi8(0x07));
  v[2] = _mm256_srli_epi16(v[2], 1);  // bits 1-3 only, so no bits cross bytes
}

// Dot-layout quad-block -> its four dot vectors V0..V3 of stored levels (qalora_layout.h).
template <int BITS>
static inline void unpack_dot(const uint8_t* p, __m256i v[4]) {
  if constexpr (BITS == 8) {
    for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * j));
  } else if constexpr (BITS == 4) {
    const __m256i m = _mm256_set1_epi8(0x0F);
    for (int h = 0; h < 2; ++h) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * h));
      v[2 * h] = _mm256_and_si256(b, m);
      v[2 * h + 1] = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
    }
  } else if constexpr (BITS == 2) {
    const __m256i m = _mm256_set1_epi8(0x03);
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    v[0] = _mm256_and_si256(b, m);
    v[1] = _mm256_and_si256(_mm256_srli_epi16(b, 2), m);
    v[2] = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
    v[3] = _mm256_and_si256(_mm256_srli_epi16(b, 6), m);
  } else {
    static_assert(BITS == 3, "bits must be 2, 3, 4 or 8");
    unpack3q(p, v);
  }
}

// 32 stored levels (one unpacked block) -> four float vectors (elements 0-7, 8-15, ...).
template <int BITS>
static inline void to_float(__m256i w, __m256 out[4]) {
  const __m128i lo = _mm256_castsi256_si128(w);
  const __m128i hi = _mm256_extracti128_si256(w, 1);
  if constexpr (BITS == 8) {
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
  } else {
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  }
}

// Packed block -> four float vectors straight from memory (f32 path, 2/4/8-bit): byte
// zero-extension loads replace the unpack + lane shuffles of to_float(unpack())
// for the layouts where that is possible (fewer shuffle-port ops, the bottleneck).
template <int BITS>
static inline void load_float(const uint8_t* p, __m256 out[4]) {
  if constexpr (BITS == 4) {
    const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
    const __m256i m = _mm256_set1_epi32(0x0F);
    out[0] = _mm256_cvtepi32_ps(_mm256_and_si256(b0, m));
    out[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b1, m));
    out[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
    out[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
  } else if constexpr (BITS == 2) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i m = _mm256_set1_epi32(0x03);
    out[0] = _mm256_cvtepi32_ps(_mm256_and_si256(b, m));
    out[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(b, 2), m));
    out[2] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(b, 4), m));
    out[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 6));
  } else {
    static_assert(BITS == 8, "3-bit blocks are decoded a quad at a time (unpack3q)");
    for (int i = 0; i < 4; ++i)
      out[i] = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i))));
  }
}

// Horizontal sums of four vectors -> one 4-lane vector [sum a, sum b, sum c, sum d].
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b);
  const __m256 cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// Store up to 4 lanes (the last quad of a layer may be partial).
static inline void store_cols(float* dst, __m128 v, int64_t ncols) {
  if (ncols >= 4) {
    _mm_storeu_ps(dst, v);
  } else {
    float tmp[4];
    _mm_storeu_ps(tmp, v);
    for (int64_t c = 0; c < ncols; ++c) dst[c] = tmp[c];
  }
}

}  // namespace qalora
