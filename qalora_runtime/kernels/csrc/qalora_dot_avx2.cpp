// AVX2 q8 GEMV over the dot layout (qalora_layout.h): the decode path of layers
// whose activations are quantized to int8 (bf16 models), llama.cpp style.
//
// Activations are quantized to int8 per 32-block (quantize_act_avx2) and their
// bytes laid out once per call in dot-vector order (dot_expand_act_avx2). Per
// quad-block (4 columns x 32 inputs) the kernel then does 4 maddubs, 3 int16 adds
// and 1 madd for 128 weights, giving the 4 columns' int32 sums in lanes
// [c0 c1 c2 c3 | c0 c1 c2 c3]; one convert and one FMA by the block's activation
// scale follow, one FMA per group by the weight scales, and the float zero-point
// costs one FMA per group for 4 columns: - s*z * sum(x_group). The quad layout's
// kernel needed three vphaddw per block for the same reduction, each costing as
// much as four multiplies on this host (scripts/kernel_experiments/simd_port_costs.cpp).
#pragma GCC target("avx2,fma,f16c")
#include "qalora_layout.h"
#include "qalora_unpack_avx2.h"

namespace qalora {
namespace {

// int32 lanes [c0 c1 c2 c3 | c0 c1 c2 c3]: the quad's 4 columns dotted with the
// block's 32 activations (xb: the block's 4 expanded activation vectors).
template <int BITS>
static inline __m256i dot_block(const __m256i v[4], const int8_t* xb) {
  __m256i x[4];
  for (int j = 0; j < 4; ++j) x[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 32 * j));
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (BITS == 8) {
    // Signed levels: move the sign onto the activation (maddubs takes unsigned x
    // signed); |q-128| <= 128 gives pair sums up to 32512, so each vector gets its
    // own madd (two could overflow int16).
    __m256i d[4];
    for (int j = 0; j < 4; ++j)
      d[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(v[j], v[j]), _mm256_sign_epi8(x[j], v[j])),
                               ones);
    return _mm256_add_epi32(_mm256_add_epi32(d[0], d[1]), _mm256_add_epi32(d[2], d[3]));
  } else {
    // Levels <= 15: a maddubs lane is at most 2*15*127 = 3810, so four of them add
    // exactly in int16 (15240) and one madd finishes the sum.
    const __m256i s01 = _mm256_add_epi16(_mm256_maddubs_epi16(v[0], x[0]), _mm256_maddubs_epi16(v[1], x[1]));
    const __m256i s23 = _mm256_add_epi16(_mm256_maddubs_epi16(v[2], x[2]), _mm256_maddubs_epi16(v[3], x[3]));
    return _mm256_madd_epi16(_mm256_add_epi16(s01, s23), ones);
  }
}

