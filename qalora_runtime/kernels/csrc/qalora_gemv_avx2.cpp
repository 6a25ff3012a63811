// AVX2 exact fp32 GEMV / small-M kernel over the quad-interleaved block layout
// (qalora_layout.h), for layers that run with fp32 activations.
//
// 2/3/4-bit levels are masked in place (no shifts; the power-of-two offsets are
// undone by a prepared copy of x), 8-bit ones sign-extended; all are converted to
// float and multiplied by the fp32 activations (exact up to fp32 summation
// order); per group one FMA by the weight scale, and the float zero-point costs
// one FMA per group for 4 columns: - s*z * sum(x_group). The cost per weight is
// the same at every width (one convert and one FMA per 8 weights), so 2/3-bit
// layers that run with fp32 activations are stored in the plane layout instead,
// whose GEMV (qalora_plane_avx2.cpp) gets cheaper with fewer bits. The int8
// activation (q8) GEMV is in qalora_dot_avx2.cpp.
#pragma GCC target("avx2,fma,f16c")
#include "qalora_layout.h"
#include "qalora_unpack_avx2.h"

namespace qalora {
namespace {

// Block-column -> 4 float vectors of (possibly power-of-2 scaled) levels, from
// dword lanes of packed bytes with a single AND each: no shift. The scales are
// undone exactly by the prepared activations xa (x * 2^-shift, f32_prepare_avx2)
// and, for 3-bit columns 1 and 2, by a final per-column factor.
static inline __m256 masked_float(__m256i d, int mask) {
  return _mm256_cvtepi32_ps(_mm256_and_si256(d, _mm256_set1_epi32(mask)));
}

alignas(32) constexpr int32_t kMask3[4][4][8] = {
#define QALORA_M3(m) {m, m, m, m, m, m, m, m}
#define QALORA_M3C(m) {QALORA_M3(m), QALORA_M3(m << 8), QALORA_M3(m << 16), QALORA_M3(m << 24)}
    QALORA_M3C(0x07), QALORA_M3C(0x38), QALORA_M3C(0x0E), QALORA_M3C(0x07)
#undef QALORA_M3C
#undef QALORA_M3
};

template <int BITS, int MR>
void f32_quad(const LayerView& L, int64_t nq, const float* xw, const float* xs, int64_t m0, float* y) {
  const int64_t K = L.K, G = L.groups(), bpg = L.bpg(), BB = 4 * BITS;
  const uint8_t* wq = L.quad_q(nq);
  const float* ss = L.quad_s(nq);
  xw += m0 * K;  // x (8-bit) or its scaled copy (2/3/4-bit, see f32_prepare_avx2)
  xs += m0 * G;
  __m256 facc[MR][4];
  __m128 zacc[MR];
  for (int m = 0; m < MR; ++m) {
    for (int c = 0; c < 4; ++c) facc[m][c] = _mm256_setzero_ps();
    zacc[m] = _mm_setzero_ps();
  }
  for (int64_t g = 0; g < G; ++g) {
    __m256 gacc[MR][4];
    for (int m = 0; m < MR; ++m)
      for (int c = 0; c < 4; ++c) gacc[m][c] = _mm256_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const uint8_t* blk = wq + b * 4 * BB;
      _mm_prefetch(reinterpret_cast<const char*>(blk + 8 * 4 * BB), _MM_HINT_T0);
      __m256i v3[4];
      if constexpr (BITS == 3) {
        unpack3q_scaled(blk, v3);  // lane k of v3[c] holds levels 4k..4k+3, one per byte
      }
      for (int c = 0; c < 4; ++c) {
        __m256 wf[4];
        const uint8_t* p = blk + c * BB;
        if constexpr (BITS == 8) {
          for (int i = 0; i < 4; ++i)
            wf[i] = _mm256_cvtepi32_ps(
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i))));
        } else if constexpr (BITS == 4) {  // wf: levels 0-7, 8-15, 16*(16-23), 16*(24-31)
          const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
          const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
          wf[0] = masked_float(b0, 0x0F);
          wf[1] = masked_float(b1, 0x0F);
          wf[2] = masked_float(b0, 0xF0);
          wf[3] = masked_float(b1, 0xF0);
        } else if constexpr (BITS == 2) {  // wf[r]: 4^r * levels 8r..8r+7
          const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
          for (int r = 0; r < 4; ++r) wf[r] = masked_float(b0, 3 << (2 * r));
        } else {  // wf[r]: 2^(8r) * levels {4k + r} (times 8 / 2 for columns 1 / 2)
          // Masks from memory: as immediates GCC rebuilt them in the loop (movabs+broadcast).
          for (int r = 0; r < 4; ++r)
            wf[r] = _mm256_cvtepi32_ps(_mm256_and_si256(
                v3[c], _mm256_load_si256(reinterpret_cast<const __m256i*>(kMask3[c][r]))));
        }
        for (int m = 0; m < MR; ++m) {
          const float* xb = xw + m * K + b * 32;
          // Two chains per column halve the FMA latency chain.
          __m256 a0 = _mm256_mul_ps(wf[0], _mm256_loadu_ps(xb));
          __m256 a1 = _mm256_mul_ps(wf[1], _mm256_loadu_ps(xb + 8));
          a0 = _mm256_fmadd_ps(wf[2], _mm256_loadu_ps(xb + 16), a0);
          a1 = _mm256_fmadd_ps(wf[3], _mm256_loadu_ps(xb + 24), a1);
          gacc[m][c] = _mm256_add_ps(gacc[m][c], _mm256_add_ps(a0, a1));
        }
      }
    }
    const float* sg = ss + g * 8;
    const __m128 sz = _mm_loadu_ps(sg + 4);
    for (int c = 0; c < 4; ++c) {
      const __m256 sc = _mm256_broadcast_ss(sg + c);
      for (int m = 0; m < MR; ++m) facc[m][c] = _mm256_fmadd_ps(gacc[m][c], sc, facc[m][c]);
    }
    for (int m = 0; m < MR; ++m)
      zacc[m] = _mm_fmadd_ps(sz, _mm_broadcast_ss(xs + m * G + g), zacc[m]);
  }
  const int64_t n0 = nq * 4, ncols = L.N - n0 < 4 ? L.N - n0 : 4;
  const __m128 colscale = BITS == 3 ? _mm_setr_ps(1.0f, 0.125f, 0.5f, 1.0f) : _mm_set1_ps(1.0f);
  for (int m = 0; m < MR; ++m) {
    const __m128 d = hsum4(facc[m][0], facc[m][1], facc[m][2], facc[m][3]);
    const __m128 r = _mm_sub_ps(BITS == 3 ? _mm_mul_ps(d, colscale) : d, zacc[m]);
    store_cols(y + (m0 + m) * L.N + n0, r, ncols);
  }
}

