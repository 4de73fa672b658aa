#!/usr/bin/env bash
# The GPU measurement groups (the newest first in `run`), for one lent H100/H200 (../.library/device/README.md).
#
#   here (PyPI reachable):  bash bench/gpu_session.sh prepare
#       -> .whl/: the cp312 wheels the lent machine lacks (it has torch, triton; no internet). /.whl/ is git-ignored;
#          carry it: it travels with the checkout (about 45 MB of the 64 MiB a call may carry).
#   on the device:          run command="bash bench/gpu_session.sh run 560 <group>" carry=[".whl"]
#                           (pending: `suite`, every single-GPU test in one call, never run: session 21 got no
#                           machine; session 20 ran s19a + s18c (bench/RESULTS.md "Session 20"); attn, e2e, train
#                           rerun the main tables)
#       -> installs the wheels (into /tmp/site, as the device README says), then runs the group's steps until 560 s
#          are spent (each with its own limit; the last ones are skipped when the budget runs out); log.txt,
#          steps.txt and results.jsonl come back in $OUT.
#
# Append the returned results.jsonl lines to bench/results.jsonl (with `command` pointing at bench/results.jsonl)
# and the tables to bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=("megatron-core==0.16.1" "zarr==3.1.6" "numcodecs" "donfig" "crc32c" "google-crc32c" "diffusers==0.42.1"
        "av==19.0.2" "nvidia-cudnn-frontend==1.16.0")

prepare() {
    mkdir -p .whl
    for w in "${WHEELS[@]}"; do
        pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$w"
    done
    du -sh .whl && ls .whl
}

# $OUT gets three files (at most 8 come back): log.txt (every step's output, in order), steps.txt, results.jsonl
step() {   # step NAME LIMIT_S cmd...: run cmd with min(LIMIT_S, time left), its output appended to $OUT/log.txt
    local name=$1 limit=$2; shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    if (( left < 30 )); then echo "skipped $name (budget spent)" | tee -a "$OUT/steps.txt"; return; fi
    (( limit > left )) && limit=$left
    echo "===== $name (limit ${limit}s): $*" | tee -a "$OUT/log.txt"
    local t0; t0=$(date +%s)
    PYTHONUNBUFFERED=1 timeout "$limit" "$@" >> "$OUT/log.txt" 2>&1
    local rc=$?
    echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/steps.txt" "$OUT/log.txt"
}

install_wheels() {   # the device README's recipe: wheels into /tmp/site, the checkout itself on PYTHONPATH
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl "$@" >> "$OUT/log.txt" 2>&1 || { echo "wheel install failed" | tee -a "$OUT/steps.txt"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/log.txt"
    python -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())" \
        | tee -a "$OUT/log.txt"
}

