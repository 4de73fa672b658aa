"""Evaluate generated videos / latent dumps: quality metrics, and fidelity against a --reference run.

Examples:
  longlive eval out/video.mp4 --shots 0,33,65 --out eval/            # per-video metrics + plots
  longlive eval nvfp4.mp4 ptq.mp4 --reference bf16.mp4 --out fid/    # one fidelity table (PSNR/SSIM)
  longlive eval nvfp4_kv.pt --reference bf16.pt --out fid/           # latent dumps: latent MSE, latent drift
  longlive eval -c tiny.yaml --prompt "a red square@0" --prompt "a blue circle@4" --variant steps4 \\
      --variant steps2 infer.denoising_steps=[1000,500] --out fid/    # generate each variant, then compare
  longlive eval -c tiny.yaml --checkpoint run/ --prompt "a red square" --variant bf16 \\
      --variant nvfp4_ptq quant.linear=nvfp4_emulated \\
      --variant nvfp4_qat quant.linear=nvfp4_emulated qat.steps=20 --out fid/   # BF16 vs NVFP4 PTQ vs QAT
Writes OUT/report.json, OUT/report.md and OUT/<metric>.png (and OUT/runs/* when generating). Metrics whose
weights are not on local disk (--dino/--clip directories, LPIPS, VBench) are listed as skipped with the reason.
"""
from __future__ import annotations

import os
import sys

from ..eval.fidelity import Run, compare_runs, load_run
from ..eval.report import ALL_METRICS, WEIGHT_FREE, EvalOptions, Report, evaluate_video, fidelity_markdown
from ..eval.video_io import is_latent_file, parse_shots
from .common import add_config_arguments


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="VIDEO",
                        help="Videos (mp4, ...) or latent dumps (.pt/.safetensors).")
    parser.add_argument("--out", required=True, help="Output directory for report.json, report.md and plots.")
    parser.add_argument("--reference", help="Reference run (video or latent dump): adds the fidelity table.")
    parser.add_argument("--latents", nargs="+", default=None, metavar="FILE",
                        help="Latent dumps aligned with the VIDEO inputs (one per video).")
    parser.add_argument("--reference-latents", default=None, help="Latent dump of the reference video.")
    parser.add_argument("--latent-layout", default="CTHW", choices=("CTHW", "TCHW"), help="Stored latent layout.")
    parser.add_argument("--labels", nargs="+", default=None, help="Names for the inputs (default: file names).")
    parser.add_argument("--shots", default=None,
                        help="Shot start frames '0,33,65' or a JSON/JSONL file (the synthetic-data manifest works).")
    parser.add_argument("--metrics", default=",".join(WEIGHT_FREE),
                        help=f"Comma-separated metrics, or 'all'. Available: {','.join(ALL_METRICS)}.")
    parser.add_argument("--window", type=int, default=None, help="Early/late window in frames (default 10%%).")
    parser.add_argument("--sink-frames", type=int, default=1, help="Latent frames of the first shot's sink.")
    parser.add_argument("--motion-stride", type=int, default=1, help="Optical flow between frames t and t+stride.")
    parser.add_argument("--dino", default=None, help="Local Hugging Face DINO directory (subject_consistency).")
    parser.add_argument("--clip", default=None, help="Local Hugging Face CLIP directory (background/text metrics).")
    parser.add_argument("--prompts", default=None, help="Text file, one prompt per shot (text_video_similarity).")
    parser.add_argument("--vbench", default="", help="Comma-separated VBench dimensions to run (needs vbench).")
    parser.add_argument("--vbench-long", action="store_true", help="Use VBench-Long instead of VBench.")
    parser.add_argument("--no-lpips", action="store_true", help="Do not try LPIPS in fidelity comparisons.")
    parser.add_argument("--no-plots", action="store_true", help="Skip the PNG plots.")
    parser.add_argument("--plot-min-points", type=int, default=8, help="Plot series with at least this many points.")
    gen = parser.add_argument_group("model + prompts mode (instead of VIDEO inputs): generate each variant, compare "
                                    "to the first")
    gen.add_argument("--variant", nargs="+", action="append", default=[], metavar="LABEL [SECTION.KEY=VALUE]",
                     help="A run to generate: label, then config overrides (repeat; the first is the reference). "
                          "qat.steps=N [qat.loss=task|distill] fine-tunes the checkpoint with the variant's config "
                          "(e.g. quant.linear=nvfp4_emulated: QAT) for N steps before generating it.")
    add_config_arguments(gen)
    gen.add_argument("--checkpoint", default=None, help="Checkpoint for every variant (default: seeded random init).")
    gen.add_argument("--prompt", action="append", default=[], metavar="TEXT[@CHUNK]", help="Prompt schedule entry.")
    gen.add_argument("--prompt-file", default=None, help="Prompt schedule file (as `longlive generate`).")
    gen.add_argument("--prompt-index", type=int, default=0, help="Which video of a LongLive JSONL prompt file.")
    gen.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    gen.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="DiT dtype (default: bf16 on CUDA).")


