"""Fused low-bit CPU kernels (2/3/4/8-bit, float zero-points) from the C++ extension in ``csrc/``.

A layer is repacked at load into the layout its activation dtype wants, and each
layout has one GEMV for small ``M`` plus the shared tiled GEMM for large ``M``:

* *dot* layout, ``q8`` GEMV (bf16 activations, or ``QALORA_CPU_INT8_ACT=1``):
  activations quantized to int8 per 32-block, integer dot products (AVX2
  ``maddubs``) whose four columns' sums come out side by side, one FMA per block
  plus one per group for the float zero (llama.cpp's approach). Error ~1e-3
  relative, comparable to bf16 rounding of the activations themselves.
* *quad* layout, ``f32`` GEMV (fp32 activations, 4/8-bit): the levels converted to
  fp32 and multiplied exactly; error ~1e-6 relative.
* *plane* layout, ``f32`` GEMV (fp32 activations, 2/3-bit): exact too, looking up
  a pair of inputs of one bit plane for 8 columns per instruction, so it gets
  cheaper with fewer bits (see ``csrc/qalora_plane_avx2.cpp``).
* ``gemm`` (prefill, any layout): dequantize an L2-sized tile to fp32 and run a
  register-blocked FMA kernel over all rows; exact like ``f32``.

* ``dense`` (large M of bf16 layers): on AMX CPUs 16-column blocks dequantized
  straight into AMX tiles (``csrc/qalora_amx.cpp``); on AVX512-BF16 CPUs without
  AMX (AMD Zen 4) L2-sized tiles rounded to bf16 and multiplied with vdpbf16ps
  (``csrc/qalora_gemm_bf16.cpp``); elsewhere the layer is dequantized into x's
  dtype and ATen's GEMM does the multiply. Weights are rounded once to bf16,
  as a bf16 dense weight is.
* ``bf16_gemm`` (large M of fp32 layers, opt-in): the vdpbf16ps kernel on any
  layout, with x rounded to bf16 and the fp32 sums returned. It runs only when
  ``torch.set_float32_matmul_precision("medium")`` allows bf16 products in fp32
  matmuls (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"`` is the same
  switch in PyTorch's newer API); the default keeps the exact tiled GEMM.

Each path has an AVX2 version and, for most, an AVX-512 one the C++ side picks
at run time (``isa=``, ``QALORA_CPU_ISA``). If the extension cannot be built
this module registers nothing.
"""

from __future__ import annotations

import os

import torch

from ..quant.spec import QuantSpec
from .cpu_fused_build import load_extension
from .cpu_fused_pack import repack, repack_dot, repack_planes
from .registry import LinearKernel, register_kernel

MODE_Q8, MODE_F32, MODE_GEMM, MODE_DENSE, MODE_BF16_GEMM = 0, 1, 2, 3, 4
#: Kernel instruction-set levels (``isa=``): the C++ side runs the best one the CPU
#: has unless told a lower one here or capped by ``QALORA_CPU_ISA``. ``amx`` is
#: ``avx512`` plus the AMX bf16 large-M kernel.
ISAS = {"scalar": 0, "avx2": 1, "avx512": 2, "amx": 3}
LAYOUT_QUAD, LAYOUT_PLANE, LAYOUT_DOT = 0, 1, 2
#: Key of a prepared layer's zero-byte tensor whose first dimension is its layout (absent: quad).
LAYOUT_KEY = "layout"
#: Smallest M that takes the large-M path, per kernel ISA level and layout (its
#: GEMV decides the crossover; measured with ``qalora bench crossover``, see
#: docs/BENCHMARKS.md): the AVX-512 GEMVs hold out longer than the AVX2 ones.
GEMM_MIN_M_BY_ISA = {
    ISAS["avx2"]: {LAYOUT_QUAD: 3, LAYOUT_PLANE: 6, LAYOUT_DOT: 256},
    ISAS["avx512"]: {LAYOUT_QUAD: 8, LAYOUT_PLANE: 12, LAYOUT_DOT: 256},
}
#: bf16 large-M kernels (MODE_DENSE) by name, and the M from which each overtakes
#: the q8 GEMV (``qalora bench crossover``): AMX tiles, or vdpbf16ps where there is
#: AVX512-BF16 but no AMX. Without either, bf16 takes the tiled fp32 GEMM.
DENSE_BF16_MIN_M_BY_KERNEL = {"amx": 12, "avx512_bf16": 16}
INT8_ACT_ENV = "QALORA_CPU_INT8_ACT"

_ext = load_extension()
#: The ISA level the kernels run at here (QALORA_CPU_ISA applied).
_ISA = _ext.isa() if _ext is not None else ISAS["scalar"]
#: That level's switch points (the scalar path keeps AVX2's; benchmarks override entries).
GEMM_MIN_M = dict(GEMM_MIN_M_BY_ISA[ISAS["avx512"] if _ISA >= ISAS["avx512"] else ISAS["avx2"]])
# Read once: choose_mode runs for every linear call.
_INT8_ACT_ALWAYS = os.environ.get(INT8_ACT_ENV, "") == "1"


