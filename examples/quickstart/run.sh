#!/usr/bin/env bash
# CPU quickstart: train the tiny model on synthetic data, stream an mp4 with a prompt switch, render a contact sheet.
#   bash examples/quickstart/run.sh [--set section.key=value ...]
# Env: OUT (default outputs/quickstart, git-ignored), LONGLIVE (default `longlive`). Extra arguments go to every longlive command.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-outputs/quickstart}"
LONGLIVE="${LONGLIVE:-longlive}"

echo "== 1. train (teacher forcing, tiny model) -> $OUT/run"
$LONGLIVE train -c "$HERE/config.yaml" --set "train.output_dir=$OUT/run" --no-progress "$@"

echo "== 2. generate 8 chunks with a prompt switch at chunk 4 -> $OUT/video.mp4"
$LONGLIVE generate --checkpoint "$OUT/run" --prompt-file "$HERE/prompts.txt" --out "$OUT/video.mp4" \
    --latents-out "$OUT/latents.pt" --no-progress "$@"

echo "== 3. contact sheet -> $OUT/sheet.png"
python -m tools.contact_sheet "$OUT/video.mp4" --out "$OUT/sheet.png" --frames 8 --cols 8
