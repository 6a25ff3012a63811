// AVX-512 VNNI q8 GEMV over the dot layout (qalora_layout.h): the int8-activation
// decode path (bf16 models) on CPUs with AVX512_VNNI.
//
// The AVX2 kernel (qalora_dot_avx2.cpp) needs 4 maddubs, 3 int16 adds and a madd
// per quad-block of 128 weights. Here two dot vectors share a 512-bit register and
// one vpdpbusd does maddubs + madd + accumulate, so a quad-block is 2 vpdpbusd:
//   2/3/4-bit: registers [V0 | V2] and [V1 | V3] (4-bit: one load, a mask and a
//              shift; 2-bit: the 32 bytes in both halves, shifted 0/4 and 2/6;
//              3-bit: the AVX2 decoder's four vectors paired), activations
//              expanded in the matching order [X0 X2 X1 X3] (dot_expand_act_avx2, paired);
//   8-bit:     [V0 | V1] and [V2 | V3] straight from memory, natural order.
// vpdpbusd multiplies unsigned by signed bytes: 2/3/4-bit levels are unsigned
// already; 8-bit levels are stored signed (q - 128), so one XOR flips them back
// to q and the zero-point term takes s*(z - 128) + 128*s = s*z. The int32 lanes come
// out as the four columns' sums repeated four times; one convert and one FMA by
// the activation block scale per block, one FMA per group by the weight scales,
// and one FMA per group for the float zero-point (- s*z * sum(x_group)), as on AVX2.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#include <immintrin.h>

#include "qalora_layout.h"
#include "qalora_unpack_avx2.h"

namespace qalora {
namespace {

// A quad-block's 128 levels as two registers of unsigned bytes (order in the header).
template <int BITS>
static inline void unpack_dot512(const uint8_t* p, __m512i w[2]) {
  if constexpr (BITS == 8) {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    w[0] = _mm512_xor_si512(_mm512_loadu_si512(p), flip);
    w[1] = _mm512_xor_si512(_mm512_loadu_si512(p + 64), flip);
  } else if constexpr (BITS == 4) {
    const __m512i m = _mm512_set1_epi8(0x0F);
    const __m512i z = _mm512_loadu_si512(p);
    w[0] = _mm512_and_si512(z, m);
    w[1] = _mm512_and_si512(_mm512_srli_epi16(z, 4), m);
  } else if constexpr (BITS == 2) {
    const __m512i m = _mm512_set1_epi8(0x03);
    const __m512i b = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512i s0 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);  // [0 | 4]
    const __m512i s1 = _mm512_add_epi16(s0, _mm512_set1_epi16(2));                          // [2 | 6]
    w[0] = _mm512_and_si512(_mm512_srlv_epi16(b, s0), m);
    w[1] = _mm512_and_si512(_mm512_srlv_epi16(b, s1), m);
  } else {
    static_assert(BITS == 3, "bits must be 2, 3, 4 or 8");
    __m256i v[4];
    unpack3q(p, v);
    w[0] = _mm512_inserti64x4(_mm512_castsi256_si512(v[0]), v[2], 1);
    w[1] = _mm512_inserti64x4(_mm512_castsi256_si512(v[1]), v[3], 1);
  }
}

template <int BITS, int MR>
void q8_dot_quad512(const LayerView& L, int64_t nq, const QuantAct& A, int64_t m0, float* y) {
  const int64_t K = L.K, KB = L.kb(), G = L.groups(), bpg = L.bpg(), QB = 16 * BITS;
  const uint8_t* wq = L.quad_q(nq);
  const float* ss = L.quad_s(nq);
  const int8_t* xe = A.xe + m0 * 4 * K;
  const float* dx = A.dx + m0 * KB;
  const float* xs = A.xs + m0 * G;
  __m512 facc[MR], gacc[MR];
  __m128 zacc[MR];
  for (int m = 0; m < MR; ++m) {
    facc[m] = gacc[m] = _mm512_setzero_ps();
    zacc[m] = _mm_setzero_ps();
  }
  const uint8_t* blk = wq;
  const float* sg = ss;
  int64_t left = bpg, g = 0;
  for (int64_t b = 0; b < KB; ++b, blk += QB) {
    // 2 KB ahead: the AVX2 kernels' 512 B left this host's DRAM latency exposed.
    _mm_prefetch(reinterpret_cast<const char*>(blk) + 2048, _MM_HINT_T0);
    if constexpr (BITS == 8) _mm_prefetch(reinterpret_cast<const char*>(blk) + 2048 + 64, _MM_HINT_T0);
    __m512i w[2];
    unpack_dot512<BITS>(blk, w);
    for (int m = 0; m < MR; ++m) {
      const int8_t* xb = xe + m * 4 * K + b * 128;
      __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_loadu_si512(xb));
      acc = _mm512_dpbusd_epi32(acc, w[1], _mm512_loadu_si512(xb + 64));
      gacc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(dx[m * KB + b]), gacc[m]);
    }
    if (--left == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(sg) + 1024, _MM_HINT_T0);
      const __m128 s4 = _mm_loadu_ps(sg);
      const __m512 sc = _mm512_broadcast_f32x4(s4);
      __m128 sz = _mm_loadu_ps(sg + 4);
      if constexpr (BITS == 8) sz = _mm_fmadd_ps(s4, _mm_set1_ps(128.0f), sz);  // unsigned levels: s*z
      for (int m = 0; m < MR; ++m) {
        facc[m] = _mm512_fmadd_ps(gacc[m], sc, facc[m]);
        zacc[m] = _mm_fmadd_ps(sz, _mm_set1_ps(xs[m * G + g]), zacc[m]);
        gacc[m] = _mm512_setzero_ps();
      }
      left = bpg;
      ++g;
      sg += 8;
    }
  }
  const int64_t n0 = nq * 4, ncols = L.N - n0 < 4 ? L.N - n0 : 4;
  for (int m = 0; m < MR; ++m) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(facc[m]), _mm512_extractf32x8_ps(facc[m], 1));
    const __m128 d = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    store_cols(y + (m0 + m) * L.N + n0, _mm_sub_ps(d, zacc[m]), ncols);
  }
}

template <int BITS>
void q8_dot_range512(const LayerView& L, const QuantAct& A, int64_t M, float* y, int64_t q0, int64_t q1) {
  for (int64_t nq = q0; nq < q1; ++nq) {  // rows four at a time share each unpacked quad-block
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) q8_dot_quad512<BITS, 4>(L, nq, A, m, y);
    for (; m + 2 <= M; m += 2) q8_dot_quad512<BITS, 2>(L, nq, A, m, y);
    if (m < M) q8_dot_quad512<BITS, 1>(L, nq, A, m, y);
  }
}

}  // namespace

void q8_dot_gemv_avx512(const LayerView& L, const QuantAct& A, int64_t M, float* y, int64_t q0, int64_t q1) {
  switch (L.bits) {
    case 2: q8_dot_range512<2>(L, A, M, y, q0, q1); break;
    case 3: q8_dot_range512<3>(L, A, M, y, q0, q1); break;
    case 4: q8_dot_range512<4>(L, A, M, y, q0, q1); break;
    default: q8_dot_range512<8>(L, A, M, y, q0, q1); break;
  }
}

}  // namespace qalora
