"""Sequence-parallel streaming inference (issue 9 item 4, DESIGN.md §4 and §6): the chunk loop over N ranks.

Layout. The current chunk's T tokens are split contiguously over the SP group (rank r holds tokens
[r T/N, (r+1) T/N), all heads); Ulysses' all-to-all turns its seq-sharded q/k/v [B, T/N, H, D] into
head-sharded full-chunk q/k/v [B, T, H/N, D] (rank-major gather = the natural token order). Each rank's
KV cache stores exactly that: every token of the window (sinks, shot sink, rolling window, current chunk)
for its H/N heads, so the cache is a plain `KVCache` / `NVFP4KVCache` built for H/N heads (per-rank K/V
memory / N) and **no cached K/V ever crosses the network**: per layer and pass only the chunk's q, k, v and
the attention output move (4 all-to-alls of [B, T/N, H, D] per rank), independent of the window length.
The alternative (a seq-sharded cache) would all-to-all the whole window's K/V at every pass.

Where the cache hook runs. On one rank `WanSelfAttention` calls the KV hook before its attention core.
Here the hook must see head-sharded K/V, i.e. run after the all-to-all. The model stays free of process
groups (STYLE.md §1): the engine calls `forward_tokens(..., kv_cache=None)`, so the model never calls a
hook, and the SP plan's self-attention cores (`WAN_SP_PLAN.ulysses_cores`) are wrapped from outside by
`CachedUlyssesAttention`: all-to-all seq->heads, then the cache hook of its layer, then the core, then
all-to-all heads->seq. The engine binds its cache to the wrappers only for the duration of its own passes;
outside them the wrappers are plain `UlyssesAttention` (training keeps working on the same model).

Other inputs. Text cross-attention is replicated: each rank's queries attend the full text K/V, no
communication. RoPE positions are sliced like the tokens. Timesteps are per latent frame, but a rank's
slice may end mid-frame (e.g. 3 frames over 2 ranks): `local_timesteps` re-expresses them per group of
g = gcd(T/N, tokens per frame) tokens, each group inside one frame, which the per-frame modulation accepts
exactly (no assumption that a chunk's frames share a timestep; seeded image-to-video frames may differ).
The head output is all-gathered so that every rank holds the whole chunk's velocity (needed for the Euler
step; [B, T, p*C] per pass, small next to the all-to-alls); the recache pass skips that gather. The
recache forward over n stored chunks splits its n*T tokens contiguously the same way, with the
block-causal mask in natural order (= the gathered order).

Token count. T must be divisible by N; anything else raises ValueError (no padding: padded tokens would
have to be masked out of every cached key and would waste cache memory; real settings divide: 1.3B 480p
chunks have 3 x 1560 tokens, 5B 704p chunks 8 x 880).

NVFP4 cache. K/V quantize per 16-value block along the head dim, per token and head, but the chunk's FP32
region scale is amax/2688 over the whole chunk, all heads. `ShardedNVFP4KVCache` all-reduces (MAX) the
chunk amax of K and V over the SP group (two floats per layer and write) so every rank quantizes its heads
exactly as the one-rank cache does: given the same K/V, the shard's codes, block scales and region scales
are bitwise the one-rank cache's (tested). Since the blocks are per token and head, the current chunk's
K/V are quantized *before* the all-to-all (seq-sharded, all heads) and cross the network packed: 4.5 bits
per value instead of 16 (3.56x fewer K/V bytes; q and the output stay in the model dtype), with the same
codes as quantizing after it. The recache forward attends full-precision K/V, so it sends them unpacked.

Entry points: `build_engine` (one rank or SP), `init_sp_inference` (`longlive generate` under torchrun with
parallel.sp_size > 1: one process per SP rank, rank 0 writes the mp4), bench/bench_sp_inference.py.
Compiled chunk passes (step=compile): the blocks run through the chunk step's compiled function, graph-breaking at
the cached Ulysses core (collectives, cache hook and attention stay eager, as the one-rank hook does). Not
covered: TP inside the SP engine, CUDA-graph capture of SP passes (the all-to-alls; step=*cuda_graph* runs as compile).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings

import torch
import torch.distributed as dist
from torch import nn

from ..config import InferConfig
from ..inference.engine import StreamingEngine
from ..inference.fp8_kv_cache import with_static_bounds
from ..inference.kv_cache import KVCache
from ..models.wan.model import WanDiT
from ..models.wan.sp_plan import WAN_SP_PLAN
from ..quant.constants import BLOCK
from ..quant.nvfp4.kv_cache import NVFP4KVCache, PackedKV, build_kv_cache, quantize_chunk
from ..quant.nvfp4.reference import NVFP4Quantized
from .sp_plan import SPPlan
from .ulysses import UlyssesAttention, heads_to_seq, seq_to_heads


# ----- layout (pure functions) ------------------------------------------------------------------------
def split_tokens(num_tokens: int, sp_size: int, rank: int) -> slice:
    """Rank `rank`'s contiguous share of `num_tokens` tokens; ValueError unless sp_size divides them."""
    if num_tokens % sp_size:
        raise ValueError(f"SP inference: a chunk has {num_tokens} tokens (chunk frames x latent height x width "
                         f"after patching), not divisible by parallel.sp_size={sp_size}; tokens are not padded. "
                         f"Fix: choose infer.chunk_frames / infer.height / infer.width so that sp_size divides "
                         f"the token count, or an sp_size that divides {num_tokens}")
    n = num_tokens // sp_size
    return slice(rank * n, (rank + 1) * n)


