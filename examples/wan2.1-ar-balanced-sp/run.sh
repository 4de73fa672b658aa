#!/usr/bin/env bash
# Wan2.1-1.3B AR tuning with Balanced SP: videos -> Zarr latent cache -> teacher-forcing training on N GPUs.
#   VIDEOS=/data/videos bash examples/wan2.1-ar-balanced-sp/run.sh [--set section.key=value ...]
# Env: VIDEOS (folder of mp4s + manifest.jsonl captions), CACHE (default: data.path of the config), RUN (run dir),
#      VAE / TEXT_ENCODER (local Wan2.1 VAE and umT5 dirs), MODE=torchrun|slurm, NPROC (GPUs on this node),
#      TORCHRUN_ARGS (e.g. "--nnodes 2 --rdzv-endpoint host:29500"), LONGLIVE (default `longlive`).
# Extra arguments (--set ...) go to every command, so one override changes preprocess and training alike.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-$HERE/config.yaml}"
VIDEOS="${VIDEOS:?set VIDEOS to a folder of training videos}"
CACHE="$(realpath -m "${CACHE:-data/cache/wan2.1-480p}")"
RUN="$(realpath -m "${RUN:-runs/wan2.1-ar-sp4}")"
VAE="${VAE:-checkpoints/Wan2.1-T2V-1.3B-Diffusers/vae}"
TEXT_ENCODER="${TEXT_ENCODER:-checkpoints/Wan2.1-T2V-1.3B-Diffusers/text_encoder}"
MODE="${MODE:-torchrun}"
NPROC="${NPROC:-8}"
LONGLIVE="${LONGLIVE:-longlive}"

echo "== 1. preprocess $VIDEOS -> $CACHE (resumable: rerunning skips committed videos)"
$LONGLIVE preprocess "$VIDEOS" --out "$CACHE" -c "$CONFIG" --vae "$VAE" --text-encoder "$TEXT_ENCODER" \
    --no-progress "$@"
python -m tools.cache_inspect "$CACHE" --validate --no-progress | tail -n 1

echo "== 2. teacher-forcing training with Balanced SP ($MODE) -> $RUN"
if [ "$MODE" = slurm ]; then
  $LONGLIVE slurm -c "$CONFIG" --run-dir "$RUN" --set "data.path=$CACHE" --submit "$@"
else
  torchrun ${TORCHRUN_ARGS:-} --nproc-per-node "$NPROC" -m megatron_longlive.cli.main train -c "$CONFIG" \
      --set "data.path=$CACHE" --set "train.output_dir=$RUN" --resume --no-progress "$@"
fi
