// Torch bindings for the qalora CPU fused kernels: argument checks, activation
// preparation, runtime ISA dispatch and at::parallel_for over output quads.
// The SIMD translation units are compiled for AVX2 or AVX-512 via `#pragma GCC
// target` and only entered after cpu_has_avx2() / cpu_has_avx512(); everything
// here is baseline x86-64.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "qalora_layout.h"
#include "qalora_ops.h"

namespace qalora {

bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

// AMX needs the CPU bits (CPUID 7.0 EDX: 22 AMX-BF16, 24 AMX-TILE; 7.1 EAX 5:
// AVX512-BF16 for the conversions) and, on Linux, the process's permission to use
// the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA).
bool cpu_has_amx_bf16() {
  static const bool ok = [] {
    if (!cpu_has_avx512()) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !((a >> 5) & 1u)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

bool cpu_has_avx512_bf16() {
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
}

int64_t cpu_isa_supported() {
  return cpu_has_amx_bf16() ? kIsaAmx : cpu_has_avx512() ? kIsaAvx512 : cpu_has_avx2() ? kIsaAvx2 : kIsaScalar;
}

// The best supported level, capped by QALORA_CPU_ISA (scalar | avx2 | avx512 | amx), read
// once: a debugging and A/B switch, not a tuning knob.
int64_t cpu_isa() {
  static const int64_t isa = [] {
    const int64_t best = cpu_isa_supported();
    const char* env = std::getenv("QALORA_CPU_ISA");
    if (env == nullptr || *env == '\0') return best;
    const std::string name(env);
    const int64_t cap = name == "scalar" ? kIsaScalar : name == "avx2" ? kIsaAvx2 : name == "avx512" ? kIsaAvx512
                        : name == "amx"  ? kIsaAmx : -1;
    TORCH_CHECK(cap >= 0, "QALORA_CPU_ISA must be scalar, avx2, avx512 or amx, got '", name, "'");
    return cap < best ? cap : best;
  }();
  return isa;
}

// Exact scalar path: per-element dequantize and fp32 accumulate (any CPU, any layout).
void f32_gemv_scalar(const LayerView& L, const float* x, int64_t M, float* y, int64_t n0, int64_t n1) {
  const int64_t K = L.K;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = k / L.group;
        acc += (L.scale(n, g) * static_cast<float>(L.level(n, k)) - L.scale_zero(n, g)) * x[m * K + k];
      }
      y[m * L.N + n] = acc;
    }
}

}  // namespace qalora

namespace {

// kBf16Gemm: products in bf16 (x and W rounded to bf16, fp32 sums) for any layout
// and activation dtype; fp32 x gets the fp32 sums (the opt-in fp32 prefill), bf16
// x the same as kDense.
enum Mode : int64_t { kQ8 = 0, kF32 = 1, kGemm = 2, kDense = 3, kBf16Gemm = 4 };

// dtype conversions by hand: at decode sizes Tensor::to() costs more in dispatch
// and allocation (~6 us per call, measured) than the conversion itself.
at::Tensor to_f32(const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat) return x.contiguous();
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(xc.sizes(), xc.options().dtype(at::kFloat));
  const c10::BFloat16* src = xc.data_ptr<c10::BFloat16>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0, n = xc.numel(); i < n; ++i) dst[i] = static_cast<float>(src[i]);
  return out;
}

at::Tensor from_f32(const at::Tensor& y, at::ScalarType dtype) {
  at::Tensor out = at::empty(y.sizes(), y.options().dtype(dtype));
  const float* src = y.data_ptr<float>();
  c10::BFloat16* dst = out.data_ptr<c10::BFloat16>();
  for (int64_t i = 0, n = y.numel(); i < n; ++i) dst[i] = c10::BFloat16(src[i]);
  return out;
}

// The dense weight of the kDense path, one per thread and dtype, grown to the
// largest layer seen: a fresh multi-MB allocation per call would pay its page
// faults every time (torch's CPU allocator does not cache).
at::Tensor& dense_scratch(int64_t numel, at::ScalarType dtype) {
  thread_local at::Tensor f32, bf16;
  at::Tensor& t = dtype == at::kFloat ? f32 : bf16;
  if (!t.defined() || t.numel() < numel) t = at::empty({numel}, at::TensorOptions().dtype(dtype));
  return t;
}

