"""The flag sets of public Megatron-LM and Megatron-DeepSpeed launch scripts, scaled down (tiny
layers, hidden, vocabulary, sequence; a --world-size that fits) with every flag kept, through the
entry point's --dry-run: exit 0, every flag that changes nothing here listed once at start-up, and a
flag naming a feature we lack refused in one line that names it. Sizes are ours; the flag names and
value shapes are those of the script named above each set."""
import re
import shlex

import pytest

from megatron_ted.launch.pretrain import main

TINY = "--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --max-position-embeddings 16"
FUSIONS = ["--no-masked-softmax-fusion", "--no-rope-fusion"]

# (argv, world size, the flags listed as having no effect)
SCRIPTS = {
    # NVIDIA/Megatron-LM examples/gpt3/train_gpt3_175b_distributed.sh (without --rampup-batch-size: refused below)
    "megatron-lm gpt3 175b": (
        TINY + " --attention-backend auto --micro-batch-size 1 --global-batch-size 8 --train-iters 50"
        " --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.006 --clip-grad 1.0 --fp16 --lr 6.0e-5"
        " --lr-decay-style cosine --min-lr 6.0e-6 --lr-warmup-fraction .001 --lr-decay-iters 40"
        " --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --mock-data --vocab-size 128 --split 949,50,1"
        " --log-interval 100 --save-interval 10000 --eval-interval 1000 --eval-iters 10", 8,
        ["--attention-backend"]),
    # NVIDIA/Megatron-LM examples/mixtral/train_mixtral_8x7b_distributed.sh (with its optional W&B flags)
    "megatron-lm mixtral 8x7b": (
        "--use-mcore-models --disable-bias-linear --seq-length 16 --max-position-embeddings 64 --num-layers 4"
        " --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --init-method-std 0.01 --attention-dropout 0.0"
        " --hidden-dropout 0.0 --normalization RMSNorm --position-embedding-type rope --swiglu"
        " --untie-embeddings-and-output-weights --group-query-attention --num-query-groups 2 --no-masked-softmax-fusion"
        " --no-position-embedding --rotary-base 1000000 --num-experts 4 --moe-router-topk 2"
        " --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2 --moe-grouped-gemm"
        " --moe-token-dispatcher-type alltoall --overlap-param-gather --overlap-grad-reduce --mock-data --vocab-size 128"
        " --split 99990,8,2 --micro-batch-size 1 --global-batch-size 8 --lr 1e-4 --train-iters 50 --lr-decay-iters 32"
        " --lr-decay-style cosine --min-lr 1.0e-5 --weight-decay 0.1 --lr-warmup-iters 5 --clip-grad 1.0 --bf16"
        " --tensor-model-parallel-size 1 --pipeline-model-parallel-size 2 --expert-model-parallel-size 2"
        " --use-distributed-optimizer --sequence-parallel --log-interval 1 --save-interval 10000 --eval-interval 1000"
        " --eval-iters 10 --no-load-optim --no-load-rng --wandb-project p --wandb-exp-name e", 4,
        ["--use-mcore-models", "--no-masked-softmax-fusion", "--moe-grouped-gemm", "--moe-token-dispatcher-type",
         "--overlap-param-gather", "--overlap-grad-reduce", "--wandb-project", "--wandb-exp-name"]),
    # NVIDIA/Megatron-LM examples/llama/train_llama3_8b_h100_fp8.sh (without --decoupled-lr/-min-lr: refused below)
    "megatron-lm llama3 8b fp8": (
        "--use-mcore-models --num-layers 4 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4"
        " --group-query-attention --num-query-groups 2 --kv-channels 8 --seq-length 16 --max-position-embeddings 16"
        " --position-embedding-type rope --rotary-base 1000000 --rotary-percent 1.0 --attention-dropout 0.0"
        " --hidden-dropout 0.0 --swiglu --init-method-std 0.0134 --attention-backend fused --apply-layernorm-1p"
        " --untie-embeddings-and-output-weights --disable-bias-linear --micro-batch-size 1 --global-batch-size 8"
        " --train-samples 800 --lr-decay-samples 790 --lr-warmup-samples 16 --lr 0.00015 --min-lr 0.00001"
        " --lr-decay-style cosine --clip-grad 1.0 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --bf16"
        " --grad-reduce-in-bf16 --cross-entropy-loss-fusion --calculate-per-token-loss --manual-gc"
        " --empty-unused-memory-level 1 --exit-duration-in-mins 235 --fp8-format hybrid --fp8-amax-history-len 1024"
        " --fp8-amax-compute-algo max --fp8-param-gather --tensor-model-parallel-size 2 --context-parallel-size 1"
        " --sequence-parallel --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather --mock-data"
        " --tokenizer-type NullTokenizer --vocab-size 128 --tiktoken-pattern v2 --split 99,1,0"
        " --no-create-attention-mask-in-dataloader --no-mmap-bin-files --num-workers 1 --log-interval 1 --eval-iters 32"
        " --eval-interval 100 --save-interval 1000 --log-throughput --profile --profile-step-start 4"
        " --profile-step-end 6 --ckpt-format torch_dist --distributed-timeout-minutes 60", 4,
        ["--use-mcore-models", "--attention-backend", "--apply-layernorm-1p", "--grad-reduce-in-bf16",
         "--cross-entropy-loss-fusion", "--calculate-per-token-loss", "--empty-unused-memory-level",
         "--fp8-amax-history-len", "--fp8-amax-compute-algo", "--fp8-param-gather", "--fp8-recipe", "--overlap-grad-reduce",
         "--overlap-param-gather", "--tiktoken-pattern", "--no-create-attention-mask-in-dataloader",
         "--no-mmap-bin-files", "--log-throughput", "--ckpt-format"]),
    # NVIDIA/Megatron-LM examples/post_training/modelopt/conf/deepseek-ai/DeepSeek-R1.sh
    "megatron-lm deepseek-r1": (
        "--save-interval 100000 --micro-batch-size 1 --bf16 --no-masked-softmax-fusion --disable-bias-linear"
        " --untie-embeddings-and-output-weights --position-embedding-type rope --no-rope-fusion --normalization RMSNorm"
        " --swiglu --num-layers 4 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --kv-channels 8"
        " --multi-latent-attention --kv-lora-rank 16 --v-head-dim 8 --q-lora-rank 16 --qk-head-dim 8 --qk-layernorm"
        " --qk-pos-emb-head-dim 4 --num-experts 8 --moe-layer-freq [0]*1+[1]*3 --moe-ffn-hidden-size 16"
        " --moe-router-dtype fp32 --moe-router-score-function sigmoid --moe-router-bias-update-rate 1e-3"
        " --moe-router-enable-expert-bias --moe-router-topk 4 --moe-router-num-groups 4 --moe-router-group-topk 2"
        " --moe-router-pre-softmax --moe-router-topk-scaling-factor 2.5 --moe-shared-expert-overlap"
        " --moe-shared-expert-intermediate-size 16 --moe-aux-loss-coeff 1e-4 --moe-router-load-balancing-type seq_aux_loss"
        " --moe-token-dispatcher-type alltoall --moe-token-drop-policy probs --seq-length 16 --max-position-embeddings 64"
        " --mock-data --vocab-size 128 --make-vocab-size-divisible-by 128 --use-mcore-models --rotary-base 10000"
        " --rotary-percent 1.0 --rotary-scaling-factor 40 --mscale 1.0 --mscale-all-dim 1.0 --recompute-activations"
        " --moe-layer-recompute --sequence-parallel --tensor-model-parallel-size 2 --expert-model-parallel-size 2", 4,
        FUSIONS + ["--use-mcore-models", "--moe-router-dtype", "--moe-router-pre-softmax", "--moe-token-dispatcher-type",
                   "--moe-layer-recompute"]),
    # NVIDIA/Megatron-LM examples/post_training/modelopt/conf/qwen/Qwen3-30B-A3B.sh
    "megatron-lm qwen3 30b-a3b": (
        "--save-interval 100000 --micro-batch-size 1 --bf16 --no-masked-softmax-fusion --disable-bias-linear"
        " --untie-embeddings-and-output-weights --position-embedding-type rope --no-rope-fusion --normalization RMSNorm"
        " --swiglu --num-layers 4 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --group-query-attention"
        " --num-query-groups 2 --kv-channels 8 --qk-layernorm --num-experts 8 --moe-ffn-hidden-size 16 --moe-router-topk 4"
        " --moe-router-dtype fp32 --moe-aux-loss-coeff 1e-3 --moe-token-dispatcher-type alltoall"
        " --moe-router-load-balancing-type aux_loss --moe-layer-recompute --seq-length 16 --max-position-embeddings 64"
        " --mock-data --vocab-size 128 --make-vocab-size-divisible-by 100 --use-mcore-models --rotary-percent 1.0"
        " --rotary-base 1000000 --no-bias-swiglu-fusion --sequence-parallel --tensor-model-parallel-size 2"
        " --expert-model-parallel-size 2", 4,
        FUSIONS + ["--no-bias-swiglu-fusion", "--use-mcore-models", "--moe-router-dtype", "--moe-token-dispatcher-type",
                   "--moe-layer-recompute"]),
    # microsoft/Megatron-DeepSpeed examples_deepspeed/MoE/ds_pretrain_gpt_1.3B_MoE128.sh (and _350M_MoE128.sh),
    # with its optional --disable-moe-token-dropping
    "megatron-deepspeed gpt moe128": (
        TINY + " --override-opt_param-scheduler --adam-beta1 0.9 --adam-beta2 0.95 --tensor-model-parallel-size 1"
        " --moe-expert-parallel-size 4 --num-experts 8 --moe-loss-coeff 0.01 --moe-train-capacity-factor 1.0"
        " --moe-eval-capacity-factor 1.0 --moe-min-capacity 4 --init-method-std 0.014 --lr-decay-tokens 16384"
        " --lr-warmup-tokens 1024 --micro-batch-size 2 --exit-duration-in-mins 30000000 --global-batch-size 16"
        " --train-tokens 16384 --train-iters 200 --lr 1.2e-4 --min-lr 1.0e-6 --lr-decay-style cosine --split 98,2,0"
        " --log-interval 10 --eval-interval 100 --eval-iters 10 --save-interval 10000 --weight-decay 0.1 --clip-grad 1.0"
        " --hysteresis 2 --num-workers 0 --fp16 --tensorboard-queue-size 1 --log-timers-to-tensorboard"
        " --log-batch-size-to-tensorboard --log-validation-ppl-to-tensorboard --checkpoint-activations"
        " --create-moe-param-group --disable-moe-token-dropping --mock-data --vocab-size 128 --data-impl mmap"
        " --deepspeed --deepspeed_config ds.json --pipeline-model-parallel-size 1 --no-pipeline-parallel"
        " --deepspeed-activation-checkpointing", 8,
        ["--override-opt_param-scheduler", "--log-timers-to-tensorboard", "--log-batch-size-to-tensorboard",
         "--log-validation-ppl-to-tensorboard", "--create-moe-param-group", "--data-impl", "--deepspeed",
         "--deepspeed_config", "--no-pipeline-parallel", "--deepspeed-activation-checkpointing"]),
    # microsoft/Megatron-DeepSpeed examples_deepspeed/pretrain_llama2_distributed.sh (activation checkpointing on)
    "megatron-deepspeed llama2": (
        "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --num-layers 4 --hidden-size 32"
        " --ffn-hidden-size 64 --num-attention-heads 4 --micro-batch-size 2 --global-batch-size 16 --seq-length 16"
        " --max-position-embeddings 16 --train-iters 50 --mock-data --vocab-size 128 --data-impl mmap --split 949,50,1"
        " --distributed-backend nccl --lr 3e-4 --lr-decay-style cosine --min-lr 3e-5 --weight-decay 0.1 --clip-grad 1"
        " --lr-warmup-iters 5 --optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --log-interval 1 --save-interval 10000"
        " --eval-interval 1000 --eval-iters 10 --bf16 --no-query-key-layer-scaling --attention-dropout 0"
        " --hidden-dropout 0 --use-rotary-position-embeddings --untie-embeddings-and-output-weights --swiglu"
        " --normalization rmsnorm --disable-bias-linear --num-key-value-heads 2 --deepspeed-activation-checkpointing"
        " --recompute-granularity full --recompute-method uniform --zero-stage=1 --deepspeed_config=ds.json --deepspeed",
        8, ["--data-impl", "--optimizer", "--no-query-key-layer-scaling", "--deepspeed-activation-checkpointing",
            "--deepspeed_config", "--deepspeed"]),
    # microsoft/Megatron-DeepSpeed examples_deepspeed/rebase/ds_pretrain_gpt_1.3B.sh
    "megatron-deepspeed rebase gpt 1.3b": (
        TINY + " --override-opt_param-scheduler --adam-beta1 0.9 --adam-beta2 0.95 --tensor-model-parallel-size 2"
        " --init-method-std 0.014 --lr-decay-tokens 16384 --lr-warmup-tokens 1024 --micro-batch-size 2"
        " --exit-duration-in-mins 30000000 --global-batch-size 16 --train-tokens 16384 --train-samples 3000 --lr 2e-4"
        " --min-lr 1e-6 --lr-decay-style cosine --split 949,50,1 --log-interval 10 --eval-interval 100 --eval-iters 10"
        " --save-interval 100 --weight-decay 0.1 --clip-grad 1.0 --hysteresis 2 --num-workers 0 --fp16 --seed 1234"
        " --no-async-tensor-model-parallel-allreduce --tensorboard-queue-size 1 --log-timers-to-tensorboard"
        " --log-batch-size-to-tensorboard --log-validation-ppl-to-tensorboard --checkpoint-activations"
        " --log-optimizer-states-to-tensorboard --mock-data --vocab-size 128 --data-impl mmap --deepspeed"
        " --deepspeed_config ds.json --zero-stage 1 --pipeline-model-parallel-size 1 --no-pipeline-parallel"
        " --deepspeed-activation-checkpointing", 4,
        ["--override-opt_param-scheduler", "--no-async-tensor-model-parallel-allreduce", "--log-timers-to-tensorboard",
         "--log-batch-size-to-tensorboard", "--log-validation-ppl-to-tensorboard", "--log-optimizer-states-to-tensorboard",
         "--data-impl", "--deepspeed", "--deepspeed_config", "--no-pipeline-parallel",
         "--deepspeed-activation-checkpointing"]),
}

