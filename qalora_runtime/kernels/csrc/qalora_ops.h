// Fused decoder-layer ops (see qalora_ops.cpp): one call each instead of a chain
// of small PyTorch ops. All take and return float32 or bfloat16 CPU tensors.
#pragma once
#include <torch/extension.h>

namespace qalora {

// out = rms_norm(residual += x) * weight when residual is given (residual updated
// in place), else rms_norm(x) * weight. x, residual: [rows, hidden].
at::Tensor rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                    double eps);
// gate_up[rows, 2I] -> silu(gate_up[:, :I]) * gate_up[:, I:]  ([rows, I]).
at::Tensor silu_mul(const at::Tensor& gate_up);
// Rotates the first `heads` heads of each row of x[rows, cols] in place with
// float32 cos / signed-sin tables [positions, head_dim] at positions[rows].
void rope_(at::Tensor& x, int64_t heads, int64_t head_dim, const at::Tensor& cos_table,
           const at::Tensor& sin_table, const at::Tensor& positions);
// q[B, heads, D] attends over keys [max(0, len - window), len) of its paged
// sequence (window <= 0: all) -> [B, heads * D].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, int64_t window, double scale);

// y[M, N] = x[M, K] @ W for a layer in a packed layout of qalora_layout.h
// (layout 0 = quad, 1 = plane, 2 = dot); mode 0 = int8-activation GEMV, 1 = exact
// fp32 GEMV, 2 = tiled GEMM. Each layout has one GEMV (dot: int8, the others:
// exact), which a GEMV request of either kind runs, except that an exact request
// on a dot layer runs the (exact) GEMM.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& ss, int64_t bits,
                         int64_t group, int64_t N, int64_t mode, int64_t layout);

// out[t, :] = column ids[t] of a packed layer W[K, N] (an embedding stored as a
// linear layer hidden -> vocab, e.g. a tied lm_head); out is [T, K] fp32 or bf16.
void packed_embedding(const at::Tensor& ids, const at::Tensor& qw, const at::Tensor& ss, int64_t bits,
                      int64_t group, int64_t N, at::Tensor& out, int64_t layout);

bool cpu_has_avx2();

// Adds FusedDecoder (qalora_decode.cpp) and its weight bundle to the module.
void register_fused_decoder(pybind11::module_& m);

}  // namespace qalora
