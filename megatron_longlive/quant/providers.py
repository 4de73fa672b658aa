"""Linear providers per precision backend, and `build_linear_provider(quant_cfg)` (STYLE.md §2).

bf16 -> plain nn.Linear; nvfp4_emulated -> NVFP4Linear (exact NVFP4 numerics, any device);
fp8 -> FP8Linear (E4M3 rowwise-scaled GEMMs, torch._scaled_mm on Hopper+); te_nvfp4 -> Transformer
Engine's Linear run under its NVFP4BlockScaling recipe (Blackwell). Every low-precision provider is
wrapped in a KeepListProvider so modules matching `quant.keep_high_precision` stay plain nn.Linear.
"""
from __future__ import annotations

import contextlib
import warnings

from torch import nn

from ..config.quant import QuantConfig
from ..models.provider import KeepListProvider, LinearProvider
from .constants import BLOCK

TE_INSTALL_HINT = ("pip install 'megatron_longlive[gpu]' (or pip install 'transformer-engine[pytorch]'); "
                   "NVFP4 GEMMs need a Blackwell GPU. Otherwise set quant.linear=nvfp4_emulated or fp8")


def _blocked(name: str, in_features: int, out_features: int, what: str) -> bool:
    """True if the shape fits 16-value blocks; otherwise warn that the layer stays high precision."""
    if in_features % BLOCK or out_features % BLOCK:
        warnings.warn(f"{what}: {name} ({in_features}->{out_features}) is not a multiple of {BLOCK}; "
                      "keeping it as a plain nn.Linear", stacklevel=3)
        return False
    return True


class NVFP4EmulatedProvider(LinearProvider):
    """Builds NVFP4Linear (dequantize-then-fp32-matmul emulation of the NVFP4 training recipe).

    With a `tp_group`, "column" layers get out_features / tp and "row" layers in_features / tp (the
    tensor-parallel NVFP4Linear); "replicated" layers stay whole."""

    def __init__(self, rht: bool = True, stochastic_rounding: bool = True, weight_2d: bool = True, rht_seed: int = 0,
                 tp_group=None):
        from .nvfp4.linear import NVFP4Recipe

        self.recipe = NVFP4Recipe(rht=rht, stochastic_rounding=stochastic_rounding, weight_2d=weight_2d,
                                  rht_seed=rht_seed)
        self.tp_group = tp_group

    def linear(self, name, in_features, out_features, bias=True, style="replicated"):
        from .nvfp4.linear import NVFP4Linear

        from .tensor_parallel import local_features, tp_style

        tp = 1
        if tp_style(style, self.tp_group)[1] is not None:
            import torch.distributed as dist

            tp = dist.get_world_size(self.tp_group)
        local_in, local_out = local_features(name, in_features, out_features, style, tp, BLOCK, "nvfp4_emulated")
        if not _blocked(name, local_in, local_out, "nvfp4_emulated"):
            return nn.Linear(in_features, out_features, bias=bias)
        return NVFP4Linear(local_in, local_out, bias, self.recipe, style=style, tp_group=self.tp_group)


class FP8Provider(LinearProvider):
    """Builds FP8Linear: E4M3 GEMMs with rowwise scales (torch._scaled_mm, or its exact emulation)."""

    def __init__(self, emulate: bool | None = None, fast_accum: bool = False, recipe: str = "rowwise",
                 amax_history: int = 16, amax_margin: int = 2, fast_accum_backward: bool = False, tp_group=None):
        """tp_group: "column" / "row" layers become this rank's shard (quant/tensor_parallel.py)."""
        self.emulate, self.tp_group = emulate, tp_group
        self.options = dict(fast_accum=fast_accum, recipe=recipe, amax_history=amax_history, amax_margin=amax_margin,
                            fast_accum_backward=fast_accum_backward)

    def linear(self, name, in_features, out_features, bias=True, style="replicated"):
        from .fp8 import FP8Linear
        from .tensor_parallel import local_features, tp_style

        style, group = tp_style(style, self.tp_group)
        if group is not None:
            import torch.distributed as dist

            local_in, local_out = local_features(name, in_features, out_features, style,
                                                 dist.get_world_size(group), BLOCK, "fp8")
            return FP8Linear(local_in, local_out, bias, emulate=self.emulate, style=style, tp_group=group,
                             **self.options)
        if not _blocked(name, in_features, out_features, "fp8"):
            return nn.Linear(in_features, out_features, bias=bias)
        return FP8Linear(in_features, out_features, bias, emulate=self.emulate, **self.options)


def fp8_options(quant_cfg: QuantConfig) -> dict:
    """FP8Linear keyword arguments from the quant config."""
    return dict(fast_accum=quant_cfg.fp8_fast_accum, recipe=quant_cfg.fp8_recipe,
                amax_history=quant_cfg.fp8_amax_history, amax_margin=quant_cfg.fp8_amax_margin,
                fast_accum_backward=quant_cfg.fp8_fast_accum_backward)


def import_te():
    """transformer_engine.pytorch and its recipe module, or an ImportError that says how to get them."""
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common import recipe
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError(f"quant.linear=te_nvfp4 needs Transformer Engine ({exc}). Fix: {TE_INSTALL_HINT}") from exc
    if not hasattr(recipe, "NVFP4BlockScaling"):  # pragma: no cover
        raise ImportError(f"this Transformer Engine has no NVFP4BlockScaling recipe; upgrade it. {TE_INSTALL_HINT}")
    return te, recipe


