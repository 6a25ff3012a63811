"""Model definitions (Llama family) and the architecture registry."""
