#!/usr/bin/env bash
# The GPU checks of the compute paths in one prepared call, for a lent GPU machine with little time on it:
#
#     bash benchmarks/gpu_check.sh            # writes into $OUT (default: ./gpu_check)
#     QUICK=1 bash benchmarks/gpu_check.sh    # one round per step run, no 2k-token steps
#     UNMEASURED=1 bash benchmarks/gpu_check.sh   # 1. and 3. instead of 2.: what no GPU run has measured yet
#
# 1. tests/test_gpu.py, its whole output in test_gpu.txt (and its last lines on stdout);
# 2. training steps (bf16 autocast) of full-rank, SLTrain's dense path and its default (`auto`, which takes the batched
#    rebuild there: `layers_by_path` says so) at 60M and 350M on 32k tokens, and on 2k tokens (where launches bound the
#    step): step_cuda_*_check.json, with the results' usual fields (benchmarks/step_bench.py). Copy the files worth
#    keeping to benchmarks/results, with a `note`.
# 3. (UNMEASURED=1) the default at 60M on 32k tokens in three rounds (another sample of its spread between processes),
#    the layer on few tokens in fp32 (layer_cuda_fp32_tokens{1024,256}.{json,png}: `peft_sltrain.cost` sends the wider
#    layers factored there, never timed) and the 1B step (step_cuda_1b_auto.json, 16k tokens); each part is cut off at
#    a time limit (about 480 s in all: planned for a 15-minute lease, not yet run).
# The whole took 436 and 456 s on H200s (the ninth and tenth runs, docs/compute_paths.md): give it a call's limit.
# A failed part does not stop the rest.
set -u
OUT=$(mkdir -p "${OUT:-gpu_check}" && cd "${OUT:-gpu_check}" && pwd)
ROUNDS=$([ -n "${QUICK:-}" ] && echo 1 || echo 2)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import sys, torch
torch.cuda.is_available() or sys.exit('gpu_check.sh: no CUDA device here; nothing run')
print('torch', torch.__version__, 'on', torch.cuda.get_device_name())" || exit 1
git log -1 --format='tree of %h %s' 2>/dev/null; git status --short 2>/dev/null | head -5

python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py >"$OUT/test_gpu.txt" 2>&1
echo "tests/test_gpu.py: exit status $? (whole output: $OUT/test_gpu.txt)"
tail -n 4 "$OUT/test_gpu.txt"

steps() {  # [LIMIT=seconds] steps SIZE BATCH NAME [step_bench flags]
    local size=$1 batch=$2 name=$3
    shift 3
    timeout "${LIMIT:-0}" python3 benchmarks/step_bench.py --device cuda --variants full,sltrain-dense,sltrain-auto \
        --steps 8 --sizes "$size" --batch "$batch" --out "$OUT/$name" "$@" 2>&1 | grep -v '^\s*$' | tail -n 4
}
if [ -n "${UNMEASURED:-}" ]; then
    export PYTHONUNBUFFERED=1
    LIMIT=180 steps 60m 128 step_cuda_60m_auto_rounds3.json --rounds 3 --variants full,sltrain-auto
    for n in 1024 256; do
        timeout 80 python3 benchmarks/layer_bench.py --device cuda --dtype fp32 --tokens $n \
            --out "$OUT/layer_cuda_fp32_tokens$n" 2>&1 | grep -v '^\s*$' | tail -n 2
    done
    LIMIT=160 steps 1b 64 step_cuda_1b_auto.json --rounds 1 --variants full,sltrain-auto
    ls -l "$OUT"
    exit 0
fi
steps 60m 128 step_cuda_60m_check.json --rounds "$ROUNDS"
steps 350m 128 step_cuda_350m_check.json --rounds "$ROUNDS"
[ -n "${QUICK:-}" ] || steps 350m 8 step_cuda_350m_batch8_check.json --rounds 1
[ -n "${QUICK:-}" ] || steps 60m 8 step_cuda_60m_batch8_check.json --rounds 1
ls -l "$OUT"
