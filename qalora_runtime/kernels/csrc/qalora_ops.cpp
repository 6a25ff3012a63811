// Fused element-wise and attention ops of the decoder layer (CPU, fp32 and bf16).
//
// At decode sizes (one token: 576 hidden, 9 heads) each PyTorch op costs a few
// microseconds of dispatch and allocation and a composite like rms_norm runs
// ~10 of them; measured on SmolLM2 this overhead was ~40% of a token. Each
// function here replaces a chain of ops with one call that does its math in
// fp32 and rounds once to the tensor's dtype. Decode attention reads keys and
// values straight from the paged cache (no gather copy).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

#include "qalora_layout.h"
#include "qalora_ops.h"

namespace {

using c10::BFloat16;

inline float load_f(const float* p, int64_t i) { return p[i]; }
inline float load_f(const BFloat16* p, int64_t i) { return static_cast<float>(p[i]); }
inline void store_f(float* p, int64_t i, float v) { p[i] = v; }
inline void store_f(BFloat16* p, int64_t i, float v) { p[i] = BFloat16(v); }

// Runs f(scalar tag) for the two activation dtypes the runtime uses.
template <typename F>
void dispatch_float(at::ScalarType t, const F& f) {
  if (t == at::kFloat) {
    f(float{});
  } else {
    f(BFloat16{});
  }
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16");
}

// Rows are independent; split them across threads only when there are enough
// elements for a thread to pay for its wake-up.
template <typename F>
void for_rows(int64_t rows, int64_t row_elems, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(row_elems, 1));
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) f(r);
  });
}

// ---- rms norm ---------------------------------------------------------------
template <typename T>
void rms_norm_rows(T* x, T* res, T* out, const T* w, int64_t rows, int64_t H, int64_t xs, int64_t rs,
                   int64_t os, float eps) {
  for_rows(rows, H, [&](int64_t r) {
    T* xr = x + r * xs;
    T* rr = res ? res + r * rs : nullptr;
    T* orow = out + r * os;
    double ss = 0.0;
    if (rr) {
      // residual += x, rounded to the stream's dtype exactly like torch's add.
      for (int64_t i = 0; i < H; ++i) {
        store_f(rr, i, load_f(rr, i) + load_f(xr, i));
        const float v = load_f(rr, i);
        ss += static_cast<double>(v) * v;
      }
    } else {
      for (int64_t i = 0; i < H; ++i) {
        const float v = load_f(xr, i);
        ss += static_cast<double>(v) * v;
      }
    }
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / H) + eps);
    const T* src = rr ? rr : xr;
    for (int64_t i = 0; i < H; ++i) store_f(orow, i, load_f(src, i) * inv * load_f(w, i));
  });
}

// ---- silu(gate) * up ----------------------------------------------------------
// Cephes-style expf on 8 lanes (relative error ~2e-7 over the clamped range).
__attribute__((target("avx2,fma"))) inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) void silu_mul_f32_avx2(const float* g, const float* u, float* o, int64_t n) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 den = _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
    _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

template <typename T>
void silu_mul_rows(const T* gu, T* out, int64_t rows, int64_t I, int64_t gs, int64_t os, bool simd) {
  for_rows(rows, I, [&](int64_t r) {
    const T* g = gu + r * gs;
    const T* u = g + I;
    T* o = out + r * os;
    if constexpr (std::is_same_v<T, float>) {
      if (simd) return silu_mul_f32_avx2(g, u, o, I);
    }
    std::vector<float> gf(I), uf(I), of(I);
    for (int64_t i = 0; i < I; ++i) gf[i] = load_f(g, i), uf[i] = load_f(u, i);
    if (simd) {
      silu_mul_f32_avx2(gf.data(), uf.data(), of.data(), I);
    } else {
      for (int64_t i = 0; i < I; ++i) of[i] = gf[i] / (1.0f + std::exp(-gf[i])) * uf[i];
    }
    for (int64_t i = 0; i < I; ++i) store_f(o, i, of[i]);
  });
}

