"""Compare loss curves of two or more runs: a table of smoothed values at chosen steps, and a PNG plot.

    python -m tools.compare_runs runs/a runs/b --steps 50,100,200 --window 10 --plot loss.png
    python -m tools.compare_runs runs/a/metrics.jsonl runs/b --metric grad_norm

Each RUN is a run directory holding metrics.jsonl (written by `longlive train` / `longlive distill`) or the
file itself. The smoothed value at step s is the mean of the last `--window` logged values at steps <= s (a
trailing moving average; window 1 = the raw value); a run that has not logged step s yet shows `-`. The last
column is each later run minus the first. The plot shows every run's raw curve (faint) and its smoothed curve.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from megatron_longlive.training.metrics import read_metrics


def load_series(run: str, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric` in a run dir's metrics.jsonl (or the given file), sorted by step."""
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run}: no metrics.jsonl. Fix: pass a run directory of `longlive train` "
                                "(train.output_dir) or a metrics.jsonl file")
    records = [r for r in read_metrics(path) if metric in r and "step" in r]
    if not records:
        raise ValueError(f"{path}: no record has {metric!r}. Fix: choose --metric from the file's keys, e.g. loss")
    records.sort(key=lambda r: r["step"])
    return [int(r["step"]) for r in records], [float(r[metric]) for r in records]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: out[i] = mean(values[max(0, i - window + 1): i + 1])."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def value_at(steps: list[int], smoothed: list[float], step: int) -> float | None:
    """Smoothed value at the last logged step <= `step`, None before the first or after the run's last step."""
    if not steps or step < steps[0] or step > steps[-1]:
        return None
    lo, hi = 0, len(steps)
    while lo < hi:  # last index with steps[i] <= step
        mid = (lo + hi) // 2
        if steps[mid] <= step:
            lo = mid + 1
        else:
            hi = mid
    return smoothed[lo - 1]


def default_steps(all_steps: list[list[int]], count: int = 8) -> list[int]:
    """`count` evenly spaced steps up to the longest run's last step, always including its first and last."""
    first = min(s[0] for s in all_steps)
    last = max(s[-1] for s in all_steps)
    if last == first:
        return [last]
    picks = {round(first + (last - first) * i / (count - 1)) for i in range(count)}
    return sorted(picks)


def compare(runs: list[str], labels: list[str], metric: str, window: int, steps: list[int] | None):
    """Table rows [step, value per run..., delta per later run...] and the series for plotting."""
    series = []
    for run in runs:
        s, v = load_series(run, metric)
        series.append((s, v, smooth(v, window)))
    steps = steps or default_steps([s for s, _, _ in series])
    rows = []
    for step in steps:
        vals = [value_at(s, sm, step) for s, _, sm in series]
        deltas = [None if v is None or vals[0] is None else v - vals[0] for v in vals[1:]]
        rows.append([step, *vals, *deltas])
    header = ["step", *labels, *[f"{lab}-{labels[0]}" for lab in labels[1:]]]
    return header, rows, series


def format_table(header: list[str], rows: list[list], num_runs: int) -> str:
    """Right-aligned columns; values with 4 decimals, deltas (columns after the runs) signed; `-` for none."""
    def cell(x, col: int) -> str:
        if col == 0:
            return str(x)
        if x is None:
            return "-"
        return f"{x:+.4f}" if col > num_runs else f"{x:.4f}"

    cells = [header] + [[cell(x, i) for i, x in enumerate(r)] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def plot(path: str, labels: list[str], series, metric: str, window: int, log_y: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, (label, (steps, raw, smoothed)) in enumerate(zip(labels, series)):
        color = f"C{i % 10}"
        ax.plot(steps, raw, color=color, alpha=0.25, linewidth=1)
        ax.plot(steps, smoothed, color=color, linewidth=2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{metric} (moving average of {window})" if window > 1 else metric)
    if log_y and all(v > 0 for _, raw, _ in series for v in raw):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _labels(runs: list[str], given: list[str] | None) -> list[str]:
    if given:
        if len(given) != len(runs):
            raise ValueError(f"--labels has {len(given)} names for {len(runs)} runs")
        return given
    names = [os.path.basename(os.path.normpath(r if os.path.isdir(r) else os.path.dirname(os.path.abspath(r))))
             for r in runs]
    return names if len(set(names)) == len(names) else [f"{i}:{n}" for i, n in enumerate(names)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="Run directories (or metrics.jsonl files), 2 or more.")
    parser.add_argument("--metric", default="loss", help="Key of the metrics records (default: loss).")
    parser.add_argument("--window", type=int, default=10, help="Moving-average window in logged records (1: raw).")
    parser.add_argument("--steps", default=None, help="Comma-separated steps for the table (default: 8 evenly spaced).")
    parser.add_argument("--labels", nargs="+", default=None, help="Names of the runs (default: directory names).")
    parser.add_argument("--plot", default=None, metavar="PNG", help="Write the curves to this PNG.")
    parser.add_argument("--log-y", action="store_true", help="Logarithmic y axis in the plot.")


def run(args: argparse.Namespace) -> int:
    if len(args.runs) < 2:
        raise ValueError(f"need 2 or more runs to compare, got {len(args.runs)}")
    if args.window < 1:
        raise ValueError(f"--window {args.window} must be >= 1")
    steps = None
    if args.steps:
        try:
            steps = sorted({int(s) for s in args.steps.split(",") if s.strip()})
        except ValueError:
            raise ValueError(f"--steps {args.steps!r} is not a comma-separated list of integers, e.g. 10,50,100") from None
    labels = _labels(args.runs, args.labels)
    header, rows, series = compare(args.runs, labels, args.metric, args.window, steps)
    print(f"{args.metric}, moving average of the last {args.window} logged value(s)")
    print(format_table(header, rows, len(labels)))
    if args.plot:
        plot(args.plot, labels, series, args.metric, args.window, args.log_y)
        print(f"wrote {os.path.abspath(args.plot)}")
    if any(not math.isfinite(v) for _, raw, _ in series for v in raw):
        print("note: some logged values are NaN/Inf")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ._cli import run_tool

    return run_tool("compare_runs", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
