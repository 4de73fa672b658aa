"""megatron_longlive: train and serve real-time, minute-long, multi-shot autoregressive video generators
on Wan-family DiTs, with Balanced sequence parallelism and NVFP4 (LongLive-2.0 style)."""
__version__ = "0.1.0"
