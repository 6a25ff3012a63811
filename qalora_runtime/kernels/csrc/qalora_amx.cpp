// AMX bf16 GEMM over the dot layout (qalora_layout.h): the large-M (prefill) path
// of bf16 models on CPUs with AMX-BF16.
//
// Dequantizing a whole layer to bf16 and calling ATen's GEMM (MODE_DENSE's
// fallback) writes and re-reads the dense layer, and oneDNN reorders it into its
// own blocked format on every call: ~170 us for a 576x1536 layer before any math
// on this host. Here a block of 16 output columns is dequantized once per call
// straight into AMX "A" tiles (16 columns x 32 inputs of bf16, 1 KB, kept in L2
// for the whole K; two blocks at a time), and the product is computed transposed, y^T = W^T x^T:
// x^T is packed once per call into the pair-interleaved "B" tiles
// ([16 input pairs][16 rows][2]), so the weights need no interleaving at all.
// tdpbf16ps accumulates in fp32; each weight is rounded once to bf16 (round to
// nearest even) from s * q - s*z, the same rounding a bf16 dense weight has.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,avx2,fma,f16c")
#include <immintrin.h>

#include "qalora_dequant_bf16.h"
#include "qalora_layout.h"
#include "qalora_shuffle_avx512.h"

namespace qalora {
namespace {

constexpr int64_t kTileElems = 16 * 32;  // bf16 elements of one 16 x 64-byte tile

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: C (16 columns x 16 rows fp32), 4: A (weights), 5-7: B (activations).
void load_tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// Quad-block b of quad nq -> rows 4*qi .. 4*qi+3 of A tile b (column c's 32 inputs as bf16).
template <int BITS>
void dequant_quad_block(const LayerView& L, int64_t nq, int64_t b, int64_t qi, uint16_t* a) {
  const uint8_t* blk = L.quad_q(nq) + b * 16 * BITS;
  // The same block of the next column block (4 quads on): its stream warms while this one is used.
  const int64_t ahead = 4 * L.kb() * 16 * BITS;
  for (int64_t off = 0; off < 16 * BITS; off += 64) _mm_prefetch(reinterpret_cast<const char*>(blk) + ahead + off, _MM_HINT_T0);
  if (b % L.bpg() == 0) _mm_prefetch(reinterpret_cast<const char*>(L.quad_s(nq + 4) + (b / L.bpg()) * 8), _MM_HINT_T0);
  dequant_quad_block_bf16<BITS>(L, nq, b, a + b * kTileElems + qi * 4 * 32, 32);
}

// NC column blocks (A tiles 4, 5; their weights at a and a + KC tiles) times NM m-blocks
// from mb0 (B tiles 6, 7): C tiles 0-3 = (c, m) pairs, each loaded tile used twice,
// so the packed activations are read once per two column blocks. -> cbuf[c * 2 + m].
template <int NC, int NM>
void tile_product(const uint16_t* a, const uint16_t* xt, int64_t KC, int64_t mb0, float* cbuf) {
  _tile_zero(0);
  if constexpr (NM > 1) _tile_zero(1);
  if constexpr (NC > 1) _tile_zero(2);
  if constexpr (NC > 1 && NM > 1) _tile_zero(3);
  const uint16_t* b0 = xt + mb0 * KC * kTileElems;  // m-block mb0's tiles, contiguous along K
  for (int64_t kc = 0; kc < KC; ++kc) {
    _tile_loadd(4, a + kc * kTileElems, 64);
    _tile_loadd(6, b0 + kc * kTileElems, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NM > 1) {
      _tile_loadd(7, b0 + (KC + kc) * kTileElems, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (NC > 1) {
      _tile_loadd(5, a + (KC + kc) * kTileElems, 64);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NM > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, cbuf, 64);
  if constexpr (NM > 1) _tile_stored(1, cbuf + 256, 64);
  if constexpr (NC > 1) _tile_stored(2, cbuf + 512, 64);
  if constexpr (NC > 1 && NM > 1) _tile_stored(3, cbuf + 768, 64);
}

// Column block cb (quads 4cb .. 4cb+3) -> its KC A tiles at a (missing quads as zeros).
template <int BITS>
void dequant_column_block(const LayerView& L, int64_t cb, uint16_t* a) {
  for (int64_t b = 0; b < L.kb(); ++b)
    for (int64_t qi = 0; qi < 4; ++qi) {
      const int64_t nq = cb * 4 + qi;
      if (nq < L.quads()) dequant_quad_block<BITS>(L, nq, b, qi, a);
      else
        for (int c = 0; c < 4; ++c) _mm512_storeu_si512(a + b * kTileElems + (qi * 4 + c) * 32, _mm512_setzero_si512());
    }
}

template <int BITS>
void amx_range(const LayerView& L, const uint16_t* xt, int64_t M, uint16_t* y, int64_t c0, int64_t c1,
               uint16_t* a) {
  const int64_t KC = L.kb(), MB = (M + 15) / 16;
  alignas(64) float cbuf[4 * 256];
  for (int64_t cb = c0; cb < c1; cb += 2) {
    const int64_t nc = c1 - cb < 2 ? c1 - cb : 2;
    for (int64_t ci = 0; ci < nc; ++ci) dequant_column_block<BITS>(L, cb + ci, a + ci * KC * kTileElems);
    for (int64_t mb0 = 0; mb0 < MB; mb0 += 2) {
      const int64_t nm = MB - mb0 < 2 ? MB - mb0 : 2;
      if (nc == 2) {
        if (nm == 2) tile_product<2, 2>(a, xt, KC, mb0, cbuf);
        else tile_product<2, 1>(a, xt, KC, mb0, cbuf);
      } else {
        if (nm == 2) tile_product<1, 2>(a, xt, KC, mb0, cbuf);
        else tile_product<1, 1>(a, xt, KC, mb0, cbuf);
      }
      // cbuf[c * 2 + i][n][m] is y[(mb0 + i) * 16 + m, (cb + c) * 16 + n]: transpose, round to bf16.
      for (int64_t ci = 0; ci < nc; ++ci) {
        const int64_t n0 = (cb + ci) * 16, ncols = L.N - n0 < 16 ? L.N - n0 : 16;
        const __mmask16 keep = static_cast<__mmask16>((1u << ncols) - 1u);
        for (int64_t i = 0; i < nm; ++i) {
          __m512 rows[16];
          transpose16(cbuf + (ci * 2 + i) * 256, rows);
          const int64_t m0 = (mb0 + i) * 16, live = M - m0 < 16 ? M - m0 : 16;
          for (int64_t mm = 0; mm < live; ++mm)
            _mm256_mask_storeu_epi16(y + (m0 + mm) * L.N + n0, keep, (__m256i)_mm512_cvtneps_pbh(rows[mm]));
        }
      }
    }
  }
}

}  // namespace

int64_t amx_xt_elems(int64_t M, int64_t K) { return (M + 15) / 16 * 16 * K; }
int64_t amx_weight_buf_elems(int64_t K) { return 2 * (K / 32) * kTileElems; }  // two column blocks

void amx_pack_x(const uint16_t* x, int64_t M, int64_t K, uint16_t* xt) {
  const int64_t MB = (M + 15) / 16, KC = K / 32;
  const int* xp = reinterpret_cast<const int*>(x);  // bf16 pairs (2r, 2r+1) as dwords
  int* out = reinterpret_cast<int*>(xt);
  const __m512i by_row = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(K / 2)));
  for (int64_t mb = 0; mb < MB; ++mb) {
    const int64_t rows = M - mb * 16 < 16 ? M - mb * 16 : 16;
    const __mmask16 live = static_cast<__mmask16>((1u << rows) - 1u);  // rows past M stay zero
    for (int64_t kc = 0; kc < KC; ++kc) {
      int* tile = out + (mb * KC + kc) * 256;  // [16 pairs][16 rows], an m-block's tiles along K
      const int* src = xp + mb * 16 * (K / 2) + kc * 16;
      for (int64_t r = 0; r < 16; ++r)
        _mm512_storeu_si512(tile + r * 16, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, by_row, src + r, 4));
    }
  }
}

void amx_gemm_dot(const LayerView& L, const uint16_t* xt, int64_t M, uint16_t* y, int64_t c0, int64_t c1,
                  uint16_t* wbuf) {
  load_tile_config();
  switch (L.bits) {
    case 2: amx_range<2>(L, xt, M, y, c0, c1, wbuf); break;
    case 3: amx_range<3>(L, xt, M, y, c0, c1, wbuf); break;
    case 4: amx_range<4>(L, xt, M, y, c0, c1, wbuf); break;
    default: amx_range<8>(L, xt, M, y, c0, c1, wbuf); break;
  }
  _tile_release();
}

}  // namespace qalora
