// AVX2 exact-fp32 GEMV over the plane layout (qalora_layout.h), for 2/3-bit layers.
//
// The quad-layout f32 GEMV converts and multiplies once per 8 weights at every bit
// width, so there 2/3-bit run no faster than 4-bit (the exact path is compute-bound
// on AVX2). Here the cost scales with the bit width instead: per pair of inputs
// x_a, x_b the prepared table [0, a, b, a+b] is indexed by the 2 bits of one plane
// for 8 columns at once (one in-lane vpermilps, which reads only the low 2 bits of
// each index lane, so a shift is the whole index computation), and plane j's
// lookups are weighted by 2^j. (8-entry tables over 3 inputs with the cross-lane
// vpermps were measured too: vpermps costs twice a vpermilps on this CPU, so they
// are slower at 2 bits and no faster at 3; scripts/kernel_experiments/.)
// Then as on the quad path: y = sum_g s * sum(q x) - s*z * sum_g(x).
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include "qalora_layout.h"

namespace qalora {
namespace {

template <int BITS, int MR>
void plane_oct(const LayerView& L, int64_t no, const float* prep, int64_t m0, float* y) {
  constexpr int NA = 4;  // accumulators per row: the add/FMA latency chains stay short
  const int64_t KB = L.kb(), G = L.groups(), bpg = L.bpg();
  const int64_t row_floats = KB * kPlaneTables * 4 + G;
  const uint32_t* po = L.oct_planes(no);
  const float* so = L.oct_s(no);
  const float* tabs[MR];
  const float* xs[MR];
  __m256 facc[MR], zacc[MR];
  for (int m = 0; m < MR; ++m) {
    tabs[m] = prep + (m0 + m) * row_floats;
    xs[m] = tabs[m] + KB * kPlaneTables * 4;
    facc[m] = zacc[m] = _mm256_setzero_ps();
  }
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[MR][NA];
    for (int m = 0; m < MR; ++m)
      for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      __m256i p[BITS];
      for (int j = 0; j < BITS; ++j)
        p[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(po + (b * BITS + j) * kPlaneCols));
      _mm_prefetch(reinterpret_cast<const char*>(po + (b + 4) * BITS * kPlaneCols), _MM_HINT_T0);
#pragma GCC unroll 16
      for (int t = 0; t < kPlaneTables; ++t) {
        __m256 tab[MR];  // the pair's 4-entry table in both 128-bit lanes
        for (int m = 0; m < MR; ++m)
          tab[m] = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(tabs[m] + (b * kPlaneTables + t) * 4));
        for (int j = 0; j < BITS; ++j) {
          const __m256i idx = p[j];
          p[j] = _mm256_srli_epi32(p[j], 2);  // the next pair's bits; one live register per plane
          const int a = (t * BITS + j) % NA;
          for (int m = 0; m < MR; ++m) {
            const __m256 v = _mm256_permutevar_ps(tab[m], idx);
            acc[m][a] = j == 0 ? _mm256_add_ps(acc[m][a], v)
                               : _mm256_fmadd_ps(v, _mm256_set1_ps(static_cast<float>(1 << j)), acc[m][a]);
          }
        }
      }
    }
    const float* sg = so + g * 2 * kPlaneCols;  // s, then s * z kPlaneCols floats later
    const __m256 s = _mm256_loadu_ps(sg), sz = _mm256_loadu_ps(sg + kPlaneCols);
    for (int m = 0; m < MR; ++m) {
      const __m256 gs = _mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3]));
      facc[m] = _mm256_fmadd_ps(gs, s, facc[m]);
      zacc[m] = _mm256_fmadd_ps(sz, _mm256_broadcast_ss(xs[m] + g), zacc[m]);
    }
  }
  const int64_t n0 = no * 8, ncols = L.N - n0 < 8 ? L.N - n0 : 8;
  for (int m = 0; m < MR; ++m) {
    const __m256 r = _mm256_sub_ps(facc[m], zacc[m]);
    float* dst = y + (m0 + m) * L.N + n0;
    if (ncols == 8) {
      _mm256_storeu_ps(dst, r);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, r);
      for (int64_t c = 0; c < ncols; ++c) dst[c] = tmp[c];
    }
  }
}

template <int BITS>
void plane_range(const LayerView& L, const float* prep, int64_t M, float* y, int64_t o0, int64_t o1) {
  for (int64_t no = o0; no < o1; ++no) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) plane_oct<BITS, 2>(L, no, prep, m, y);  // two rows share the plane loads
    if (m < M) plane_oct<BITS, 1>(L, no, prep, m, y);
  }
}

}  // namespace

void plane_prepare_avx2(const LayerView& L, const float* x, int64_t M, float* prep) {
  const int64_t K = L.K, KB = L.kb(), G = L.groups(), group = L.group;
  const int64_t row_floats = KB * kPlaneTables * 4 + G;
  // [0, a, b, a+b] = (a & [0, ~0, 0, ~0]) + (b & [0, 0, ~0, ~0]): a+b is one fp32 rounding.
  const __m128 ma = _mm_castsi128_ps(_mm_setr_epi32(0, -1, 0, -1));
  const __m128 mb = _mm_castsi128_ps(_mm_setr_epi32(0, 0, -1, -1));
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float* tab = prep + m * row_floats;
    for (int64_t i = 0; i < K; i += 2)
      _mm_storeu_ps(tab + i * 2, _mm_add_ps(_mm_and_ps(_mm_broadcast_ss(xr + i), ma),
                                            _mm_and_ps(_mm_broadcast_ss(xr + i + 1), mb)));
    float* xs = tab + KB * kPlaneTables * 4;
    for (int64_t g = 0; g < G; ++g) {
      __m256 s = _mm256_setzero_ps();
      for (int64_t i = 0; i < group; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(xr + g * group + i));
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
      xs[g] = _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
    }
  }
}

void plane_gemv_avx2(const LayerView& L, const float* prep, int64_t M, float* y, int64_t o0, int64_t o1) {
  if (L.bits == 2) plane_range<2>(L, prep, M, y, o0, o1);
  else plane_range<3>(L, prep, M, y, o0, o1);
}

}  // namespace qalora
