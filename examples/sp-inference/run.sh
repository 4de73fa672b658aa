#!/usr/bin/env bash
# SP inference: `longlive generate` under torchrun, one process per SP rank; rank 0 writes the mp4.
#   CHECKPOINT=runs/wan2.1-ar-sp4 bash examples/sp-inference/run.sh [--set section.key=value ...]
# Env: CHECKPOINT (run dir / weights; empty = random init), NPROC (= parallel.sp_size, default 4), PROMPT, OUT,
#      TORCHRUN_ARGS. The result equals `longlive generate` on one GPU (tests/distributed/test_sp_inference.py).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-$HERE/config.yaml}"
NPROC="${NPROC:-4}"
PROMPT="${PROMPT:-a lighthouse on a cliff at night, waves crashing}"
OUT="${OUT:-outputs/sp$NPROC.mp4}"
CKPT_ARGS=()
if [ -n "${CHECKPOINT:-}" ]; then CKPT_ARGS=(--checkpoint "$CHECKPOINT"); fi

echo "== SP inference on $NPROC rank(s) -> $OUT"
torchrun ${TORCHRUN_ARGS:-} --nproc-per-node "$NPROC" -m megatron_longlive.cli.main generate -c "$CONFIG" \
    "${CKPT_ARGS[@]}" --set "parallel.sp_size=$NPROC" --prompt "$PROMPT" --out "$OUT" --no-progress "$@"
