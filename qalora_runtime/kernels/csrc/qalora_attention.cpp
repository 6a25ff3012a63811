// Decode attention: one query token per sequence over its paged KV cache (CPU, fp32 and bf16).
//
// cache[blocks, block_size, 2, kv_heads, D]. Scores and the softmax are fp32 (as
// transformers' eager attention). Keys and values are read straight from the
// cache (no gather copy). The AVX-512 span kernel (head_dim 64 or 128) converts a
// cached row to fp32 once per KV head, for all its query heads (GQA); the AVX2
// one, for any head_dim, converts it per query head.
//
// Threads split the work by token spans, as flash-decoding does: with fewer
// sequences than threads, a sequence's keys are cut into spans; each span yields
// per query head (max score, sum of exponentials, unnormalized output) and the
// spans are merged. A span reads whole token rows front to back. The split by KV
// head it replaces read a part of every row on each thread and, with the cache
// cold (a decode step streams ~80 MB of weights between two visits of a layer),
// ran slower on 2 threads than on 1 (SmolLM2, 151 tokens: 52-72 vs 35 us a layer).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "qalora_float_util.h"
#include "qalora_layout.h"
#include "qalora_ops.h"

namespace {

using namespace qalora::simd;

// A span shorter than this is not worth a thread: its merge and wake-up would cost more.
constexpr int64_t kMinSpan = 32;
// The key pass prefetches the whole row (keys and values) of the token this far
// ahead: a cold cache is read at DRAM latency otherwise, one token at a time.
constexpr int64_t kPrefetchTokens = 8;

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

// sc[t] = exp(sc[t] - max) in place; returns the sum, and the max in *mx.
__attribute__((target("avx2,fma"))) float exp_sum_avx2(float* sc, int64_t n, float* mx_out) {
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
  *mx_out = mx;
  return sum;
}

struct AttnShape {
  int64_t block_size, kvh, D, max_blocks, window, H, qs;
  float scale;
};

// One span's partial result: per query head its max score, sum of exponentials
// and unnormalized output, laid out [m: H][l: H][acc: H * D].
struct Partial {
  float* p;
  int64_t H;
  float* m() const { return p; }
  float* l() const { return p + H; }
  float* acc() const { return p + 2 * H; }
};

// All query heads of one sequence over tokens [s0, s1). qf: the query, fp32, pre-scaled.
template <typename T>
__attribute__((target("avx2,fma"))) void attend_span(const AttnShape& S, const float* qf, const T* cache,
                                                   const int64_t* table, int64_t s0, int64_t s1,
                                                   std::vector<float>& scores, const Partial& out) {
  const int64_t D = S.D, H = S.H, group = S.H / S.kvh, tok_stride = 2 * S.kvh * D, n = s1 - s0;
  auto token = [&](int64_t p) {
    return cache + (table[p / S.block_size] * S.block_size + p % S.block_size) * tok_stride;
  };
  scores.resize(H * n);
  const int64_t row_bytes = tok_stride * static_cast<int64_t>(sizeof(T));
  for (int64_t p = s0; p < s1; ++p) {
    if (p + kPrefetchTokens < s1) {
      const char* row = reinterpret_cast<const char*>(token(p + kPrefetchTokens));
      for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(row + off, _MM_HINT_T0);
    }
    const T* k = token(p);
    for (int64_t j = 0; j < H; ++j) scores[j * n + (p - s0)] = dot_avx2(qf + j * D, k + (j / group) * D, D);
  }
  for (int64_t j = 0; j < H; ++j) out.l()[j] = exp_sum_avx2(scores.data() + j * n, n, out.m() + j);
  float* acc = out.acc();
  std::fill(acc, acc + H * D, 0.0f);
  for (int64_t p = s0; p < s1; ++p) {
    const T* v = token(p) + S.kvh * D;
    for (int64_t j = 0; j < H; ++j) axpy_avx2(scores[j * n + (p - s0)], v + (j / group) * D, acc + j * D, D);
  }
}

// 16 lanes of x as fp32 (AVX-512).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) inline __m512 load16(const float* x) {
  return _mm512_loadu_ps(x);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) inline __m512 load16(const BFloat16* x) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// attend_span on AVX-512 for head_dim = 16 * ND: each cached row is converted to
