#!/usr/bin/env bash
# Wan2.2-5B NVFP4: teacher-forcing training with NVFP4 linears, then a video from the NVFP4 KV cache.
#   bash examples/wan2.2-5b-nvfp4/run.sh [--set section.key=value ...]     (the cache at data.path must exist:
#   make it as in examples/wan2.1-ar-balanced-sp/run.sh, with this config)
# Env: RUN (run dir), NPROC (GPUs), TORCHRUN_ARGS, PROMPT, OUT (mp4), LONGLIVE (default `longlive`).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-$HERE/config.yaml}"
RUN="$(realpath -m "${RUN:-runs/wan2.2-5b-nvfp4}")"
NPROC="${NPROC:-8}"
PROMPT="${PROMPT:-a red kite rises over a windy beach at sunset}"
OUT="${OUT:-outputs/wan2.2-5b-nvfp4.mp4}"
LONGLIVE="${LONGLIVE:-longlive}"

echo "== 1. NVFP4 teacher-forcing training on $NPROC GPU(s) -> $RUN"
torchrun ${TORCHRUN_ARGS:-} --nproc-per-node "$NPROC" -m megatron_longlive.cli.main train -c "$CONFIG" \
    --set "train.output_dir=$RUN" --resume --no-progress "$@"

echo "== 2. stream a video with the NVFP4 KV cache -> $OUT"
$LONGLIVE generate -c "$CONFIG" --checkpoint "$RUN" --prompt "$PROMPT" --out "$OUT" --no-progress "$@"
