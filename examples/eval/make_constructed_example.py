"""Build the constructed-video fidelity example in examples/eval/constructed/ (no model needed).

Reference: a synthetic 3-shot moving-shapes video (dataloaders/synthetic.py, 64x64, 49 frames).
Compared runs, each a known degradation of the reference so the table can be read against expectations:
  nvfp4_pixels  - the frames themselves NVFP4 fake-quantized (1x16 blocks along width, reference quantizer):
                  a stand-in for quantization error, not a quantized model
  blurred       - Gaussian blur sigma 1 (PSNR/SSIM drop, sharpness drops)
  faded         - fades to flat gray over the last two thirds (drift, falling SSIM over time)
Then runs the same command a user would:

  python examples/eval/make_constructed_example.py            # writes build/eval_example/*.mp4, then:
  longlive eval build/eval_example/nvfp4_pixels.mp4 build/eval_example/blurred.mp4 \
      build/eval_example/faded.mp4 --reference build/eval_example/reference.mp4 \
      --shots build/eval_example/shots.json --out examples/eval/constructed
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

from dataloaders.synthetic import render_video
from megatron_longlive.cli.main import main
from megatron_longlive.eval import testvideos as tv
from megatron_longlive.inference.video_writer import Mp4Writer
from megatron_longlive.quant.nvfp4.reference import fake_quantize

VIDEOS = "build/eval_example"
OUT = "examples/eval/constructed"


def nvfp4_pixels(frames: np.ndarray) -> np.ndarray:
    """[T, H, W, 3] in [0, 1] -> NVFP4 round trip of the [-1, 1] values in 1x16 blocks along the width."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() * 2 - 1  # [T, 3, H, W]
    q = fake_quantize(x.reshape(-1, x.shape[-1])).reshape(x.shape)
    return ((q.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()


def main_() -> int:
    os.makedirs(VIDEOS, exist_ok=True)
    frames_u8, shots = render_video(seed=0, index=0, height=64, width=64, num_frames=49, num_shots=3)
    ref = frames_u8.astype(np.float32) / 255.0
    runs = {"reference": ref, "nvfp4_pixels": nvfp4_pixels(ref), "blurred": tv.blur(ref, 1.0),
            "faded": tv.fade_to(ref, 0.5, start=16)}
    for name, frames in runs.items():
        with Mp4Writer(os.path.join(VIDEOS, f"{name}.mp4"), fps=8, crf=0) as w:
            w.write(tv.to_uint8(frames))
    with open(os.path.join(VIDEOS, "shots.json"), "w") as f:
        json.dump({"shots": shots}, f)
    sys.argv = ["longlive", "eval", *(f"{VIDEOS}/{n}.mp4" for n in ("nvfp4_pixels", "blurred", "faded")),
                "--reference", f"{VIDEOS}/reference.mp4", "--shots", f"{VIDEOS}/shots.json", "--out", OUT]
    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main_())
