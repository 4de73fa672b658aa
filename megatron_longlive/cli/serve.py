"""Live interactive viewer: `longlive serve --config C [--checkpoint RUN]`, then open http://127.0.0.1:8000 ."""
from __future__ import annotations

import argparse

from .common import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..serve.settings import ServeSettings

    d = ServeSettings()
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", default=None,
                        help="Training run dir, step_* checkpoint dir or .safetensors weights (default: random init).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only).")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one).")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="DiT dtype (default: bf16 on CUDA).")
    parser.add_argument("--max-sessions", type=int, default=d.max_sessions, help="Concurrent viewers (default 1).")
    parser.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars, help="Longest accepted prompt.")
    parser.add_argument("--min-switch-interval", type=float, default=d.min_switch_interval_s,
                        help="Seconds between two accepted prompt switches of a session.")
    parser.add_argument("--max-lead", type=float, default=d.max_lead_s,
                        help="Seconds of video generated ahead of playback (bounds switch latency).")
    parser.add_argument("--max-chunks", type=int, default=0, help="End a session after this many chunks (0: endless).")
    parser.add_argument("--no-recache", action="store_true", help="Do not recache the KV cache on a prompt switch.")
    parser.add_argument("--image", default=None, metavar="PATH",
                        help="Start every session from this image (image-to-video; resized to cover infer.height x "
                             "infer.width and center-cropped).")
    parser.add_argument("--negative-prompt", default=None, metavar="TEXT",
                        help="Negative prompt when infer.guidance_scale != 1 (default: infer.negative_prompt).")


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from ..inference.pipeline import load_dit, load_encoders
    from ..serve.app import Viewer, build_app
    from ..serve.settings import ServeSettings
    from .generate import _config

    for name in ("max_sessions", "max_prompt_chars"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.min_switch_interval < 0 or args.max_lead <= 0 or args.max_chunks < 0:
        raise ValueError("--min-switch-interval must be >= 0, --max-lead > 0 and --max-chunks >= 0")
    cfg = _config(args)
    if args.negative_prompt is not None:
        cfg.infer.negative_prompt = args.negative_prompt
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    vae, text_encoder = load_encoders(cfg)
    seed = None
    if args.image:
        from ..inference.conditioning import load_seed

        seed = load_seed(vae, cfg.infer.height, cfg.infer.width, image=args.image).to(device)
    model = load_dit(cfg, args.checkpoint, device, dtype)
    settings = ServeSettings(max_prompt_chars=args.max_prompt_chars, min_switch_interval_s=args.min_switch_interval,
                             max_sessions=args.max_sessions, max_lead_s=args.max_lead, max_chunks=args.max_chunks,
                             recache=not args.no_recache)
    app = build_app(Viewer(cfg, model, vae.to(device), text_encoder.to(device), settings, seed_latents=seed))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: anyone who can reach this address can drive the model")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", ws="websockets")
    server = uvicorn.Server(config)
    _announce(server)
    server.run()
    return 0


def _announce(server) -> None:
    """Print the URL once uvicorn has bound its socket (the real port when --port 0)."""
    startup = server.startup

    async def startup_and_print(sockets=None):
        await startup(sockets=sockets)
        for s in server.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                print(f"longlive serve: open http://{host}:{port}/", flush=True)
                return

    server.startup = startup_and_print