// ---- rotary embedding ----------------------------------------------------------
// x' = x * cos + roll(x, D/2) * sin_signed (sin_signed carries rotate_half's sign).
template <typename T>
void rope_rows(T* x, int64_t rows, int64_t xs, int64_t heads, int64_t D, const float* cos_t,
               const float* sin_t, const int64_t* pos) {
  const int64_t half = D / 2;
  for_rows(rows, heads * D, [&](int64_t r) {
    const float* c = cos_t + pos[r] * D;
    const float* s = sin_t + pos[r] * D;
    float buf[512];
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + r * xs + h * D;
      for (int64_t i = 0; i < D; ++i) buf[i] = load_f(v, i);
      for (int64_t i = 0; i < D; ++i) {
        const float rot = buf[i < half ? i + half : i - half];
        store_f(v, i, buf[i] * c[i] + rot * s[i]);
      }
    }
  });
}

// ---- decode attention over the paged cache ----------------------------------------
// One query token per sequence; cache[blocks, block_size, 2, kv_heads, D]. Scores
// and the softmax are fp32 (as transformers' eager attention); each cached row is
// converted to fp32 once and used by all query heads of its KV head (GQA).
// 8 lanes of x as fp32: plain loads for float, widen-and-shift for bfloat16.
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
__attribute__((target("avx2,fma"))) inline __m256 load8(const BFloat16* x) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <typename T>
__attribute__((target("avx2,fma"))) inline float dot_avx2(const float* a, const T* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
  acc0 = _mm256_add_ps(acc0, acc1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float r = _mm_cvtss_f32(h);
  for (; i < n; ++i) r += a[i] * load_f(b, i);
  return r;
}

template <typename T>
__attribute__((target("avx2,fma"))) inline void axpy_avx2(float w, const T* x, float* y, int64_t n) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(wv, load8(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += w * load_f(x, i);
}

// In-place softmax of n scores (fp32, max-subtracted).
__attribute__((target("avx2,fma"))) void softmax_avx2(float* sc, int64_t n) {
  float mx = -INFINITY;
  for (int64_t t = 0; t < n; ++t) mx = std::max(mx, sc[t]);
  const __m256 mv = _mm256_set1_ps(mx);
  __m256 sv = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + t), mv));
    _mm256_storeu_ps(sc + t, e);
    sv = _mm256_add_ps(sv, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sv);
  float sum = 0.0f;
  for (float l : lanes) sum += l;
  for (; t < n; ++t) sum += (sc[t] = std::exp(sc[t] - mx));
  const float inv = 1.0f / sum;
  for (int64_t u = 0; u < n; ++u) sc[u] *= inv;
}

struct AttnShape {
  int64_t block_size, kvh, D, max_blocks, window, H, qs;
  float scale;
};

// One work item: sequence b, KV heads [h0, h1). Keys are visited token by token so
// the cache is read front to back: a token's K (later V) for all heads of the item
// is one contiguous run. Visiting head by head instead (a 128-byte read every 768
// bytes) measured ~4x slower once the cache is cold.
template <typename T>
__attribute__((target("avx2,fma"))) void attend_avx2(const AttnShape& S, const T* q, const T* cache,
                                                   const int64_t* table, int64_t len, int64_t h0, int64_t h1,
                                                   T* out, std::vector<float>& scores, std::vector<float>& acc,
                                                   std::vector<float>& qf) {
  const int64_t D = S.D, group = S.H / S.kvh, tok_stride = 2 * S.kvh * D;
  const int64_t nq = (h1 - h0) * group;  // query heads of this item, in order
  const int64_t start = S.window > 0 ? std::max<int64_t>(0, len - S.window) : 0;
  const int64_t L = len - start;
  scores.resize(nq * L);
  acc.assign(nq * D, 0.0f);
  qf.resize(nq * D);
  const T* qb = q + h0 * group * D;
  for (int64_t i = 0; i < nq * D; ++i) qf[i] = load_f(qb, i) * S.scale;
  auto token = [&](int64_t p) {
    return cache + (table[p / S.block_size] * S.block_size + p % S.block_size) * tok_stride;
  };
  for (int64_t p = start; p < len; ++p) {
    const T* k = token(p) + h0 * D;
    for (int64_t j = 0; j < nq; ++j) scores[j * L + (p - start)] = dot_avx2(qf.data() + j * D, k + (j / group) * D, D);
  }
  for (int64_t j = 0; j < nq; ++j) softmax_avx2(scores.data() + j * L, L);
  for (int64_t p = start; p < len; ++p) {
    const T* v = token(p) + S.kvh * D + h0 * D;
    for (int64_t j = 0; j < nq; ++j) axpy_avx2(scores[j * L + (p - start)], v + (j / group) * D, acc.data() + j * D, D);
  }
  T* ob = out + h0 * group * D;
  for (int64_t i = 0; i < nq * D; ++i) store_f(ob, i, acc[i]);
}

