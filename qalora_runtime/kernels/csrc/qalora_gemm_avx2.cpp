// AVX2 prefill (large M) kernel: dequantize an L2-sized tile of the packed layer
// (any layout) to fp32 once, then run a 3-row x 4-column register-blocked dot-product kernel
// over it for every row block of x. The dequantization (a few ops per weight) is
// amortized over M rows, so for large M this runs at fp32 FMA speed while the
// whole layer is never materialized (one tile per thread at a time).
#pragma GCC target("avx2,fma,f16c")
#include "qalora_layout.h"
#include "qalora_unpack_avx2.h"

namespace qalora {
namespace {

// buf[(qi*4 + c) * kGemmKC + kl] = s * q' - s*(z - off)  (exact fp32, one rounding)
template <int BITS>
void dequant_tile(const LayerView& L, int64_t qt, int64_t nquads, int64_t k0, int64_t kc, float* buf) {
  const int64_t bpg = L.bpg(), BB = 4 * BITS;
  for (int64_t qi = 0; qi < nquads; ++qi) {
    const uint8_t* wq = L.quad_q(qt + qi);
    const float* ss = L.quad_s(qt + qi);
    for (int64_t b = k0 / 32; b < (k0 + kc) / 32; ++b) {
      const float* sg = ss + (b / bpg) * 8;
      __m256i v3[4];
      if constexpr (BITS == 3) unpack3q(wq + b * 4 * BB, v3);
      for (int c = 0; c < 4; ++c) {
        __m256 wf[4];
        if constexpr (BITS == 3) to_float<3>(v3[c], wf);
        else load_float<BITS>(wq + (b * 4 + c) * BB, wf);
        const __m256 s = _mm256_broadcast_ss(sg + c);
        const __m256 sz = _mm256_broadcast_ss(sg + 4 + c);
        float* dst = buf + (qi * 4 + c) * kGemmKC + (b * 32 - k0);
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(dst + 8 * i, _mm256_fmsub_ps(wf[i], s, sz));
      }
    }
  }
}

// The same tile from the dot layout: a vpermd puts each column's 8 inputs of dot
// vector j next to each other (dwords c and c + 4), then they convert as in load_float.
template <int BITS>
void dequant_tile_dot(const LayerView& L, int64_t qt, int64_t nquads, int64_t k0, int64_t kc, float* buf) {
  const int64_t bpg = L.bpg(), QB = 16 * BITS;
  const __m256i by_column = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  alignas(32) uint8_t cols[32];
  for (int64_t qi = 0; qi < nquads; ++qi) {
    const uint8_t* wq = L.quad_q(qt + qi);
    const float* ss = L.quad_s(qt + qi);
    for (int64_t b = k0 / 32; b < (k0 + kc) / 32; ++b) {
      const float* sg = ss + (b / bpg) * 8;
      __m256i v[4];
      unpack_dot<BITS>(wq + b * QB, v);
      for (int j = 0; j < 4; ++j) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(cols), _mm256_permutevar8x32_epi32(v[j], by_column));
        for (int c = 0; c < 4; ++c) {
          const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(cols + 8 * c));
          const __m256i q = BITS == 8 ? _mm256_cvtepi8_epi32(q8) : _mm256_cvtepu8_epi32(q8);
          float* dst = buf + (qi * 4 + c) * kGemmKC + (b * 32 - k0) + 8 * j;
          _mm256_storeu_ps(dst, _mm256_fmsub_ps(_mm256_cvtepi32_ps(q), _mm256_broadcast_ss(sg + c),
                                                _mm256_broadcast_ss(sg + 4 + c)));
        }
      }
    }
  }
}

// Bit i of a byte as int32 lane i: expands 8 inputs of one bit plane (8 KB table).
struct ByteBits {
  alignas(32) int32_t v[256][8];
  constexpr ByteBits() : v() {
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 8; ++i) v[b][i] = (b >> i) & 1;
  }
};
constexpr ByteBits kByteBits{};

