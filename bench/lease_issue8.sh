#!/usr/bin/env bash
# Issue 8's measurements on one lent multi-GPU machine, in parts that each fit one device call
# (10 minutes). Every line a bench prints goes to OUTDIR/PART.txt; record the figures in
# docs/PERFORMANCE.md with the device, the date and these commands.
#
#   bash bench/lease_issue8.sh tests  OUTDIR   # GPU tests (not the compiled ones: ~2-4 min)
#   bash bench/lease_issue8.sh layers OUTDIR   # layers A and B at EP N and TP 2 x EP N/2, eager and graphed
#   bash bench/lease_issue8.sh e2e    OUTDIR   # moe-1.3b-16e end to end at EP N and TP 2 x EP N/2
#   bash bench/lease_issue8.sh scale  OUTDIR   # the TED scale experiment (bench/ted_scale.py)
#
# N is the GPU count (4 or 8 for the targets; 2 runs the same commands at the layouts that fit).
# DATA: a corpus prefix for the end-to-end runs (default: mock data). megatron-core must be
# importable (PYTHONPATH), as for every bench.
set -uo pipefail
part=${1:?part: tests, layers, e2e or scale}
out=$(mkdir -p "${2:?output directory}" && cd "$2" && pwd)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
n=$(python3 -c "import torch; print(torch.cuda.device_count())")
log="$out/$part.txt"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "# $(date -u +%FT%TZ) ${gpu:-no GPU} x $n, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" | tee -a "$log"

run() {   # run SECONDS COMMAND...: the command and the lines a bench prints as its result
    local limit=$1; shift
    echo "\$ $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | grep -E "^(moe_layer|train_throughput|FAILED|ERROR)|^[|]| passed| failed| skipped|error:" \
        | tee -a "$log"
    echo "  (exit ${PIPESTATUS[0]})" | tee -a "$log"
}

case $part in
tests)
    run 500 python3 -m pytest tests/test_gpu.py -k "not compile" -q -p no:cacheprovider ;;
layers)
    for shape in A B; do
        run 60 torchrun --nproc_per_node "$n" bench/moe_layer.py --shape $shape --ep "$n" --repeat 5
        run 60 torchrun --nproc_per_node "$n" bench/moe_layer.py --shape $shape --tp 2 --ep $((n / 2)) --repeat 5
        run 60 torchrun --nproc_per_node "$n" bench/moe_layer.py --shape $shape --tp 2 --ep $((n / 2)) --repeat 5 \
            --cuda-graph-scope attn
    done ;;
e2e)
    data=()
    if [ -n "${DATA:-}" ]; then data=(--data-path "$DATA" --tokenizer-type NullTokenizer); fi
    common=(--preset moe-1.3b-16e --nproc "$n" --use-distributed-optimizer --iters 12 "${data[@]}")
    run 150 python3 bench/train_throughput.py "${common[@]}" --ep "$n" --global-batch-size $((16 * n)) \
        --moe-router-force-load-balancing
    run 150 python3 bench/train_throughput.py "${common[@]}" --ep "$n" --global-batch-size $((16 * n))
    run 150 python3 bench/train_throughput.py "${common[@]}" --tp 2 --ep $((n / 2)) --global-batch-size $((8 * n)) \
        --moe-router-force-load-balancing --cuda-graph-impl local --cuda-graph-scope attn ;;
scale)
    run 590 python3 bench/ted_scale.py --nproc "$n" ;;
*)
    echo "unknown part $part: tests, layers, e2e or scale" >&2; exit 2 ;;
esac
