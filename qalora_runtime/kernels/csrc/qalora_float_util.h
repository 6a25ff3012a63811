// Scalar and AVX2 float helpers shared by the fused ops (qalora_ops.cpp) and
// decode attention (qalora_attention.cpp): dtype dispatch, per-element
// load/store in fp32, and an 8-lane expf.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>

#include <cmath>

namespace qalora::simd {

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

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16");
}

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

}  // namespace qalora::simd