def local_timesteps(t: torch.Tensor, tokens_per_frame: int, part: slice) -> torch.Tensor:
    """Per-frame timesteps [B, F] of a sequence -> per-group timesteps of the tokens in `part`.

    The groups have g = gcd(len(part), tokens_per_frame, part.start) tokens, each inside one frame, so the
    model's per-frame modulation (which only needs equal-sized groups) applies exactly the frame's value."""
    n = part.stop - part.start
    g = math.gcd(n, tokens_per_frame, part.start)
    per_group = t.repeat_interleave(tokens_per_frame // g, dim=1)       # [B, S / g]
    return per_group[:, part.start // g: part.stop // g]


# ----- the attention wrapper ----------------------------------------------------------------------------
class CachedUlyssesAttention(UlyssesAttention):
    """Ulysses around one self-attention core with the KV-cache hook between the all-to-all and the core.

    q, k, v [B, S/N, H, D] -> all-to-all -> [B, S, H/N, D] -> `cache.hook(layer)` (writes this chunk's K/V
    for the rank's heads, returns the cached window) -> core -> all-to-all -> [B, S/N, H, D].
    With no cache bound it is `UlyssesAttention`. Counts the bytes each all-to-all sends off this rank."""

    def __init__(self, core: nn.Module, group, layer: int):
        super().__init__(core, group)
        self.layer = layer
        self.cache: KVCache | None = None
        self.sent_bytes = 0

    def _to_heads(self, x: torch.Tensor) -> torch.Tensor:
        self.sent_bytes += x.numel() * x.element_size() * (self.sp_size - 1) // self.sp_size
        return seq_to_heads(x, self.group, self.sp_size)

    def _packed_to_heads(self, x: NVFP4Quantized) -> NVFP4Quantized:
        """A quantized [B, S/N, H, D] chunk (codes [.., D/2] uint8, scales [.., D/16] e4m3) -> [B, S, H/N, *]."""
        codes, scales = self._to_heads(x.packed), self._to_heads(x.scales.view(torch.uint8))
        return NVFP4Quantized(codes, scales.view(x.scales.dtype), x.tensor_scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        if self.cache is None:
            return super().forward(q, k, v, mask)
        return self._cached_forward(q, k, v, mask)

    @torch.compiler.disable
    def _cached_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        """Collectives, cache bookkeeping and the attention: run eagerly, so a compiled block graph-breaks here
        (as the one-rank engine's cache hook does) and its norms, projections and FFN still compile."""
        if q.shape[2] % self.sp_size:
            raise ValueError(f"SP inference: {q.shape[2]} heads are not divisible by sp_size={self.sp_size}. "
                             f"Fix: choose parallel.sp_size dividing model.num_heads")
        q = self._to_heads(q)                                            # [B, S, H/N, D]
        if isinstance(self.cache, ShardedNVFP4KVCache) and self.cache.chunk_pass:
            # 4-bit K/V on the wire: quantized before the all-to-all (same codes as quantizing after it)
            kq, vq = (self._packed_to_heads(x) for x in self.cache.quantize_shard(k, v))
            assert mask is None, "the streaming forward of one chunk takes no mask of its own"
            k, v, mask = self.cache.packed_chunk_hook(self.layer, kq, vq, q.dtype)
        else:
            k, v = self._to_heads(k), self._to_heads(v)
            k, v, mask = self.cache.hook(self.layer)(k, v, mask)         # + the cached window, H/N heads
        # [B, S, H/N, D]; the NVFP4 cache in 'fused' mode hands a PackedKV (Triton kernel, no BF16 window copy)
        out = k.attend(q) if isinstance(k, PackedKV) else self.core(q, k, v, mask)
        self.sent_bytes += out.numel() * out.element_size() * (self.sp_size - 1) // self.sp_size
        return heads_to_seq(out, self.group, self.sp_size)               # [B, S/N, H, D]


def wrap_cached_ulysses(model: nn.Module, plan: SPPlan, group) -> list[CachedUlyssesAttention]:
    """Replace the plan's self-attention cores by `CachedUlyssesAttention` (layer i = i-th match, in module
    order); cores already wrapped by Ulysses are unwrapped first, wrappers already there are reused."""
    names = [n for n, _ in model.named_modules() if any(fnmatch.fnmatchcase(n, p) for p in plan.ulysses_cores)]
    if not names:
        raise ValueError(f"SP plan: no module matches {plan.ulysses_cores}; the plan does not fit this model")
    wrappers = []
    for layer, name in enumerate(names):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        core = getattr(parent, attr)
        if isinstance(core, CachedUlyssesAttention) and core.group is group and core.layer == layer:
            wrappers.append(core)
            continue
        while isinstance(core, UlyssesAttention):
            core = core.core
        wrapper = CachedUlyssesAttention(core, group, layer)
        setattr(parent, attr, wrapper)
        wrappers.append(wrapper)
    return wrappers


# ----- the head-sharded NVFP4 cache -----------------------------------------------------------------------
class ShardedNVFP4KVCache(NVFP4KVCache):
    """`NVFP4KVCache` of H/N heads whose chunk scales come from the amax over all SP ranks (bitwise the
    one-rank cache's heads r H/N .. (r+1) H/N)."""

    def __init__(self, group, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group
        self.amax_bytes = 0

    def chunk_amax(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amax = torch.stack([k.float().abs().amax(), v.float().abs().amax()])   # [2] fp32, exact
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.group)
        self.amax_bytes += amax.numel() * amax.element_size()
        return amax[0], amax[1]

    @property
    def chunk_pass(self) -> bool:
        """True for a chunk pass, False inside a recache forward (which attends full-precision K/V)."""
        return self._recache_plan is None

    def quantize_shard(self, k: torch.Tensor, v: torch.Tensor) -> tuple[NVFP4Quantized, NVFP4Quantized]:
        """Any shard of the current chunk's K, V (e.g. seq-sharded [B, T/N, H, D]) -> NVFP4 with the chunk's
        scale: per-(token, head) blocks, so the codes equal those of quantizing any other sharding of it."""
        ak, av = self.chunk_amax(k, v)
        return quantize_chunk(k, ak), quantize_chunk(v, av)

    def packed_chunk_hook(self, layer: int, kq: NVFP4Quantized, vq: NVFP4Quantized, dtype: torch.dtype):
        """`_chunk_hook` for an already quantized head-sharded chunk ([B, T, H/N, *]): store it in region 0,
        return the attended prefix like `_chunk_hook` (dequantized K, V and mask, or the PackedKV)."""
        tok, tpc = self.layout.tokens(-1), self.layout.tokens_per_chunk
        assert kq.packed.shape[1] == tpc, f"chunk has {kq.packed.shape[1]} tokens, the cache expects {tpc}"
        for x, codes, scales, ts in ((kq, self.k_codes, self.k_scales, self.k_ts),
                                     (vq, self.v_codes, self.v_scales, self.v_ts)):
            codes[layer, :, tok].copy_(x.packed)
            scales[layer, :, tok].copy_(x.scales)
            ts[layer, 0].copy_(x.tensor_scale)
        kv = self.packed(layer)
        if self.attention == "fused":
            return kv, None, None
        kd, vd = kv.dequantize(dtype)
        return kd, vd, self._context_mask(tpc, kd.shape[1], kd.device)


def kv_bytes(cache: KVCache) -> int:
    """Bytes of a cache's K/V storage (without the clean latents kept for recache)."""
    if isinstance(cache, NVFP4KVCache):
        return cache.kv_bytes()
    return cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()


# ----- communication model ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ChunkComm:
    """Bytes one rank sends per generated chunk (k denoising passes + 1 commit pass), from shapes."""

    all_to_all: int       # q, k, v in (k, v 4-bit packed with the NVFP4 cache) and the output back, per layer and pass
    gather: int           # the head output all-gathered every denoising pass (the commit pass's is never used)
    amax: int             # NVFP4 cache: the chunk amax all-reduce payload (2 floats per layer and pass)
    seq_sharded_cache_kv: int
    """What a seq-sharded cache would add: the whole attended window's K/V all-to-all'd every pass."""

    @property
    def total(self) -> int:
        return self.all_to_all + self.gather + self.amax


def chunk_comm_bytes(rows: int, tokens_per_chunk: int, num_heads: int, head_dim: int, num_layers: int,
                     passes: int, sp_size: int, element_size: int, out_features: int, context_tokens: int,
                     nvfp4: bool = False) -> ChunkComm:
    """`ChunkComm` of one chunk. context_tokens: cached tokens attended besides the chunk (a full window).
    nvfp4: K and V travel packed (D/2 code bytes + D/16 E4M3 scale bytes per token and head)."""
    off = lambda nbytes: nbytes * (sp_size - 1) // sp_size             # noqa: E731 - share leaving the rank
    per_token = num_heads * head_dim * element_size                    # one token's q, k, v or output
    code_bytes, scale_bytes = num_heads * head_dim // 2, num_heads * head_dim // BLOCK
    n = rows * (tokens_per_chunk // sp_size)
    kv = off(n * code_bytes) + off(n * scale_bytes) if nvfp4 else off(n * per_token)
    a2a = (2 * off(n * per_token) + 2 * kv) * num_layers * passes      # q and output, k and v
    gather = n * out_features * element_size * (sp_size - 1) * (passes - 1)
    amax = 8 * num_layers * passes if nvfp4 else 0
    w = rows * (context_tokens // sp_size)
    window = 2 * (off(w * code_bytes) + off(w * scale_bytes) if nvfp4 else off(w * per_token))
    return ChunkComm(a2a, gather, amax, window * num_layers * passes)


# ----- the engine ---------------------------------------------------------------------------------------------
class SPStreamingEngine(StreamingEngine):
    """`StreamingEngine` over the SP group `group` (megatron-core's context-parallel group from
    `grid.init_grid`): same API and results as one rank, each rank holding H/N heads of the cache.

    Every rank runs the same chunk loop with the same noise and prompts and returns the same latents
    (the velocity is all-gathered). The model is the full one (no TP); its self-attention cores are
    wrapped from outside by this engine (see module docstring)."""

    def __init__(self, model: WanDiT, infer: InferConfig, latent_size: tuple[int, int], group, batch: int = 1,
                 keep_latents: bool = True, kv_cache: str = "bf16", plan: SPPlan = WAN_SP_PLAN,
                 kv_attention: str = "dequant", **kwargs):
        """kv_attention: with the NVFP4 cache, 'dequant' (attend dequantized K/V with the model's core) or
        'fused' (the fused NVFP4-KV Triton kernel on CUDA, or CPU under TRITON_INTERPRET=1)."""
        self.kv_attention = kv_attention
        if group is None:
            raise ValueError("SPStreamingEngine needs the SP process group (grid.init_grid(...).sp); with "
                             "parallel.sp_size=1 use StreamingEngine")
        self.group = group
        self.sp_size = dist.get_world_size(group)
        self.sp_rank = dist.get_rank(group)
        heads = model.cfg.num_heads
        if heads % self.sp_size:
            raise ValueError(f"parallel.sp_size={self.sp_size} must divide model.num_heads={heads} (each rank "
                             f"caches H/N heads). Fix: choose a divisor of {heads}")
        super().__init__(model, infer, latent_size, batch, keep_latents, kv_cache, **kwargs)
        if "cuda_graph" in self.step.mode:
            warnings.warn(f"SP inference compiles its chunk passes but captures no CUDA graphs (the all-to-alls "
                          f"between ranks run outside the compiled blocks); step={self.step.mode!r} runs as "
                          f"{'compile' if 'compile' in self.step.mode else 'eager'}")
        self.tokens_per_chunk = math.prod(self.grid)
        split_tokens(self.tokens_per_chunk, self.sp_size, self.sp_rank)   # validates T % N now, not mid-stream
        self.cores = wrap_cached_ulysses(model, plan, group)
        self.gather_bytes = 0

    def _build_cache(self, kind: str, keep_latents: bool) -> KVCache:
        cfg, heads = self.model.cfg, self.model.cfg.num_heads // self.sp_size
        latent_shape = self.latent_shape if keep_latents else None
        args = (self.layout, cfg.num_layers, self.rows, heads, cfg.head_dim, latent_shape,
                self.dtype, self.device)
        if kind == "bf16":     # heads sharded; static q/K bounds and per-head V scales quantize as one rank does
            return with_static_bounds(build_kv_cache(kind, *args, attention=self.infer.attention), self.model)
        if kind == "nvfp4":
            return ShardedNVFP4KVCache(self.group, *args, attention=self.kv_attention)
        raise ValueError(f"quant.kv_cache={kind!r}: choose 'bf16' or 'nvfp4'")

    def _forward_tokens(self, tokens: torch.Tensor, t: torch.Tensor, positions: torch.Tensor, mask=None,
                        need_output: bool = True) -> torch.Tensor | None:
        """This rank's share of the tokens [B, S, D] through the model (cache applied after the all-to-all);
        returns the full head output [B, S, p*C] on every rank (None when not needed)."""
        part = split_tokens(tokens.shape[1], self.sp_size, self.sp_rank)
        t_local = local_timesteps(t, self.grid[1] * self.grid[2], part)
        for core in self.cores:
            core.cache = self.cache
        # compiled blocks (step compile / compile+cuda_graph) for the steady chunk passes, as ChunkStep runs
        # them; the filling passes and the recache passes (mask) run eagerly
        block = self.step.compiled_block
        run_block = block if block is not None and mask is None and self.step.steady() else None
        try:
            out = self.model.forward_tokens(tokens[:, part], t_local, self.context_kv, positions[part], mask,
                                            kv_cache=None, run_block=run_block)   # [B, S/N, p*C]
        finally:
            for core in self.cores:
                core.cache = None
        if not need_output:
            return None
        parts = [torch.empty_like(out) for _ in range(self.sp_size)]
        dist.all_gather(parts, out.contiguous(), group=self.group)
        self.gather_bytes += out.numel() * out.element_size() * (self.sp_size - 1)
        return torch.cat(parts, dim=1)                                    # [B, S, p*C], natural order

    # ----- accounting ---------------------------------------------------------------------------------
    def sent_bytes(self) -> dict[str, int]:
        """Bytes this rank has sent so far, by collective."""
        amax = getattr(self.cache, "amax_bytes", 0)
        a2a = sum(core.sent_bytes for core in self.cores)
        return {"all_to_all": a2a, "gather": self.gather_bytes, "amax": amax, "total": a2a + self.gather_bytes + amax}

    def chunk_comm(self) -> ChunkComm:
        """`chunk_comm_bytes` for this engine's shapes with a full window."""
        cfg = self.model.cfg
        layout = self.layout
        return chunk_comm_bytes(self.rows, self.tokens_per_chunk, cfg.num_heads, cfg.head_dim,
                                cfg.num_layers, len(self.sigmas), self.sp_size, self.dtype.itemsize,
                                math.prod(cfg.patch_size) * cfg.out_channels,
                                layout.num_slots * layout.tokens_per_chunk,
                                nvfp4=isinstance(self.cache, NVFP4KVCache))


# ----- entry points ---------------------------------------------------------------------------------------------
def build_engine(model: WanDiT, infer: InferConfig, latent_size: tuple[int, int], sp_group=None,
                 **kwargs) -> StreamingEngine:
    """The one-rank `StreamingEngine` (sp_group None) or the `SPStreamingEngine` over `sp_group`."""
    if sp_group is None:
        return StreamingEngine(model, infer, latent_size, **kwargs)
    return SPStreamingEngine(model, infer, latent_size, sp_group, **kwargs)


def init_sp_inference(parallel, num_heads: int):
    """`grid.init_grid` for streaming generation under torchrun/srun: every process is one SP rank (no TP, no DP).
    parallel: the run's `ParallelConfig`. Returns the `ProcessGroups` (`.sp` for the engine, `.device`)."""
    from .grid import init_grid

    if parallel.tp_size != 1:
        raise ValueError(f"parallel.tp_size={parallel.tp_size}: SP inference runs without tensor parallelism. "
                         f"Fix: set parallel.tp_size=1 for generate")
    groups = init_grid(1, parallel.sp_size, num_heads, parallel.backend)
    if groups.dp_size != 1:
        raise ValueError(f"generate with parallel.sp_size={parallel.sp_size} was launched on {groups.world_size} "
                         f"processes; every process must be one SP rank. Fix: launch {parallel.sp_size} processes "
                         f"(torchrun --nproc_per_node {parallel.sp_size})")
    return groups
