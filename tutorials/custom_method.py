"""Try an idea by subclassing a method: LoRA with a label-smoothed loss and a z-loss.

Run it on the bundled demo (a few minutes on 2 CPU cores):
    python tutorials/custom_method.py
or on your own model and data:
    python tutorials/custom_method.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M --json_path my.json \
        --val_json_path my_val.json --precision bf16-true    # bf16-true: on a GPU (or a CPU with bf16 units)
and every option: `python tutorials/custom_method.py --help`.

A method module overrides only what differs from its parent. Here that is `training_step`:
the loop still does batching, accumulation, DDP, clipping, logging, checkpoints and resume, and
divides whatever sum this returns by the number of target tokens in the global batch.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from jsonargparse import CLI

from litft.data import JSON
from litft.methods.lora import LoRA
from litft.train import EvalArgs, TrainArgs, finetune

DEMO = Path(__file__).resolve().parents[1] / "litft" / "demo"


class SmoothedLoRA(LoRA):
    """LoRA trained with label smoothing plus a small z-loss (log Z^2, as in PaLM) on the logits."""

    def __init__(self, smoothing: float = 0.1, z_loss: float = 1e-4, **kwargs) -> None:
        """Label smoothing and z-loss weights (all LoRA options apply).

        Args:
            smoothing: label smoothing epsilon.
            z_loss: weight of log(Z)^2, which keeps the logits' normaliser near 1.
        """
        super().__init__(**kwargs)
        self.smoothing, self.z_loss = smoothing, z_loss

    def training_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self(batch)[:, :-1]  # position t predicts labels[t + 1]
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        # Only target positions go through the head: cheap, and no full fp32 logits tensor.
        logits = self.model.lm_head(hidden[keep]).float()
        loss = F.cross_entropy(logits, targets[keep], label_smoothing=self.smoothing, reduction="sum")
        return loss + self.z_loss * torch.logsumexp(logits, dim=-1).pow(2).sum()


def main(
    checkpoint_dir: Path = DEMO / "base",
    json_path: Path = DEMO / "data" / "train.json",
    val_json_path: Path | None = DEMO / "data" / "test.json",
    out_dir: Path = Path("out/tutorials/smoothed-lora"),
    max_steps: int = 200,
    smoothing: float = 0.1,
    z_loss: float = 1e-4,
    precision: str | None = None,
) -> dict[str, float]:
    """Fine-tune SmoothedLoRA (r 16, alpha 32, lr 2e-3, batches of 16) and print the final metrics.

    Args:
        checkpoint_dir: a litft checkpoint (default: the bundled demo base).
        json_path: Alpaca-format training data (default: the demo task).
        val_json_path: validation data; null: split it off json_path.
        out_dir: where logs, checkpoints and final/ go.
        max_steps: optimizer steps.
        smoothing: label smoothing epsilon.
        z_loss: weight of log(Z)^2.
        precision: 32-true, bf16-true, bf16-mixed, 16-mixed; default bf16-true on a bf16 GPU, else 32-true.
    """
    method = SmoothedLoRA(checkpoint_dir=checkpoint_dir, smoothing=smoothing, z_loss=z_loss, r=16, alpha=32,
                          dropout=0.0, lr=2e-3)
    data = JSON(json_path=json_path, val_json_path=val_json_path)
    metrics = finetune(method, data, out_dir, TrainArgs(global_batch_size=16, micro_batch_size=16,
                                                        max_steps=max_steps, max_seq_length=128),
                       EvalArgs(interval=50, max_iters=10, exact_match_samples=100, max_new_tokens=32),
                       precision=precision)
    print({k: round(v, 4) for k, v in metrics.items()})
    return metrics


if __name__ == "__main__":
    CLI(main, as_positional=False)
