"""LoRA+ (Hayou et al., 2024, arXiv 2402.12354): train B faster than A.

In B·A, A's input side and B's output side play different roles as the width grows; the paper shows
one shared learning rate is inefficient and sets lr(B) = ratio x lr(A) (ratio ~16). Nothing else
changes, so LoRA+ is only an optimizer-grouping rule: `LoRAPlusGroups.param_groups()`. Any method
with LoRA-style `lora_A` / `lora_B` parameters takes it as a mixin (see `DoRA`, `NEFT`).

Groups: lora_B at lr x ratio; lora_A at lr; the A/B of adapters on an nn.Embedding at
`loraplus_lr_embedding`; everything else that trains (biases, DoRA's magnitudes) at lr. peft (and the
paper's code) put every 1-D parameter in B's fast group; we keep them at lr because the ratio comes
from the asymmetry of the product B·A, which a bias or a per-row magnitude is not part of.
Weight decay applies to matrices only, as in the base module.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from litft.methods.lora import LoRA
from litft.utils import LitftError


class LoRAPlusGroups:
    """Mixin: the LoRA+ optimizer groups, on when `loraplus_lr_ratio` is set. Put it before the method
    class in the bases (`class M(LoRAPlusGroups, LoRA)`) so its `param_groups()` wins."""

    def __init__(self, loraplus_lr_ratio: float | None = None, loraplus_lr_embedding: float = 1e-6,
                 **kwargs: Any) -> None:
        """
        Args:
            loraplus_lr_ratio: LoRA+: train the lora_B matrices at lr x this ratio (16 in the paper; null: off).
            loraplus_lr_embedding: LoRA+: learning rate of adapters on embedding layers (their A and B).
        """
        super().__init__(**kwargs)
        for name, value in (("loraplus_lr_ratio", loraplus_lr_ratio), ("loraplus_lr_embedding", loraplus_lr_embedding)):
            if value is not None and not value > 0:
                raise LitftError(f"{name} must be > 0 (or null to turn LoRA+ off), got {value}")
        self.loraplus_lr_ratio, self.loraplus_lr_embedding = loraplus_lr_ratio, loraplus_lr_embedding

    def param_groups(self) -> list[dict[str, Any]]:
        if self.loraplus_lr_ratio is None:
            return super().param_groups()
        lr, wd = self.hparams.lr, self.hparams.weight_decay
        embedding_params = {id(p) for m in self.model.modules()
                            if isinstance(getattr(m, "base_layer", None), nn.Embedding)
                            for n, p in m.named_parameters() if n.startswith("lora_")}
        groups: dict[str, dict[str, Any]] = {
            "A": {"params": [], "lr": lr, "weight_decay": wd},
            "B": {"params": [], "lr": lr * self.loraplus_lr_ratio, "weight_decay": wd},
            "embedding": {"params": [], "lr": self.loraplus_lr_embedding, "weight_decay": wd},
            "other": {"params": [], "lr": lr, "weight_decay": wd},
            "other_no_decay": {"params": [], "lr": lr, "weight_decay": 0.0},
        }
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if id(p) in embedding_params:
                key = "embedding"
            elif leaf == "lora_B":
                key = "B"
            elif leaf == "lora_A":
                key = "A"
            else:  # biases, DoRA magnitudes, ...: the base lr (see the module docstring)
                key = "other" if p.ndim >= 2 else "other_no_decay"
            groups[key]["params"].append(p)
        if not groups["B"]["params"]:
            raise LitftError("LoRA+ found no lora_B parameters to train faster; it needs a LoRA-style method")
        # name each group: the optimizer ignores unknown keys, and logs / tests can find them
        return [{"name": k, **g} for k, g in groups.items() if g["params"]]


class LoRAPlus(LoRAPlusGroups, LoRA):
    """LoRA+: LoRA with lora_B trained at loraplus_lr_ratio x lr (default 16)."""

    def __init__(self, loraplus_lr_ratio: float | None = 16.0, **kwargs: Any) -> None:
        """
        Args:
            loraplus_lr_ratio: LoRA+: train the lora_B matrices at lr x this ratio (16 in the paper; null: off).
        """
        super().__init__(loraplus_lr_ratio=loraplus_lr_ratio, **kwargs)
