"""LoRA: low-rank adapters on top of a frozen Linear (Hu et al., 2021).

    y = base(x) + scaling * B @ A @ dropout(x)

with ``A`` (r x in) kaiming-uniform initialised and ``B`` (out x r) zeros, so a freshly
wrapped layer computes exactly what the base layer did. ``scaling`` is ``alpha / r``
(or ``alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023, which keeps the update's
magnitude stable as r grows).

The base layer is kept as ``self.base_layer`` and only ever *called* in ``forward``, so
any module mapping in_features -> out_features works (plain ``nn.Linear``, bitsandbytes
``Linear4bit`` / ``Linear8bitLt`` for QLoRA, ...). Only ``merge`` / ``unmerge`` need to
touch the base weight, and they insist on a plain floating-point weight.

Subclasses (DoRA, ...) override ``forward`` and ``merged_weight`` / ``unmerged_weight`` and
reuse the validation, init, merge bookkeeping and the fused `LoRALinearFunction` (which takes
DoRA's per-output scale) here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from litft.cpu_kernels import dequantize_4bit, frozen_4bit_ok, linear, mm

__all__ = ["LoRALinear", "LoRALinearFunction", "lora_scaling"]


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """``alpha / r`` (classic LoRA) or ``alpha / sqrt(r)`` (rsLoRA)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _features(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear-like module.

    Prefer the attributes: quantized layers (bnb Linear4bit) store a packed weight whose
    shape is not (out, in)."""
    in_f = getattr(base_layer, "in_features", None)
    out_f = getattr(base_layer, "out_features", None)
    if in_f is None or out_f is None:
        weight = getattr(base_layer, "weight", None)
        if weight is None or weight.dim() != 2:
            raise TypeError(
                f"LoRALinear needs a Linear-like base layer with in_features/out_features or a 2-D "
                f"`.weight`; got {type(base_layer).__name__}"
            )
        out_f, in_f = weight.shape
    return int(in_f), int(out_f)


class LoRALinear(nn.Module):
    """A frozen ``base_layer`` plus a trainable low-rank update ``scaling * B @ A``."""

    method = "LoRA"  # named in error messages

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        # bool is an int subclass; reject it so `r=True` is not silently rank 1.
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"LoRA rank r must be an integer >= 1, got {r!r}")
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0):
            raise ValueError(f"LoRA alpha must be a number > 0, got {alpha!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"LoRA dropout must satisfy 0 <= dropout < 1, got {dropout!r}")

        self.base_layer = base_layer
        self.in_features, self.out_features = _features(base_layer)
        self.r = r
        self.alpha = float(alpha)
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, self.alpha, use_rslora)
        # None (not nn.Dropout(0)) so forward skips the op entirely when p == 0.
        self.lora_dropout: nn.Module | None = nn.Dropout(dropout) if dropout > 0 else None
        self.merged = False

        # Adapter lives where the base weight lives. Quantized bases store uint8/int8
        # weights, so fall back to fp32 there (QLoRA trains the adapter in higher precision).
        weight = getattr(base_layer, "weight", None)
        device = weight.device if weight is not None else None
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))
        self.reset_lora_parameters()

    @property
    def dropout(self) -> float:
        return self.lora_dropout.p if self.lora_dropout is not None else 0.0

    def reset_lora_parameters(self) -> None:
        # Same init as nn.Linear's weight for A (bound = 1/sqrt(in)); B = 0 makes the
        # initial update exactly zero so training starts from the base model.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # ------------------------------------------------------------------ forward
    def lora_forward(self, x: Tensor) -> Tensor:
        """The adapter path alone, in the adapter's dtype: ``scaling * B A dropout(x)``."""
        x = x.to(self.lora_A.dtype)
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        # Two skinny matmuls (in->r->out) instead of materialising the out x in delta.
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:  # the update already lives inside the base weight
            return self.base_layer(x)
        if self._can_fuse(x):
            base = self.base_layer
            return LoRALinearFunction.apply(x, base.weight, base.bias, self.lora_A, self.lora_B, self.scaling)
        if self._can_fuse_autocast(x):  # bf16-mixed on CPU: the fused Function in bf16, cast as autocast would
            base, low = self.base_layer, torch.get_autocast_dtype("cpu")
            with torch.autocast("cpu", enabled=False):
                return LoRALinearFunction.apply(
                    x.to(low), self._weight_in(low), None if base.bias is None else base.bias.to(low),
                    self.lora_A.to(low), self.lora_B.to(low), self.scaling)
        if self._can_fuse_4bit(x):  # QLoRA on CPU: the base weight dequantized by litft's kernel, per use
            base = self.base_layer
            return LoRALinearFunction.apply(x, None, base.bias, self.lora_A, self.lora_B, self.scaling, None,
                                            base.weight)
        result = self.base_layer(x)
        return result + self.lora_forward(x).to(result.dtype)

    def _can_fuse(self, x: Tensor) -> bool:
        """The fused path covers the common case: a plain Linear base, no dropout, one dtype, no autocast."""
        return (
            self.lora_dropout is None
            and type(self.base_layer) is nn.Linear
            and x.dtype == self.base_layer.weight.dtype == self.lora_A.dtype
            and not torch.is_autocast_enabled(x.device.type)
        )

    def _can_fuse_autocast(self, x: Tensor) -> bool:
        """bf16-mixed on CPU (fp32 weights, forward under bf16 autocast): autocast would cast x twice (for the base
        product and for A), every weight on every call, and run the scaling and the sum as separate bf16 ops. Here x
        is cast once and the fused Function runs in bf16: the same products in the same dtype, fewer passes."""
        return (
            self.lora_dropout is None
            and type(self.base_layer) is nn.Linear
            and x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and x.dtype in (torch.float32, torch.bfloat16)
            and self.base_layer.weight.dtype == self.lora_A.dtype == torch.float32
        )

    def _weight_in(self, dtype: torch.dtype) -> Tensor:
        """The base weight cast to `dtype`: a trainable one through autograd on every call (as autocast does); a
        frozen one cast once and kept until the weight changes (merge, load), as big as the saved casts autocast
        would hold from forward to backward."""
        weight = self.base_layer.weight
        if weight.requires_grad:
            return weight.to(dtype)
        key = (weight.data_ptr(), weight._version, weight.device, dtype)
        if getattr(self, "_weight_cast_key", None) != key:
            self._weight_cast = None  # free the old copy before making the new one
            self._weight_cast, self._weight_cast_key = weight.detach().to(dtype), key
        return self._weight_cast

    def _can_fuse_4bit(self, x: Tensor) -> bool:
        """The fused path over a bitsandbytes 4-bit base on CPU (fp32 compute): see `litft.cpu_kernels.dequantize_4bit`."""
        return (
            self.lora_dropout is None
            and self.lora_A.dtype == torch.float32
            and (self.base_layer.bias is None or self.base_layer.bias.dtype == torch.float32)
            and frozen_4bit_ok(x, self.base_layer)  # x: fp32 on CPU, no autocast
        )

    # -------------------------------------------------------------------- merge
    def delta_weight(self) -> Tensor:
        """``scaling * B @ A`` as an (out, in) fp32 tensor (fp32 so merging into bf16
        weights rounds only once)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def _mergeable_weight(self) -> Tensor:
        weight = getattr(self.base_layer, "weight", None)
        # bnb's Params4bit / Int8Params subclass nn.Parameter, so test the exact type:
        # merging into a packed/quantized weight would silently corrupt it.
        if (
            weight is None
            or type(weight) not in (nn.Parameter, Tensor)
            or not weight.is_floating_point()
        ):
            kind = "no weight" if weight is None else f"{type(weight).__name__} ({weight.dtype})"
            raise TypeError(
                f"cannot merge LoRA into {type(self.base_layer).__name__} with {kind}: merging "
                "requires a plain floating-point Linear weight (dequantize quantized bases first)"
            )
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"base weight shape {tuple(weight.shape)} != (out, in) = "
                f"({self.out_features}, {self.in_features}); cannot merge"
            )
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight in place (computed in fp32, stored in the weight's dtype):
        `merged_weight`, ``W + scaling * B @ A`` for LoRA. Afterwards ``forward`` only runs the base layer."""
        if self.merged:
            raise RuntimeError(f"{self.method} layer is already merged; call unmerge() first")
        weight = self._mergeable_weight()
        weight.copy_(self.merged_weight(weight.float()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out again (exact up to the weight dtype's rounding): `unmerged_weight`."""
        if not self.merged:
            raise RuntimeError(f"{self.method} layer is not merged; nothing to unmerge")
        weight = self._mergeable_weight()
        weight.copy_(self.unmerged_weight(weight.float()).to(weight.dtype))
        self.merged = False

    def merged_weight(self, weight: Tensor) -> Tensor:
        """The base weight (fp32) with the update folded in; subclasses (DoRA) fold in their own form."""
        return weight + self.delta_weight().to(weight.device)

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        """The inverse of `merged_weight`, on the merged fp32 weight."""
        return weight - self.delta_weight().to(weight.device)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
            f"use_rslora={self.use_rslora}, merged={self.merged}"
        )


class LoRALinearFunction(torch.autograd.Function):
    """``x W^T + b + s (x A^T) B^T`` with hand-written backward: the same math as the unfused path, fewer
    passes over activation-sized tensors.

    Unfused, autograd runs the base matmul, the LoRA matmuls, a scaling multiply and an add over the
    (tokens x out) output, and in backward another multiply over the output gradient and an add of the
    two input gradients. Here the scaling goes onto the thin (tokens x r) tensors and both additions
    happen inside the matmuls (``addmm_``), so only x and ``x A^T`` are saved.

    With a per-output ``scale`` (DoRA's ``m / ||W + s B A||``, see `litft/adapters/dora.py`) it computes
    ``scale * (x W^T + s (x A^T) B^T) + b`` in the same buffer and also keeps the output: m's gradient needs
    the pre-scale tensor, which is ``(out - b) / scale``.

    With ``weight_4bit`` (a bitsandbytes ``Params4bit``, QLoRA on CPU) ``weight`` is None: the frozen weight is
    dequantized where it is needed, once in forward and once in backward, into a reused buffer, and never saved.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, scale: Tensor | None = None, weight_4bit: Tensor | None = None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xa = linear(x2, lora_A)  # (tokens, r)
        w = weight if weight_4bit is None else dequantize_4bit(weight_4bit)
        out = linear(x2, w, bias if scale is None else None)
        out.addmm_(xa, lora_B.t(), alpha=scaling)
        if scale is not None:  # DoRA: rescale, then add the bias (not rescaled)
            out.mul_(scale)
            if bias is not None:
                out.add_(bias)
        ctx.save_for_backward(x2, weight, bias, lora_A, lora_B, xa, scale, None if scale is None else out)
        ctx.scaling, ctx.x_shape, ctx.weight_4bit = scaling, x.shape, weight_4bit
        return out.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x2, weight, bias, lora_A, lora_B, xa, scale, out = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        grad_scale = None
        if scale is None:
            g_pre = g  # d loss / d (x W^T + s (x A^T) B^T)
        else:
            if ctx.needs_input_grad[6]:  # sum_t g_t * pre_t, pre = (out - b) / scale; a row with scale 0 gets none
                summed = (g * out).sum(0)
                if bias is not None:
                    summed -= g.sum(0) * bias
                grad_scale = torch.where(scale != 0, summed / scale, 0.0)
            g_pre = g * scale
        g_xa = mm(g_pre, lora_B).mul_(s)  # (tokens, r): d loss / d (x A^T)
        if need_x:
            w = weight if ctx.weight_4bit is None else dequantize_4bit(ctx.weight_4bit)
            grad_x = mm(g_pre, w).addmm_(g_xa, lora_A).view(ctx.x_shape)
        else:
            grad_x = None
        grad_w = mm(g_pre.t(), x2) if need_w else None
        grad_bias = g.sum(0) if need_b and bias is not None else None
        grad_a = mm(g_xa.t(), x2) if need_a else None
        grad_b = mm(g_pre.t(), xa).mul_(s) if need_bb else None
        grads = (grad_x, grad_w, grad_bias, grad_a, grad_b, None, grad_scale, None)
        return grads[: len(ctx.needs_input_grad)]  # LoRA passes no scale: 6 inputs (8 over a 4-bit base)
