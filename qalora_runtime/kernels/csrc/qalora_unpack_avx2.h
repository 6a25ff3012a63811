// AVX2 block decoders: 32 stored levels of one block -> 32 bytes / 4x8 floats.
// Only included from translation units compiled under `#pragma GCC target("avx2,fma")`,
// which include no torch or STL headers (so no inline function is ever emitted
// with AVX2 code into a symbol a scalar-only CPU could call).
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace qalora {

static inline __m256i unpack2(const uint8_t* p) {
  int64_t w;
  std::memcpy(&w, p, 8);
  // 64-bit lane l holds bytes shifted by 2*l: byte j of lane l = q[8*l + j].
  const __m256i v = _mm256_srlv_epi64(_mm256_set1_epi64x(w), _mm256_set_epi64x(6, 4, 2, 0));
  return _mm256_and_si256(v, _mm256_set1_epi8(0x03));
}

static inline __m256i unpack4(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i v = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
  return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

static inline __m256i unpack3(const uint8_t* p) {
  const __m256i lo = unpack2(p);
  uint32_t h;
  std::memcpy(&h, p + 8, 4);
  // Byte i takes byte i/8 of h, then tests bit i%8 of it.
  const __m256i idx = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                        0x0101010101010101LL, 0x0000000000000000LL);
  const __m256i bitm = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  __m256i hv = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(h)), idx);
  hv = _mm256_cmpeq_epi8(_mm256_and_si256(hv, bitm), bitm);
  return _mm256_or_si256(lo, _mm256_and_si256(hv, _mm256_set1_epi8(0x04)));
}

static inline __m256i unpack8(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

template <int BITS>
static inline __m256i unpack(const uint8_t* p) {
  if constexpr (BITS == 2) return unpack2(p);
  else if constexpr (BITS == 3) return unpack3(p);
  else if constexpr (BITS == 4) return unpack4(p);
  else return unpack8(p);
}

// Integer dot of 32 stored levels with 32 int8 activations -> 8 int32 partial sums.
// maddubs multiplies unsigned x signed bytes; levels < 8 bits are unsigned and
// small, so pair sums stay far below int16 saturation (15*127*2 = 3810). 8-bit
// levels are signed (q-128): move the sign onto the activation (llama.cpp trick);
// |q-128| <= 128 gives at most 128*127*2 = 32512 < 32767.
template <int BITS>
static inline __m256i dot_q8(__m256i w, __m256i xq) {
  __m256i p;
  if constexpr (BITS == 8) {
    p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xq, w));
  } else {
    p = _mm256_maddubs_epi16(w, xq);
  }
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
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

// Packed block -> four float vectors straight from memory (f32 path): byte
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
  } else if constexpr (BITS == 8) {
    for (int i = 0; i < 4; ++i)
      out[i] = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i))));
  } else {
    to_float<BITS>(unpack<BITS>(p), out);
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
