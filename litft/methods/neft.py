"""NEFTune (Jain et al., 2023, arXiv 2310.05914): noisy embeddings during instruction fine-tuning.

In training steps only, the token embeddings get uniform noise: e + alpha / sqrt(L·d) * U(-1, 1),
d the hidden size and L the sequence length. L is each sample's *real* length (the paper's intent),
not the padded length of the batch that HF's hook uses: a short sample must not get less noise
because a long one shares its batch. Per token: packed sequences use the length of the sample
(segment) the token belongs to; padding (right of the last target, or segment 0) gets no noise.

The noise comes from a forward hook on the embedding *output* (so Gemma's sqrt(d) scaling, applied
after the embedding, scales the noise too, as with HF) that exists only inside `training_step`:
validation, generation and anything after training never see it, and an exception removes it too.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from litft.methods.lora import LoRA
from litft.methods.lora_plus import LoRAPlusGroups
from litft.utils import LitftError


def sample_lengths(batch: dict[str, Tensor], ignore_index: int = -100) -> Tensor:
    """(B, T, 1) float: the real length L of the sample each token belongs to; 0 on padding.

    Unpacked, right-padded batches: a sample ends at its last target token (collate gives padding
    the ignore label and an SFT sample ends with its response). Packed batches: segment sizes."""
    labels = batch["labels"]
    T = labels.shape[1]
    positions = torch.arange(T, device=labels.device).expand_as(labels)
    if batch.get("segment_ids") is not None:
        seg = batch["segment_ids"]
        counts = torch.zeros(seg.shape[0], int(seg.max()) + 1, device=seg.device, dtype=torch.long)
        counts.scatter_add_(1, seg, torch.ones_like(seg))
        lengths = counts.gather(1, seg).masked_fill(seg == 0, 0)  # segment 0 is padding
    else:
        last = torch.where(labels != ignore_index, positions, -1).amax(1, keepdim=True)
        n = torch.where(last >= 0, last + 1, T)  # no target at all: treat the row as unpadded
        lengths = torch.where(positions < n, n, 0)
    return lengths.unsqueeze(-1).float()


@contextmanager
def neftune_noise(embedding: nn.Module, alpha: float, lengths: Tensor) -> Iterator[None]:
    """Within the block, `embedding`'s output (B, T, d) gets alpha / sqrt(L·d) * U(-1, 1) noise
    per token (L from `lengths`, (B, T, 1); 0 = no noise), in training mode only."""

    def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        if not module.training:
            return output
        L = lengths.to(output.device)
        scale = torch.where(L > 0, alpha / (L * output.shape[-1]).sqrt(), 0.0).to(output.dtype)
        return output + torch.empty_like(output).uniform_(-1, 1) * scale

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class NEFTuneNoise:
    """Mixin: NEFTune noise in `training_step` when `neftune_alpha` is set. Put it before the method
    class in the bases (`class M(NEFTuneNoise, LoRA)`)."""

    def __init__(self, neftune_alpha: float | None = None, **kwargs: Any) -> None:
        """
        Args:
            neftune_alpha: NEFTune: noise scale alpha on the token embeddings in training (5 in the paper; null: off).
        """
        super().__init__(**kwargs)
        if neftune_alpha is not None and not neftune_alpha > 0:
            raise LitftError(f"neftune_alpha must be > 0 (or null to turn NEFTune off), got {neftune_alpha}")
        self.neftune_alpha = neftune_alpha

    def training_step(self, batch: dict[str, Tensor]) -> Tensor:
        if self.neftune_alpha is None:
            return super().training_step(batch)
        with neftune_noise(self.model.embed, self.neftune_alpha, sample_lengths(batch)):
            return super().training_step(batch)


class NEFT(NEFTuneNoise, LoRAPlusGroups, LoRA):
    """NEFTune: LoRA with uniform noise on the token embeddings in training (alpha 5 by default)."""

    def __init__(self, neftune_alpha: float | None = 5.0, **kwargs: Any) -> None:
        """
        Args:
            neftune_alpha: NEFTune: noise scale alpha on the token embeddings in training (5 in the paper; null: off).
        """
        super().__init__(neftune_alpha=neftune_alpha, **kwargs)
