"""DataModule base class, the in-memory dataset of tokenised samples, and padding collate.

A sample is a dict of 1-D long tensors: always `input_ids` and `labels` (aligned, same length;
the model shifts internally), plus `position_ids` and `segment_ids` for packed sequences.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from litft.utils import LitftError

if TYPE_CHECKING:
    from litft.tokenizer import Tokenizer

Sample = dict[str, Tensor]


class DataError(LitftError, ValueError):
    """Bad data or data options (the message names the file and the fix). A ValueError, and a
    LitftError so the CLI prints it as one line."""


class DataFileNotFoundError(LitftError, FileNotFoundError):
    """A data file path that does not exist or is not a file."""


class SFTDataset(Dataset):
    """Pre-tokenised samples held in memory. No shuffling here: the training loop owns the sampler."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


def collate(samples: list[Sample], pad_id: int = 0, ignore_index: int = -100) -> dict[str, Tensor]:
    """Right-pad every key to the longest sample in the batch.

    Padding values: `input_ids` -> pad_id, `labels` -> ignore_index (no loss on padding),
    `segment_ids` -> 0 (the "padding segment"), `position_ids` and anything else -> 0.
    Right padding needs no attention mask with a causal model: real tokens never attend forward.
    """
    if not samples:
        raise ValueError("collate() got an empty batch")
    pad_values = {"input_ids": pad_id, "labels": ignore_index, "segment_ids": 0, "position_ids": 0}
    longest = max(len(s["input_ids"]) for s in samples)
    batch: dict[str, Tensor] = {}
    for key in samples[0]:
        out = torch.full((len(samples), longest), pad_values.get(key, 0), dtype=torch.long)
        for row, sample in enumerate(samples):
            out[row, : len(sample[key])] = sample[key]
        batch[key] = out
    return batch


class DataModule:
    """Minimal data interface the training loop relies on.

    Usage: `data.setup(tokenizer, max_seq_length, seed)`, then build samplers/loaders over
    `data.train_dataset` / `data.val_dataset` and batch with `data.collate_fn`.
    Subclasses implement `setup` and fill the two datasets.
    """

    ignore_index: int = -100
    train_dataset: SFTDataset | None = None
    val_dataset: SFTDataset | None = None
    pad_id: int = 0

    def setup(self, tokenizer: Tokenizer, max_seq_length: int, seed: int = 42) -> None:
        raise NotImplementedError

    def collate_fn(self, samples: list[Sample]) -> dict[str, Tensor]:
        return collate(samples, pad_id=self.pad_id, ignore_index=self.ignore_index)

    def __repr__(self) -> str:
        fields: dict[str, Any] = {
            k: v for k, v in vars(self).items() if not k.endswith("_dataset") and not k.startswith("_")
        }
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"
