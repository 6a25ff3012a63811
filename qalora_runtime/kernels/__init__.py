"""Kernels for packed low-bit linear layers; `registry` is the single dispatch point."""