def extension_available() -> bool:
    """Whether the C++ extension was built and loaded (nothing here runs without it)."""
    return _ext is not None


def fused_linear(
    x: torch.Tensor,
    qw: torch.Tensor,
    ss: torch.Tensor,
    spec: QuantSpec,
    out_features: int,
    mode: int | None = None,
    isa: str | None = None,
    layout: int = LAYOUT_QUAD,
) -> torch.Tensor:
    """``x[M, K]`` (fp32/bf16) -> ``y[M, N]`` in x's dtype; ``mode`` None picks by M and dtype.

    ``isa`` (a key of ``ISAS``) forces an instruction-set level at or below the
    CPU's (tests and A/B benchmarks); None runs the best one.
    """
    if _ext is None:
        raise RuntimeError("qalora cpu_fused extension is not available")
    if isa is not None and isa not in ISAS:
        raise ValueError(f"isa must be one of {', '.join(ISAS)}, got {isa!r}")
    if mode is None:
        mode = choose_mode(x.shape[0], layout, x.dtype)
    return _ext.linear(x, qw, ss, spec.bits, spec.group_size, out_features, mode,
                       -1 if isa is None else ISAS[isa], layout)


def supported_isas() -> list[str]:
    """The instruction-set levels this CPU runs, lowest first (empty without the extension)."""
    if _ext is None:
        return []
    return [name for name, level in ISAS.items() if level <= _ext.isa_supported()]


def uses_plane_layout(spec: QuantSpec, dtype: torch.dtype) -> bool:
    """Whether a layer gets the plane layout: 2/3-bit with fp32 activations, int8 activations not forced."""
    return dtype == torch.float32 and spec.bits in (2, 3) and not _INT8_ACT_ALWAYS


def layout_for(spec: QuantSpec, dtype: torch.dtype) -> int:
    """The layout ``prepare`` packs a layer into for ``dtype`` activations."""
    if uses_plane_layout(spec, dtype):
        return LAYOUT_PLANE
    if dtype == torch.bfloat16 or _INT8_ACT_ALWAYS:
        return LAYOUT_DOT
    return LAYOUT_QUAD


def layout_of(weights: dict[str, torch.Tensor]) -> int:
    """The packed layout of a prepared layer."""
    marker = weights.get(LAYOUT_KEY)
    return LAYOUT_QUAD if marker is None else marker.shape[0]


def bf16_prefill_kernel() -> str | None:
    """The bf16 large-M kernel here: ``amx``, ``avx512_bf16`` or None (bf16 takes the tiled fp32 GEMM)."""
    if _ISA >= ISAS["amx"]:
        return "amx"
    if _ISA >= ISAS["avx512"] and _ext.has_avx512_bf16():
        return "avx512_bf16"
    return None


_BF16_PREFILL = bf16_prefill_kernel()  # read once: choose_mode runs for every linear call
#: That kernel's switch point (unused without one; benchmarks override it).
DENSE_BF16_MIN_M = DENSE_BF16_MIN_M_BY_KERNEL.get(_BF16_PREFILL or "", 0)


def set_bf16_prefill_kernel(kernel: str | None) -> str | None:
    """Let ``choose_mode`` route bf16 large M to ``kernel`` (None: the tiled fp32 GEMM) for A/B benchmarks.

    Returns the previous choice. Only the Python-side mode choice changes: a
    MODE_DENSE call still runs the best bf16 kernel its ``isa`` allows.
    """
    global _BF16_PREFILL
    if kernel is not None and kernel not in DENSE_BF16_MIN_M_BY_KERNEL:
        raise ValueError(f"kernel must be None or one of {', '.join(DENSE_BF16_MIN_M_BY_KERNEL)}, got {kernel!r}")
    previous, _BF16_PREFILL = _BF16_PREFILL, kernel
    return previous


def fp32_matmul_allows_bf16() -> bool:
    """Whether torch lets fp32 matmuls on CPU use bf16 products.

    That is oneDNN's ``torch.backends.mkldnn.matmul.fp32_precision == "bf16"``, which
    ``torch.set_float32_matmul_precision("medium")`` also sets. The new API is read
    because once it has been set, the legacy getter raises. Torch builds before it
    existed fall back to the legacy getter.
    """
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if mkldnn_matmul is not None and hasattr(mkldnn_matmul, "fp32_precision"):
        return mkldnn_matmul.fp32_precision == "bf16"
    return torch.get_float32_matmul_precision() == "medium"


def large_m_mode(dtype: torch.dtype) -> int:
    """The large-M strategy for ``dtype`` where a bf16 kernel runs: MODE_DENSE for bf16, MODE_BF16_GEMM
    for fp32 when torch allows bf16 products (:func:`fp32_matmul_allows_bf16`); else the tiled GEMM."""
    if _BF16_PREFILL is None:
        return MODE_GEMM
    if dtype == torch.bfloat16:
        return MODE_DENSE
    if dtype == torch.float32 and fp32_matmul_allows_bf16():
        return MODE_BF16_GEMM
    return MODE_GEMM