template <int BITS>
void f32_range(const LayerView& L, const float* x, const float* xa, int64_t M, float* y,
               int64_t q0, int64_t q1) {
  const float* xw = BITS == 8 ? x : xa + M * L.groups();
  for (int64_t nq = q0; nq < q1; ++nq) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) f32_quad<BITS, 2>(L, nq, xw, xa, m, y);
    if (m < M) f32_quad<BITS, 1>(L, nq, xw, xa, m, y);
  }
}

}  // namespace

void f32_gemv_avx2(const LayerView& L, const float* x, const float* xa, int64_t M, float* y,
                   int64_t q0, int64_t q1) {
  switch (L.bits) {
    case 2: f32_range<2>(L, x, xa, M, y, q0, q1); break;
    case 3: f32_range<3>(L, x, xa, M, y, q0, q1); break;
    case 4: f32_range<4>(L, x, xa, M, y, q0, q1); break;
    default: f32_range<8>(L, x, xa, M, y, q0, q1); break;
  }
}

// What the f32 path reads besides x (f32_prep_floats(L, M) floats at xa): exact
// per-group sums of x [M, K/G] for the zero term, then for 2/3/4-bit a copy of x
// [M, K] scaled per element by 2^-shift, shift being the bit position f32_quad
// leaves that element's level at (3-bit also permuted per 32-block to the level
// order of unpack3q_scaled's lanes). Power-of-two scaling is exact (for |x| above
// 2^-102, where fp32 denormals start).
void f32_prepare_avx2(const LayerView& L, const float* x, int64_t M, float* xa) {
  const int64_t K = L.K, G = L.groups(), group = L.group;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const float* p = x + m * K + g * group;
      __m256 s = _mm256_loadu_ps(p);
      for (int64_t i = 8; i < group; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(p + i));
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
      xa[m * G + g] = _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
    }
  if (L.bits == 8) return;
  float* xw = xa + M * G;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < K / 32; ++b) {
      const float* src = x + m * K + b * 32;
      float* dst = xw + m * K + b * 32;
      for (int r = 0; r < 4; ++r) {
        if (L.bits == 3) {
          const float sc = 1.0f / static_cast<float>(1u << (8 * r));
          for (int k = 0; k < 8; ++k) dst[8 * r + k] = src[4 * k + r] * sc;
        } else {
          const float sc = L.bits == 2 ? 1.0f / static_cast<float>(1 << (2 * r)) : (r < 2 ? 1.0f : 0.0625f);
          for (int k = 0; k < 8; ++k) dst[8 * r + k] = src[8 * r + k] * sc;
        }
      }
    }
}

}  // namespace qalora
