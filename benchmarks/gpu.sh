#!/usr/bin/env bash
# Every GPU figure in one command (at most 9.5 minutes: the limits below add up to 570 s, so that it fits
# one 10-minute call on a lent machine; not yet timed on a GPU): the train step
# (fp32/bf16 x contiguous/channels_last x self_training/bida, plus bf16 under torch.compile)
# with peak memory and TFLOP/s, BiDA's extras eager vs compiled, `bida train` against
# the step benchmark (data wait, pseudo-label and evaluation images/s), and the transformer
# path's teacher step (MiT-B5 + DAFormer head, 512x512, bf16: self-training vs BiDA, each with and
# without MIC) and each variant's peak memory with and without model.grad_checkpoint, and the
# same for a DINOv2 ViT-L/14 (self-training vs BiDA), and inference images/s and peak memory
# (eager fp32 and bf16, onnxruntime CPU and CUDA where installed, at 512x1024 and 1024x2048), and
# HRDA's network (MiT-B5, 1024 context + 512 detail crops, bf16): the teacher step of HRDA, MIC(HRDA)
# and BiDA + MIC(HRDA), and the peak memory of MIC(HRDA) and BiDA + MIC(HRDA) with and without
# model.grad_checkpoint (the goal: BiDA + MIC(HRDA) under 24 GB).
# Prints each part as it runs, then one summary table.
#
#   bash benchmarks/gpu.sh                 # on a machine with a CUDA GPU
#   BIDA_BENCH_SMOKE=1 bash benchmarks/gpu.sh   # CPU, tiny shapes: checks the scripts run
#
# Uses .venv/bin/python when there is a .venv, else the machine's python3 with src/ on the
# path (BIDA_PYTHON=... picks another interpreter); installs nothing. A part that fails or
# runs out of its time shows as n/a. BIDA_BENCH_OUT=DIR keeps the JSON files in DIR.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -x .venv/bin/python ] && [ -z "${BIDA_PYTHON:-}" ]; then
    PY=(.venv/bin/python)
else  # BIDA_PYTHON: another interpreter with torch (default: python3)
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    PY=("${BIDA_PYTHON:-python3}")
fi
OUT="${BIDA_BENCH_OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
"${PY[@]}" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")'

if [ -n "${BIDA_BENCH_SMOKE:-}" ]; then
    STEP=(--smoke --channels-last --compile)
    EXTRAS=(--smoke)
    LOOP=(--smoke)
    TEACHER=(--smoke --precisions fp32)
    MEMORY=(--smoke)
    VIT=(--smoke --backbone dinov2_vits14 --width 0.125)
    INFER=(--smoke)
    HRDA_TEACHER=(--smoke --hrda --precisions fp32 --methods self_training self_training+mic bida+mic)
    HRDA_MEMORY=(--smoke --hrda --methods self_training+mic bida+mic)
else
    STEP=(--repeats 6 --channels-last --compile)
    EXTRAS=(--device cuda --dim 76 --repeats 20)
    LOOP=(--iters 300 --workers 8)
    TEACHER=(--repeats 4)
    MEMORY=(--repeats 1)
    VIT=(--backbone dinov2_vitl14 --methods self_training bida --repeats 1)
    INFER=(--backbone resnet101 --width 1.0 --sizes 512x1024 1024x2048 --images 10 --repeats 3)  # --compile: not within its 70 s
    HRDA_TEACHER=(--hrda --methods self_training self_training+mic bida+mic --repeats 2 --warmup 1)
    HRDA_MEMORY=(--hrda --methods self_training+mic bida+mic --repeats 1)
fi

part() {  # part SECONDS NAME SCRIPT ARGS...: one benchmark, bounded in time, failures reported
    local limit=$1 name=$2; shift 2
    echo; echo "== $name"
    timeout --signal=TERM --kill-after=10 "$limit" "${PY[@]}" "$@" || echo "== $name: failed or timed out (exit $?)"
}

START=$SECONDS
part 100 "train step (gpu_step.py)" benchmarks/gpu_step.py "${STEP[@]}" --json "$OUT/step.json"
part 45 "BiDA extras (method_extras.py)" benchmarks/method_extras.py "${EXTRAS[@]}" --json "$OUT/extras.json"
part 75 "trainer (train_loop.py)" benchmarks/train_loop.py "${LOOP[@]}" --json "$OUT/loop.json"
part 70 "transformer teacher step (teacher_step.py)" benchmarks/teacher_step.py "${TEACHER[@]}" --json "$OUT/teacher.json"
part 50 "peak memory with grad_checkpoint (memory.py)" benchmarks/memory.py "${MEMORY[@]}" --json "$OUT/memory.json"
part 60 "DINOv2 ViT-L/14 teacher step and memory (memory.py)" benchmarks/memory.py "${VIT[@]}" --json "$OUT/memory_vit.json"
part 70 "inference: eager, bf16, onnxruntime (inference.py)" benchmarks/inference.py "${INFER[@]}" --json "$OUT/inference.json"
part 45 "HRDA, MIC(HRDA), BiDA + MIC(HRDA) teacher step (teacher_step.py --hrda)" benchmarks/teacher_step.py "${HRDA_TEACHER[@]}" --json "$OUT/teacher_hrda.json"
part 55 "MIC(HRDA) [+ BiDA] peak memory with grad_checkpoint (memory.py --hrda)" benchmarks/memory.py "${HRDA_MEMORY[@]}" --json "$OUT/memory_hrda.json"
echo; echo "== summary ($((SECONDS - START)) s, $(date -u +%Y-%m-%d), results in $OUT)"
"${PY[@]}" benchmarks/summary.py "$OUT"
