"""The single dispatch point between packed linear layers and the kernels that compute them.

A kernel is a :class:`LinearKernel`: it repacks a layer's GPTQ-layout tensors once
at load (``prepare``) into whatever layout it wants and computes
``y[M, N] = x[M, K] @ W`` from that layout (``forward``). Model code never names a
kernel; it asks :func:`select_kernel` for the best one that supports the layer's
(device, bits, group size, dtype). A kernel may switch strategy on ``M`` inside
``forward`` (fused GEMV for decode, dequantize + dense GEMM for prefill).

Set ``QALORA_KERNEL=<name>`` to force a kernel for debugging; an unknown or
unsupported name is an error, never a silent fallback.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..quant.spec import QuantSpec

logger = logging.getLogger(__name__)

FORCE_ENV = "QALORA_KERNEL"


class LinearKernel(ABC):
    """Computes ``x @ W`` for a group-wise quantized weight with float zero-points.

    Subclasses are stateless; per-layer data lives in the dict ``prepare`` returns,
    which the caller keeps (as module buffers) and passes back to ``forward``.
    """

    name: ClassVar[str]
    #: Higher wins when several kernels support a layer.
    priority: ClassVar[int] = 0

    @classmethod
    @abstractmethod
    def supports(
        cls,
        spec: QuantSpec,
        in_features: int,
        out_features: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> bool:
        """Whether this kernel can run the layer on ``device`` with activations of ``dtype``."""

    @abstractmethod
    def prepare(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        spec: QuantSpec,
        dtype: torch.dtype,
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        """Repack GPTQ-layout ``qweight[K*bits/32, N]``, ``scales``/``zeros[K/G, N]`` for this kernel.

        Must keep the weight packed (no dense full-precision copy of the layer).
        """

    @abstractmethod
    def forward(
        self, x: torch.Tensor, weights: dict[str, torch.Tensor], spec: QuantSpec
    ) -> torch.Tensor:
        """``x[M, K]`` (compute dtype) -> ``y[M, N]`` in the same dtype."""

    #: Whether :meth:`columns` can read single output columns from the packed layout.
    supports_columns: ClassVar[bool] = False

    def columns(self, ids: torch.Tensor, weights: dict[str, torch.Tensor], spec: QuantSpec,
                in_features: int, dtype: torch.dtype) -> torch.Tensor:
        """``W[:, ids].T`` as ``[len(ids), K]`` in ``dtype``: an embedding lookup from a tied head.

        Lets a quantized tied embedding share its packed lm_head's tensors instead of
        keeping a second copy. Only kernels with ``supports_columns`` implement it.
        """
        raise NotImplementedError(f"kernel {self.name!r} cannot read columns")


_KERNELS: dict[str, type[LinearKernel]] = {}


def register_kernel(cls: type[LinearKernel]) -> type[LinearKernel]:
    """Class decorator adding a kernel to the registry under ``cls.name``."""
    if cls.name in _KERNELS and _KERNELS[cls.name] is not cls:
        raise ValueError(f"kernel name {cls.name!r} registered twice")
    _KERNELS[cls.name] = cls
    return cls


def _load_builtin_kernels() -> None:
    # Imported for their @register_kernel side effect; each module guards its own
    # optional dependencies (compiler, triton, CUDA) and registers nothing if absent.
    from . import dequant_fallback  # noqa: F401

    for optional in ("cpu_int4pack", "cpu_fused", "triton_fused"):
        try:
            __import__(f"{__package__}.{optional}")
        except ImportError:
            continue


def available_kernels() -> dict[str, type[LinearKernel]]:
    """All registered kernels by name."""
    _load_builtin_kernels()
    return dict(_KERNELS)


def select_kernel(
    spec: QuantSpec,
    in_features: int,
    out_features: int,
    device: torch.device,
    dtype: torch.dtype,
    force: str | None = None,
) -> LinearKernel:
    """Pick the highest-priority kernel supporting this layer (or the forced one)."""
    kernels = available_kernels()
    forced = force or os.environ.get(FORCE_ENV) or None
    if forced:
        if forced not in kernels:
            raise ValueError(f"unknown kernel {forced!r}; available: {sorted(kernels)}")
        cls = kernels[forced]
        if not cls.supports(spec, in_features, out_features, device, dtype):
            raise ValueError(
                f"kernel {forced!r} does not support bits={spec.bits} group_size={spec.group_size} "
                f"shape={in_features}x{out_features} on {device} with {dtype}"
            )
        return cls()
    candidates = [
        cls
        for cls in kernels.values()
        if cls.supports(spec, in_features, out_features, device, dtype)
    ]
    if not candidates:
        raise ValueError(
            f"no kernel supports bits={spec.bits} group_size={spec.group_size} "
            f"shape={in_features}x{out_features} on {device} with {dtype}"
        )
    return max(candidates, key=lambda c: c.priority)()