template <typename T>
void decode_attention_impl(const AttnShape& S, const T* q, const T* cache, const int64_t* tables,
                           const int64_t* lens, int64_t B, T* out) {
  // Split a sequence's heads across threads only when there are fewer sequences than threads.
  const int64_t threads = at::get_num_threads();
  const int64_t splits = B >= threads ? 1 : std::min<int64_t>(S.kvh, threads);
  const int64_t per = (S.kvh + splits - 1) / splits;
  at::parallel_for(0, B * splits, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> scores, acc, qf;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / splits, h0 = (w % splits) * per, h1 = std::min(S.kvh, h0 + per);
      if (h0 < h1)
        attend_avx2<T>(S, q + b * S.qs, cache, tables + b * S.max_blocks, lens[b], h0, h1,
                       out + b * S.H * S.D, scores, acc, qf);
    }
  });
}

}  // namespace

namespace qalora {

at::Tensor rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                    double eps) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [rows, hidden] with contiguous rows");
  const int64_t rows = x.size(0), H = x.size(1);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous() && weight.numel() == H,
              "weight must be a contiguous [hidden] tensor of x's dtype");
  at::Tensor res;
  if (residual.has_value()) {
    res = *residual;
    TORCH_CHECK(res.scalar_type() == x.scalar_type() && res.sizes() == x.sizes() && res.stride(1) == 1,
                "residual must match x");
  }
  at::Tensor out = at::empty({rows, H}, x.options());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), res.defined() ? res.data_ptr<scalar_t>() : nullptr,
                            out.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), rows, H, x.stride(0),
                            res.defined() ? res.stride(0) : 0, H, static_cast<float>(eps));
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_float(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "gate_up must be [rows, 2 * intermediate] with contiguous rows");
  const int64_t rows = gate_up.size(0), I = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, I}, gate_up.options());
  const bool simd = cpu_has_avx2();
  dispatch_float(gate_up.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    silu_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, I,
                            gate_up.stride(0), I, simd);
  });
  return out;
}

