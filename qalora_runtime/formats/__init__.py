"""Checkpoint formats: the merged QA-LoRA format v1, importers (GGUF, GPTQ) and the adapter merge."""
