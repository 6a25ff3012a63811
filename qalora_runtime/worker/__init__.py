"""The worker: paged KV cache, attention, model runner and sampler."""