void rope_(at::Tensor& x, int64_t heads, int64_t head_dim, const at::Tensor& cos_table,
           const at::Tensor& sin_table, const at::Tensor& positions) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && heads * head_dim <= x.size(1),
              "x must be [rows, >= heads * head_dim] with contiguous rows");
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= 512, "head_dim must be even and <= 512");
  TORCH_CHECK(cos_table.scalar_type() == at::kFloat && sin_table.scalar_type() == at::kFloat &&
                  cos_table.is_contiguous() && sin_table.is_contiguous() &&
                  cos_table.numel() == sin_table.numel() && cos_table.numel() % head_dim == 0,
              "cos/sin tables must be contiguous float32 [positions, head_dim]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  positions.numel() == x.size(0), "positions must be contiguous int64 [rows]");
  const int64_t npos = cos_table.numel() / head_dim;
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t r = 0; r < x.size(0); ++r)
    TORCH_CHECK(pos[r] >= 0 && pos[r] < npos, "position ", pos[r], " outside the rotary table");
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    rope_rows<scalar_t>(x.data_ptr<scalar_t>(), x.size(0), x.stride(0), heads, head_dim,
                        cos_table.data_ptr<float>(), sin_table.data_ptr<float>(), pos);
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, int64_t window, double scale) {
  check_float(q, "q");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "q must be [B, heads, head_dim] with contiguous rows");
  TORCH_CHECK(cache.scalar_type() == q.scalar_type() && cache.dim() == 5 && cache.is_contiguous() &&
                  cache.size(2) == 2 && cache.size(4) == q.size(2),
              "cache must be contiguous [blocks, block_size, 2, kv_heads, head_dim] of q's dtype");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), kvh = cache.size(3);
  TORCH_CHECK(D <= 512 && H % kvh == 0, "head_dim must be <= 512 and heads a multiple of kv_heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 &&
                  block_tables.is_contiguous() && block_tables.size(0) == B,
              "block_tables must be contiguous int64 [B, max_blocks]");
  TORCH_CHECK(seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous() && seq_lens.numel() == B,
              "seq_lens must be contiguous int64 [B]");
  const int64_t bs = cache.size(1), max_blocks = block_tables.size(1), nblocks = cache.size(0);
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= max_blocks * bs, "sequence length ", lens[b], " outside its block table");
    for (int64_t j = 0; j < (lens[b] + bs - 1) / bs; ++j)
      TORCH_CHECK(tables[b * max_blocks + j] >= 0 && tables[b * max_blocks + j] < nblocks, "block id outside the cache");
  }
  TORCH_CHECK(cpu_has_avx2(), "decode_attention needs AVX2/FMA (use the PyTorch path)");
  at::Tensor out = at::empty({B, H * D}, q.options());
  const AttnShape S{bs, kvh, D, max_blocks, window, H, q.stride(0), static_cast<float>(scale)};
  dispatch_float(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    decode_attention_impl<scalar_t>(S, q.data_ptr<scalar_t>(), cache.data_ptr<scalar_t>(), tables, lens, B,
                                    out.data_ptr<scalar_t>());
  });
  return out;
}

void packed_embedding(const at::Tensor& ids, const at::Tensor& qw, const at::Tensor& ss, int64_t bits,
                      int64_t group, int64_t N, at::Tensor& out, int64_t layout) {
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.dim() == 1, "ids must be int64 [T]");
  check_float(out, "out");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == ids.numel(), "out must be [T, K]");
  TORCH_CHECK(layout == kQuadLayout || layout == kDotLayout || (layout == kPlaneLayout && (bits == 2 || bits == 3)),
              "bad layout");
  const int64_t K = out.size(1);
  TORCH_CHECK(group > 0 && K % group == 0 && K % 32 == 0, "group does not divide K");
  const LayerView L{qw.data_ptr<uint8_t>(), ss.data_ptr<float>(), K, N, bits, group, layout};
  TORCH_CHECK(qw.scalar_type() == at::kByte && qw.is_contiguous() && qw.numel() == L.qw_bytes(),
              "qw does not match K, N, bits");
  TORCH_CHECK(ss.scalar_type() == at::kFloat && ss.is_contiguous() && ss.numel() == L.ss_floats(),
              "ss does not match K, N, group");
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < ids.numel(); ++t)
    TORCH_CHECK(id[t] >= 0 && id[t] < N, "token id ", id[t], " outside the vocabulary of ", N);
  dispatch_float(out.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t t = 0; t < ids.numel(); ++t)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = k / group;
        // Same formula as the GEMV paths: s * stored level - s * (z - offset).
        store_f(o + t * K, k, L.scale(id[t], g) * static_cast<float>(L.level(id[t], k)) - L.scale_zero(id[t], g));
      }
  });
}

}  // namespace qalora
