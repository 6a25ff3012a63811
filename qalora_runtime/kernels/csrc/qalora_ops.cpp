// Fused element-wise and attention ops of the decoder layer (CPU, fp32 and bf16).
//
// At decode sizes (one token: 576 hidden, 9 heads) each PyTorch op costs a few
// microseconds of dispatch and allocation and a composite like rms_norm runs
// ~10 of them; measured on SmolLM2 this overhead was ~40% of a token. Each
// function here replaces a chain of ops with one call that does its math in
// fp32 and rounds once to the tensor's dtype. Decode attention is in
// qalora_attention.cpp.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

#include "qalora_float_util.h"
#include "qalora_layout.h"
#include "qalora_ops.h"

namespace {

using namespace qalora::simd;

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
