#!/usr/bin/env bash
# LoRA-DMD distillation: distill a 2-step LoRA on a frozen AR checkpoint, then stream with it (merged at load).
#   TEACHER=runs/my-ar-run bash examples/lora-dmd/run.sh [--set section.key=value ...]
# Env: TEACHER (AR run dir or weights), DISTILL (output dir), PROMPT, OUT (mp4), LONGLIVE (default `longlive`).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-$HERE/config.yaml}"
TEACHER="${TEACHER:?set TEACHER to the teacher-forced AR run dir (or its weights)}"
DISTILL="$(realpath -m "${DISTILL:-runs/lora-dmd}")"
PROMPT="${PROMPT:-a paper boat drifts down a rainy street}"
OUT="${OUT:-outputs/lora-dmd-2step.mp4}"
LONGLIVE="${LONGLIVE:-longlive}"

echo "== 1. simplified DMD: generator + critic LoRAs on the frozen teacher -> $DISTILL"
$LONGLIVE distill -c "$CONFIG" --set "distill.teacher=$TEACHER" --set "distill.output_dir=$DISTILL" --no-progress "$@"
ADAPTER="$(ls -d "$DISTILL"/step_*/generator | sort | tail -n 1)"

echo "== 2. 2-step streaming generation with the adapter $ADAPTER -> $OUT"
$LONGLIVE generate -c "$CONFIG" --checkpoint "$TEACHER" --lora "$ADAPTER" --prompt "$PROMPT" --out "$OUT" \
    --no-progress "$@"
