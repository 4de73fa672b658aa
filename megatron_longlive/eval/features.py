"""Feature-based metrics that need image/text encoders, run only from weights already on local disk.

- subject_consistency (DINO-family image encoder, e.g. a local copy of facebook/dinov2-*): per frame t,
  the mean of cos(f_t, f_0) and cos(f_t, f_{t-1}) of the CLS features, averaged over frames (VBench's
  definition); 1 for a static video.
- background_consistency: the same with CLIP image embeddings.
- text_video_similarity: cosine of CLIP image embeddings with the CLIP text embedding of the frame's
  shot prompt (one prompt per shot).
- vbench: runs the VBench (or VBench-Long) suite when the `vbench` package and its weights are installed,
  reporting its dimension names.

Encoders load with `local_files_only=True` from a directory the user names (nothing is downloaded).
Anything missing yields `MetricResult.skip(name, reason)`, never an exception.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import torch

from .metrics import MetricResult

VBENCH_DIMENSIONS = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
                     "dynamic_degree", "aesthetic_quality", "imaging_quality")
"""VBench dimensions that accept arbitrary prompts (its `custom_input` mode)."""


def _missing_dir(kind: str, path: str | None, flag: str) -> str | None:
    if path is None:
        return f"no {kind} weights given (pass {flag} DIR, a local Hugging Face model directory)"
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        return f"{path}: not a local Hugging Face model directory (config.json missing); {flag} must point to one"
    return None


def _to_tensor(out) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _load(path: str):
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


@torch.no_grad()
def _image_features(model, processor, frames_u8: np.ndarray, batch: int = 16) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> L2-normalised image features [T, D]."""
    feats = []
    for i in range(0, len(frames_u8), batch):
        pixels = processor(images=list(frames_u8[i:i + batch]), return_tensors="pt")["pixel_values"]
        if hasattr(model, "get_image_features"):
            f = _to_tensor(model.get_image_features(pixel_values=pixels))
        else:  # a plain vision backbone (DINO): the CLS token of the last layer
            f = model(pixel_values=pixels).last_hidden_state[:, 0]
        feats.append(f.float())
    return torch.nn.functional.normalize(torch.cat(feats), dim=-1)


def consistency(features: torch.Tensor) -> tuple[float, list[float]]:
    """VBench-style consistency of normalised features [T, D]: per frame t >= 1,
    (cos(f_t, f_0) + cos(f_t, f_{t-1})) / 2; returns (mean, per-frame series)."""
    if features.shape[0] < 2:
        return 1.0, [1.0]
    first = features[1:] @ features[0]
    prev = (features[1:] * features[:-1]).sum(-1)
    series = ((first + prev) / 2).clamp(-1, 1)
    return float(series.mean()), series.tolist()


def subject_consistency(frames_u8: np.ndarray, dino_dir: str | None) -> MetricResult:
    reason = _missing_dir("DINO", dino_dir, "--dino")
    if reason:
        return MetricResult.skip("subject_consistency", reason)
    model, processor = _load(dino_dir)
    value, series = consistency(_image_features(model, processor, frames_u8))
    return MetricResult("subject_consistency", value, {"min": min(series)}, series, "frame (t >= 1)")


def clip_metrics(frames_u8: np.ndarray, clip_dir: str | None, prompts: list[str] | None = None,
                 shot_starts: list[int] | None = None) -> list[MetricResult]:
    """background_consistency, and text_video_similarity when prompts are given (one per shot)."""
    reason = _missing_dir("CLIP", clip_dir, "--clip")
    if reason:
        return [MetricResult.skip("background_consistency", reason), MetricResult.skip("text_video_similarity", reason)]
    model, processor = _load(clip_dir)
    feats = _image_features(model, processor, frames_u8)
    value, series = consistency(feats)
    results = [MetricResult("background_consistency", value, {"min": min(series)}, series, "frame (t >= 1)")]
    if not prompts:
        results.append(MetricResult.skip("text_video_similarity", "no prompts given (--prompts)"))
        return results
    starts = sorted(shot_starts or [0])
    if starts[0] != 0:
        starts = [0] + starts
    if len(prompts) != len(starts):
        raise ValueError(f"{len(prompts)} prompts for {len(starts)} shots (starts {starts}). Fix: give one prompt "
                         "per shot, in order")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)
    with torch.no_grad():
        tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        text = torch.nn.functional.normalize(_to_tensor(model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))).float(), dim=-1)
    shot_of_frame = np.searchsorted(np.array(starts), np.arange(len(frames_u8)), side="right") - 1
    sims = (feats * text[torch.from_numpy(shot_of_frame)]).sum(-1)  # [T]
    results.append(MetricResult("text_video_similarity", float(sims.mean()), {"min": float(sims.min())},
                                sims.tolist()))
    return results


# ---------------------------------------------------------------------------------------------------------
# VBench adapter
# ---------------------------------------------------------------------------------------------------------
def vbench_status() -> str | None:
    """None when VBench can run offline, else why not."""
    try:
        import vbench  # noqa: F401
    except ImportError:
        return "the `vbench` package is not installed (pip install vbench, then place its weights locally)"
    cache = os.environ.get("VBENCH_CACHE_DIR", os.path.expanduser("~/.cache/vbench"))
    if not os.path.isdir(cache) or not os.listdir(cache):
        return f"VBench weights are not in {cache} (set VBENCH_CACHE_DIR); they are never downloaded here"
    return None


def vbench_metrics(video_path: str, dimensions: list[str], long: bool = False,
                   device: str = "cuda" if torch.cuda.is_available() else "cpu") -> list[MetricResult]:
    """Run VBench (or VBench-Long when `long`) on one video in custom-input mode -> one result per dimension."""
    names = [f"vbench/{d}" for d in dimensions]
    reason = vbench_status()
    if reason:
        return [MetricResult.skip(n, reason) for n in names]
    unknown = [d for d in dimensions if d not in VBENCH_DIMENSIONS]
    if unknown:
        return [MetricResult.skip(f"vbench/{d}", f"not a custom-input VBench dimension; use {VBENCH_DIMENSIONS}")
                for d in unknown]
    import vbench

    full_info = os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
    with tempfile.TemporaryDirectory() as work:
        videos = os.path.join(work, "videos")
        os.makedirs(videos)
        shutil.copy(video_path, videos)
        out = os.path.join(work, "results")
        if long:
            from vbench2_beta_long import VBenchLong

            suite, mode = VBenchLong(device, full_info, out), "long_custom_input"
        else:
            suite, mode = vbench.VBench(device, full_info, out), "custom_input"
        try:
            try:
                suite.evaluate(videos_path=videos, name="eval", dimension_list=list(dimensions), mode=mode)
            except TypeError:  # VBench releases before `mode` existed evaluate custom videos by default
                suite.evaluate(videos_path=videos, name="eval", dimension_list=list(dimensions))
            with open(os.path.join(out, "eval_eval_results.json")) as f:
                results = json.load(f)  # {dimension: [mean score, per-video list]}
        except Exception as e:  # noqa: BLE001 - a failing optional suite must not abort the report
            return [MetricResult.skip(n, f"VBench failed: {type(e).__name__}: {e}") for n in names]
    return [MetricResult(f"vbench/{d}", float(results[d][0])) for d in dimensions]