class TENVFP4Linear(nn.Module):
    """te.Linear whose forward (and hence backward) runs under TE's NVFP4BlockScaling recipe."""

    def __init__(self, in_features, out_features, bias, rht: bool, stochastic_rounding: bool, weight_2d: bool):
        super().__init__()
        te, recipe = import_te()
        self.inner = te.Linear(in_features, out_features, bias=bias)
        try:
            self.recipe = recipe.NVFP4BlockScaling(disable_rht=not rht, disable_stochastic_rounding=not stochastic_rounding,
                                                   disable_2d_quantization=not weight_2d)
        except TypeError:  # pragma: no cover - older TE: switches only via NVTE_NVFP4_DISABLE_* env vars
            warnings.warn("this TE's NVFP4BlockScaling takes no disable_* switches; using its defaults")
            self.recipe = recipe.NVFP4BlockScaling()
        self._autocast = getattr(te, "autocast", None)
        self._fp8_autocast = getattr(te, "fp8_autocast", None)

    def _context(self):
        if self._autocast is not None:
            return self._autocast(enabled=True, recipe=self.recipe)
        if self._fp8_autocast is not None:  # pragma: no cover - older TE
            return self._fp8_autocast(enabled=True, fp8_recipe=self.recipe)
        return contextlib.nullcontext()  # pragma: no cover

    def forward(self, x):
        with self._context():
            return self.inner(x)


class TENVFP4Provider(LinearProvider):
    """Builds TENVFP4Linear; importing Transformer Engine is deferred to construction."""

    def __init__(self, rht: bool = False, stochastic_rounding: bool = True, weight_2d: bool = True):
        import_te()
        self.switches = dict(rht=rht, stochastic_rounding=stochastic_rounding, weight_2d=weight_2d)

    def linear(self, name, in_features, out_features, bias=True, style="replicated"):
        if not _blocked(name, in_features, out_features, "te_nvfp4"):
            return nn.Linear(in_features, out_features, bias=bias)
        return TENVFP4Linear(in_features, out_features, bias, **self.switches)


def build_linear_provider(quant_cfg: QuantConfig, tp_group=None) -> LinearProvider:
    """The provider for `quant_cfg.linear`, with `keep_high_precision` modules kept as plain nn.Linear.
    tp_group: tensor-parallel group for the nvfp4_emulated and fp8 column/row layers (None: unsharded); kept
    layers then stay whole (a TP model routes them to megatron-core's TP linears instead: tp_quant_provider)."""
    kind = quant_cfg.linear
    if kind == "bf16":
        return LinearProvider()
    switches = dict(rht=quant_cfg.rht, stochastic_rounding=quant_cfg.stochastic_rounding,
                    weight_2d=quant_cfg.weight_2d)
    if kind == "nvfp4_emulated":
        low = NVFP4EmulatedProvider(**switches, tp_group=tp_group)
    elif kind == "te_nvfp4":
        low = TENVFP4Provider(**switches)
    elif kind == "fp8":
        low = FP8Provider(**fp8_options(quant_cfg), tp_group=tp_group)
    else:
        raise ValueError(f"quant.linear: unknown backend {kind!r}. Fix: use bf16, fp8, nvfp4_emulated or te_nvfp4")
    return KeepListProvider(low, LinearProvider(), quant_cfg.keep_high_precision)


def convert_linears(model: nn.Module, quant_cfg: QuantConfig) -> list[str]:
    """Swap the plain nn.Linear modules of an already built (e.g. loaded) model for the `quant_cfg.linear`
    implementation, sharing their parameters, outside `keep_high_precision`. In eval this is the W4A4
    (nvfp4_emulated) or W8A8 (fp8) inference path. Returns the converted module names."""
    import fnmatch

    if quant_cfg.linear == "bf16":
        return []
    if quant_cfg.linear == "te_nvfp4":
        raise ValueError("quant.linear=te_nvfp4: build the model with build_linear_provider instead (TE owns its "
                         "parameters); convert_linears supports nvfp4_emulated and fp8")
    from .fp8 import FP8Linear
    from .nvfp4.linear import NVFP4Linear, NVFP4Recipe

    recipe = NVFP4Recipe(rht=quant_cfg.rht, stochastic_rounding=quant_cfg.stochastic_rounding,
                         weight_2d=quant_cfg.weight_2d)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear
             and not any(fnmatch.fnmatchcase(n, p) for p in quant_cfg.keep_high_precision)
             and m.in_features % BLOCK == 0 and m.out_features % BLOCK == 0]
    for name in names:
        old = model.get_submodule(name)
        new = (NVFP4Linear.from_linear(old, recipe) if quant_cfg.linear == "nvfp4_emulated"
               else FP8Linear.from_linear(old, **fp8_options(quant_cfg)))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return names


def freeze_for_inference(model: nn.Module, fuse_gelu: bool = True) -> int:
    """Quantize the weights of every low-bit linear that supports it once (e.g. FP8Linear), so inference
    forwards only quantize activations; fuse_gelu: FFNs whose fc2 is FP8 quantize fc2's input in the GELU's
    kernel (fp8_ffn.fuse_gelu_quant). Returns how many modules were frozen."""
    from .fp8_ffn import fuse_gelu_quant

    frozen = [m for m in model.modules() if callable(getattr(m, "freeze", None))]
    for m in frozen:
        m.freeze()
    if fuse_gelu:
        fuse_gelu_quant(model)
    return len(frozen)

