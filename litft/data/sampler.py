"""Length-grouped sampling: batches of samples of similar length, so padding to the longest wastes little compute.

Instruction data mixes 20-token and 1000-token samples; a random batch padded to its longest sample is often more
padding than text. `LengthGroupedSampler` does what HF's `group_by_length` (LengthGroupedSampler) does, for the
whole global batch at once: each epoch it shuffles the samples (seed + epoch), cuts the order into mega-batches
of `mega_batch_steps` optimizer steps, sorts each mega-batch by length (longest first), cuts it into global
batches, shuffles the order of the global batches, and puts the one holding the longest sample first (so an out
of memory shows up at step 1, not hours in). The batches are random in which samples go together (up to their
length) and in the order they come; only the grouping is by length. Loss and masks are untouched: a batch is
padded and normalised exactly as a random one is (litft/train.py).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def sample_length(sample: dict[str, torch.Tensor]) -> int:
    """Tokens the sample is padded to: its longest `*input_ids` (a preference pair: the longer of its two)."""
    return max(len(v) for k, v in sample.items() if k.endswith("input_ids"))


class LengthGroupedSampler(Sampler[int]):
    """The indices one rank trains on, in DataLoader order (batch_size = micro_batch_size, drop_last), one epoch.

    A global batch is `micro_batch_size * accumulation * num_replicas` samples of similar length. It is sorted
    longest first and cut into micro-batches of `micro_batch_size`; micro-batch k goes to rank k % num_replicas
    as its accumulation step k // num_replicas. So the samples of every optimizer step are the same for any
    split into devices x accumulation of the same global batch (DDP trains what one process trains), and the
    ranks of one step get micro-batches of similar length. Samples beyond the last whole global batch (fewer
    than one) are left out of that epoch; they differ from epoch to epoch.

    Deterministic: the order depends only on (seed, epoch, the lengths, the batch shape), so a resumed run that
    skips the batches it has seen (train.py `micro_batches`) continues exactly.
    """

    def __init__(self, dataset: Sequence[dict[str, torch.Tensor]], micro_batch_size: int, accumulation: int = 1,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0, mega_batch_steps: int = 50) -> None:
        if micro_batch_size < 1 or accumulation < 1 or num_replicas < 1 or mega_batch_steps < 1:
            raise ValueError("LengthGroupedSampler: micro_batch_size, accumulation, num_replicas and mega_batch_steps "
                             "must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"LengthGroupedSampler: rank {rank} is not in 0..{num_replicas - 1}")
        self.lengths = [sample_length(dataset[i]) for i in range(len(dataset))]
        self.micro_batch_size, self.accumulation = micro_batch_size, accumulation
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.mega_batch_steps = mega_batch_steps
        self.global_batch_size = micro_batch_size * accumulation * num_replicas
        self.num_steps = len(self.lengths) // self.global_batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_steps * self.accumulation * self.micro_batch_size

    def global_batches(self) -> list[list[int]]:
        """This epoch's optimizer steps: each a list of `global_batch_size` indices, longest first."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()[: self.num_steps * self.global_batch_size]
        mega = self.mega_batch_steps * self.global_batch_size
        steps: list[list[int]] = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start: start + mega], key=lambda i: -self.lengths[i])  # stable: ties keep the shuffle
            steps += [chunk[j: j + self.global_batch_size] for j in range(0, len(chunk), self.global_batch_size)]
        steps = [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]
        if steps:
            first = max(range(len(steps)), key=lambda s: self.lengths[steps[s][0]])  # the longest sample's step
            steps.insert(0, steps.pop(first))
        return steps

    def __iter__(self) -> Iterator[int]:
        m, w = self.micro_batch_size, self.num_replicas
        for step in self.global_batches():
            for k in range(self.rank, w * self.accumulation, w):
                yield from step[k * m: (k + 1) * m]