# One call may run 600 s at most (device README), so the steps come in groups of about 550 s each; call the groups
# back to back on the warm machine (it is given back after 30 s idle):
#   run command="bash bench/gpu_session.sh run 560 attn" ...; then "run 560 e2e"; then "run 560 train"
run() {
    local budget=${1:-560}; shift || true
    local groups=("${@:-attn e2e train}"); groups=(${groups[*]})
    DEADLINE=$(( $(date +%s) + budget ))
    OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
    local res="$OUT/results.jsonl" g
    install_wheels
    for g in "${groups[@]}"; do
        case $g in
        attn)   # infer.attention=cudnn-fp8 (issue 9): correctness first, then the per-call and per-chunk speed
            step cudnn_fp8_tests 150 python -m pytest -q -m gpu -s tests/gpu/test_cudnn_fp8_attention_gpu.py \
                tests/gpu/test_window_attention_gpu.py -k "cudnn or kernel_vs or attend or replay"
            step kv_attention 90 python bench/bench_kv_attention.py --no-growing \
                --variants cudnn cudnn-fp8 cudnn-fp8-kernel fp8-triton --out "$res"
            step dit_fps 420 python bench/bench_generate_chunk.py \
                --settings wan2.2-ti2v-5b wan2.1-1.3b-2step wan2.1-1.3b --steps compile+cuda_graph --linear fp8-fast \
                --attention sdpa cudnn-fp8 --chunks 3 --out "$res" ;;
        s15)    # next: the FP8 tests (every channel quantizer config bitwise), the quantizer's bandwidth per op and
                # config (pipelined, spill-free), the linear tables at 65520 tokens (the training step's; the token
                # padding to 128) with kernel profiles, the 1.3B step (bf16, channel, channel + fast accumulation)
                # with its kernel split, then the 32760-token tables
            step fp8_tests 60 python -m pytest -q -m gpu -s tests/gpu/test_fp8_gpu.py
            step fp8_quantize 80 python bench/bench_fp8_quantize.py --shapes 65520x1536 65520x8960 32760x14336 \
                --out "$res"
            step fp8_linear_65520 150 python bench/bench_fp8_linear.py --warmup 5 --iters 10 --tokens 65520 --profile \
                --out "$res"
            step train_step 180 python bench/bench_train_step.py --preset wan2.1-1.3b \
                --quant bf16 fp8_channel fp8_channel_fast --warmup 1 --steps 2 --profile --out "$res"
            step fp8_linear_32760 120 python bench/bench_fp8_linear.py --warmup 10 --tokens 32760 --out "$res" ;;
        s16)    # the channel quantizer with its codes pinned (computed once for both stores: GELU forward), every
                # config bitwise on the GPU; its bandwidth against the unpinned form; the 65520-token linear and FFN
                # tables (FFN with fast accumulation in all GEMMs; the accumulators' errors against the exact
                # product; dgrad and wgrad on two streams); then the timed 1.3B step, bf16 vs channel
            step fp8_tests 90 python -m pytest -q -m gpu -s tests/gpu/test_fp8_gpu.py -k channel
            step fp8_quantize 110 python bench/bench_fp8_quantize.py --shapes 65520x1536 65520x8960 32760x14336 \
                --out "$res"
            step fp8_linear_65520 150 python bench/bench_fp8_linear.py --warmup 5 --iters 10 --tokens 65520 --profile \
                --out "$res"
            step train_step 240 python bench/bench_train_step.py --preset wan2.1-1.3b --quant bf16 fp8_channel \
                --warmup 1 --steps 2 --out "$res" ;;
        s16b)   # quant.fp8_fast_accum_backward on trial: loss curves at the 1.3B shapes (4 blocks, 65520 tokens) for
                # bf16 / channel / channel + fast accumulation, the timed step with it, whether the fast
                # accumulator's error is systematic (its least-squares scale against promoted accumulation)
            step loss_track 300 python bench/bench_fp8_loss_track.py --layers 4 --steps 60 --out "$res"
            step train_step_fast 150 python bench/bench_train_step.py --preset wan2.1-1.3b \
                --quant bf16 fp8_channel_fast --warmup 1 --steps 2 --out "$res"
            step fp8_linear_1_3b 60 python bench/bench_fp8_linear.py --warmup 5 --iters 10 --tokens 65520 \
                --models 1.3b --out "$res" ;;
        s17)    # train.compile_elementwise (models/compiled_ops.py) and one shared x quantization for q/k/v
                # (quant/fp8_shared_input.py): the GPU tests of both, the 1.3B step eager then compiled (bf16 and
                # FP8 with the shared q/k/v codes), then the q/k/v pass (bf16, separate, shared)
            step tests 120 python -m pytest -q -m gpu -s tests/gpu/test_fp8_gpu.py tests/gpu/test_compiled_ops_gpu.py \
                -k "channel or compiled"
            step train_step_eager 150 python bench/bench_train_step.py --preset wan2.1-1.3b --quant bf16 \
                fp8_channel_fast --warmup 1 --steps 2 --out "$res"
            step train_step_compiled 220 python bench/bench_train_step.py --preset wan2.1-1.3b --quant bf16 \
                fp8_channel_fast --warmup 1 --steps 2 --compile-elementwise on --profile --out "$res"
            step fp8_qkv 90 python bench/bench_fp8_qkv.py --warmup 5 --iters 20 --out "$res" ;;
        s17b)   # train.compile_elementwise against float64 on the GPU (compiled no less accurate than eager), then
                # loss curves at the 1.3B block shapes: bf16 eager vs compiled, FP8 (defaults) compiled
            step tests 100 python -m pytest -q -m gpu -s tests/gpu/test_compiled_ops_gpu.py
            step loss_track 170 python bench/bench_fp8_loss_track.py --layers 4 --steps 20 --window 5 \
                --quant bf16 bf16+compiled --out "$res" ;;
        s18)    # probe: FP8 GEMMs quantizing their BF16 operands in the prologue (no quantizer pass) against the
                # channel quantizer + cuBLAS, per GEMM and per training pass, at 65520 tokens
            step probe_check 60 python bench/probe_fp8_prologue_gemm.py --check
            step probe_1536 240 python bench/probe_fp8_prologue_gemm.py --shapes 1536x1536 --out "$OUT/probe.jsonl"
            step probe_ffn 240 python bench/probe_fp8_prologue_gemm.py --shapes 1536x8960,8960x1536 \
                --out "$OUT/probe.jsonl" ;;
        s18b)   # resume bit-identical on CUDA (bf16, FP8 delayed scales from the checkpoint), the FP8 linear after
                # its tensor-parallel refactor, the probe's GPU check with the FP8 accumulator's tolerance
            step resume 200 python -m pytest -q -m gpu -s tests/gpu/test_train_resume_gpu.py
            step fp8_tests 200 python -m pytest -q -m gpu tests/gpu/test_fp8_gpu.py
            step probe_check 60 python bench/probe_fp8_prologue_gemm.py --check ;;
        s19a)   # s19 without the step (a short lease)
            run_s19a ;;
        s18c)   # the 1.3B step after session 18's changes (TP-ready FP8Linear, checkpointed scales), compiled ops
            step train_step_compiled 240 python bench/bench_train_step.py --preset wan2.1-1.3b --quant bf16 \
                fp8_channel_fast --warmup 1 --steps 2 --compile-elementwise on --out "$res" ;;
        s19)    # q/k/v as one FP8 GEMM per pass (quant/fp8_shared_input.py): its GPU test (the quantizer writing into
                # slices of the concatenated codes), the channel quantizer configs bitwise (q's row stride is now an
                # argument), the q/k/v pass (bf16, bf16 one linear, FP8 separate, FP8 one GEMM), then the 1.3B step
            run_s19a
            step train_step_compiled 260 python bench/bench_train_step.py --preset wan2.1-1.3b --quant bf16 \
                fp8_channel_fast --warmup 1 --steps 2 --compile-elementwise on --out "$res" ;;
        suite)  # every single-GPU test at HEAD (multi-GPU ones skip on one card): the whole CUDA path's regression
            step gpu_suite 560 python -m pytest -v -m gpu -rs --durations=20 tests/gpu ;;   # -v: a cut-short run still names each result
        *) echo "unknown group $g (suite | s19 | s19a | s18c | s18b | s18 | s17b | s17 | s16 | s16b | s15 | attn | e2e | train)"; exit 2 ;;
        esac
    done
}

