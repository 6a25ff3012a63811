// The whole decoder stack of a decode step (one new token per sequence) in one C++ call.
//
// With every op of a layer already fused, a SmolLM2 decode token still spent
// ~5 ms of ~16 ms in Python: module calls, argument conversion and dispatch,
// ~15 crossings per layer x 30 layers. FusedDecoder holds the layers' packed
// weights, norms and KV caches (registered once from Python) and runs
// norm -> qkv -> rope -> cache write -> attention -> o -> norm -> gate_up ->
// silu*mul -> down for every layer without returning to Python. Prefill and
// mixed steps keep the Python path; both use the same kernels.
#include <torch/extension.h>

#include <cstring>
#include <vector>

#include "qalora_ops.h"

namespace qalora {

namespace {

struct LinearW {
  at::Tensor qw, ss;
  c10::optional<at::Tensor> bias;
  int64_t bits, group, N, layout;

  at::Tensor operator()(const at::Tensor& x, int64_t mode) const {
    at::Tensor y = packed_linear(x, qw, ss, bits, group, N, mode, layout);
    if (bias.has_value()) y.add_(*bias);
    return y;
  }
};

struct LayerW {
  at::Tensor input_norm, post_norm;
  LinearW qkv, o, gate_up, down;
  int64_t window;
  at::Tensor cache;  // [blocks, block_size, 2, kv_heads, head_dim]
};

LinearW make_linear(const at::Tensor& qw, const at::Tensor& ss, const c10::optional<at::Tensor>& bias,
                    int64_t bits, int64_t group, int64_t N, int64_t layout) {
  TORCH_CHECK(qw.scalar_type() == at::kByte && qw.is_contiguous(), "qw must be contiguous uint8");
  TORCH_CHECK(ss.scalar_type() == at::kFloat && ss.is_contiguous(), "ss must be contiguous float32");
  if (bias.has_value()) TORCH_CHECK(bias->dim() == 1 && bias->numel() == N, "bias must be [N]");
  return LinearW{qw, ss, bias, bits, group, N, layout};
}

class FusedDecoder {
 public:
  FusedDecoder(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate,
               double eps, double scale, at::Tensor final_norm)
      : hidden_(hidden), heads_(heads), kvh_(kv_heads), dim_(head_dim), inter_(intermediate), eps_(eps),
        scale_(scale), final_norm_(std::move(final_norm)) {
    TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "heads must be a multiple of kv_heads");
    TORCH_CHECK(final_norm_.dim() == 1 && final_norm_.numel() == hidden, "final norm must be [hidden]");
  }