# flags of those scripts that name a feature we lack: (script, what the script adds)
REFUSED = [
    ("megatron-lm gpt3 175b", "--rampup-batch-size 2 2 16"),           # three values, as the script writes them
    ("megatron-lm llama3 8b fp8", "--decoupled-lr 5.0e-4"),
    ("megatron-lm llama3 8b fp8", "--decoupled-min-lr 4.5e-5"),
    ("megatron-deepspeed rebase gpt 1.3b", "--zero-stage 2"),           # the script's zero_stage set to 2
]


def _run(argv, world_size, capsys):
    code = main(argv + ["--dry-run", "--world-size", str(world_size)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("script,refused", [(s, None) for s in SCRIPTS] + REFUSED,
                         ids=[s for s in SCRIPTS] + [f"{s}: {r.split()[0]}" for s, r in REFUSED])
def test_public_launch_script_flags_through_the_dry_run(script, refused, capsys):
    text, world_size, no_effect = SCRIPTS[script]
    argv = shlex.split(text) + (shlex.split(refused) if refused else [])
    code, out, err = _run(argv, world_size, capsys)
    if refused:
        flag = refused.split()[0]
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {flag}"), err
        assert "not available here" in lines[0] and "Traceback" not in out + err
        return
    assert code == 0, err
    noted = [line for line in out.splitlines() if line.startswith("accepted with no effect here: ")]
    assert len(noted) == 1, out
    listed = re.findall(r"(?:: |; )(--[\w-]+) \(", noted[0])   # "--flag (why)" joined by "; "
    assert sorted(listed) == sorted(no_effect)
