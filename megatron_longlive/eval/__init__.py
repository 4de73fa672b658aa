"""Evaluation of generated videos: weight-free metrics (metrics.py), encoder-based metrics from local weights
(features.py), fidelity between runs (fidelity.py) and report files (report.py); `longlive eval` is the CLI."""