def _labels(paths: list[str], given: list[str] | None) -> list[str]:
    if given is not None:
        if len(given) != len(paths):
            raise ValueError(f"--labels has {len(given)} names for {len(paths)} inputs")
        return given
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(stems)) < len(stems):
        return [os.path.join(os.path.basename(os.path.dirname(os.path.abspath(p))), s) for p, s in zip(paths, stems)]
    return stems


def _load(label: str, path: str, latents: str | None, layout: str) -> Run:
    if is_latent_file(path):
        return load_run(label, latents=path, layout=layout)
    return load_run(label, video=path, latents=latents, layout=layout)


def _generate(args) -> tuple[list[Run], list[int], list[str], list[str]]:
    """Model + prompts mode: the generated runs, shot starts in pixel frames, one prompt per shot, notes."""
    import torch

    from ..config import load_config
    from ..eval.variants import generate_variants, parse_variant, qat_notes, reproduced_reference

    try:
        from ..inference import pipeline  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--variant needs the streaming generator (megatron_longlive.inference.pipeline), which "
                         f"this checkout cannot import ({e}). Fix: evaluate videos written by `longlive generate`"
                         ) from e
    from ..inference.prompts import check_schedule, load_prompt_file, parse_cli_prompts
    from ..models.wan.vae import pixel_frames_for

    if args.inputs or args.reference:
        raise ValueError("--variant generates the runs itself; do not also give VIDEO inputs or --reference")
    if bool(args.prompt) == bool(args.prompt_file):
        raise ValueError("--variant needs the prompts: give either --prompt TEXT[@CHUNK] (repeatable) or --prompt-file")
    cfg = load_config(args.config, args.overrides)
    segments = (load_prompt_file(args.prompt_file, cfg.infer.chunk_frames, args.prompt_index,
                                 num_chunks=cfg.infer.num_chunks, chunks_per_shot=cfg.infer.chunks_per_shot,
                                 scene_cut_prefix=cfg.infer.scene_cut_prefix) if args.prompt_file
                else parse_cli_prompts(args.prompt))
    segments = check_schedule(segments, cfg.infer.num_chunks)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    variants = [parse_variant(v) for v in args.variant]
    runs = generate_variants(variants, segments, args.out, args.config, args.overrides, args.checkpoint, device, dtype)
    shots = [0 if s.start_chunk == 0 else pixel_frames_for(s.start_chunk * cfg.infer.chunk_frames) for s in segments]
    notes = qat_notes(variants, args.out) + reproduced_reference(runs, variants)
    return runs, shots, [s.prompt for s in segments], notes


def run(args) -> int:
    if args.latents is not None and len(args.latents) != len(args.inputs):
        raise ValueError(f"--latents has {len(args.latents)} files for {len(args.inputs)} inputs; give one per input")
    if not args.inputs and not args.variant:
        raise ValueError("nothing to evaluate: give VIDEO files, or --variant LABEL ... with prompts to generate runs")
    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    prompts = None
    if args.prompts:
        with open(args.prompts) as f:
            prompts = [line.strip() for line in f if line.strip()]
    generated = _generate(args) if args.variant else None
    if generated is not None and prompts is None:
        prompts = generated[2]
    opt = EvalOptions(metrics=ALL_METRICS if names == ["all"] else tuple(names), window=args.window,
                      sink_frames=args.sink_frames, motion_stride=args.motion_stride, dino=args.dino, clip=args.clip,
                      prompts=prompts, vbench=tuple(d for d in args.vbench.split(",") if d),
                      vbench_long=args.vbench_long,
                      progress=True)
    if generated is None:
        paths = list(args.inputs) + ([args.reference] if args.reference else [])
        labels = _labels(paths, None if args.labels is None else
                         list(args.labels) + ([_labels([args.reference], None)[0]] if args.reference else []))
        lat = list(args.latents or [None] * len(args.inputs)) + ([args.reference_latents] if args.reference else [])
        runs = [_load(label, p, z, args.latent_layout) for label, p, z in zip(labels, paths, lat)]
        has_reference = bool(args.reference)
    else:
        runs, has_reference = generated[0][1:] + generated[0][:1], len(generated[0]) > 1  # reference last

    report = Report(notes=list(generated[3]) if generated else [])
    for r in runs:
        source = r.video_path or r.latent_path
        shots = parse_shots(args.shots, source) if generated is None or args.shots else generated[1]
        results = evaluate_video(r.frames, r.latents, shots, opt, r.video_path)
        frames = r.frames.shape[0] if r.frames is not None else None
        report.add_video(r.label, results, video=r.video_path, latents=r.latent_path,
                         frames=str(frames) if frames else None)
    if has_reference:
        ref, others = runs[-1], runs[:-1]
        report.reference = ref.label
        report.fidelity, report.fidelity_results = compare_runs(ref, others, use_lpips=not args.no_lpips)
    written = report.write(args.out, plots=not args.no_plots, min_points=args.plot_min_points)
    if report.fidelity:
        print(fidelity_markdown(report.fidelity, report.reference))
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    for metric, why, videos in report.skipped_grouped():
        print(f"skipped {metric} ({', '.join(videos)}): {why}")
    print(f"wrote {written['markdown']}, {written['json']} and {len(written['plots'])} plot(s)")
    return 0
