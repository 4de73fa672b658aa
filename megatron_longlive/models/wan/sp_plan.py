"""How the Wan DiT is split for sequence parallelism: data, applied by `distributed/sp_plan.py`.

`WanDiT.forward_tokens(tokens, t, context_kv, positions, mask)` is the SP entry point: video tokens,
their per-frame timesteps and RoPE positions are sharded over SP ranks (each rank holds whole
frames); text tokens and their cross-attention K/V are replicated; only the self-attention cores
exchange data (Ulysses). The head output stays sharded like the tokens (the loss is local). The K/V
projections of the text see every rank's queries' share of their gradient: it is averaged over SP before
their backward (exact SP=1 numerics for quantized K/V linears too).
"""
from __future__ import annotations

from ...distributed.sp_plan import SPPlan, SplitSpec

WAN_SP_PLAN = SPPlan(
    ulysses_cores=("blocks.*.self_attn.core",),
    split_inputs={"tokens": SplitSpec(dim=1, unit="token"),      # [B, S, D]
                  "t": SplitSpec(dim=1, unit="frame"),           # [B, F]
                  "positions": SplitSpec(dim=0, unit="token")},  # [S, 3]
    replicated_inputs=("context", "context_kv"),
    outputs={"head": SplitSpec(dim=1, unit="token")},            # [B, S, p*C]
    replicated_grads=("blocks.*.cross_attn.k", "blocks.*.cross_attn.v"),
)
