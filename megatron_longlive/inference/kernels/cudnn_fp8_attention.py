"""cuDNN's FP8 flash attention (Hopper+) through cudnn-frontend's Python graph API, for `infer.attention=cudnn-fp8`.

Why: on an H100 the window attention is ~50% of a 1.3B chunk step and cuDNN's BF16 SDPA already runs it at ~55% of
the BF16 peak; our Triton FP8 kernel stays below that (Triton does not overlap softmax with the FP8 MMAs), so the
FP8 tensor cores are reached through cuDNN's own FP8 kernel.

    q8 [B, Sq, H, D], k8 / v8 [B, Skv, H, D]   float8_e4m3fn views (heads and channels contiguous, B/S strided)
    descale_q, descale_k                        fp32 device tensors of one element (q ~ q8 * descale_q, same for K)
    v_scale                                     fp32 [H], V's per-head scales (v ~ v8 * v_scale[h])
    -> [B, Sq, H, D] bf16: softmax(q k^T * attn_scale) @ v8 * v_scale (V's descale is 1 in the graph: per-head
       scales, which its per-tensor descales cannot express, are applied in the pass that reads the output)

P is scaled by P_SCALE (256, as in our Triton FP8 kernel) before its E4M3 cast and divided out again. The output is
requested in BF16; where the installed cuDNN cannot build that graph the output comes as E4M3 with scale_o = 0.5
(|O| <= max|v8| <= 448, the half keeps P's rounding from saturating it) and is decoded here.

Split keys: where the query tiles fill the SMs' last wave poorly (the 1.3B chunk: 444 tiles of 128 queries on
132 SMs, 3.4 waves), the window's keys are cut into `splits` equal parts run as batch entries of one launch (q
broadcast by a zero batch stride), the kernel returns each part's softmax stats and split_kv_combine_triton merges
the parts exactly; `auto_splits` picks the count from the wave arithmetic (1 for the 5B: 1320 tiles, 10 waves).

Plans are built once per (device, shapes, strides, attn_scale, splits) outside CUDA-graph capture (the chunk step
warms up before it captures); execution only launches on the current stream, so it is captured like any kernel.
Everything this module needs is optional: `unavailable_reason(device)` says what is missing, with the fix.
"""
from __future__ import annotations

import importlib
import math
import threading

import torch

from .split_kv_combine_triton import combine_split_kv
from .window_attention_triton import P_SCALE

O_SCALE_FP8 = 0.5
Q_TILE = 128                # queries per cuDNN FP8 tile (the wave arithmetic of auto_splits)
MAX_SPLITS = 4
kv_splits_override: int | None = None   # benchmarks: force a split count (None: auto_splits)
_PLANS: dict[tuple, "_Plan"] = {}
_HANDLES: dict[int, int] = {}
_LOCK = threading.Lock()


def _cudnn():
    if torch.cuda.is_available():
        torch.backends.cudnn.version()     # load torch's libcudnn first: the frontend then dlopens that same library
    return importlib.import_module("cudnn")


def unavailable_reason(device: torch.device | str) -> str | None:
    """None when cuDNN FP8 attention can run on `device`, else why not and the fix."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"infer.attention=cudnn-fp8 runs cuDNN kernels: {device} is not a CUDA device (on the CPU the engine "
                f"uses an exact emulation of the same FP8 math instead)")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"cuDNN FP8 attention needs Hopper or newer (sm90+), {device} is sm{major}{minor}. Fix: infer.attention=sdpa"
    try:
        cudnn = _cudnn()
    except ImportError:
        return ("infer.attention=cudnn-fp8 needs cudnn-frontend's Python package. Fix: pip install "
                "'megatron_longlive[cudnn]' (nvidia-cudnn-frontend), or infer.attention=sdpa")
    if not hasattr(cudnn.pygraph, "sdpa_fp8"):
        return f"cudnn-frontend {getattr(cudnn, '__version__', '?')} has no sdpa_fp8. Fix: pip install -U nvidia-cudnn-frontend"
    return None


def _handle(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _HANDLES:
        with torch.cuda.device(index):
            _HANDLES[index] = _cudnn().create_handle()
    return _HANDLES[index]


def _bhsd(t: torch.Tensor) -> tuple[list[int], list[int]]:
    """cuDNN's (b, h, s, d) dims and strides of a [B, S, H, D] tensor."""
    b, s, h, d = t.shape
    sb, ss, sh, sd = t.stride()
    return [b, h, s, d], [sb, sh, ss, sd]