// W^T [N, K] of the layer dequantized in dtype (fp32 exact, bf16 rounded to nearest
// even) into this thread's dense scratch, for ATen's GEMM.
at::Tensor dense_weight(const qalora::LayerView& L, at::ScalarType dtype) {
  const int64_t N = L.N, K = L.K;
  at::Tensor w = dense_scratch(N * K, dtype).narrow(0, 0, N * K).view({N, K});
  void* wp = w.data_ptr();
  const bool bf16 = dtype == at::kBFloat16;
  at::parallel_for(0, L.quads(), qalora::kGemmQuads, [&](int64_t b, int64_t e) {
    std::vector<float> buf(qalora::kGemmQuads * 4 * qalora::kGemmKC);
    qalora::dequant_dense_avx2(L, wp, bf16, b, e, buf.data());
  });
  return w;
}

// kBf16Gemm for fp32 x: y (fp32) = bf16(x) @ bf16(W) with fp32 sums, any layout.
// The AVX512-BF16 kernel where it runs (AMX hosts have it too), else ATen's bf16
// GEMM over a bf16 dense copy (oneDNN decides how it multiplies).
at::Tensor bf16_gemm_f32(const at::Tensor& x, const qalora::LayerView& L, int64_t isa) {
  const int64_t M = x.size(0), N = L.N;
  const at::Tensor xb = x.contiguous().to(at::kBFloat16);
  if (isa >= qalora::kIsaAvx512 && qalora::cpu_has_avx512_bf16()) {
    at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));  // the first K tile stores
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr<c10::BFloat16>());
    float* yp = y.data_ptr<float>();
    // Plane layers and 2/3-bit quads are rounded through an exact fp32 tile.
    const bool f32_tile = L.layout == qalora::kPlaneLayout || (L.layout == qalora::kQuadLayout && L.bits < 4);
    at::parallel_for(0, L.quads(), qalora::kGemmQuads, [&](int64_t b, int64_t e) {
      const at::Tensor wbuf = at::empty({qalora::kBf16TileElems}, xb.options());  // 64-byte aligned
      const at::Tensor fbuf = at::empty({f32_tile ? qalora::kGemmQuads * 4 * qalora::kGemmKC : 0}, y.options());
      qalora::bf16_gemm_avx512(L, xp, M, yp, nullptr, b, e,
                               reinterpret_cast<uint16_t*>(wbuf.data_ptr<c10::BFloat16>()), fbuf.data_ptr<float>());
    });
    return y;
  }
  TORCH_CHECK(isa >= qalora::kIsaAvx2, "the bf16 GEMM mode needs AVX2");
  return at::linear(xb, dense_weight(L, at::kBFloat16)).to(at::kFloat);
}