run_s19a() {   # the same-input FP8 group's GPU tests, then the q/k/v pass table
    step fp8_tests 100 python -m pytest -q -m gpu -s tests/gpu/test_fp8_gpu.py \
        -k "same_input or channel_quantizer or channel_linear"
    step fp8_qkv 100 python bench/bench_fp8_qkv.py --warmup 5 --iters 20 --profile --out "$res"
}

# Issues 13 and 14 on a machine of N GPUs (a multi-GPU kind): NCCL equality first, then the tables.
#   run command="bash bench/gpu_session.sh run-multi 1500" carry=[".whl"] kind=nvidia-h100-x4 (or -x2 / -x8)
run_multi() {
    local budget=${1:-1500}
    DEADLINE=$(( $(date +%s) + budget ))
    OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
    install_wheels
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1        # NVLink multicast off (KINDS.md)
    local n; n=$(nvidia-smi -L | wc -l)
    # SP sizes dividing both settings' heads (12, 24) and chunk tokens (4680, 7040): 2 or 4
    local sp_all=$(( n >= 4 ? 4 : 2 )) sp=$(( n >= 5 ? 4 : (n >= 3 ? 2 : 1) ))   # sp: leaves one GPU for the VAE
    local res="$OUT/results.jsonl" trs="bench/bench_sp_train_step.py --latent-frames 24 48 96 --out $OUT/results.jsonl"
    step nccl_equality 420 python -m pytest -q -m gpu -s tests/gpu/test_sp_gpu.py tests/gpu/test_sp_inference_gpu.py
    # 13: Balanced SP vs naive vs none, BF16 and FP8, seconds per step, peak memory, all-to-all share
    step train_sp1 300 torchrun --nproc-per-node 1 $trs
    step train_balanced 300 torchrun --nproc-per-node "$sp_all" $trs --layout balanced
    step train_naive 300 torchrun --nproc-per-node "$sp_all" $trs --layout naive
    step train_balanced_fp8 300 torchrun --nproc-per-node "$sp_all" $trs --layout balanced --quant fp8
    # 14: SP inference DiT FPS (BF16 vs NVFP4 KV, bytes on the wire), then e2e with a dedicated VAE GPU + latency
    step sp_inference 420 torchrun --nproc-per-node "$sp_all" bench/bench_sp_inference.py --step compile \
        --kv bf16 nvfp4 nvfp4-fused --out "$res"
    step sp_e2e 420 torchrun --nproc-per-node "$sp" bench/bench_e2e.py --step compile --modes stream device \
        --decode-device "cuda:$sp" --linear fp8-fast --out "$res"
}

