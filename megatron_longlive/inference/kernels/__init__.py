"""Triton kernels of the streaming inference path (attention over the KV window)."""
