// AVX2 GEMV / small-M kernels over the quad-interleaved block layout (qalora_layout.h).
//
// q8 path (llama.cpp style): activations quantized to int8 per 32-block; per block
// and column one integer dot (maddubs + madd), one int->float convert and one FMA
// by the block's activation scale; per group one FMA by the weight scale, and the
// float zero-point costs one FMA per group for 4 columns: - s*z * sum(x_group).
// f32 path: the same decode, but levels are converted to float and multiplied by
// the fp32 activations, so the result is exact up to fp32 summation order.
#pragma GCC target("avx2,fma,f16c")
#include "qalora_layout.h"
#include "qalora_unpack_avx2.h"

namespace qalora {
namespace {

template <int BITS, int MR>
void q8_quad(const LayerView& L, int64_t nq, const QuantAct& A, int64_t m0, float* y) {
  const int64_t K = L.K, KB = L.kb(), G = L.groups(), bpg = L.bpg(), BB = 4 * BITS;
  const uint8_t* wq = L.quad_q(nq);
  const float* ss = L.quad_s(nq);
  const int8_t* xq = A.xq + m0 * K;
  const float* dx = A.dx + m0 * KB;
  const float* xs = A.xs + m0 * G;
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
      __m256i xv[MR];
      __m256 dv[MR];
      for (int m = 0; m < MR; ++m) {
        xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + b * 32));
        dv[m] = _mm256_broadcast_ss(dx + m * KB + b);
      }
      const uint8_t* blk = wq + b * 4 * BB;
      _mm_prefetch(reinterpret_cast<const char*>(blk + 8 * 4 * BB), _MM_HINT_T0);
      for (int c = 0; c < 4; ++c) {
        const __m256i w = unpack<BITS>(blk + c * BB);
        for (int m = 0; m < MR; ++m) {
          const __m256 p = _mm256_cvtepi32_ps(dot_q8<BITS>(w, xv[m]));
          gacc[m][c] = _mm256_fmadd_ps(p, dv[m], gacc[m][c]);
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
  for (int m = 0; m < MR; ++m) {
    const __m128 r = _mm_sub_ps(hsum4(facc[m][0], facc[m][1], facc[m][2], facc[m][3]), zacc[m]);
    store_cols(y + (m0 + m) * L.N + n0, r, ncols);
  }
}

template <int BITS, int MR>
void f32_quad(const LayerView& L, int64_t nq, const float* x, const float* xs, int64_t m0, float* y) {
  const int64_t K = L.K, G = L.groups(), bpg = L.bpg(), BB = 4 * BITS;
  const uint8_t* wq = L.quad_q(nq);
  const float* ss = L.quad_s(nq);
  x += m0 * K;
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
      for (int c = 0; c < 4; ++c) {
        __m256 wf[4];
        load_float<BITS>(blk + c * BB, wf);
        for (int m = 0; m < MR; ++m) {
          const float* xb = x + m * K + b * 32;
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
  for (int m = 0; m < MR; ++m) {
    const __m128 r = _mm_sub_ps(hsum4(facc[m][0], facc[m][1], facc[m][2], facc[m][3]), zacc[m]);
    store_cols(y + (m0 + m) * L.N + n0, r, ncols);
  }
}

template <int BITS>
void q8_range(const LayerView& L, const QuantAct& A, int64_t M, float* y, int64_t q0, int64_t q1) {
  // Rows go two at a time: with 4 columns that is already 16 vector accumulators.
  for (int64_t nq = q0; nq < q1; ++nq) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) q8_quad<BITS, 2>(L, nq, A, m, y);
    if (m < M) q8_quad<BITS, 1>(L, nq, A, m, y);
  }
}

template <int BITS>
void f32_range(const LayerView& L, const float* x, const float* xs, int64_t M, float* y,
               int64_t q0, int64_t q1) {
  for (int64_t nq = q0; nq < q1; ++nq) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) f32_quad<BITS, 2>(L, nq, x, xs, m, y);
    if (m < M) f32_quad<BITS, 1>(L, nq, x, xs, m, y);
  }
}

}  // namespace

void q8_gemv_avx2(const LayerView& L, const QuantAct& A, int64_t M, float* y, int64_t q0, int64_t q1) {
  switch (L.bits) {
    case 2: q8_range<2>(L, A, M, y, q0, q1); break;
    case 3: q8_range<3>(L, A, M, y, q0, q1); break;
    case 4: q8_range<4>(L, A, M, y, q0, q1); break;
    default: q8_range<8>(L, A, M, y, q0, q1); break;
  }
}

void f32_gemv_avx2(const LayerView& L, const float* x, const float* xs, int64_t M, float* y,
                   int64_t q0, int64_t q1) {
  switch (L.bits) {
    case 2: f32_range<2>(L, x, xs, M, y, q0, q1); break;
    case 3: f32_range<3>(L, x, xs, M, y, q0, q1); break;
    case 4: f32_range<4>(L, x, xs, M, y, q0, q1); break;
    default: f32_range<8>(L, x, xs, M, y, q0, q1); break;
  }
}

// One row of activations -> int8 per 32-block, block scales, per-group sums of
// the dequantized int8 values (not of x: see QuantAct).
void quantize_act_avx2(const float* x, int64_t K, int64_t group, int8_t* xq, float* dx, float* xs) {
  const int64_t bpg = group / 32;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t g = 0; g < K / group; ++g) {
    float gsum = 0.0f;
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const float* p = x + b * 32;
      __m256 v[4];
      for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(p + 8 * i);
      __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], absmask), _mm256_and_ps(v[1], absmask)),
                                _mm256_max_ps(_mm256_and_ps(v[2], absmask), _mm256_and_ps(v[3], absmask)));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float amax = _mm_cvtss_f32(m4);
      const float d = amax / 127.0f;
      const __m256 id = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      __m256i q[4];
      for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));
      const __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
      s4 = _mm_hadd_epi32(s4, s4);
      s4 = _mm_hadd_epi32(s4, s4);
      const __m256i a = _mm256_packs_epi32(q[0], q[1]);
      const __m256i c = _mm256_packs_epi32(q[2], q[3]);
      const __m256i packed = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, c), perm);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + b * 32), packed);
      dx[b] = d;
      gsum += d * static_cast<float>(_mm_cvtsi128_si32(s4));
    }
    xs[g] = gsum;
  }
}

}  // namespace qalora
