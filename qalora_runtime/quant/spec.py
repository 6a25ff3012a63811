"""QuantSpec: the bits and group size of one group-wise quantized linear layer."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """Group-wise asymmetric quantization with float zero-points.

    A weight ``W[k, n]`` (input feature ``k``, output feature ``n``) is stored as an
    integer ``q[k, n]`` in ``[0, 2**bits)`` with per-group ``scales[g, n]`` and
    ``zeros[g, n]`` (``g = k // group_size``) so that ``W = scales * (q - zeros)``.
    """

    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bits={self.bits}; supported: {SUPPORTED_BITS}")
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")

    @property
    def max_q(self) -> int:
        """Largest integer level, ``2**bits - 1``."""
        return (1 << self.bits) - 1

    def check_in_features(self, in_features: int, name: str = "layer") -> None:
        """Raise ValueError unless ``in_features`` can be packed and grouped with this spec."""
        if in_features % self.group_size != 0:
            raise ValueError(
                f"{name}: group_size {self.group_size} does not divide in_features {in_features}"
            )
        if in_features % 32 != 0:
            raise ValueError(
                f"{name}: in_features {in_features} must be a multiple of 32 for GPTQ packing"
            )

    def packed_rows(self, in_features: int) -> int:
        """Number of int32 rows of a GPTQ ``qweight`` for ``in_features`` inputs."""
        return in_features * self.bits // 32
