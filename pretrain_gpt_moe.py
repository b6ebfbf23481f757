"""Pretrain a GPT Mixture-of-Experts model with tensor x expert x data parallelism (DeepSpeed-TED).

    torchrun --nproc_per_node 4 pretrain_gpt_moe.py --tensor-model-parallel-size 2 \
        --expert-model-parallel-size 2 --num-experts 4 --mock-data --vocab-size 1024

See docs/TRAINING.md for the flags and docs/LAUNCH.md for the launchers in scripts/.
"""
import sys

from megatron_ted.launch.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