// fp32 once into registers and used by every query head of its KV head (the AVX2
// version converts it once per query head), and a dot product needs ND FMAs and
// one reduction instead of 2 ND and a longer one. Same visiting order, same math.
template <typename T, int ND>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) void attend_span512(
    const AttnShape& S, const float* qf, const T* cache, const int64_t* table, int64_t s0, int64_t s1,
    std::vector<float>& scores, const Partial& out) {
  constexpr int64_t D = 16 * ND;
  const int64_t H = S.H, kvh = S.kvh, group = S.H / S.kvh, tok_stride = 2 * kvh * D, n = s1 - s0;
  auto token = [&](int64_t p) {
    return cache + (table[p / S.block_size] * S.block_size + p % S.block_size) * tok_stride;
  };
  scores.resize(H * n);
  const int64_t row_bytes = tok_stride * static_cast<int64_t>(sizeof(T));
  for (int64_t p = s0; p < s1; ++p) {
    if (p + kPrefetchTokens < s1) {
      const char* row = reinterpret_cast<const char*>(token(p + kPrefetchTokens));
      for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(row + off, _MM_HINT_T0);
    }
    const T* k = token(p);
    for (int64_t h = 0; h < kvh; ++h) {
      __m512 kv[ND];
      for (int i = 0; i < ND; ++i) kv[i] = load16(k + h * D + 16 * i);
      for (int64_t j = h * group; j < (h + 1) * group; ++j) {
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qf + j * D), kv[0]);
        for (int i = 1; i < ND; ++i) a = _mm512_fmadd_ps(_mm512_loadu_ps(qf + j * D + 16 * i), kv[i], a);
        scores[j * n + (p - s0)] = _mm512_reduce_add_ps(a);
      }
    }
  }
  for (int64_t j = 0; j < H; ++j) out.l()[j] = exp_sum_avx2(scores.data() + j * n, n, out.m() + j);
  float* acc = out.acc();
  std::fill(acc, acc + H * D, 0.0f);
  for (int64_t p = s0; p < s1; ++p) {
    const T* v = token(p) + kvh * D;
    for (int64_t h = 0; h < kvh; ++h) {
      __m512 vv[ND];
      for (int i = 0; i < ND; ++i) vv[i] = load16(v + h * D + 16 * i);
      for (int64_t j = h * group; j < (h + 1) * group; ++j) {
        const __m512 w = _mm512_set1_ps(scores[j * n + (p - s0)]);
        float* aj = acc + j * D;
        for (int i = 0; i < ND; ++i) _mm512_storeu_ps(aj + 16 * i, _mm512_fmadd_ps(w, vv[i], _mm512_loadu_ps(aj + 16 * i)));
      }
    }
  }
}

// The span kernel for this shape and CPU: AVX-512 for head_dim 64 or 128, else AVX2.
template <typename T>
using SpanFn = void (*)(const AttnShape&, const float*, const T*, const int64_t*, int64_t, int64_t,
                        std::vector<float>&, const Partial&);

template <typename T>
SpanFn<T> span_kernel(int64_t D) {
  if (qalora::cpu_isa() >= qalora::kIsaAvx512) {
    if (D == 64) return &attend_span512<T, 4>;
    if (D == 128) return &attend_span512<T, 8>;
  }
  return &attend_span<T>;
}

// out = softmax-weighted values of a sequence from its spans' partials.
template <typename T>
void merge_spans(const Partial* parts, int64_t spans, int64_t H, int64_t D, T* out) {
  for (int64_t j = 0; j < H; ++j) {
    float mx = -INFINITY;
    for (int64_t s = 0; s < spans; ++s) mx = std::max(mx, parts[s].m()[j]);
    float w[64], denom = 0.0f;  // spans <= threads; at::get_num_threads() is capped below
    for (int64_t s = 0; s < spans; ++s) denom += parts[s].l()[j] * (w[s] = std::exp(parts[s].m()[j] - mx));
    const float inv = 1.0f / denom;
    for (int64_t d = 0; d < D; ++d) {
      float v = 0.0f;
      for (int64_t s = 0; s < spans; ++s) v += w[s] * parts[s].acc()[j * D + d];
      store_f(out + j * D, d, v * inv);
    }
  }
}

template <typename T>
void decode_attention_impl(const AttnShape& S, const T* q, const T* cache, const int64_t* tables,
                           const int64_t* lens, int64_t B, T* out) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), 64);
  const int64_t want = B >= threads ? 1 : (threads + B - 1) / B;  // spans per sequence, before the length cap
  const int64_t H = S.H, D = S.D, part_floats = H * (D + 2);
  std::vector<int64_t> first(B + 1, 0), begin(B);  // item range and first attended key per sequence
  for (int64_t b = 0; b < B; ++b) {
    begin[b] = S.window > 0 ? std::max<int64_t>(0, lens[b] - S.window) : 0;
    const int64_t n = lens[b] - begin[b];
    first[b + 1] = first[b] + std::max<int64_t>(1, std::min(want, n / kMinSpan));
  }
  std::vector<float> parts(first[B] * part_floats);
  const SpanFn<T> attend = span_kernel<T>(D);
  at::parallel_for(0, first[B], 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> scores, qf(H * D);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = std::upper_bound(first.begin(), first.end(), w) - first.begin() - 1;
      const int64_t spans = first[b + 1] - first[b], i = w - first[b], n = lens[b] - begin[b];
      const T* qb = q + b * S.qs;
      for (int64_t e = 0; e < H * D; ++e) qf[e] = load_f(qb, e) * S.scale;
      const Partial part{parts.data() + w * part_floats, H};
      attend(S, qf.data(), cache, tables + b * S.max_blocks, begin[b] + n * i / spans,
             begin[b] + n * (i + 1) / spans, scores, part);
      if (spans == 1) merge_spans(&part, 1, H, D, out + b * H * D);
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    const int64_t spans = first[b + 1] - first[b];
    if (spans == 1) continue;
    std::vector<Partial> ps;
    for (int64_t s = 0; s < spans; ++s) ps.push_back(Partial{parts.data() + (first[b] + s) * part_floats, H});
    merge_spans(ps.data(), spans, H, D, out + b * H * D);
  }
}

}  // namespace

namespace qalora {

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
}  // namespace qalora
