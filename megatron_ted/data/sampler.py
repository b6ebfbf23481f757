"""Which samples each data-parallel rank reads, and the micro-batches it gets.

Megatron's MegatronPretrainingSampler order: the dataset is read in index order from
`consumed_samples`; each micro-step takes the next `micro_batch_size * dp_size` samples and gives DP
rank r the r-th slice of `micro_batch_size`. So global sample i (counted from consumed_samples)
goes to rank (i // micro_batch_size) % dp_size, and a global batch of G = micro_batch_size *
dp_size * num_micro_batches samples is the same set of indices for every DP size: the layout
changes who reads a sample, never which samples make up a step. Resuming with
consumed_samples = steps_done * G continues exactly where training stopped.

    loader = build_pretraining_data_loader(train_ds, consumed_samples, micro_batch_size, dp_rank, dp_size)
    it = iter(loader)
    batch = next(it)   # {"tokens", "labels", "loss_mask", "position_ids"}: [micro_batch_size, seq]

Shuffling is the dataset's (GPTDataset's shuffle index, seeded); the sampler is sequential.
Ranks that share a DP rank (tensor / expert parallel peers) get identical batches.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class PretrainingSampler:
    """Yields this DP rank's micro-batches as lists of dataset indices; drops an incomplete last step."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int):
        if total_samples <= 0:
            raise ValueError(f"the dataset has no samples (total_samples={total_samples})")
        if micro_batch_size <= 0:
            raise ValueError(f"--micro-batch-size {micro_batch_size}: must be >= 1")
        if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data-parallel rank {data_parallel_rank} not in [0, {data_parallel_size})")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(
                f"consumed_samples {consumed_samples}: must be in [0, {total_samples}), the dataset "
                "size; build the dataset for at least as many samples as training consumes"
            )
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.data_parallel_size = int(data_parallel_size)
        self.samples_per_micro_step = self.micro_batch_size * self.data_parallel_size

    def __len__(self) -> int:
        remaining = max(0, self.total_samples - self.consumed_samples)
        return remaining // self.samples_per_micro_step

    def __iter__(self) -> Iterator[list[int]]:
        first = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        for step in range(len(self)):
            start = first + step * self.samples_per_micro_step
            yield list(range(start, start + self.micro_batch_size))


def collate_gpt_batch(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack GPTDataset items into [b, s] tensors, keeping the keys the model uses."""
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in BATCH_KEYS}


def build_pretraining_data_loader(dataset, consumed_samples: int, micro_batch_size: int,
                                  data_parallel_rank: int, data_parallel_size: int,
                                  num_workers: int = 0, pin_memory: bool = False
                                  ) -> Optional[torch.utils.data.DataLoader]:
    """A DataLoader over this rank's micro-batches (None for a None dataset, as Megatron)."""
    if dataset is None:
        return None
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                 data_parallel_rank, data_parallel_size)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_gpt_batch,
        persistent_workers=num_workers > 0,
    )