// The same tile from the plane layout (2/3-bit, fp32 activations): quad q is the
// half q % 2 of oct q / 2; a column's level is rebuilt 8 inputs at a time from
// one byte of each bit plane.
template <int BITS>
void dequant_tile_plane(const LayerView& L, int64_t qt, int64_t nquads, int64_t k0, int64_t kc, float* buf) {
  const int64_t bpg = L.bpg();
  for (int64_t qi = 0; qi < nquads; ++qi) {
    const int64_t q = qt + qi, half = q % 2;
    const uint32_t* po = L.oct_planes(q / 2);
    const float* so = L.oct_s(q / 2);
    for (int64_t b = k0 / 32; b < (k0 + kc) / 32; ++b) {
      const float* sg = so + (b / bpg) * 2 * kPlaneCols;
      for (int c = 0; c < 4; ++c) {
        const int64_t cc = half * 4 + c;
        const __m256 s = _mm256_broadcast_ss(sg + cc), sz = _mm256_broadcast_ss(sg + kPlaneCols + cc);
        float* dst = buf + (qi * 4 + c) * kGemmKC + (b * 32 - k0);
        for (int i = 0; i < 4; ++i) {
          __m256i v = _mm256_setzero_si256();
          for (int j = 0; j < BITS; ++j) {
            const uint32_t byte = (po[(b * BITS + j) * kPlaneCols + cc] >> (8 * i)) & 0xFFu;
            const __m256i bitv = _mm256_load_si256(reinterpret_cast<const __m256i*>(kByteBits.v[byte]));
            v = _mm256_or_si256(v, _mm256_slli_epi32(bitv, j));
          }
          _mm256_storeu_ps(dst + 8 * i, _mm256_fmsub_ps(_mm256_cvtepi32_ps(v), s, sz));
        }
      }
    }
  }
}

// y[m0+m, n0+c] += sum_k x[m, k] * w[c, k] for MR rows and 4 columns over kc inputs.
template <int MR>
void micro(const float* x, int64_t ldx, const float* w, int64_t kc, float* y, int64_t ldy, int64_t ncols) {
  __m256 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < 4; ++c) acc[m][c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; k += 8) {
    __m256 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + k);
    for (int c = 0; c < 4; ++c) {
      const __m256 wv = _mm256_loadu_ps(w + c * kGemmKC + k);
      for (int m = 0; m < MR; ++m) acc[m][c] = _mm256_fmadd_ps(xv[m], wv, acc[m][c]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    float* dst = y + m * ldy;
    __m128 r = hsum4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
    if (ncols >= 4) {
      _mm_storeu_ps(dst, _mm_add_ps(_mm_loadu_ps(dst), r));
    } else {
      float tmp[4];
      _mm_storeu_ps(tmp, r);
      for (int64_t c = 0; c < ncols; ++c) dst[c] += tmp[c];
    }
  }
}