template <int BITS, int MR>
void q8_dot_quad(const LayerView& L, int64_t nq, const QuantAct& A, int64_t m0, float* y) {
  const int64_t K = L.K, KB = L.kb(), G = L.groups(), bpg = L.bpg(), QB = 16 * BITS;
  const uint8_t* wq = L.quad_q(nq);
  const float* ss = L.quad_s(nq);
  const int8_t* xe = A.xe + m0 * 4 * K;
  const float* dx = A.dx + m0 * KB;
  const float* xs = A.xs + m0 * G;
  __m256 facc[MR];
  __m128 zacc[MR];
  for (int m = 0; m < MR; ++m) {
    facc[m] = _mm256_setzero_ps();
    zacc[m] = _mm_setzero_ps();
  }
  __m256 gacc[MR];
  for (int m = 0; m < MR; ++m) gacc[m] = _mm256_setzero_ps();
  // One loop over blocks, closing a group every bpg blocks: with group 32 a nested
  // group/block loop spent more instructions on loop set-up than on the block.
  const uint8_t* blk = wq;
  const float* sg = ss;
  int64_t left = bpg, g = 0;
  for (int64_t b = 0; b < KB; ++b, blk += QB) {
    _mm_prefetch(reinterpret_cast<const char*>(blk + 8 * QB), _MM_HINT_T0);
    __m256i v[4];
    unpack_dot<BITS>(blk, v);
    for (int m = 0; m < MR; ++m) {
      const __m256 p = _mm256_cvtepi32_ps(dot_block<BITS>(v, xe + m * 4 * K + b * 128));
      gacc[m] = _mm256_fmadd_ps(p, _mm256_broadcast_ss(dx + m * KB + b), gacc[m]);
    }
    if (--left == 0) {
      const __m256 sc = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(sg));
      const __m128 sz = _mm_loadu_ps(sg + 4);
      for (int m = 0; m < MR; ++m) {
        facc[m] = _mm256_fmadd_ps(gacc[m], sc, facc[m]);
        zacc[m] = _mm_fmadd_ps(sz, _mm_broadcast_ss(xs + m * G + g), zacc[m]);
        gacc[m] = _mm256_setzero_ps();
      }
      left = bpg;
      ++g;
      sg += 8;
    }
  }
  const int64_t n0 = nq * 4, ncols = L.N - n0 < 4 ? L.N - n0 : 4;
  for (int m = 0; m < MR; ++m) {
    const __m128 d = _mm_add_ps(_mm256_castps256_ps128(facc[m]), _mm256_extractf128_ps(facc[m], 1));
    store_cols(y + (m0 + m) * L.N + n0, _mm_sub_ps(d, zacc[m]), ncols);
  }
}

template <int BITS>
void q8_dot_range(const LayerView& L, const QuantAct& A, int64_t M, float* y, int64_t q0, int64_t q1) {
  // Rows go four (8-bit: two) at a time, each quad-block unpacked once for all of
  // them: 5-12% faster than pairs at M = 4-16 for 4-bit; 8-bit runs out of registers.
  for (int64_t nq = q0; nq < q1; ++nq) {
    int64_t m = 0;
    if constexpr (BITS != 8)
      for (; m + 4 <= M; m += 4) q8_dot_quad<BITS, 4>(L, nq, A, m, y);
    for (; m + 2 <= M; m += 2) q8_dot_quad<BITS, 2>(L, nq, A, m, y);
    if (m < M) q8_dot_quad<BITS, 1>(L, nq, A, m, y);
  }
}

}  // namespace

void q8_dot_gemv_avx2(const LayerView& L, const QuantAct& A, int64_t M, float* y, int64_t q0, int64_t q1) {
  switch (L.bits) {
    case 2: q8_dot_range<2>(L, A, M, y, q0, q1); break;
    case 3: q8_dot_range<3>(L, A, M, y, q0, q1); break;
    case 4: q8_dot_range<4>(L, A, M, y, q0, q1); break;
    default: q8_dot_range<8>(L, A, M, y, q0, q1); break;
  }
}

// Expanded vector j of a block = its dwords (4 inputs each) 2j, 2j, 2j, 2j, 2j+1 x4,
// stored in slot j, or with `paired` in slot {0, 2, 1, 3}[j]: the [X0 X2 X1 X3] order in
// which the VNNI kernel (qalora_dot_avx512.cpp) pairs the vectors of 2/3/4-bit layers.
void dot_expand_act_avx2(const int8_t* xq, int64_t M, int64_t K, int8_t* xe, bool paired) {
  const int slot_of[2][4] = {{0, 1, 2, 3}, {0, 2, 1, 3}};
  const int* slot = slot_of[paired ? 1 : 0];
  for (int64_t b = 0; b < M * K / 32; ++b) {
    const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * 32));
    for (int j = 0; j < 4; ++j) {
      const __m256i idx = _mm256_setr_epi32(2 * j, 2 * j, 2 * j, 2 * j, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xe + b * 128 + 32 * slot[j]),
                          _mm256_permutevar8x32_epi32(xb, idx));
    }
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
