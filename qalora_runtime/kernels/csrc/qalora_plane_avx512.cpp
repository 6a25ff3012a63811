// AVX-512 exact-fp32 GEMV over the plane layout (qalora_layout.h), 2/3-bit layers.
//
// The AVX2 kernel (qalora_plane_avx2.cpp) looks up pairs of inputs in 4-entry
// tables with the in-lane vpermilps. AVX-512's vpermps indexes a whole 16-float
// register, so here each table covers four inputs: entry e = the sum of the x's
// whose bit is set in e (prepared once per call). One vpermps by the low 4 bits of
// a plane's dwords then gives, for the 16 columns of one layout row, their
// 4-input partial dot product for that bit plane; a shift moves to the next 4
// inputs. Per 64 weights and plane: one shift, one vpermps (the table read
// from memory), one add, so 2-bit costs 2/3 of 3-bit and both less than the
// 4-bit quad kernel per weight. Plane j's sums are kept apart and weighted
// 2^j per group, then as everywhere: y = sum_g s * sum(q x) - s*z * sum_g(x).
// Table entries are sums of up to four fp32 inputs (rounded as they add), so the
// result is exact up to fp32 summation order, like every f32 path.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include <immintrin.h>

#include "qalora_layout.h"

namespace qalora {
namespace {

constexpr int64_t kTabsPerBlock = 8;  // 32 inputs / 4 per table
constexpr int64_t kTabFloats = 16;

int64_t row_floats(const LayerView& L) { return L.kb() * kTabsPerBlock * kTabFloats + L.groups(); }

template <int BITS, int MR>
void plane_pair(const LayerView& L, int64_t pr, const float* prep, int64_t m0, float* y) {
  const int64_t KB = L.kb(), G = L.groups(), bpg = L.bpg(), rf = row_floats(L);
  // The pair's 16 columns are one sequential stream of 64-byte plane rows, and its
  // scales another (qalora_layout.h), so every load is a whole aligned line.
  const uint32_t* pp = L.oct_planes(2 * pr);
  const float* sp = L.oct_s(2 * pr);
  // Prefetch ~2 KB ahead in both streams; a pair of at most 8 KB (SmolLM2's K) looks
  // one pair ahead instead, where the next pair's streams would otherwise start cold.
  const int64_t pair_bytes = KB * BITS * 64, ahead = pair_bytes <= 8192 ? pair_bytes : 2048;
  const int64_t ahead_s = pair_bytes <= 8192 ? G * 128 : 4096 / BITS;  // 128 B of scales per 64 * BITS B of planes
  const float* tabs[MR];
  const float* xs[MR];
  __m512 facc[MR], zacc[MR];
  for (int m = 0; m < MR; ++m) {
    tabs[m] = prep + (m0 + m) * rf;
    xs[m] = tabs[m] + KB * kTabsPerBlock * kTabFloats;
    facc[m] = zacc[m] = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[MR][BITS][2];  // per plane, two chains (even/odd tables) to halve the add latency chain
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < BITS; ++j) acc[m][j][0] = acc[m][j][1] = _mm512_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const uint32_t* pb = pp + b * BITS * kPlaneCols;
      __m512i p[BITS];
      for (int j = 0; j < BITS; ++j) {
        p[j] = _mm512_loadu_si512(pb + j * kPlaneCols);
        _mm_prefetch(reinterpret_cast<const char*>(pb + j * kPlaneCols) + ahead, _MM_HINT_T0);
      }
#pragma GCC unroll 8
      for (int t = 0; t < kTabsPerBlock; ++t) {
        for (int j = 0; j < BITS; ++j) {
          const __m512i idx = p[j];
          p[j] = _mm512_srli_epi32(p[j], 4);
          for (int m = 0; m < MR; ++m) {
            const __m512 tab = _mm512_loadu_ps(tabs[m] + (b * kTabsPerBlock + t) * kTabFloats);
            acc[m][j][t & 1] = _mm512_add_ps(acc[m][j][t & 1], _mm512_permutexvar_ps(idx, tab));
          }
        }
      }
    }
    const float* sg = sp + g * 2 * kPlaneCols;
    _mm_prefetch(reinterpret_cast<const char*>(sg) + ahead_s, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(sg + kPlaneCols) + ahead_s, _MM_HINT_T0);
    const __m512 s = _mm512_loadu_ps(sg), sz = _mm512_loadu_ps(sg + kPlaneCols);
    for (int m = 0; m < MR; ++m) {
      __m512 gs = _mm512_add_ps(acc[m][BITS - 1][0], acc[m][BITS - 1][1]);
      for (int j = BITS - 2; j >= 0; --j)  // Horner in 2: planes weighted 2^j, exactly
        gs = _mm512_fmadd_ps(gs, _mm512_set1_ps(2.0f), _mm512_add_ps(acc[m][j][0], acc[m][j][1]));
      facc[m] = _mm512_fmadd_ps(gs, s, facc[m]);
      zacc[m] = _mm512_fmadd_ps(sz, _mm512_set1_ps(xs[m][g]), zacc[m]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    alignas(64) float r[16];
    _mm512_store_ps(r, _mm512_sub_ps(facc[m], zacc[m]));
    const int64_t n0 = pr * kPlaneCols, ncols = L.N - n0 < kPlaneCols ? L.N - n0 : kPlaneCols;
    float* dst = y + (m0 + m) * L.N + n0;
    for (int64_t c = 0; c < ncols; ++c) dst[c] = r[c];  // the padding columns' lanes are dropped
  }
}

template <int BITS>
void plane_range512(const LayerView& L, const float* prep, int64_t M, float* y, int64_t p0, int64_t p1) {
  for (int64_t pr = p0; pr < p1; ++pr) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) plane_pair<BITS, 2>(L, pr, prep, m, y);  // two rows share the plane loads
    if (m < M) plane_pair<BITS, 1>(L, pr, prep, m, y);
  }
}

}  // namespace

int64_t plane_prep_floats_avx512(const LayerView& L, int64_t M) { return M * row_floats(L); }

void plane_prepare_avx512(const LayerView& L, const float* x, int64_t M, float* prep) {
  const int64_t K = L.K, G = L.groups(), group = L.group;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float* tab = prep + m * row_floats(L);
    // Entry e of the table of inputs i..i+3 = sum of x[i + j] over the bits j of e.
    for (int64_t i = 0; i < K; i += 4) {
      __m512 t = _mm512_maskz_mov_ps(0xAAAA, _mm512_set1_ps(xr[i]));
      t = _mm512_mask_add_ps(t, 0xCCCC, t, _mm512_set1_ps(xr[i + 1]));
      t = _mm512_mask_add_ps(t, 0xF0F0, t, _mm512_set1_ps(xr[i + 2]));
      t = _mm512_mask_add_ps(t, 0xFF00, t, _mm512_set1_ps(xr[i + 3]));
      _mm512_storeu_ps(tab + i * 4, t);
    }
    float* xs = tab + L.kb() * kTabsPerBlock * kTabFloats;
    for (int64_t g = 0; g < G; ++g) {
      __m512 s = _mm512_setzero_ps();
      for (int64_t i = 0; i < group; i += 16) s = _mm512_add_ps(s, _mm512_loadu_ps(xr + g * group + i));
      xs[g] = _mm512_reduce_add_ps(s);
    }
  }
}

void plane_gemv_avx512(const LayerView& L, const float* prep, int64_t M, float* y, int64_t p0, int64_t p1) {
  if (L.bits == 2) plane_range512<2>(L, prep, M, y, p0, p1);
  else plane_range512<3>(L, prep, M, y, p0, p1);
}

}  // namespace qalora
