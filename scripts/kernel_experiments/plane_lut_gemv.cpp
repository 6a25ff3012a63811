// Experiment behind the plane layout: can a bit-plane lookup-table GEMV make the
// *exact fp32* decode of 2- and 3-bit weights faster than the 4-bit path? This
// is the first variant (8-entry tables over 3 inputs, cross-lane vpermps); the
// production kernel (qalora_plane_avx2.cpp) uses 4-entry tables over 2 inputs
// with the in-lane vpermilps, which costs half a vpermps on this CPU.
//
// Idea (T-MAC style, fp32 tables): store each bit plane of 8 columns x 32 rows as
// 8 dwords (bit r of column c's dword = bit j of level q[r, c]); per 3 activation
// rows build the 8-entry table of all their subset sums; one vpermps then yields
// sum(bit * x) over 3 rows for 8 columns, so a b-bit layer costs b lookups per
// 3 rows instead of one int->float convert + FMA per row. Measured side by side
// with the production quad-layout f32 GEMV (qalora_gemv_avx2.cpp) in one run.
//
//   g++ -O3 -std=c++17 -Iqalora_runtime/kernels/csrc scripts/kernel_experiments/plane_lut_gemv.cpp \
//       qalora_runtime/kernels/csrc/qalora_gemv_avx2.cpp -o /tmp/plane && /tmp/plane 4096 4096
//
// Arguments: K N [pool layers; default: enough for > 64 MB, i.e. beyond L3].
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "qalora_layout.h"

using namespace qalora;