class _Plan:
    """One built cuDNN FP8 SDPA graph plus the buffers it owns (workspace, constant scales, amax outputs)."""

    def __init__(self, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, attn_scale: float, splits: int = 1):
        cudnn = _cudnn()
        self.device = q8.device
        self.handle = _handle(self.device)
        self.splits = splits
        b, sq, h, d = q8.shape
        self.out_shape = (splits, b, sq, h, d)
        errors = []
        # q's zero batch stride (no copy) first; a repeated q where the backend refuses it. BF16 output where the
        # backend builds it, else E4M3.
        for q_copy, out_fp8 in ((False, False), (False, True), (True, False), (True, True))[: 2 if splits == 1 else 4]:
            try:
                self._build(cudnn, *self._views(q8, k8, v8, q_copy), attn_scale, out_fp8)
                self.out_fp8, self.q_copy = out_fp8, q_copy
                break
            except Exception as e:  # noqa: BLE001 - cudnnGraphNotSupportedError or a build RuntimeError
                errors.append(f"{'fp8' if out_fp8 else 'bf16'} output{', q copied' if q_copy else ''}: "
                              f"{type(e).__name__}: {e}")
        else:
            raise RuntimeError("cuDNN could not build its FP8 attention for q "
                               f"{tuple(q8.shape)}, kv {tuple(k8.shape)} in {splits} key part(s) (backend "
                               f"{cudnn.backend_version()}): "
                               + "; ".join(errors) + ". Fix: infer.attention=sdpa")
        f32 = dict(dtype=torch.float32, device=self.device)
        self.workspace = torch.empty(max(1, self.graph.get_workspace_size()), dtype=torch.uint8, device=self.device)
        self.consts = {self.t_descale_v: torch.ones(1, 1, 1, 1, **f32),
                       self.t_descale_s: torch.full((1, 1, 1, 1), 1.0 / P_SCALE, **f32),
                       self.t_scale_s: torch.full((1, 1, 1, 1), P_SCALE, **f32),
                       self.t_scale_o: torch.full((1, 1, 1, 1), O_SCALE_FP8 if self.out_fp8 else 1.0, **f32),
                       self.t_amax_s: torch.zeros(1, 1, 1, 1, **f32),
                       self.t_amax_o: torch.zeros(1, 1, 1, 1, **f32)}

    def _views(self, q8, k8, v8, q_copy: bool):
        """q, k, v as the graph sees them: with P > 1 key parts, batch entry p attends keys [p*S/P, (p+1)*S/P)
        (b = 1: a view of the window) with q broadcast (stride 0) or copied."""
        p = self.splits
        if p == 1:
            return q8, k8, v8
        _, skv, h, d = k8.shape
        part = lambda t: t.as_strided((p, skv // p, h, d), (skv // p * t.stride(1), *t.stride()[1:]),  # noqa: E731
                                      t.storage_offset())
        q = q8.expand(p, *q8.shape[1:])
        return (q.contiguous() if q_copy else q), part(k8), part(v8)

    def _build(self, cudnn, q8, k8, v8, attn_scale: float, out_fp8: bool) -> None:
        dt = cudnn.data_type
        g = cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                          handle=self.handle)
        self.t_q, self.t_k, self.t_v = (g.tensor(name=n, dim=_bhsd(t)[0], stride=_bhsd(t)[1], data_type=dt.FP8_E4M3)
                                        for n, t in (("q", q8), ("k", k8), ("v", v8)))
        scalar = lambda n: g.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt.FLOAT)  # noqa: E731
        (self.t_descale_q, self.t_descale_k, self.t_descale_v, self.t_descale_s, self.t_scale_s,
         self.t_scale_o) = (scalar(n) for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s",
                                                "scale_o"))
        o, stats, amax_s, amax_o = g.sdpa_fp8(q=self.t_q, k=self.t_k, v=self.t_v, descale_q=self.t_descale_q,
                                          descale_k=self.t_descale_k, descale_v=self.t_descale_v,
                                          descale_s=self.t_descale_s, scale_s=self.t_scale_s,
                                          scale_o=self.t_scale_o, generate_stats=self.splits > 1,
                                          attn_scale=attn_scale)
        b, sq, h, d = q8.shape                    # b = splits x batch
        o.set_output(True).set_dim([b, h, sq, d]).set_stride([sq * h * d, d, h * d, 1]) \
            .set_data_type(dt.FP8_E4M3 if out_fp8 else dt.BFLOAT16)
        if self.splits > 1:                       # the merge's log-sum-exps, [P*B, H, Sq] fp32
            stats.set_output(True).set_dim([b, h, sq, 1]).set_stride([h * sq, sq, 1, 1]).set_data_type(dt.FLOAT)
        for t in (amax_s, amax_o):
            t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(dt.FLOAT)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph, self.t_o, self.t_amax_s, self.t_amax_o = g, o, amax_s, amax_o
        self.t_stats = stats if self.splits > 1 else None

    def __call__(self, q8, k8, v8, descale_q: torch.Tensor, descale_k: torch.Tensor,
                 v_scale: torch.Tensor) -> torch.Tensor:
        p, b, sq, h, d = self.out_shape
        out = torch.empty(self.out_shape, dtype=torch.float8_e4m3fn if self.out_fp8 else torch.bfloat16,
                          device=self.device)                     # [P, B, Sq, H, D] memory = the declared strides
        q, k, v = self._views(q8, k8, v8, self.q_copy)
        pack = {self.t_q: q, self.t_k: k, self.t_v: v, self.t_o: out,
                self.t_descale_q: descale_q.reshape(1, 1, 1, 1), self.t_descale_k: descale_k.reshape(1, 1, 1, 1),
                **self.consts}
        lse = None
        if p > 1:
            lse = torch.empty((p, b, h, sq), dtype=torch.float32, device=self.device)
            pack[self.t_stats] = lse
        cudnn = _cudnn()
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(self.device).cuda_stream)
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return combine_split_kv(out, lse, v_scale, O_SCALE_FP8 if self.out_fp8 else 1.0)


