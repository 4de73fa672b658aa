"""Evaluate generated videos / latent dumps: quality metrics, and fidelity against a --reference run.

Examples:
  longlive eval out/video.mp4 --shots 0,33,65 --out eval/            # per-video metrics + plots
  longlive eval nvfp4.mp4 ptq.mp4 --reference bf16.mp4 --out fid/    # one fidelity table (PSNR/SSIM)
  longlive eval nvfp4_kv.pt --reference bf16.pt --out fid/           # latent dumps: latent MSE, latent drift
Writes OUT/report.json, OUT/report.md and OUT/<metric>.png. Metrics whose weights are not on local disk
(--dino/--clip directories, LPIPS, VBench) are listed as skipped with the reason.
"""
from __future__ import annotations

import os

from ..eval.fidelity import Run, compare_runs, load_run
from ..eval.report import ALL_METRICS, WEIGHT_FREE, EvalOptions, Report, evaluate_video, fidelity_markdown
from ..eval.video_io import is_latent_file, parse_shots


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="VIDEO", help="Videos (mp4, ...) or latent dumps (.pt/.safetensors).")
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


def run(args) -> int:
    if args.latents is not None and len(args.latents) != len(args.inputs):
        raise ValueError(f"--latents has {len(args.latents)} files for {len(args.inputs)} inputs; give one per input")
    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    prompts = None
    if args.prompts:
        with open(args.prompts) as f:
            prompts = [line.strip() for line in f if line.strip()]
    opt = EvalOptions(metrics=ALL_METRICS if names == ["all"] else tuple(names), window=args.window,
                      sink_frames=args.sink_frames, motion_stride=args.motion_stride, dino=args.dino, clip=args.clip,
                      prompts=prompts, vbench=tuple(d for d in args.vbench.split(",") if d), vbench_long=args.vbench_long,
                      progress=True)
    paths = list(args.inputs) + ([args.reference] if args.reference else [])
    labels = _labels(paths, None if args.labels is None else
                     list(args.labels) + ([_labels([args.reference], None)[0]] if args.reference else []))
    lat = list(args.latents or [None] * len(args.inputs)) + ([args.reference_latents] if args.reference else [])
    runs = [_load(label, p, z, args.latent_layout) for label, p, z in zip(labels, paths, lat)]

    report = Report()
    for r in runs:
        source = r.video_path or r.latent_path
        shots = parse_shots(args.shots, source)
        results = evaluate_video(r.frames, r.latents, shots, opt, r.video_path)
        frames = r.frames.shape[0] if r.frames is not None else None
        report.add_video(r.label, results, video=r.video_path, latents=r.latent_path,
                         frames=str(frames) if frames else None)
    if args.reference:
        ref, others = runs[-1], runs[:-1]
        report.reference = ref.label
        report.fidelity, report.fidelity_results = compare_runs(ref, others, use_lpips=not args.no_lpips)
    written = report.write(args.out, plots=not args.no_plots, min_points=args.plot_min_points)
    if report.fidelity:
        print(fidelity_markdown(report.fidelity, report.reference))
    for metric, why, videos in report.skipped_grouped():
        print(f"skipped {metric} ({', '.join(videos)}): {why}")
    print(f"wrote {written['markdown']}, {written['json']} and {len(written['plots'])} plot(s)")
    return 0