  void add_layer(at::Tensor input_norm, at::Tensor post_norm, LinearW qkv, LinearW o, LinearW gate_up,
                 LinearW down, int64_t window, at::Tensor cache) {
    const auto dtype = final_norm_.scalar_type();
    TORCH_CHECK(input_norm.numel() == hidden_ && post_norm.numel() == hidden_ &&
                    input_norm.scalar_type() == dtype && post_norm.scalar_type() == dtype,
                "layer norms must be [hidden] of the model dtype");
    TORCH_CHECK(qkv.N == (heads_ + 2 * kvh_) * dim_, "qkv projection has the wrong output size");
    TORCH_CHECK(o.N == hidden_ && down.N == hidden_, "o/down projections must output hidden");
    TORCH_CHECK(gate_up.N == 2 * inter_, "gate_up projection must output 2 * intermediate");
    TORCH_CHECK(cache.dim() == 5 && cache.is_contiguous() && cache.scalar_type() == dtype &&
                    cache.size(2) == 2 && cache.size(3) == kvh_ && cache.size(4) == dim_,
                "cache must be contiguous [blocks, block_size, 2, kv_heads, head_dim] of the model dtype");
    layers_.push_back(LayerW{std::move(input_norm), std::move(post_norm), std::move(qkv), std::move(o),
                             std::move(gate_up), std::move(down), window, std::move(cache)});
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x: embeddings [B, hidden] (becomes the residual stream and is modified).
  // Returns final_norm(last residual) [B, hidden].
  at::Tensor forward(at::Tensor x, const at::Tensor& positions, const at::Tensor& slots,
                     const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cos_table,
                     const at::Tensor& sin_table, int64_t mode) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == hidden_ && x.is_contiguous() &&
                    x.scalar_type() == final_norm_.scalar_type(),
                "x must be contiguous [B, hidden] of the model dtype");
    const int64_t B = x.size(0);
    TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == B,
                "slots must be contiguous int64 [B]");
    const int64_t* slot = slots.data_ptr<int64_t>();
    const int64_t q_size = heads_ * dim_, kv_cols = 2 * kvh_ * dim_;
    const int64_t esize = x.element_size();
    at::Tensor residual = x, h;
    for (size_t l = 0; l < layers_.size(); ++l) {
      const LayerW& L = layers_[l];
      h = l == 0 ? rms_norm(residual, c10::nullopt, L.input_norm, eps_) : rms_norm(h, residual, L.input_norm, eps_);
      at::Tensor qkv = L.qkv(h, mode);  // [B, (heads + 2 kv_heads) * dim]
      rope_(qkv, heads_ + kvh_, dim_, cos_table, sin_table, positions);
      // K and V of a token are adjacent in qkv and in the cache: one copy per token.
      const int64_t slots_total = L.cache.size(0) * L.cache.size(1);
      char* cache_base = static_cast<char*>(L.cache.data_ptr());
      const char* qkv_base = static_cast<const char*>(qkv.data_ptr());
      for (int64_t b = 0; b < B; ++b) {
        TORCH_CHECK(slot[b] >= 0 && slot[b] < slots_total, "slot ", slot[b], " outside the KV cache");
        std::memcpy(cache_base + slot[b] * kv_cols * esize, qkv_base + (b * qkv.size(1) + q_size) * esize,
                    kv_cols * esize);
      }
      const at::Tensor q = qkv.narrow(1, 0, q_size).view({B, heads_, dim_});
      at::Tensor attn = decode_attention(q, L.cache, block_tables, seq_lens, L.window, scale_);
      h = rms_norm(L.o(attn, mode), residual, L.post_norm, eps_);
      h = L.down(silu_mul(L.gate_up(h, mode)), mode);
    }
    return layers_.empty() ? rms_norm(residual, c10::nullopt, final_norm_, eps_)
                           : rms_norm(h, residual, final_norm_, eps_);
  }

 private:
  int64_t hidden_, heads_, kvh_, dim_, inter_;
  double eps_, scale_;
  at::Tensor final_norm_;
  std::vector<LayerW> layers_;
};

}  // namespace

void register_fused_decoder(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<LinearW>(m, "PackedLinearWeights", "A packed layer's tensors for FusedDecoder");
  m.def("packed_linear_weights", &make_linear, "bundle a packed layer for FusedDecoder", py::arg("qw"),
        py::arg("ss"), py::arg("bias"), py::arg("bits"), py::arg("group"), py::arg("N"), py::arg("layout") = 0);
  py::class_<FusedDecoder>(m, "FusedDecoder", "all decoder layers of a decode step in one call")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, at::Tensor>(),
           py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
           py::arg("intermediate"), py::arg("eps"), py::arg("scale"), py::arg("final_norm"))
      .def("add_layer", &FusedDecoder::add_layer, py::arg("input_norm"), py::arg("post_norm"), py::arg("qkv"),
           py::arg("o"), py::arg("gate_up"), py::arg("down"), py::arg("window"), py::arg("cache"))
      .def("num_layers", &FusedDecoder::num_layers)
      .def("forward", &FusedDecoder::forward, py::arg("x"), py::arg("positions"), py::arg("slots"),
           py::arg("block_tables"), py::arg("seq_lens"), py::arg("cos_table"), py::arg("sin_table"),
           py::arg("mode"), py::call_guard<py::gil_scoped_release>());  // a whole step: let the server run
}

}  // namespace qalora
