"""Wan-family DiT, its VAE and text-encoder wrappers, and checkpoint conversion."""
from .attention import AttentionCore, ChunkMask, block_causal_mask
from .model import WanDiT

__all__ = ["AttentionCore", "ChunkMask", "block_causal_mask", "WanDiT"]
