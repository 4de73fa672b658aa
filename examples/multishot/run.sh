#!/usr/bin/env bash
# Multi-shot generation from a prompt file, then a contact sheet to look at the shots.
#   bash examples/multishot/run.sh [--set section.key=value ...]
# Env: PROMPTS (default examples/multishot/shots; or examples/multishot/switches.jsonl), CHECKPOINT (run dir /
#      weights; empty = random init), OUT (mp4), LONGLIVE (default `longlive`).
# Live and interactive instead (type prompts, start shots mid-stream in the browser):
#   longlive serve -c examples/multishot/config.yaml [--checkpoint RUN]    then open http://127.0.0.1:8000
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-$HERE/config.yaml}"
PROMPTS="${PROMPTS:-$HERE/shots}"
OUT="${OUT:-outputs/multishot.mp4}"
LONGLIVE="${LONGLIVE:-longlive}"
CKPT_ARGS=()
if [ -n "${CHECKPOINT:-}" ]; then CKPT_ARGS=(--checkpoint "$CHECKPOINT"); fi

echo "== 1. generate from $PROMPTS -> $OUT"
$LONGLIVE generate -c "$CONFIG" "${CKPT_ARGS[@]}" --prompt-file "$PROMPTS" --out "$OUT" \
    --latents-out "${OUT%.mp4}.pt" --no-progress "$@"

echo "== 2. contact sheet -> ${OUT%.mp4}.png"
python -m tools.contact_sheet "$OUT" --out "${OUT%.mp4}.png" --frames 8 --cols 8