# DALI's GPU decoder (issue 7). Its wheel (nvidia-dali-cuda130, ~199 MB: the lent machine runs CUDA 13) exceeds what
# one call may carry (64 MiB), so it travels in 50 MiB parts over consecutive calls on the same warm machine (given
# back after 30 s idle: call again at once); each call stashes what it brought in /tmp/dali, which stays on the machine.
#   here:       bash bench/gpu_session.sh prepare-dali     -> .dali/part_aa.. + NAME + SHA256 + deps/ (its pure deps)
#   device:     run command="bash bench/gpu_session.sh stash-dali" carry=[".dali/NAME", ".dali/SHA256", ".dali/deps",
#                   ".dali/part_aa"]; then carry=[".dali/part_ab"]; ...; the last part with run-dali:
#               run command="bash bench/gpu_session.sh stash-dali && bash bench/gpu_session.sh run-dali 560"
#                   carry=[".dali/part_ad"]   (the other wheels: /tmp/site from an earlier run on this machine, or
#                   carry .whl too when it fits)
DALI_DEPS=("astunparse==1.6.3" "gast" "six" "optree" "nvtx" "makefun" "libcst~=1.8" "pyyaml")
prepare_dali() {
    rm -rf .dali && mkdir -p .dali/deps
    pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        --platform manylinux2014_x86_64 -d .dali nvidia-dali-cuda130==2.4.0
    for w in "${DALI_DEPS[@]}"; do
        pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .dali/deps "$w"
    done
    # DALI's image-codec and compression libraries (53 MB) are carried only if importing DALI needs them: the
    # video decoder uses NVDEC from the driver
    mkdir -p .dali/extra
    pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 -d .dali/extra "nvidia-nvimgcodec-cu13>=0.9.0,<0.10.0" \
        "nvidia-libnvcomp-cu13==5.3.0.16"
    local whl; whl=$(ls .dali/*.whl)
    basename "$whl" > .dali/NAME
    sha256sum "$whl" | cut -d' ' -f1 > .dali/SHA256
    split -b 50M "$whl" .dali/part_ && rm "$whl"
    ls -la .dali .dali/deps
}

stash_dali() {   # keep what this call carried (any of .dali/*) in /tmp/dali, which outlives the checkout's copy
    mkdir -p /tmp/dali && cp -r .dali/. /tmp/dali/ && ls -la /tmp/dali
}

run_dali() {   # run-dali [BUDGET_S] [tests]: "tests" skips the benchmark
    local budget=${1:-560} only=${2:-}
    DEADLINE=$(( $(date +%s) + budget ))
    OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
    local name; name=$(cat /tmp/dali/NAME)
    cat /tmp/dali/part_* > "/tmp/$name" && ls -la "/tmp/$name" | tee -a "$OUT/log.txt"
    echo "$(cat /tmp/dali/SHA256)  /tmp/$name" | sha256sum -c | tee -a "$OUT/log.txt" || exit 1
    if [ -d .whl ]; then install_wheels "/tmp/$name" /tmp/dali/deps/*.whl $(ls /tmp/dali/extra/*.whl 2>/dev/null)
    else   # the other wheels are already in /tmp/site from an earlier run on this machine
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
            "/tmp/$name" /tmp/dali/deps/*.whl $(ls /tmp/dali/extra/*.whl 2>/dev/null) >> "$OUT/log.txt" 2>&1 \
            || { echo "dali install failed"; exit 1; }
        export PYTHONPATH=/tmp/site:$PWD
    fi
    python -c "import nvidia.dali as d; print('dali', d.__version__)" 2>&1 | tee -a "$OUT/log.txt"
    step dali_tests 240 python -m pytest -q -m gpu -s -rs tests/gpu/test_data_dali.py
    [ "$only" = tests ] && return
    step dali_bench 240 python bench/bench_data.py --height 480 --width 832 --frames 81 --vae random --device cuda \
        --dtype bfloat16 --out "$OUT/results.jsonl"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    prepare-dali) prepare_dali ;;
    stash-dali) stash_dali ;;
    run-dali) shift; run_dali "$@" ;;
    run-multi) shift; run_multi "$@" ;;
    *) echo "usage: bash bench/gpu_session.sh prepare | run [BUDGET_S] | run-multi [BUDGET_S] | prepare-dali | stash-dali |" \
            "run-dali [BUDGET_S]"; exit 2 ;;
esac