def _check(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor) -> None:
    for name, t in (("q8", q8), ("k8", k8), ("v8", v8)):
        if t.dtype != torch.float8_e4m3fn or t.dim() != 4 or not t.is_cuda:
            raise ValueError(f"cudnn_fp8_attention: {name} must be a CUDA float8_e4m3fn [B, S, H, D] tensor, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
        if t.stride(3) != 1 or t.stride(2) != t.shape[3] or t.data_ptr() % 16:
            raise ValueError(f"cudnn_fp8_attention: {name} needs contiguous heads/channels and a 16-byte aligned "
                             f"base, strides {t.stride()}")
    if k8.shape != v8.shape or q8.shape[0] != k8.shape[0] or q8.shape[2:] != k8.shape[2:]:
        raise ValueError(f"cudnn_fp8_attention: q {tuple(q8.shape)} and k/v {tuple(k8.shape)}/{tuple(v8.shape)} "
                         f"must share batch, heads and head_dim")


def auto_splits(batch: int, sq: int, heads: int, skv: int, sms: int) -> int:
    """Key parts for one launch: the count (<= MAX_SPLITS, dividing skv) whose query tiles fill the SMs' waves best;
    a split must gain over 8% of wave time (the merge's pass costs some)."""
    if batch != 1:            # a batch > 1 window is a prefix of the cache buffer: its key parts are no single view
        return 1
    tiles = math.ceil(sq / Q_TILE) * heads
    cost = lambda p: math.ceil(p * tiles / sms) / p  # noqa: E731 - waves of 1/p-long tiles
    best = min((p for p in range(1, MAX_SPLITS + 1) if skv % p == 0), key=cost)
    return best if cost(best) < 0.92 * cost(1) else 1


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@torch.compiler.disable
def cudnn_fp8_attention(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                        descale_k: torch.Tensor, attn_scale: float, v_scale: torch.Tensor | None = None,
                        splits: int | None = None) -> torch.Tensor:
    """Attention of E4M3 q8 over E4M3 k8/v8 on cuDNN's FP8 kernel -> bf16 [B, Sq, H, D], times V's per-head scales
    v_scale [H] (None: in v8's code units). splits: key parts per launch (None: kv_splits_override, else
    auto_splits)."""
    _check(q8, k8, v8)
    b, sq, h, d = q8.shape
    if splits is None:
        splits = kv_splits_override or auto_splits(b, sq, h, k8.shape[1], _sm_count(q8.device))
    if splits > 1 and (b != 1 or k8.shape[1] % splits):
        raise ValueError(f"cudnn_fp8_attention: {splits} key parts need batch 1 and keys divisible by them, got q "
                         f"{tuple(q8.shape)}, kv {tuple(k8.shape)}")
    if v_scale is None:
        v_scale = torch.ones(h, dtype=torch.float32, device=q8.device)
    key = (q8.device, attn_scale, splits, *((tuple(t.shape), t.stride()) for t in (q8, k8, v8)))
    plan = _PLANS.get(key)
    if plan is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("cudnn_fp8_attention: first call of a new shape inside CUDA-graph capture; run the "
                               "shape once before capturing (the chunk step warms up first)")
        reason = unavailable_reason(q8.device)
        if reason:
            raise RuntimeError(reason)
        with _LOCK:
            plan = _PLANS.get(key) or _Plan(q8, k8, v8, attn_scale, splits)
            _PLANS[key] = plan
    return plan(q8, k8, v8, descale_q, descale_k, v_scale.float())
