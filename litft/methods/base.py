"""The base fine-tuning module. Subclass it and override only what your method changes.

The training loop (`litft/train.py`) knows only this interface:
  configure_model()          load the base model, wrap/freeze layers
  training_step(batch)       -> summed loss (the loop divides by the global sum of loss_count(batch))
  validation_step(batch)     -> (summed loss, its loss_count)
  loss_count(batch)          what the loss is summed over: target tokens (DPO: pairs)
  pop_metric_sums()          extra summed metrics since the last call (DPO's rewards), logged as sum / count
  configure_optimizers()     -> (optimizer, lr scheduler); reads self.total_steps
  after_optimizer_step(step) anything a method changes outside the optimizer (Delta-LoRA moves W)
  trainable_state_dict() / load_trainable_state_dict(sd)   what a resumable checkpoint holds
  save_final(out_dir)        what a finished run leaves behind
"""
from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from litft.checkpoint import METHOD_CONFIG, check_checkpoint_dir, load_model, save_checkpoint
from litft.models.gpt import GPT, chunked_cross_entropy
from litft.utils import LitftError, atomic_write_text


class Finetune(L.LightningModule):
    weights_file = "model.safetensors"  # what save_final / step-N checkpoints store the trained weights in
    reports_perplexity = True  # the loss is a mean token cross-entropy: validation also reports exp(loss)

    def __init__(
        self,
        checkpoint_dir: Path,
        optimizer: str = "AdamW",
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.0,
        optimizer_args: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        """The base model and the optimizer settings every method shares.

        Args:
            checkpoint_dir: the litft base model checkpoint to fine-tune.
            optimizer: a torch.optim class name (AdamW, SGD, ...) or a bitsandbytes one (bnb.AdamW8bit,
                bnb.PagedAdamW, bnb.PagedAdamW8bit).
            lr: peak learning rate.
            weight_decay: decoupled weight decay (not applied to 1-D parameters such as biases and norms).
            betas: Adam betas.
            warmup_steps: linear warmup steps, then cosine decay to min_lr_ratio * lr at the last step.
            min_lr_ratio: final learning rate as a fraction of lr.
            optimizer_args: extra keyword arguments for the optimizer (e.g. {"eps": 1e-6}).
            gradient_checkpointing: recompute each block in backward (less memory, ~1/3 more compute).
        """
        super().__init__()
        self.save_hyperparameters()  # collects the init args of every subclass too: see method_config()
        self.checkpoint_dir = check_checkpoint_dir(checkpoint_dir)  # fail before any work, with a clear message
        if lr <= 0 or weight_decay < 0 or warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
            raise LitftError("need lr > 0, weight_decay >= 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")
        self.make_optimizer([torch.nn.Parameter(torch.zeros(1))])  # its options checked now, before any model loads
        self.model: GPT | None = None
        self.total_steps = 1  # set by the training loop before configure_optimizers()

    # -- model ----------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:  # idempotent: Fabric may call it again
            return
        self.model = load_model(self.checkpoint_dir)
        self.model.gradient_checkpointing = self.hparams.gradient_checkpointing

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["input_ids"], position_ids=batch.get("position_ids"),
                          segment_ids=batch.get("segment_ids"), output="hidden")

    def training_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss_sum, _ = chunked_cross_entropy(self.model.lm_head, self(batch), batch["labels"])
        return loss_sum

    @torch.no_grad()
    def validation_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return chunked_cross_entropy(self.model.lm_head, self(batch), batch["labels"])

    def loss_count(self, batch: dict[str, torch.Tensor]) -> int:
        """What training_step's loss is a sum over (the loop normalises by its global total): target tokens."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def pop_metric_sums(self) -> dict[str, torch.Tensor]:
        """Extra metrics summed over the steps since the last call (the loop logs them divided by the loss
        count, as train/<name> and val/<name>); none here."""
        return {}

    # -- optimisation ---------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters in optimizer groups; weight decay only on matrices."""
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        decay = [p for n, p in params if p.ndim >= 2]
        no_decay = [p for n, p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.hparams.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The optimizer these options name, over `params`; options it does not take are one clear error."""
        h = self.hparams
        optimizer_cls = resolve_optimizer(h.optimizer)
        if h.optimizer_args is not None and not isinstance(h.optimizer_args, dict):
            raise LitftError(f"optimizer_args must be a mapping (e.g. '{{\"eps\": 1e-6}}'), got {h.optimizer_args!r}")
        if "lr" in (h.optimizer_args or {}):
            raise LitftError("optimizer_args sets lr: use --lr")
        kwargs = dict(lr=h.lr, **(h.optimizer_args or {}))
        if "betas" in _init_params(optimizer_cls):
            kwargs.setdefault("betas", tuple(h.betas))
        try:
            return optimizer_cls(params, **kwargs)
        except (TypeError, ValueError) as e:
            raise LitftError(f"{h.optimizer} does not take these options ({' '.join(str(e).split())}): check --betas, "
                             "--lr and --optimizer_args") from None

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        h = self.hparams
        optimizer = self.make_optimizer(self.param_groups())
        total, warmup, floor = max(self.total_steps, 1), h.warmup_steps, h.min_lr_ratio

        def lr_factor(step: int) -> float:  # linear warmup, then cosine to `floor`
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    def after_optimizer_step(self, step: int) -> None:
        """Called by the loop after optimizer step `step` (counted from 1); a method that changes weights outside
        the optimizer does it here (Delta-LoRA). Nothing by default."""

    # -- what checkpoints hold ------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        sd = self.model.state_dict()
        if self.model.config.tie_embeddings:
            sd.pop("lm_head.weight", None)
        return {k: v.detach().cpu() for k, v in sd.items()}

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=not self.model.config.tie_embeddings)

    def method_config(self) -> dict[str, Any]:
        """Enough to rebuild this module: its class and init args (see `load_method`)."""
        # paths absolute, so merge_lora / generate / resume read the run from any working directory
        args = {k: (str(Path(v).resolve()) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in self.hparams.items()}
        args["checkpoint_dir"] = str(self.checkpoint_dir.resolve())
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": args}

    def save_final(self, out_dir: Path) -> None:
        """Full fine-tuning: a complete litft checkpoint (loadable by every litft command)."""
        save_checkpoint(self.trainable_state_dict(), self.model.config, out_dir, tokenizer_dir=self.checkpoint_dir)
        atomic_write_text(out_dir / METHOD_CONFIG, yaml.safe_dump(self.method_config(), sort_keys=False))

    def merged_model(self, into: str = "original") -> GPT:
        """The plain model with whatever the method trained folded in (for merge_lora / export). `into` picks the
        weights an adapter on a quantized base merges into (see LoRA); full fine-tuning has nothing to merge."""
        return self.model


def _init_params(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters)


def resolve_optimizer(name: str) -> type[torch.optim.Optimizer]:
    if name.startswith(("bnb.", "bitsandbytes.")):
        import bitsandbytes as bnb

        cls = getattr(bnb.optim, name.split(".", 1)[1], None)
    else:
        cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise LitftError(f"unknown optimizer {name!r}: use a torch.optim class name (AdamW, SGD, ...) or "
                         "bnb.AdamW8bit / bnb.PagedAdamW / bnb.PagedAdamW8bit")
    return cls
