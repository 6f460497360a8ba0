"""LoRA-FA (arXiv 2308.03303): LoRA with A frozen at its random init, so backward keeps x·A^T instead of x.

The layer (and why it saves memory) is `litft/adapters/lora_fa.py`; this module swaps it in, keeps A frozen
after `mark_only_adapters_trainable` (which would train every `lora_*` tensor), and offers peft's LoRA-FA
optimizer (`--lorafa_optimizer true`, peft's `create_lorafa_optimizer`): AdamW on B with B's gradient projected
to the one the full update would have, (1/s^2)·g_B·(A·A^T + δI)^-1, δ = 1e-8. It is peft's AdamW variant
(eps added to sqrt(v) after the bias correction is folded into the step size, weight decay applied after the
update), so a run matches peft's step for step; other trainable tensors (biases) get the same AdamW.

Composes with `--quantize` (the base's own autograd keeps its quantized weight, not x), `--neftune_alpha`,
`--use_rslora`, `--init_adapter` (A and B start from the file; A stays frozen) and several devices. It refuses
dropout (its mask would be as large as x) and LoRA+ (whose ratio lr(B)/lr(A) means nothing when A is frozen).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from litft.adapters.inject import adapter_modules
from litft.adapters.lora_fa import LoRAFALinear
from litft.methods.lora import LoRA
from litft.methods.neft import NEFTuneNoise
from litft.utils import LitftError

LORAFA_DELTA = 1e-8  # peft's ridge on A·A^T before the (pseudo-)inverse


class LoRAFAOptimizer(torch.optim.Optimizer):
    """peft's LoraFAOptimizer: AdamW whose update of each LoRA B uses the projected gradient
    (1/s^2)·g_B·(A·A^T + δI)^-1 (A frozen); every other parameter gets plain (peft-style) AdamW.

    `projections` maps id(B) -> (A, s). The state is per B (exp_avg, exp_avg_sq, step), as torch's optimizers keep
    it, so `state_dict()` / `load_state_dict()` resume it."""

    def __init__(self, params: Any, projections: dict[int, tuple[Tensor, float]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True) -> None:
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"need lr >= 0, eps >= 0 and betas in [0, 1), got {lr}, {eps}, {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))
        self.projections = projections

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if id(p) in self.projections:  # a LoRA B: the LoRA-FA projected gradient
                    A, s = self.projections[id(p)]
                    A32 = A.float()
                    eye = torch.eye(A.shape[0], device=A.device, dtype=torch.float32)
                    inverse = torch.linalg.pinv(A32 @ A32.T + LORAFA_DELTA * eye)
                    grad = ((1 / s**2) * (grad.float() @ inverse)).to(p.grad.dtype)
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = float(state["step"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size = step_size * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


class LoRAFA(NEFTuneNoise, LoRA):
    """LoRA-FA: LoRA with A frozen at its random init (only B trains); backward keeps x·A^T, not x."""

    def __init__(self, dropout: float = 0.0, lorafa_optimizer: bool = False, **kwargs: Any) -> None:
        """
        Args:
            dropout: must be 0: a dropout mask is as large as the layer input LoRA-FA does not keep.
            lorafa_optimizer: peft's LoRA-FA optimizer: AdamW on B with the projected gradient
                (1/s^2)·g_B·(A·A^T + 1e-8·I)^-1 (needs --optimizer AdamW; --optimizer_args may set only eps,
                default 1e-6 as in peft).
        """
        if "loraplus_lr_ratio" in kwargs:
            raise LitftError("LoRA-FA does not take loraplus_lr_ratio: LoRA+ sets lr(B) / lr(A), and LoRA-FA freezes A "
                             "(raise --lr instead)")
        if dropout:
            raise LitftError(f"LoRA-FA needs --dropout 0 (got {dropout}): a dropout mask is as large as the layer input, "
                             "which LoRA-FA exists not to keep for backward")
        super().__init__(dropout=dropout, **kwargs)
        self.lorafa_optimizer = lorafa_optimizer
        if lorafa_optimizer:
            h = self.hparams
            if h.optimizer != "AdamW":
                raise LitftError(f"--lorafa_optimizer true is its own AdamW variant: drop --optimizer {h.optimizer} "
                                 "(or set --lorafa_optimizer false)")
            extra = set(h.optimizer_args or {}) - {"eps"}
            if extra:
                raise LitftError(f"--lorafa_optimizer true takes only eps in --optimizer_args, got {sorted(extra)}")

    def make_adapter(self, name: str, linear: nn.Module) -> nn.Module:
        return LoRAFALinear(linear, self.r, self.alpha, self.dropout, self.use_rslora)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        for _, module in adapter_modules(self.model):  # mark_only_adapters_trainable turned every lora_* on
            module.lora_A.requires_grad_(False)

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        if not getattr(self, "lorafa_optimizer", False) or self.model is None:
            return super().make_optimizer(params)
        h = self.hparams
        projections = {id(m.lora_B): (m.lora_A, m.scaling) for _, m in adapter_modules(self.model)}
        return LoRAFAOptimizer(params, projections, lr=h.lr, betas=tuple(h.betas),
                               eps=(h.optimizer_args or {}).get("eps", 1e-6), weight_decay=h.weight_decay)
