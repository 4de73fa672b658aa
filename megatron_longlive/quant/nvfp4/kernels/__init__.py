"""Triton NVFP4 kernels (import `ops` to register the torch.library custom ops)."""
