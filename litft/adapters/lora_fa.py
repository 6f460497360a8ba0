"""LoRA-FA: LoRA with A frozen at its random init; only B trains (Zhang et al., 2023, arXiv 2308.03303).

    y = base(x) + s · B · (A x)          A (r x in): frozen, kaiming-uniform as LoRA's     B (out x r): trains, 0 at init

The point is activation memory. LoRA's backward needs the layer input x (tokens x in) for A's gradient. With W
and A both frozen nothing needs x any more:

    dL/dB = s · g^T (x A^T)              only the projection xa = x A^T (tokens x r) is needed
    dL/dx = g W + s · (g B) A            only the weights are needed

so `LoRAFALinearFunction` saves xa (r numbers per token) and the weights, never x. On a bitsandbytes base the
base layer's own autograd runs (it keeps the quantized weight, not x) and the adapter path alone is the Function,
with no weight. Dropout would need its mask (one per input element) in backward, which defeats the point: the
layer refuses dropout.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from litft.adapters.lora import LoRALinear
from litft.cpu_kernels import linear, mm
from litft.utils import LitftError

__all__ = ["LoRAFALinear", "LoRAFALinearFunction"]


class LoRAFALinear(LoRALinear):
    """A frozen base layer, a frozen random A and a trainable B; backward keeps x·A^T, not x."""

    method = "LoRA-FA"

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        if dropout:
            raise LitftError(f"LoRA-FA needs dropout 0 (got {dropout}): a dropout mask is as large as the layer input, "
                             "which LoRA-FA exists not to keep for backward. Pass --dropout 0")
        super().__init__(base_layer, r, alpha, 0.0, use_rslora)
        self.lora_A.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        if self._can_fuse(x) and not base.weight.requires_grad:
            return LoRAFALinearFunction.apply(x, base.weight, base.bias, self.lora_A, self.lora_B, self.scaling)
        # quantized (or mixed-dtype) base: its own autograd, plus the adapter path that keeps only x·A^T
        result = base(x)
        update = LoRAFALinearFunction.apply(x.to(self.lora_A.dtype), None, None, self.lora_A, self.lora_B, self.scaling)
        return result + update.to(result.dtype)


class LoRAFALinearFunction(torch.autograd.Function):
    """``x W^T + b + s (x A^T) B^T`` (or only ``s (x A^T) B^T`` when ``weight`` is None) with W and A frozen:
    saves the weights and ``x A^T`` (tokens x r), not x (tokens x in). No gradient for W or A."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float) -> Tensor:
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            raise RuntimeError("LoRA-FA keeps neither x nor a gradient path for W or A: both must be frozen")
        x2 = x.reshape(-1, x.shape[-1])
        xa = linear(x2, lora_A)  # (tokens, r): all that backward needs of x
        if weight is None:
            out = mm(xa, lora_B.t()).mul_(scaling)
            out_features = lora_B.shape[0]
        else:
            out = linear(x2, weight, bias)
            out.addmm_(xa, lora_B.t(), alpha=scaling)
            out_features = weight.shape[0]
        ctx.save_for_backward(weight, lora_A, lora_B, xa)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return out.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weight, lora_A, lora_B, xa = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = grad_b = None
        if ctx.needs_input_grad[0]:
            g_xa = mm(g, lora_B).mul_(s)  # (tokens, r)
            grad_x = (mm(g_xa, lora_A) if weight is None else mm(g, weight).addmm_(g_xa, lora_A)).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        if ctx.needs_input_grad[4]:
            grad_b = mm(g.t(), xa).mul_(s)
        return grad_x, None, grad_bias, None, grad_b, None
