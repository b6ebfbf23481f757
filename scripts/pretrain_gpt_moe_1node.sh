#!/usr/bin/env bash
# Pretrain a GPT-MoE on one node with torchrun: all its GPUs (NCCL), or CPU processes (gloo) when
# there is no GPU. Every size and path comes from the environment, with defaults:
#
#   bash scripts/pretrain_gpt_moe_1node.sh                          # defaults for this machine
#   DRY_RUN=1 bash scripts/pretrain_gpt_moe_1node.sh                # layout, parameters, memory; no training
#   DATA_PATH=data/corpus_text_document TOKENIZER_MODEL=data/tok.model \
#     NPROC=8 TP=2 EP=4 NUM_LAYERS=24 HIDDEN=2048 bash scripts/pretrain_gpt_moe_1node.sh
#   bash scripts/pretrain_gpt_moe_1node.sh --log-comm               # extra flags go to pretrain_gpt_moe.py
#
# Without DATA_PATH it trains on synthetic tokens (--mock-data). Checkpoints go to CHECKPOINT_DIR,
# which is both --save and --load: running the same command again resumes. docs/LAUNCH.md has the
# full list of variables.
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "error: $*" >&2; exit 2; }
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}

# ---- devices: GPUs when there are any, else CPU processes ------------------------------------------
NUM_GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
CPU=${CPU:-$([ "$NUM_GPUS" -gt 0 ] && echo 0 || echo 1)}
if [ "$CPU" = 1 ]; then
  # CPU defaults: a tiny TED model, TP 2 x EP 2 on 4 gloo processes (minutes on 2 cores)
  NPROC=${NPROC:-4}; TP=${TP:-2}; EP=${EP:-2}
  NUM_LAYERS=${NUM_LAYERS:-4}; HIDDEN=${HIDDEN:-128}; HEADS=${HEADS:-4}; SEQ_LEN=${SEQ_LEN:-128}
  NUM_EXPERTS=${NUM_EXPERTS:-4}; MICRO_BATCH=${MICRO_BATCH:-4}; GLOBAL_BATCH=${GLOBAL_BATCH:-16}
  TRAIN_ITERS=${TRAIN_ITERS:-100}; LR=${LR:-2e-3}; MIN_LR=${MIN_LR:-2e-4}; LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-10}
  PRECISION=${PRECISION:-fp32}; VOCAB_SIZE=${VOCAB_SIZE:-1024}; DROPOUT=${DROPOUT:-0}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  # GPU defaults: 24 layers x 2048 with 16 experts every other layer, expert-parallel over the node
  NPROC=${NPROC:-$NUM_GPUS}; TP=${TP:-1}; EP=${EP:-$(( NPROC <= 16 ? NPROC : 16 ))}
  NUM_LAYERS=${NUM_LAYERS:-24}; HIDDEN=${HIDDEN:-2048}; HEADS=${HEADS:-16}; SEQ_LEN=${SEQ_LEN:-2048}
  NUM_EXPERTS=${NUM_EXPERTS:-16}; MICRO_BATCH=${MICRO_BATCH:-4}; GLOBAL_BATCH=${GLOBAL_BATCH:-$((MICRO_BATCH * NPROC / TP * 4))}
  TRAIN_ITERS=${TRAIN_ITERS:-10000}; LR=${LR:-3e-4}; MIN_LR=${MIN_LR:-3e-5}; LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-200}
  PRECISION=${PRECISION:-bf16}; VOCAB_SIZE=${VOCAB_SIZE:-50256}; DROPOUT=${DROPOUT:-0.1}
fi
FFN_HIDDEN=${FFN_HIDDEN:-$((4 * HIDDEN))}
MOE_LAYER_FREQ=${MOE_LAYER_FREQ:-2}
TOPK=${TOPK:-2}
AUX_LOSS=${AUX_LOSS:-0.01}
CAPACITY_FACTOR=${CAPACITY_FACTOR:-}     # empty: dropless routing
SAVE_INTERVAL=${SAVE_INTERVAL:-100}
LOG_INTERVAL=${LOG_INTERVAL:-10}
RUN_DIR=${RUN_DIR:-runs/1node}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-$RUN_DIR/checkpoints}
LOG_DIR=${LOG_DIR:-$RUN_DIR/logs}

ARGS=(
  --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS"
  --ffn-hidden-size "$FFN_HIDDEN" --seq-length "$SEQ_LEN"
  --num-experts "$NUM_EXPERTS" --moe-layer-freq "$MOE_LAYER_FREQ" --moe-router-topk "$TOPK"
  --moe-aux-loss-coeff "$AUX_LOSS"
  --tensor-model-parallel-size "$TP" --expert-model-parallel-size "$EP"
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
  --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine
  --lr-warmup-iters "$LR_WARMUP_ITERS" --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0
  --hidden-dropout "$DROPOUT" --attention-dropout "$DROPOUT"
  --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval "$SAVE_INTERVAL"
  --log-interval "$LOG_INTERVAL"
)
[ -n "$CAPACITY_FACTOR" ] && ARGS+=(--moe-expert-capacity-factor "$CAPACITY_FACTOR")
case "$PRECISION" in
  fp16|bf16) ARGS+=("--$PRECISION") ;;
  fp32) ;;
  *) die "PRECISION=$PRECISION is unknown: use fp16, bf16 or fp32" ;;
esac
[ "$CPU" = 1 ] && ARGS+=(--distributed-backend gloo)
if [ -n "${TOKENIZER_MODEL:-}" ]; then
  ARGS+=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
else
  ARGS+=(--tokenizer-type NullTokenizer --vocab-size "$VOCAB_SIZE")
fi
if [ -n "${DATA_PATH:-}" ]; then
  read -r -a DATA_WORDS <<< "$DATA_PATH"
  ARGS+=(--data-path "${DATA_WORDS[@]}" --split "${SPLIT:-969,30,1}")
else
  ARGS+=(--mock-data)
fi
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
ARGS+=("${EXTRA[@]}" "$@")

if [ "$DRY_RUN" = 1 ]; then
  exec "$PYTHON" pretrain_gpt_moe.py "${ARGS[@]}" --dry-run --world-size "$NPROC" --gpus-per-node "$NPROC"
fi
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/train-$(date +%Y%m%d-%H%M%S).log"
echo "$NPROC $([ "$CPU" = 1 ] && echo "CPU processes (gloo)" || echo GPUs), TP $TP x EP $EP;" \
     "checkpoints $CHECKPOINT_DIR; log $LOG" | tee "$LOG"
"$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$NPROC" \
  pretrain_gpt_moe.py "${ARGS[@]}" 2>&1 | tee -a "$LOG"
