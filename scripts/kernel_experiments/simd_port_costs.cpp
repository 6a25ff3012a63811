// Throughput of the AVX2 instructions the exact fp32 GEMV is made of, alone and
// mixed, in units of one multiply's throughput cost (vmulps runs on the FMA pipes) (so the numbers do not depend on
// the TSC or the clock). Answers "which instructions compete for the same
// execution pipes on this host", which decides whether a low-bit decode trick
// can beat the 4-bit path (docs/BENCHMARKS.md, "Why the exact fp32 path ..."), and
// why the q8 GEMV reduces four columns without vphaddw ("q8 GEMV on the dot layout").
//
//   g++ -O2 scripts/kernel_experiments/simd_port_costs.cpp -o /tmp/ports && /tmp/ports
//
// Every block is 32 or 48 independent instructions (no dependency chains longer
// than the op latency allows), repeated; x86-64 with AVX2/FMA only.
#include <x86intrin.h>

#include <cstdio>

#define R4(x) x x x x
#define CLOBBER "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13"
#define OP8(op) op "%%ymm0, %%ymm1, %%ymm2\n" op "%%ymm0, %%ymm1, %%ymm3\n" op "%%ymm0, %%ymm1, %%ymm4\n" op \
  "%%ymm0, %%ymm1, %%ymm5\n" op "%%ymm0, %%ymm1, %%ymm6\n" op "%%ymm0, %%ymm1, %%ymm7\n" op                  \
  "%%ymm0, %%ymm1, %%ymm8\n" op "%%ymm0, %%ymm1, %%ymm9\n"
// Multiplies (same pipes as FMA) into registers nothing reads: no dependency chains.
#define MUL4 "vmulps %%ymm0, %%ymm1, %%ymm10\n vmulps %%ymm0, %%ymm1, %%ymm11\n" \
  "vmulps %%ymm0, %%ymm1, %%ymm12\n vmulps %%ymm0, %%ymm1, %%ymm13\n"

template <int K>
double ticks() {  // TSC ticks per loop iteration
  const long n = 20000000;
  const unsigned long t0 = __rdtsc();
  for (long i = 0; i < n; ++i) {
    if constexpr (K == 0) asm volatile(R4(OP8("vmulps ") MUL4) ::: CLOBBER);  // 48 MUL
    if constexpr (K == 1) asm volatile(R4(OP8("vpand ")) ::: CLOBBER);               // 32 AND
    if constexpr (K == 2) asm volatile(R4("vcvtdq2ps %%ymm1, %%ymm2\n vcvtdq2ps %%ymm1, %%ymm3\n vcvtdq2ps %%ymm1, %%ymm4\n vcvtdq2ps %%ymm1, %%ymm5\n vcvtdq2ps %%ymm1, %%ymm6\n vcvtdq2ps %%ymm1, %%ymm7\n vcvtdq2ps %%ymm1, %%ymm8\n vcvtdq2ps %%ymm1, %%ymm9\n") ::: CLOBBER);
    if constexpr (K == 3) asm volatile(R4(OP8("vpermps ")) ::: CLOBBER);             // 32 table lookups
    if constexpr (K == 4) asm volatile(R4(OP8("vpmaddwd ")) ::: CLOBBER);            // 32 int16 dot pairs
    if constexpr (K == 5) asm volatile(R4(OP8("vpmaddubsw ")) ::: CLOBBER);          // 32 u8*s8 dot pairs
    if constexpr (K == 6) asm volatile(R4(OP8("vpermps ") MUL4 MUL4) ::: CLOBBER);   // 32 perm + 32 MUL
    if constexpr (K == 7) asm volatile(R4("vcvtdq2ps %%ymm1, %%ymm2\n vcvtdq2ps %%ymm1, %%ymm3\n" MUL4 MUL4) ::: CLOBBER);  // 8 cvt + 32 MUL
    if constexpr (K == 8) asm volatile(R4(OP8("vpmaddwd ") MUL4 MUL4) ::: CLOBBER);  // 32 pmaddwd + 32 MUL
    if constexpr (K == 9) asm volatile(R4("vaddps %%ymm0, %%ymm1, %%ymm2\n vaddps %%ymm0, %%ymm1, %%ymm3\n vaddps %%ymm0, %%ymm1, %%ymm4\n vaddps %%ymm0, %%ymm1, %%ymm5\n" MUL4 MUL4) ::: CLOBBER);  // 16 add + 32 MUL
    if constexpr (K == 10) asm volatile(R4(OP8("vphaddw ")) ::: CLOBBER);            // 32 horizontal int16 adds
    if constexpr (K == 11) asm volatile(R4(OP8("vpaddw ")) ::: CLOBBER);             // 32 int16 adds
  }
  return static_cast<double>(__rdtsc() - t0) / n;
}

int main() {
  const double fma = ticks<0>() / 48;  // cost unit: one multiply (FMA pipes) at full throughput
  struct Row { const char* what; double t, fmas; } rows[] = {
      {"vpand (per op)", ticks<1>() / 32, 0},        {"vcvtdq2ps (per op)", ticks<2>() / 32, 0},
      {"vpermps (per op)", ticks<3>() / 32, 0},      {"vpmaddwd (per op)", ticks<4>() / 32, 0},
      {"vpmaddubsw (per op)", ticks<5>() / 32, 0},   {"32 vpermps + 32 MUL", ticks<6>(), 32},
      {"8 vcvtdq2ps + 32 MUL", ticks<7>(), 32},     {"32 vpmaddwd + 32 MUL", ticks<8>(), 32},
      {"16 vaddps + 32 MUL", ticks<9>(), 32},
      {"vphaddw (per op)", ticks<10>() / 32, 0},     {"vpaddw (per op)", ticks<11>() / 32, 0},
  };
  std::printf("cost in multiply-throughput units (1 vmulps = 1.00, the FMA pipes; a mix costing more than its multiplies competes with them)\n");
  for (const Row& r : rows) {
    if (r.fmas == 0) std::printf("  %-24s %6.2f\n", r.what, r.t / fma);
    else std::printf("  %-24s %6.2f  (its multiplies alone: %.0f)\n", r.what, r.t / fma, r.fmas);
  }
}
