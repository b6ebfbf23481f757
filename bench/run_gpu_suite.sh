#!/usr/bin/env bash
# The GPU tests and the benchmarks of docs/PERFORMANCE.md on one machine, in parts that each fit a
# 10-minute run. Every command and the lines it prints as its result go to OUTDIR/PART.txt, headed
# by the date, the GPU and the commit: what a table in docs/PERFORMANCE.md records.
#
#   bash bench/run_gpu_suite.sh tests    OUTDIR   # tests marked gpu, without the compiled layers
#   bash bench/run_gpu_suite.sh compile  OUTDIR   # the Inductor-compiled layer tests
#   bash bench/run_gpu_suite.sh layers   OUTDIR   # layers A and B: EP N; TP 2 x EP N/2 eager and graphed
#   bash bench/run_gpu_suite.sh e2e      OUTDIR   # moe-1.3b-16e end to end: EP N (balanced, learned); TED graphed
#   bash bench/run_gpu_suite.sh memory   OUTDIR   # memory model against the measured peak
#   bash bench/run_gpu_suite.sh recompute OUTDIR  # checkpointing modes and CAC on a stack of layer-A layers
#   bash bench/run_gpu_suite.sh scale    OUTDIR   # the TED scale experiment (bench/ted_scale.py)
# One GPU each (GPU 0), the measurements issues 23, 25, 26 and 27 wait for:
#   bash bench/run_gpu_suite.sh fp8      OUTDIR   # FP8 GPU tests; layers A, B bf16 / tensorwise / rowwise; a profile
#   bash bench/run_gpu_suite.sh fp8-e2e  OUTDIR   # 24 x 2048, 8 experts every other layer, end to end: bf16 vs FP8
#   bash bench/run_gpu_suite.sh fp8-converge OUTDIR  # 300 steps bf16 vs FP8 on DATA (a text corpus; skipped without)
#   bash bench/run_gpu_suite.sh offload  OUTDIR   # optimizer offload: GPU test, fit ratio, step slowdown
#   bash bench/run_gpu_suite.sh generate OUTDIR   # generation GPU tests; ours eager / static / graphed vs transformers
#   bash bench/run_gpu_suite.sh attention OUTDIR  # layers A, B with RoPE: multi-head, GQA, MLA
#   bash bench/run_gpu_suite.sh pp       OUTDIR   # pipeline tests; end to end PP 2 vs EP 2 (needs N >= 2, else skipped)
#   bash bench/run_gpu_suite.sh lease1   OUTDIR [PART...]   # one 10-minute run: the parts in turn (below)
#
# N is the number of GPUs used: NGPUS from the environment, else every visible GPU. Layouts with
# TP 2 run only where N >= 2. DATA: a corpus prefix for the end-to-end runs (default: mock data).
# SUITE_PRINT=1 (with NGPUS) prints each part's commands and runs nothing (tests/test_bench_smoke.py).
#
# lease1 runs PARTs (default: attention fp8 generate tests fp8-e2e offload fp8-converge, the most
# value per minute first) while each one's estimate fits what is left of a 570 s budget, then
# names the parts left for the next run. From a session, with the device tool (one H200):
#   here, once, in the repository root (the wheel is not committed; /.whl/ is in .gitignore):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1
#   and, for fp8-converge, the quick start's corpus under data/ (ignored too: docs/DATA.md).
#   run(kind="nvidia-h200", timeout_s=600, carry=[".whl", "data"],
#       command="DATA=data/stdlib_text_document bash bench/run_gpu_suite.sh lease1 $OUT")
#   then again with the parts its last line names: "... lease1 $OUT offload fp8-converge".
# A .whl/ folder with the megatron-core wheel is installed under /tmp/site when megatron.core is
# not importable (the device image has no megatron-core; the data side and the CLI need it).
set -uo pipefail
parts="tests compile layers e2e memory recompute scale fp8 fp8-e2e fp8-converge offload generate attention pp lease1"
lease_parts="attention fp8 generate tests fp8-e2e offload fp8-converge"
part=${1:?part: one of $parts}
case " $parts " in *" $part "*) ;; *) echo "error: unknown part '$part': one of $parts" >&2; exit 2 ;; esac
case ${2:?output directory} in /*) out=$2 ;; *) out=$PWD/$2 ;; esac
queue=("${@:3}")
for q in "${queue[@]}"; do   # before anything runs: a wrong part name is one line
    case " $lease_parts " in *" $q "*) ;; *) echo "error: lease1 runs parts of: $lease_parts; not '$q'" >&2; exit 2 ;; esac
done
print_only=${SUITE_PRINT:-}
# NVLink multicast off: not every lent machine supports it, and NCCL then fails at start-up.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
if [ -z "$print_only" ] && ls .whl/megatron_core-*.whl >/dev/null 2>&1 \
        && ! python3 -c "import megatron.core" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "error: the wheels in .whl/ did not install" >&2; exit 2; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
n=${NGPUS:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
if ! [ "$n" -ge 1 ] 2>/dev/null; then
    echo "error: no GPU visible (NGPUS=$n); this suite needs CUDA" >&2; exit 2
fi
if [ -n "$print_only" ]; then
    log=/dev/null
else
    mkdir -p "$out"
    log="$out/$part.txt"
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    echo "# $(date -u +%FT%TZ) ${gpu:-no GPU} x $n, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
        | tee -a "$log"
fi

# the lines a bench or pytest prints as its result (RESULT_LINES: more, e.g. the logged iterations)
result_lines="^(moe_layer|train_throughput|recompute|optimizer_offload|generate \||FAILED|ERROR)|^[|]| passed| failed| skipped|error:|GiB"
run() {   # run SECONDS COMMAND...: the command, then its result lines
    local limit=$1 cmd; shift
    printf -v cmd '%q ' "$@"
    echo "\$ ${cmd% }" | tee -a "$log"
    [ -n "$print_only" ] && return 0
    timeout "$limit" "$@" 2>&1 | grep -E "$result_lines${RESULT_LINES:+|$RESULT_LINES}" | tee -a "$log"
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
fp8)   # FP8 GEMMs against bf16 in the same run (target >= 1.25x), then where the FP8 layer's time goes
    run 300 python3 -m pytest tests/test_gpu.py -k fp8 -q -p no:cacheprovider
    for shape in A B; do
        run 90 torchrun --nproc_per_node 1 bench/moe_layer.py --shape $shape --repeat 5
        for recipe in tensorwise rowwise; do
            run 120 torchrun --nproc_per_node 1 bench/moe_layer.py --shape $shape --repeat 5 \
                --fp8-format hybrid --fp8-recipe $recipe
        done
    done
    [ -z "$print_only" ] && mkdir -p "$out/fp8_profile"
    run 120 torchrun --nproc_per_node 1 bench/moe_layer.py --shape A --fp8-format hybrid --fp8-recipe rowwise \
        --profile "$out/fp8_profile/layer_a_rowwise"
    RESULT_LINES="." run 60 python3 bench/kernel_table.py "$out/fp8_profile/layer_a_rowwise.json" --top 40 ;;
fp8-e2e)   # one GPU, a model that fits with its optimizer (target: FP8 >= 1.2x bf16 tokens/s)
    common=(--preset moe-1.3b-16e --num-experts 8 --nproc 1 --use-distributed-optimizer --iters 12
            --global-batch-size 16 --moe-router-force-load-balancing)
    run 180 python3 bench/train_throughput.py "${common[@]}"
    run 180 python3 bench/train_throughput.py "${common[@]}" --fp8-format hybrid --fp8-recipe tensorwise
    run 180 python3 bench/train_throughput.py "${common[@]}" --fp8-format hybrid --fp8-recipe rowwise ;;
fp8-converge)   # >= 300 steps on a text corpus, bf16 and FP8: the logged losses (final within 1%)
    if [ -z "${DATA:-}" ]; then
        echo "skipped: fp8-converge needs DATA=<corpus prefix> (a text corpus; mock data says nothing)" | tee -a "$log"
    else
        conv=(--num-layers 12 --hidden-size 1024 --num-attention-heads 16 --ffn-hidden-size 4096 --num-experts 8
              --moe-layer-freq 2 --moe-router-topk 2 --moe-aux-loss-coeff 0.01 --seq-length 1024
              --max-position-embeddings 1024 --micro-batch-size 8 --global-batch-size 32 --train-iters 300
              --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 30 --bf16 --log-interval 10
              --eval-interval 1000 --hidden-dropout 0 --attention-dropout 0 --use-distributed-optimizer
              --data-path "$DATA" --tokenizer-type NullTokenizer --vocab-size 16384 --split 98,2,0 --seed 1234)
        RESULT_LINES=" iteration" run 280 torchrun --nproc_per_node 1 pretrain_gpt_moe.py "${conv[@]}"
        RESULT_LINES=" iteration" run 280 torchrun --nproc_per_node 1 pretrain_gpt_moe.py "${conv[@]}" \
            --fp8-format hybrid --fp8-recipe tensorwise
    fi ;;
offload)   # docs/OPTIMIZER.md: fit ratio (target >= 2.5x, model 1.9x) and step slowdown (target <= 1.25)
    run 120 python3 -m pytest tests/test_optimizer_offload.py -k gpu -q -p no:cacheprovider
    run 430 python3 bench/optimizer_offload.py --iters 3 --warmup 1 ;;
generate)   # targets: >= 3x transformers at batch 1, >= 2x at batch 32; greedy ids equal in fp32
    run 120 python3 -m pytest tests/test_inference.py -m gpu -q -p no:cacheprovider
    run 270 python3 bench/generate.py --decode eager,static,graph
    run 180 python3 bench/generate.py --dtype fp32 --batch-sizes 1 --decode eager,graph ;;
attention)   # RoPE on all: multi-head against GQA and MLA at layers A (16 heads) and B (32 heads)
    for shape in A B; do
        run 60 torchrun --nproc_per_node 1 bench/moe_layer.py --shape $shape --repeat 5 --position-embedding-type rope
    done
    run 60 torchrun --nproc_per_node 1 bench/moe_layer.py --shape A --repeat 5 --position-embedding-type rope \
        --num-query-groups 4
    run 60 torchrun --nproc_per_node 1 bench/moe_layer.py --shape B --repeat 5 --position-embedding-type rope \
        --num-query-groups 8
    run 60 torchrun --nproc_per_node 1 bench/moe_layer.py --shape A --repeat 5 --multi-latent-attention
    run 60 torchrun --nproc_per_node 1 bench/moe_layer.py --shape B --repeat 5 --multi-latent-attention \
        --q-lora-rank 1536 ;;
pp)
    if [ "$n" -lt 2 ]; then
        echo "skipped: pp needs >= 2 GPUs (N=$n)" | tee -a "$log"
    else
        run 300 python3 -m pytest tests/test_pipeline.py -q -p no:cacheprovider
        common=(--preset moe-1.3b-16e --nproc 2 --use-distributed-optimizer --iters 12 --global-batch-size 32
                --moe-router-force-load-balancing)
        run 150 python3 bench/train_throughput.py "${common[@]}" --pipeline-model-parallel-size 2
        run 150 python3 bench/train_throughput.py "${common[@]}" --ep 2
    fi ;;
lease1)
    [ ${#queue[@]} -eq 0 ] && read -r -a queue <<<"$lease_parts"
    declare -A estimate=([attention]=150 [fp8]=330 [generate]=420 [tests]=200 [fp8-e2e]=420 [offload]=540
                         [fp8-converge]=480)
    start=$SECONDS budget=570 left=()
    for q in "${queue[@]}"; do
        remaining=$((budget - (SECONDS - start)))
        if [ "${estimate[$q]}" -gt "$remaining" ]; then left+=("$q"); continue; fi
        echo "== $q (estimate ${estimate[$q]} s, $remaining s left)" | tee -a "$log"
        if [ -n "$print_only" ]; then
            bash "$0" "$q" "$out"
        else
            timeout "$remaining" bash "$0" "$q" "$out"
        fi
        rc=$?
        echo "== $q done after $((SECONDS - start)) s (exit $rc)" | tee -a "$log"
    done
    if [ ${#left[@]} -gt 0 ]; then
        echo "left: next run: bash bench/run_gpu_suite.sh lease1 \$OUT ${left[*]}" | tee -a "$log"
    else
        echo "left: none" | tee -a "$log"
    fi ;;
esac
