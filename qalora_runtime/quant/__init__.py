"""Quantization primitives: the spec of a quantized layer, GPTQ bit packing, RTN quantization."""