at::Tensor qalora_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& ss, int64_t bits,
                         int64_t group, int64_t N, int64_t mode, int64_t isa, int64_t layout) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8");
  TORCH_CHECK(mode >= kQ8 && mode <= kBf16Gemm,
              "mode must be 0 (q8), 1 (f32), 2 (gemm), 3 (dense) or 4 (bf16 gemm)");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(group > 0 && group % 32 == 0 && K % group == 0, "bad group size for K");
  TORCH_CHECK(qw.scalar_type() == at::kByte && qw.is_contiguous(), "qw must be contiguous uint8");
  TORCH_CHECK(ss.scalar_type() == at::kFloat && ss.is_contiguous(), "ss must be contiguous float32");
  TORCH_CHECK(layout == qalora::kQuadLayout || layout == qalora::kDotLayout ||
                  (layout == qalora::kPlaneLayout && (bits == 2 || bits == 3)),
              "layout must be 0 (quad), 1 (plane, 2/3-bit only) or 2 (dot)");
  if (isa < 0) isa = qalora::cpu_isa();
  TORCH_CHECK(isa <= qalora::cpu_isa_supported(), "isa ", isa, " is not supported by this CPU (best: ",
              qalora::cpu_isa_supported(), ")");
  const qalora::LayerView L{qw.data_ptr<uint8_t>(), ss.data_ptr<float>(), K, N, bits, group, layout};
  TORCH_CHECK(qw.numel() == L.qw_bytes(), "qw size does not match K, N, bits and layout");
  TORCH_CHECK(ss.numel() == L.ss_floats(), "ss size does not match K, N, group and layout");
  const int64_t quads = L.quads();
  const bool simd = isa >= qalora::kIsaAvx2;

  if (mode == kBf16Gemm && x.scalar_type() == at::kBFloat16) mode = kDense;
  if (mode == kBf16Gemm) return bf16_gemm_f32(x, L, isa);
  if (mode == kDense && isa >= qalora::kIsaAmx && layout == qalora::kDotLayout && x.scalar_type() == at::kBFloat16) {
    // AMX tiles straight from the packed layer: no dense copy, no oneDNN reorder.
    const at::Tensor xb = x.contiguous();
    at::Tensor xt = at::empty({qalora::amx_xt_elems(M, K)}, xb.options());
    uint16_t* xtp = reinterpret_cast<uint16_t*>(xt.data_ptr<c10::BFloat16>());
    qalora::amx_pack_x(reinterpret_cast<const uint16_t*>(xb.data_ptr<c10::BFloat16>()), M, K, xtp);
    at::Tensor y = at::empty({M, N}, xb.options());
    uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>());
    at::parallel_for(0, (quads + 3) / 4, 2, [&](int64_t b, int64_t e) {
      std::vector<uint16_t> wbuf(qalora::amx_weight_buf_elems(K));
      qalora::amx_gemm_dot(L, xtp, M, yp, b, e, wbuf.data());
    });
    return y;
  }
  if (mode == kDense && isa >= qalora::kIsaAvx512 && layout == qalora::kDotLayout &&
      x.scalar_type() == at::kBFloat16 && qalora::cpu_has_avx512_bf16()) {
    // vdpbf16ps over L2-sized bf16 tiles dequantized per call: no dense copy of the layer.
    const at::Tensor xb = x.contiguous();
    at::Tensor acc = at::empty({M, N}, xb.options().dtype(at::kFloat));  // the first K tile stores
    at::Tensor y = at::empty({M, N}, xb.options());
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr<c10::BFloat16>());
    uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>());
    float* accp = acc.data_ptr<float>();
    at::parallel_for(0, quads, qalora::kGemmQuads, [&](int64_t b, int64_t e) {
      const at::Tensor wbuf = at::empty({qalora::kBf16TileElems}, xb.options());  // 64-byte aligned
      qalora::bf16_gemm_avx512(L, xp, M, accp, yp, b, e, reinterpret_cast<uint16_t*>(wbuf.data_ptr<c10::BFloat16>()),
                               nullptr);
    });
    return y;
  }
  if (simd && mode == kDense) {
    // Fallback (fp32 x, non-dot layouts, CPUs without AVX512-BF16, ISA caps):
    // dequantize W^T once in x's dtype (bf16 rounded, fp32 exact) and let ATen's
    // GEMM (oneDNN / MKL) do the multiply.
    return at::linear(x.contiguous(), dense_weight(L, x.scalar_type()));
  }

  const at::Tensor xf = to_f32(x);
  // Each layout has one GEMV: quad and plane the exact fp32 one, dot the q8 one.
  // A GEMV request of the other kind runs the layout's own, except an exact
  // request on a dot layer, which takes the (exact) tiled GEMM.
  const bool gemm = mode == kGemm || (layout == qalora::kDotLayout && mode == kF32);
  at::Tensor y = (simd && gemm) ? at::zeros({M, N}, xf.options()) : at::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t G = K / group;

  if (!simd) {
    at::parallel_for(0, N, 32, [&](int64_t b, int64_t e) { qalora::f32_gemv_scalar(L, xp, M, yp, b, e); });
  } else if (gemm) {
    at::parallel_for(0, quads, qalora::kGemmQuads, [&](int64_t b, int64_t e) {
      // 64-byte aligned (a std::vector is 16): unaligned zmm loads of the tile split cache lines.
      const at::Tensor tile = at::empty({qalora::kGemmQuads * 4 * qalora::kGemmKC}, xf.options());
      float* buf = tile.data_ptr<float>();
      if (isa >= qalora::kIsaAvx512) qalora::f32_gemm_avx512(L, xp, M, yp, b, e, buf);
      else qalora::f32_gemm_avx2(L, xp, M, yp, b, e, buf);
    });
  } else if (layout == qalora::kPlaneLayout && isa >= qalora::kIsaAvx512) {
    at::Tensor prep = at::empty({qalora::plane_prep_floats_avx512(L, M)}, xf.options());
    float* pp = prep.data_ptr<float>();
    qalora::plane_prepare_avx512(L, xp, M, pp);
    at::parallel_for(0, L.pairs(), 2,
                     [&](int64_t b, int64_t e) { qalora::plane_gemv_avx512(L, pp, M, yp, b, e); });
  } else if (layout == qalora::kPlaneLayout) {
    at::Tensor prep = at::empty({qalora::plane_prep_floats(L, M)}, xf.options());
    float* pp = prep.data_ptr<float>();
    qalora::plane_prepare_avx2(L, xp, M, pp);
    at::parallel_for(0, L.octs(), 4, [&](int64_t b, int64_t e) { qalora::plane_gemv_avx2(L, pp, M, yp, b, e); });
  } else if (layout == qalora::kDotLayout) {
    // int8 activations [M, K], then the same bytes in dot-vector order [M, 4K].
    at::Tensor xq = at::empty({M, 5 * K}, xf.options().dtype(at::kChar));
    at::Tensor dx = at::empty({M, K / 32}, xf.options());
    at::Tensor xs = at::empty({M, G}, xf.options());
    int8_t* xqp = xq.data_ptr<int8_t>();
    int8_t* xep = xqp + M * K;
    float* dxp = dx.data_ptr<float>();
    float* xsp = xs.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      qalora::quantize_act_avx2(xp + m * K, K, group, xqp + m * K, dxp + m * (K / 32), xsp + m * G);
    const bool vnni = isa >= qalora::kIsaAvx512;
    qalora::dot_expand_act_avx2(xqp, M, K, xep, vnni && bits != 8);
    const qalora::QuantAct A{xep, dxp, xsp};
    at::parallel_for(0, quads, 8, [&](int64_t b, int64_t e) {
      if (vnni) qalora::q8_dot_gemv_avx512(L, A, M, yp, b, e);
      else qalora::q8_dot_gemv_avx2(L, A, M, yp, b, e);
    });
  } else {
    // Per-group sums of x (zero-point term) or a permuted x (3-bit), by the kernel's rules.
    at::Tensor xa = at::empty({qalora::f32_prep_floats(L, M)}, xf.options());
    float* xap = xa.data_ptr<float>();
    qalora::f32_prepare_avx2(L, xp, M, xap);
    const bool wide = isa >= qalora::kIsaAvx512 && bits == 4;  // 8-bit measured faster on AVX2
    at::parallel_for(0, quads, 8, [&](int64_t b, int64_t e) {
      if (wide) qalora::f32_gemv_avx512(L, xap, M, yp, b, e);
      else qalora::f32_gemv_avx2(L, xp, xap, M, yp, b, e);
    });
  }
  return x.scalar_type() == at::kFloat ? y : from_f32(y, x.scalar_type());
}

}  // namespace

