"""Delta-LoRA: LoRA whose frozen W also moves, by the change of the low-rank product (Zi et al., 2023,
arXiv 2309.02411).

After each optimizer step t >= K (K: the start step), with no gradient and no optimizer state for W:

    W <- W + λ · s · (B_t A_t - B_{t-1} A_{t-1})            (λ = 2 in the paper)

The layer keeps W as loaded and the moved part as its own tensor: ``lora_delta`` (out x in, the adapter's dtype),
the sum of every update so far, so the effective weight is ``W + lora_delta``. That is the saved format too:
`adapter.safetensors` holds lora_A, lora_B and one dense lora_delta per adapted layer, so a resumed run (and
merge_lora, generate) rebuild exactly the W training ended with, whatever the base's dtype, and the base file is
never rewritten. ``W + lora_delta`` is formed per call inside `DeltaLoRALinearFunction` (and again in backward),
so backward keeps x and the tensors already resident, not an (out x in) temporary per layer.

Dropout must be 0: the paper derives the update from the gradient of B·A on the same input the base sees. A
quantized base cannot move (its weight is packed): `DeltaLoRA` refuses `--quantize`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from litft.adapters.lora import LoRALinear
from litft.cpu_kernels import linear, mm
from litft.utils import LitftError

__all__ = ["DeltaLoRALinear", "DeltaLoRALinearFunction"]


class DeltaLoRALinear(LoRALinear):
    """A plain Linear whose effective weight ``W + lora_delta`` moves with the adapter's B·A (see the module doc)."""

    method = "Delta-LoRA"

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        if dropout:
            raise LitftError(f"Delta-LoRA needs dropout 0 (got {dropout}): its update of W is the change of B·A, "
                             "derived for the undropped input. Pass --dropout 0")
        if type(base_layer) is not nn.Linear or not base_layer.weight.is_floating_point():
            raise LitftError(f"Delta-LoRA moves the base weight, so it needs a plain floating-point nn.Linear; got "
                             f"{type(base_layer).__name__} ({base_layer.weight.dtype}). Do not quantize the base")
        super().__init__(base_layer, r, alpha, 0.0, use_rslora)
        self.register_buffer("lora_delta", torch.zeros_like(self.lora_B @ self.lora_A))
        self._previous: tuple[Tensor, Tensor] | None = None  # (A, B) after the last step: B_{t-1} A_{t-1}

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        return DeltaLoRALinearFunction.apply(x, base.weight, self.lora_delta, base.bias, self.lora_A, self.lora_B,
                                             self.scaling)

    # ------------------------------------------------------------------ the update of W
    @torch.no_grad()
    def remember_product(self) -> None:
        """Keep (A, B) as B_{t-1} A_{t-1} for the next `move_weight` (at the start, and after loading weights)."""
        self._previous = (self.lora_A.detach().clone(), self.lora_B.detach().clone())

    @torch.no_grad()
    def move_weight(self, update_ratio: float, apply: bool) -> None:
        """After an optimizer step: lora_delta += λ·s·(B_t A_t - B_{t-1} A_{t-1}) when `apply` (t >= K); either way
        the current (A, B) become the previous ones."""
        if apply:
            if self._previous is None:
                raise RuntimeError("Delta-LoRA: move_weight before remember_product (no B_{t-1} A_{t-1})")
            A0, B0 = (t.to(self.lora_A.device) for t in self._previous)
            change = self.lora_B.float() @ self.lora_A.float() - B0.float() @ A0.float()
            self.lora_delta.add_((update_ratio * self.scaling * change).to(self.lora_delta.dtype))
        self.remember_product()

    # -------------------------------------------------------------------- merge
    def merged_weight(self, weight: Tensor) -> Tensor:
        return weight + self.lora_delta.float().to(weight.device) + self.delta_weight().to(weight.device)

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        return weight - self.delta_weight().to(weight.device) - self.lora_delta.float().to(weight.device)


class DeltaLoRALinearFunction(torch.autograd.Function):
    """``x (W + D)^T + b + s (x A^T) B^T`` with W and D (lora_delta) frozen. ``W + D`` is formed in forward and
    again in backward (autograd would keep it: one (out x in) tensor per layer until backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, delta: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float) -> Tensor:
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("Delta-LoRA moves W without gradients: W and lora_delta must be frozen")
        x2 = x.reshape(-1, x.shape[-1])
        xa = linear(x2, lora_A)
        out = linear(x2, weight + delta.to(weight.dtype), bias)
        out.addmm_(xa.to(out.dtype), lora_B.t().to(out.dtype), alpha=scaling)
        ctx.save_for_backward(x2, weight, delta, lora_A, lora_B, xa)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x2, weight, delta, lora_A, lora_B, xa = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])
        g_xa = mm(g.to(lora_B.dtype), lora_B).mul_(s)  # (tokens, r)
        grad_x = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = mm(g, weight + delta.to(weight.dtype)).addmm_(g_xa.to(g.dtype), lora_A.to(g.dtype))
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            grad_bias = g.sum(0)
        if ctx.needs_input_grad[4]:
            grad_a = mm(g_xa.t(), x2.to(g_xa.dtype))
        if ctx.needs_input_grad[5]:
            grad_b = mm(g.t().to(xa.dtype), xa).mul_(s)
        return grad_x, None, None, grad_bias, grad_a, grad_b, None