def _dense_bf16_switch(layout: int, dtype: torch.dtype) -> bool:
    """Whether ``layout``/``dtype`` switches at DENSE_BF16_MIN_M (bf16 on the dot layout with a bf16 kernel)."""
    return layout == LAYOUT_DOT and dtype == torch.bfloat16 and _BF16_PREFILL is not None


def gemm_min_m(layout: int, dtype: torch.dtype) -> int | None:
    """Smallest M that takes the large-M path on a ``layout`` layer (None: an unknown layout).

    fp32 layers switch where the exact tiled GEMM overtakes their GEMV, bf16
    products or not: the bf16 GEMM is faster than the fp32 one, so that M is late
    rather than early (``qalora bench crossover --fp32-matmul-precision medium``).
    """
    if _dense_bf16_switch(layout, dtype):
        return DENSE_BF16_MIN_M
    return GEMM_MIN_M.get(layout)


def set_gemm_min_m(layout: int, dtype: torch.dtype, value: int) -> int:
    """Set the switch ``gemm_min_m(layout, dtype)`` reads (A/B benchmarks); returns the previous value."""
    global DENSE_BF16_MIN_M
    previous = gemm_min_m(layout, dtype)
    if _dense_bf16_switch(layout, dtype):
        DENSE_BF16_MIN_M = value
    else:
        GEMM_MIN_M[layout] = value
    return previous


def choose_mode(m: int, layout: int, dtype: torch.dtype) -> int:
    """Strategy for ``m`` rows of ``dtype`` on a ``layout`` layer: its GEMV below gemm_min_m, else large-M."""
    switch = gemm_min_m(layout, dtype)
    if switch is not None and m >= switch:  # an unknown layout is the C++ check's to reject
        return large_m_mode(dtype)
    return MODE_Q8 if layout == LAYOUT_DOT else MODE_F32


class CpuFusedKernel(LinearKernel):
    """AVX2/AVX-512 fused dequant GEMV/GEMM for 2/3/4/8-bit float-zero layers (fp32 and bf16 activations).

    The weight stays packed (``bits/8`` bytes per weight plus fp32 scale and
    scale*zero per group); no dense copy of a layer is ever kept (only an explicit
    ``MODE_DENSE`` call that neither bf16 kernel takes dequantizes into a per-thread scratch).
    """

    name = "cpu_fused"
    # Above cpu_int4pack: on the AVX2 hosts measured it is faster at every M (BENCHMARKS.md).
    priority = 20

    @classmethod
    def supports(
        cls,
        spec: QuantSpec,
        in_features: int,
        out_features: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> bool:
        return (
            _ext is not None
            and torch.device(device).type == "cpu"
            and dtype in (torch.float32, torch.bfloat16)
            and spec.bits in (2, 3, 4, 8)
            and spec.group_size % 32 == 0
            and in_features % spec.group_size == 0
            and out_features > 0
        )

    def prepare(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        spec: QuantSpec,
        dtype: torch.dtype,
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        layout = layout_for(spec, dtype)
        pack = {LAYOUT_QUAD: repack, LAYOUT_PLANE: repack_planes, LAYOUT_DOT: repack_dot}[layout]
        qw, ss = pack(qweight, scales, zeros, spec)
        # Zero-byte tensors whose shapes carry N (the packed tensors are padded to
        # quads or octs) and the layout: read per call without touching data.
        weights = {"qw": qw, "ss": ss, "out_features": torch.empty(qweight.shape[1], 0, dtype=torch.uint8)}
        if layout != LAYOUT_QUAD:
            weights[LAYOUT_KEY] = torch.empty(layout, 0, dtype=torch.uint8)
        return weights

    def forward(
        self, x: torch.Tensor, weights: dict[str, torch.Tensor], spec: QuantSpec
    ) -> torch.Tensor:
        n = weights["out_features"].shape[0]
        if x.dim() == 2:  # the model's case: call straight through (runs ~120 times per token)
            layout = layout_of(weights)
            return _ext.linear(x, weights["qw"], weights["ss"], spec.bits, spec.group_size, n,
                               choose_mode(x.shape[0], layout, x.dtype), -1, layout)
        lead = x.shape[:-1]
        y = fused_linear(x.reshape(-1, x.shape[-1]), weights["qw"], weights["ss"], spec, n,
                         layout=layout_of(weights))
        return y.reshape(*lead, n)

    supports_columns = True

    def columns(self, ids: torch.Tensor, weights: dict[str, torch.Tensor], spec: QuantSpec,
                in_features: int, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(ids.shape[0], in_features, dtype=dtype)
        _ext.packed_embedding(ids.contiguous(), weights["qw"], weights["ss"], spec.bits, spec.group_size,
                              weights["out_features"].shape[0], out, layout_of(weights))
        return out

    @staticmethod
    def native_weights(weights: dict[str, torch.Tensor], spec: QuantSpec, bias: torch.Tensor | None):
        """This layer's tensors bundled for the C++ ``FusedDecoder`` (which calls the kernel directly)."""
        n = weights["out_features"].shape[0]
        return _ext.packed_linear_weights(weights["qw"], weights["ss"], bias, spec.bits, spec.group_size, n,
                                          layout_of(weights))


if _ext is not None:
    register_kernel(CpuFusedKernel)