namespace {

constexpr int kTriples = 11;  // rows 0-29 in 10 triples, rows 30-31 (+ a zero row) in the 11th

// Per 32-row block: 11 tables [0, a, b, a+b, c, a+c, b+c, a+b+c]; per group: sum of x.
void build_tables(const float* x, int64_t K, int64_t group, float* T, float* xs) {
  for (int64_t b = 0; b < K / 32; ++b)
    for (int t = 0; t < kTriples; ++t) {
      const float a = x[b * 32 + 3 * t], c1 = x[b * 32 + 3 * t + 1], c2 = t < 10 ? x[b * 32 + 3 * t + 2] : 0.f;
      float* d = T + (b * kTriples + t) * 8;
      d[0] = 0; d[1] = a; d[2] = c1; d[3] = a + c1; d[4] = c2; d[5] = a + c2; d[6] = c1 + c2; d[7] = (a + c1) + c2;
    }
  for (int64_t g = 0; g < K / group; ++g) {
    float s = 0;
    for (int64_t i = 0; i < group; ++i) s += x[g * group + i];
    xs[g] = s;
  }
}

// P[N/8][K/32][BITS][8] plane dwords, ss[N/8][G][2][8] (s, s*z): y = sum_g s*sum(q x) - s*z*sum_g(x).
template <int BITS>
void plane_gemv(const uint32_t* P, const float* ss, const float* T, const float* xs, int64_t K, int64_t N,
                int64_t group, float* y) {
  const int64_t KB = K / 32, G = K / group, bpg = group / 32;
  for (int64_t o = 0; o < N / 8; ++o) {
    __m256 facc = _mm256_setzero_ps(), zacc = _mm256_setzero_ps();
    const uint32_t* po = P + o * KB * BITS * 8;
    const float* so = ss + o * G * 16;
    for (int64_t g = 0; g < G; ++g) {
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
        __m256i p[BITS];
        for (int j = 0; j < BITS; ++j) p[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(po + (b * BITS + j) * 8));
        _mm_prefetch(reinterpret_cast<const char*>(po + (b + 8) * BITS * 8), _MM_HINT_T0);
        const float* tb = T + b * kTriples * 8;
#pragma GCC unroll 11
        for (int t = 0; t < kTriples; ++t) {
          const __m256 tab = _mm256_loadu_ps(tb + 8 * t);
          for (int j = 0; j < BITS; ++j) {  // vpermps reads only the low 3 bits of each index lane
            const __m256 v = _mm256_permutevar8x32_ps(tab, t == 0 ? p[j] : _mm256_srli_epi32(p[j], 3 * t));
            __m256& a = acc[(t * BITS + j) % 4];
            a = j == 0 ? _mm256_add_ps(a, v) : _mm256_fmadd_ps(v, _mm256_set1_ps(static_cast<float>(1 << j)), a);
          }
        }
      }
      const __m256 gs = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
      facc = _mm256_fmadd_ps(gs, _mm256_loadu_ps(so + g * 16), facc);
      zacc = _mm256_fmadd_ps(_mm256_loadu_ps(so + g * 16 + 8), _mm256_broadcast_ss(xs + g), zacc);
    }
    _mm256_storeu_ps(y + o * 8, _mm256_sub_ps(facc, zacc));
  }
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

template <class F>
double seconds_per_call(F&& call, int pool) {
  int it = 0;
  const double t0 = now();
  while (now() - t0 < 1.0) call(it++ % pool);
  return (now() - t0) / it;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) { std::fprintf(stderr, "usage: %s K N [pool]\n", argv[0]); return 2; }
  const int64_t K = std::atoll(argv[1]), N = std::atoll(argv[2]), group = 32, KB = K / 32, G = K / group;
  if (K % 32 || N % 8) { std::fprintf(stderr, "K must be a multiple of 32 and N of 8\n"); return 2; }
  std::vector<float> x(K), y(N), T(KB * kTriples * 8), xs(G), ss(N / 8 * G * 16), ssq(N / 4 * G * 8, 0.5f), xa(G + K);
  for (auto& v : x) v = std::rand() / static_cast<float>(RAND_MAX) - 0.5f;
  for (auto& v : ss) v = std::rand() / static_cast<float>(RAND_MAX);
  build_tables(x.data(), K, group, T.data(), xs.data());
  std::printf("K=%lld N=%lld M=1, 1 thread, us per call (GB/s of packed levels)\n", (long long)K, (long long)N);
  for (int bits : {2, 3, 4}) {
    const int64_t bytes = N * K * bits / 8;
    const int pool = argc > 3 ? std::atoi(argv[3]) : static_cast<int>(64e6 / bytes) + 1;
    std::vector<std::vector<uint32_t>> planes(pool, std::vector<uint32_t>(bytes / 4));
    std::vector<std::vector<uint8_t>> quads(pool, std::vector<uint8_t>(bytes));
    for (auto& p : planes) for (auto& v : p) v = static_cast<uint32_t>(std::rand()) * 2654435761u ^ std::rand();
    for (auto& q : quads) for (auto& v : q) v = static_cast<uint8_t>(std::rand());
    auto plane = [&](int i) {
      const uint32_t* P = planes[i].data();
      if (bits == 2) plane_gemv<2>(P, ss.data(), T.data(), xs.data(), K, N, group, y.data());
      else if (bits == 3) plane_gemv<3>(P, ss.data(), T.data(), xs.data(), K, N, group, y.data());
      else plane_gemv<4>(P, ss.data(), T.data(), xs.data(), K, N, group, y.data());
    };
    // Correctness of the plane kernel against float64 on the first layer.
    plane(0);
    double err = 0, mag = 0;
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t o = n / 8, c = n % 8, b = k / 32, r = k % 32, g = k / group;
        int level = 0;
        for (int j = 0; j < bits; ++j) level |= ((planes[0][((o * KB + b) * bits + j) * 8 + c] >> r) & 1) << j;
        acc += (static_cast<double>(ss[(o * G + g) * 16 + c]) * level - ss[(o * G + g) * 16 + 8 + c]) * x[k];
      }
      err = std::fmax(err, std::fabs(acc - y[n]));
      mag = std::fmax(mag, std::fabs(acc));
    }
    const LayerView L0{quads[0].data(), ssq.data(), K, N, bits, group};
    f32_prepare_avx2(L0, x.data(), 1, xa.data());
    auto quad = [&](int i) {
      const LayerView L{quads[i].data(), ssq.data(), K, N, bits, group};
      f32_gemv_avx2(L, x.data(), xa.data(), 1, y.data(), 0, N / 4);
    };
    const double tp = seconds_per_call(plane, pool), tq = seconds_per_call(quad, pool);
    std::printf("  %d-bit: plane LUT %8.1f (%5.2f)  max rel err %.1e | production quad f32 %8.1f (%5.2f)\n", bits,
                tp * 1e6, bytes / tp / 1e9, err / mag, tq * 1e6, bytes / tq / 1e9);
  }
}
