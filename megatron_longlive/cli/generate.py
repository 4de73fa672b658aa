"""Stream a video chunk by chunk from prompts: `longlive generate --checkpoint RUN --prompt "text@0" --out x.mp4`."""
from __future__ import annotations

import argparse
import os
import time

from .common import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", default=None,
                        help="Training run dir, step_* checkpoint dir or .safetensors weights (default: random init). "
                             "Without --config, a run dir's config.yaml is used.")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT[@CHUNK]",
                        help="Prompt starting at chunk CHUNK (repeatable), e.g. 'a red square@0' 'a blue circle@4'.")
    parser.add_argument("--interactive", action="store_true",
                        help="Also read prompt switches from stdin while the video streams: each line is the prompt "
                             "from the next chunk on; '/shot TEXT' starts a new shot (scene cut); '/quit' stops reading.")
    parser.add_argument("--prompt-file", default=None,
                        help="Prompt schedule: .jsonl ({start_chunk, prompt} per line, or LongLive's {prompts: [...]}),"
                             " .yaml list, .txt 'CHUNK: prompt' lines or LongLive's one-prompt-per-line .txt, or a "
                             "LongLive case directory (caption/<case>/0.json, 1.json, ... {\"caption\": ...} per shot, "
                             "optional shot_durations.txt in chunks; later shots get infer.scene_cut_prefix).")
    parser.add_argument("--prompt-index", type=int, default=0,
                        help="Which video of a multi-video prompt file (LongLive JSONL or .txt line, 0-based) or "
                             "which case folder of a LongLive prompt directory (sorted by name).")
    parser.add_argument("--image", default=None, metavar="PATH",
                        help="Image-to-video: start the video from this image (its VAE latent is the clean first latent "
                             "frame, kept in the global sink). An image of another size is resized (aspect kept) to "
                             "cover infer.height x infer.width and center-cropped.")
    parser.add_argument("--continue-from", default=None, metavar="CLIP",
                        help="Continue this video clip: its first 1+4k frames (resized and center-cropped like --image)"
                             " are encoded and seed the cache; the output starts with them.")
    parser.add_argument("--switch-frame-indices", default=None,
                        help="LongLive JSONL: comma-separated latent frames where prompts switch (if not in the file).")
    parser.add_argument("--negative-prompt", default=None, metavar="TEXT",
                        help="Negative prompt of classifier-free guidance (infer.negative_prompt; default: the empty "
                             "string, as Wan). Guidance is on when infer.guidance_scale != 1, e.g. "
                             "--set infer.guidance_scale=5; it runs one forward of twice the batch per step.")
    parser.add_argument("--lora", default=None, metavar="ADAPTER_DIR",
                        help="Few-step LoRA (a peft-format adapter dir, or a `longlive distill` output dir: its "
                             "newest step_*/generator), merged into the weights; "
                             "pair it with its short schedule, e.g. --set infer.denoising_steps=[1000,500].")
    parser.add_argument("--out", default=None, help="Output mp4 (default: infer.output).")
    parser.add_argument("--latents-out", default=None, help="Also save the latents (.pt or .safetensors).")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="DiT dtype (default: bf16 on CUDA).")
    parser.add_argument("--no-progress", action="store_true", help="Hide progress bars.")


def _config(args):
    from ..config import load_config

    path = args.config
    if path is None and args.checkpoint and os.path.isfile(os.path.join(args.checkpoint, "config.yaml")):
        path = os.path.join(args.checkpoint, "config.yaml")
    return load_config(path, args.overrides)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..inference.conditioning import load_seed
    from ..inference.pipeline import generate_video, load_dit, load_encoders
    from ..inference.prompts import load_prompt_file, parse_cli_prompts

    cfg = _config(args)
    if args.negative_prompt is not None:
        cfg.infer.negative_prompt = args.negative_prompt
    if bool(args.prompt) == bool(args.prompt_file):
        raise ValueError("give either --prompt TEXT[@CHUNK] (repeatable) or --prompt-file FILE")
    if args.prompt_file:
        switches = ([int(s) for s in args.switch_frame_indices.split(",") if s.strip()]
                    if args.switch_frame_indices else None)
        segments = load_prompt_file(args.prompt_file, cfg.infer.chunk_frames, args.prompt_index, switches,
                                    num_chunks=cfg.infer.num_chunks, chunks_per_shot=cfg.infer.chunks_per_shot,
                                    scene_cut_prefix=cfg.infer.scene_cut_prefix)
    else:
        segments = parse_cli_prompts(args.prompt)
    live = None
    if args.interactive and cfg.parallel.sp_size > 1:
        raise ValueError("--interactive reads stdin on one process; with parallel.sp_size > 1 the ranks would see "
                         "different prompts. Fix: run --interactive with parallel.sp_size=1")
    if args.interactive:      # read stdin from now on, so lines typed during model loading are not lost
        import sys

        from ..inference.live_prompts import LivePrompts

        live = LivePrompts(sys.stdin)
    vae, text_encoder = load_encoders(cfg)
    seed = None          # image-to-video / continuation: clean latents of the video's first frames
    if args.image or args.continue_from:
        seed = load_seed(vae, cfg.infer.height, cfg.infer.width, args.image, args.continue_from)
    sp = None            # parallel.sp_size > 1 under torchrun/srun: each process is one SP rank, rank 0 writes
    if cfg.parallel.sp_size > 1:
        from ..distributed.sp_inference import init_sp_inference

        sp = init_sp_inference(cfg.parallel, cfg.model.num_heads)
    main = sp is None or sp.rank == 0
    device = sp.device if sp else torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model = load_dit(cfg, args.checkpoint, device, dtype)
    if args.lora:
        from ..training.lora import resolve_adapter_dir
        from ..training.lora_switch import load_with_adapter

        try:
            adapter = resolve_adapter_dir(args.lora)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--lora {e}") from None
        if main and adapter != args.lora:
            print(f"--lora {args.lora}: using the adapter {adapter}")
        load_with_adapter(model, adapter, merge=True)
    if device.type == "cuda":     # the streaming decoder runs beside the DiT (side stream), in the DiT's dtype
        vae.model.to(device, dtype)
    out = args.out or cfg.infer.output
    t0 = time.perf_counter()
    result = generate_video(cfg, model, segments, out if main else None, vae, text_encoder,
                            latents_path=args.latents_out if main else None, progress=main and not args.no_progress,
                            seed_latents=seed, sp_group=sp.sp if sp else None, live_prompts=live)
    if not main:
        return 0
    frames = result.video.shape[2]
    print(f"wrote {os.path.abspath(out)} ({frames} frames, {frames / cfg.infer.fps:.1f} s at {cfg.infer.fps:g} fps, "
          f"{cfg.infer.num_chunks} chunks, {time.perf_counter() - t0:.1f} s)")
    if result.latents_path:
        print(f"latents: {os.path.abspath(result.latents_path)}")
    return 0
