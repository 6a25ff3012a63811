"""qalora_runtime: serve merged QA-LoRA low-bit (2/3/4/8-bit, float zero-point) language models."""

__version__ = "0.1.0"