// Round-to-nearest-even fp32 -> bf16 of 8 lanes (finite inputs: dequantized weights).
static inline __m128i to_bf16(__m256 v) {
  const __m256i i = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(i, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(i, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

template <int BITS>
void dequant_tile_any(const LayerView& L, int64_t qt, int64_t nquads, int64_t k0, int64_t kc, float* buf) {
  if (L.layout == kDotLayout) {
    dequant_tile_dot<BITS>(L, qt, nquads, k0, kc, buf);
  } else if constexpr (BITS == 2 || BITS == 3) {
    if (L.layout == kPlaneLayout) dequant_tile_plane<BITS>(L, qt, nquads, k0, kc, buf);
    else dequant_tile<BITS>(L, qt, nquads, k0, kc, buf);
  } else {
    dequant_tile<BITS>(L, qt, nquads, k0, kc, buf);
  }
}

template <int BITS>
void gemm_range(const LayerView& L, const float* x, int64_t M, float* y, int64_t q0, int64_t q1, float* buf) {
  const int64_t K = L.K;
  for (int64_t qt = q0; qt < q1; qt += kGemmQuads) {
    const int64_t nquads = q1 - qt < kGemmQuads ? q1 - qt : kGemmQuads;
    for (int64_t k0 = 0; k0 < K; k0 += kGemmKC) {
      const int64_t kc = K - k0 < kGemmKC ? K - k0 : kGemmKC;
      dequant_tile_any<BITS>(L, qt, nquads, k0, kc, buf);
      int64_t m = 0;
      for (; m + 3 <= M; m += 3) {
        for (int64_t qi = 0; qi < nquads; ++qi) {
          const int64_t n0 = (qt + qi) * 4, ncols = L.N - n0 < 4 ? L.N - n0 : 4;
          micro<3>(x + m * K + k0, K, buf + qi * 4 * kGemmKC, kc, y + m * L.N + n0, L.N, ncols);
        }
      }
      for (; m < M; ++m) {
        for (int64_t qi = 0; qi < nquads; ++qi) {
          const int64_t n0 = (qt + qi) * 4, ncols = L.N - n0 < 4 ? L.N - n0 : 4;
          micro<1>(x + m * K + k0, K, buf + qi * 4 * kGemmKC, kc, y + m * L.N + n0, L.N, ncols);
        }
      }
    }
  }
}

template <int BITS>
void dense_range(const LayerView& L, void* out, bool bf16, int64_t q0, int64_t q1, float* buf) {
  const int64_t K = L.K;
  for (int64_t qt = q0; qt < q1; qt += kGemmQuads) {
    const int64_t nquads = q1 - qt < kGemmQuads ? q1 - qt : kGemmQuads;
    const int64_t ncols = (L.N - qt * 4 < nquads * 4 ? L.N - qt * 4 : nquads * 4);
    for (int64_t k0 = 0; k0 < K; k0 += kGemmKC) {
      const int64_t kc = K - k0 < kGemmKC ? K - k0 : kGemmKC;
      dequant_tile_any<BITS>(L, qt, nquads, k0, kc, buf);
      for (int64_t c = 0; c < ncols; ++c) {
        const float* src = buf + c * kGemmKC;
        const int64_t row = (qt * 4 + c) * K + k0;
        if (bf16) {
          uint16_t* dst = static_cast<uint16_t*>(out) + row;
          for (int64_t k = 0; k < kc; k += 8)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), to_bf16(_mm256_loadu_ps(src + k)));
        } else {
          float* dst = static_cast<float*>(out) + row;
          for (int64_t k = 0; k < kc; k += 8) _mm256_storeu_ps(dst + k, _mm256_loadu_ps(src + k));
        }
      }
    }
  }
}

}  // namespace

void dequant_dense_avx2(const LayerView& L, void* out, bool bf16, int64_t q0, int64_t q1, float* buf) {
  switch (L.bits) {
    case 2: dense_range<2>(L, out, bf16, q0, q1, buf); break;
    case 3: dense_range<3>(L, out, bf16, q0, q1, buf); break;
    case 4: dense_range<4>(L, out, bf16, q0, q1, buf); break;
    default: dense_range<8>(L, out, bf16, q0, q1, buf); break;
  }
}

void dequant_tile_avx2(const LayerView& L, int64_t qt, int64_t nquads, int64_t k0, int64_t kc, float* buf) {
  switch (L.bits) {
    case 2: dequant_tile_any<2>(L, qt, nquads, k0, kc, buf); break;
    case 3: dequant_tile_any<3>(L, qt, nquads, k0, kc, buf); break;
    case 4: dequant_tile_any<4>(L, qt, nquads, k0, kc, buf); break;
    default: dequant_tile_any<8>(L, qt, nquads, k0, kc, buf); break;
  }
}

void f32_gemm_avx2(const LayerView& L, const float* x, int64_t M, float* y, int64_t q0, int64_t q1,
                   float* buf) {
  switch (L.bits) {
    case 2: gemm_range<2>(L, x, M, y, q0, q1, buf); break;
    case 3: gemm_range<3>(L, x, M, y, q0, q1, buf); break;
    case 4: gemm_range<4>(L, x, M, y, q0, q1, buf); break;
    default: gemm_range<8>(L, x, M, y, q0, q1, buf); break;
  }
}

}  // namespace qalora