namespace qalora {

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& ss, int64_t bits,
                         int64_t group, int64_t N, int64_t mode, int64_t layout) {
  return qalora_linear(x, qw, ss, bits, group, N, mode, -1, layout);
}

}  // namespace qalora

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qalora fused low-bit CPU kernels (float zero-points)";
  // The long-running calls release the GIL (like ATen ops do), so the server's
  // event loop keeps streaming and accepting requests while the engine thread
  // computes a step. The few-microsecond ops keep it: a release costs about as much.
  using release_gil = py::call_guard<py::gil_scoped_release>;
  m.def("linear", &qalora_linear,
        "y = x @ W for a packed layer (layout 0: quad, 1: plane, 2: dot; isa -1: best, 0: scalar, "
        "1: avx2, 2: avx512, 3: amx)",
        py::arg("x"), py::arg("qw"), py::arg("ss"), py::arg("bits"), py::arg("group"), py::arg("N"),
        py::arg("mode"), py::arg("isa") = -1, py::arg("layout") = 0, release_gil());
  m.def("rms_norm", &qalora::rms_norm, "(residual += x) then RMSNorm, one pass", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("silu_mul", &qalora::silu_mul, "silu(gate) * up of a fused gate_up projection", py::arg("gate_up"));
  m.def("rope_", &qalora::rope_, "rotary embedding in place on the first heads of each row", py::arg("x"),
        py::arg("heads"), py::arg("head_dim"), py::arg("cos_table"), py::arg("sin_table"), py::arg("positions"));
  m.def("decode_attention", &qalora::decode_attention, "one-token attention over the paged KV cache",
        py::arg("q"), py::arg("cache"), py::arg("block_tables"), py::arg("seq_lens"), py::arg("window"),
        py::arg("scale"), release_gil());
  m.def("packed_embedding", &qalora::packed_embedding, "embedding lookup from a packed [hidden -> vocab] layer",
        py::arg("ids"), py::arg("qw"), py::arg("ss"), py::arg("bits"), py::arg("group"), py::arg("N"),
        py::arg("out"), py::arg("layout") = 0);
  qalora::register_fused_decoder(m);
  m.def("has_avx2", &qalora::cpu_has_avx2, "whether the AVX2/FMA paths can run on this CPU");
  m.def("isa_supported", &qalora::cpu_isa_supported,
        "best kernel ISA level of this CPU (0 scalar, 1 avx2, 2 avx512, 3 amx)");
  m.def("has_amx_bf16", &qalora::cpu_has_amx_bf16, "whether the AMX bf16 prefill path can run here");
  m.def("has_avx512_bf16", &qalora::cpu_has_avx512_bf16, "whether the AVX512-BF16 prefill path can run here");
  m.def("isa", &qalora::cpu_isa, "the ISA level the kernels use (isa_supported capped by QALORA_CPU_ISA)");
}
