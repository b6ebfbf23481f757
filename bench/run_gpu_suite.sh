#!/usr/bin/env bash
# The GPU tests and the benchmarks of docs/PERFORMANCE.md on one multi-GPU machine, in parts that
# each fit a 10-minute run. Every command and the lines it prints as its result go to OUTDIR/PART.txt,
# headed by the date, the GPU and the commit: what a table in docs/PERFORMANCE.md records.
#
#   bash bench/run_gpu_suite.sh tests    OUTDIR   # tests marked gpu, without the compiled layers
#   bash bench/run_gpu_suite.sh compile  OUTDIR   # the Inductor-compiled layer tests
#   bash bench/run_gpu_suite.sh layers   OUTDIR   # layers A and B: EP N; TP 2 x EP N/2 eager and graphed
#   bash bench/run_gpu_suite.sh e2e      OUTDIR   # moe-1.3b-16e end to end: EP N (balanced, learned); TED graphed
#   bash bench/run_gpu_suite.sh memory   OUTDIR   # memory model against the measured peak
#   bash bench/run_gpu_suite.sh recompute OUTDIR  # checkpointing modes and CAC on a stack of layer-A layers
#   bash bench/run_gpu_suite.sh scale    OUTDIR   # the TED scale experiment (bench/ted_scale.py)
#
# N is the number of GPUs used: NGPUS from the environment, else every visible GPU. Layouts with
# TP 2 run only where N >= 2. DATA: a corpus prefix for the end-to-end runs (default: mock data).
set -uo pipefail
parts="tests compile layers e2e memory recompute scale"
part=${1:?part: one of $parts}
case " $parts " in *" $part "*) ;; *) echo "error: unknown part '$part': one of $parts" >&2; exit 2 ;; esac
case ${2:?output directory} in /*) out=$2 ;; *) out=$PWD/$2 ;; esac
# NVLink multicast off: not every lent machine supports it, and NCCL then fails at start-up.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
n=${NGPUS:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
if ! [ "$n" -ge 1 ] 2>/dev/null; then
    echo "error: no GPU visible (NGPUS=$n); this suite needs CUDA" >&2; exit 2
fi
mkdir -p "$out"
log="$out/$part.txt"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "# $(date -u +%FT%TZ) ${gpu:-no GPU} x $n, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    | tee -a "$log"

run() {   # run SECONDS COMMAND...: the command, then the lines a bench or pytest prints as its result
    local limit=$1; shift
    echo "\$ $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 \
        | grep -E "^(moe_layer|train_throughput|recompute|FAILED|ERROR)|^[|]| passed| failed| skipped|error:|GiB" \
        | tee -a "$log"
    echo "  (exit ${PIPESTATUS[0]})" | tee -a "$log"
}

tp2=()   # the TP 2 x EP N/2 layout where N allows it
[ "$n" -ge 2 ] && tp2=(--tp 2 --ep $((n / 2)))

case $part in
tests)
    run 560 python3 -m pytest tests -m gpu -k "not compile" -q -p no:cacheprovider ;;
compile)
    run 560 python3 -m pytest tests -m gpu -k compile -q -p no:cacheprovider ;;
layers)
    for shape in A B; do
        run 60 torchrun --nproc_per_node "$n" bench/moe_layer.py --shape $shape --ep "$n" --repeat 5
        if [ ${#tp2[@]} -gt 0 ]; then
            run 60 torchrun --nproc_per_node "$n" bench/moe_layer.py --shape $shape "${tp2[@]}" --repeat 5
            run 60 torchrun --nproc_per_node "$n" bench/moe_layer.py --shape $shape "${tp2[@]}" --repeat 5 \
                --cuda-graph-scope attn
        fi
    done ;;
e2e)
    data=()
    if [ -n "${DATA:-}" ]; then data=(--data-path "$DATA" --tokenizer-type NullTokenizer); fi
    common=(--preset moe-1.3b-16e --nproc "$n" --use-distributed-optimizer --iters 12 "${data[@]}")
    run 150 python3 bench/train_throughput.py "${common[@]}" --ep "$n" --global-batch-size $((16 * n)) \
        --moe-router-force-load-balancing
    run 150 python3 bench/train_throughput.py "${common[@]}" --ep "$n" --global-batch-size $((16 * n))
    if [ ${#tp2[@]} -gt 0 ]; then
        run 150 python3 bench/train_throughput.py "${common[@]}" "${tp2[@]}" --global-batch-size $((8 * n)) \
            --moe-router-force-load-balancing --cuda-graph-impl local --cuda-graph-scope attn
    fi ;;
memory)
    layers=()   # fewer than 24 layers where the 1.3B-16e cases would not fit without expert parallelism
    [ "$n" -eq 1 ] && layers=(--num-layers 6)
    [ "$n" -eq 2 ] && layers=(--num-layers 12)
    run 560 torchrun --nproc_per_node "$n" bench/memory_model.py --iters 2 "${layers[@]}" ;;
recompute)
    run 200 torchrun --nproc_per_node "$n" bench/recompute.py --shape A --ep "$n"
    run 200 torchrun --nproc_per_node "$n" bench/recompute.py --shape A --ep "$n" --moe-layer-freq 1
    if [ "$n" -ge 4 ]; then
        run 150 torchrun --nproc_per_node "$n" bench/recompute.py --shape A "${tp2[@]}"
    fi ;;
scale)
    run 590 python3 bench/ted_scale.py --nproc "$n" ;;
esac
