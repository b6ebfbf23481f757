#!/usr/bin/env bash
# The CPU quick start: a real text corpus -> SentencePiece tokenizer -> Megatron .bin/.idx ->
# a tiny GPT-MoE trained at TP=2, EP=2 on 4 gloo processes -> a checkpoint -> a generated sample.
# A few minutes on 2 cores.
# Sizes are overridable from the environment (e.g. TRAIN_ITERS=50 bash scripts/quickstart_cpu.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh

WORK=${WORK:-runs/quickstart}
NPROC=${NPROC:-4}
TP=${TP:-2}
EP=${EP:-2}
TRAIN_ITERS=${TRAIN_ITERS:-150}
VOCAB=${VOCAB:-2000}
SAVE_INTERVAL=${SAVE_INTERVAL:-50}
PROMPT=${PROMPT:-Return the}
mkdir -p "$WORK"

if [ ! -s "$WORK/corpus.jsonl" ]; then
  echo "== 1/5 corpus: docstrings of the Python standard library"
  $PYTHON tools/make_corpus.py --output "$WORK/corpus.jsonl" --max-docs 6000
fi
if [ ! -s "$WORK/tokenizer.model" ]; then
  echo "== 2/5 tokenizer: SentencePiece, vocabulary $VOCAB"
  $PYTHON tools/train_tokenizer.py --input "$WORK/corpus.jsonl" --output-prefix "$WORK/tokenizer" \
    --vocab-size "$VOCAB"
fi
if [ ! -s "$WORK/corpus_text_document.idx" ]; then
  echo "== 3/5 preprocess: JSONL -> Megatron .bin/.idx"
  $PYTHON tools/preprocess_data.py --input "$WORK/corpus.jsonl" --output-prefix "$WORK/corpus" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$WORK/tokenizer.model" \
    --append-eod --workers 2
fi

echo "== 4/5 train: GPT-MoE, $NPROC processes, TP=$TP EP=$EP, checkpoints in $WORK/checkpoints"
OMP_NUM_THREADS=1 $PYTHON -m torch.distributed.run --nproc_per_node "$NPROC" --master_port ${MASTER_PORT:-29512} \
  pretrain_gpt_moe.py \
  --tensor-model-parallel-size "$TP" --expert-model-parallel-size "$EP" \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 256 \
  --num-experts 4 --moe-router-topk 2 --moe-layer-freq 2 --moe-aux-loss-coeff 0.01 \
  --seq-length 128 --micro-batch-size 4 --global-batch-size 16 \
  --train-iters "$TRAIN_ITERS" --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 10 --lr-decay-style cosine \
  --hidden-dropout 0 --attention-dropout 0 --clip-grad 1.0 --weight-decay 0.01 \
  --data-path "$WORK/corpus_text_document" --split 98,2,0 \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$WORK/tokenizer.model" \
  --data-cache-path "$WORK/cache" \
  --save "$WORK/checkpoints" --save-interval "$SAVE_INTERVAL" \
  --log-interval 10 --eval-interval 50 --eval-iters 2 "$@"

echo "== 5/5 generate: the checkpoint (saved at TP=$TP EP=$EP) loaded in one process, prompt \"$PROMPT\""
OMP_NUM_THREADS=2 $PYTHON tools/generate_text.py --load "$WORK/checkpoints" --prompt "$PROMPT" \
  --max-new-tokens 48 --temperature 0.8 --top-k 20 --seed 1
