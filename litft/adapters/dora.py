"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv 2402.09353).

    W' = m * (W + s·B·A) / ||W + s·B·A||        (norm of each output row, over the input dim)
    y  = W' x + bias                            (the bias is not rescaled)

``m`` (``lora_magnitude``, one value per output feature) trains and starts at ``||W||`` so a fresh
layer computes exactly what the base layer did; ``s`` is LoRA's scaling. As in the paper (section
4.3) the norm is a constant in backward (detached): gradients reach m, A and B only through the
numerator, which saves memory and matches peft.

Cheap norm. peft materialises ``W + s·B·A`` (out x in) at every step. Expanding the square row by
row instead gives

    ||W_i + s·B_i·A||^2 = ||W_i||^2 + 2s·B_i·(A·W_i^T) + s^2·B_i·(A·A^T)·B_i^T

where ``||W_i||^2`` is frozen (computed once) and ``A·W^T`` is one r-row matmul *through the base
layer* (minus its bias). So the base layer is only ever called, never read, in ``forward``: a
bitsandbytes 4-bit base works unchanged and the norm uses its own quantized matmul.

Forward: ``y = (m / n) * (base(x) - bias + s·B·A·dropout(x)) + bias``. Dropout touches the LoRA
branch only; peft instead rescales ``W·dropout(x)`` (one more full-size matmul per layer). Both
agree when dropout is 0 (and in eval).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from litft.adapters.lora import LoRALinear, LoRALinearFunction
from litft.utils import LitftError

__all__ = ["DoRALinear"]

_NORM_EPS = 1e-12  # a zero row (W_i = 0, B_i = 0) would give m / 0 = nan; with the clamp it gives 0


class DoRALinear(LoRALinear):
    """A frozen Linear (plain or bitsandbytes-quantized) re-parametrised as magnitude x direction."""

    method = "DoRA"

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        # bnb Linear4bit / Linear8bitLt subclass nn.Linear; embeddings, convs, ... have no row-norm form here.
        if not isinstance(base_layer, nn.Linear):
            raise LitftError(f"DoRA needs a Linear layer (plain or bitsandbytes-quantized) to adapt; got "
                             f"{type(base_layer).__name__}. Target only Linear layers (q, k, v, o, gate, up, down, "
                             "lm_head) or use LoRA for this layer.")
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        # ||W_i||^2 of the frozen base, fp32. Not persistent: it derives from the base weights.
        self.register_buffer("base_sq_norm", self._base_row_sq_norms(), persistent=False)
        self.lora_magnitude = nn.Parameter(self.base_sq_norm.sqrt().to(self.lora_A.dtype))
        self._norm_cache: tuple[tuple, Tensor] | None = None  # eval only: generation calls forward per token
        self._merge_scale: Tensor | None = None  # m / n used by merge(), so unmerge() can undo it

    # ------------------------------------------------------------------ the norm
    def _base_no_bias(self, x: Tensor) -> Tensor:
        """x @ W^T through the base layer's own matmul (quantized or not)."""
        y = self.base_layer(x)
        bias = getattr(self.base_layer, "bias", None)
        return y if bias is None else y - bias

    @torch.no_grad()
    def _base_row_sq_norms(self) -> Tensor:
        """||W_i||^2 per output row, fp32 (once, at init: the base is frozen)."""
        try:
            return self._mergeable_weight().float().pow(2).sum(1)  # a plain weight: read it, far cheaper
        except (TypeError, ValueError):
            pass
        # Quantized: probe the base with identity rows; base(I[i:j]) = W[:, i:j]^T, dequantized by the base.
        device, dtype = self.lora_A.device, self.lora_A.dtype
        sq = torch.zeros(self.out_features, device=device)
        for i in range(0, self.in_features, 256):
            n = min(256, self.in_features - i)
            eye = torch.zeros(n, self.in_features, device=device, dtype=dtype)
            eye[torch.arange(n), torch.arange(i, i + n)] = 1.0
            sq += self._base_no_bias(eye).float().pow(2).sum(0)
        return sq

    @torch.no_grad()
    def weight_norm(self, dtype: torch.dtype | None = None) -> Tensor:
        """||W + s·B·A|| per output row (fp32, detached), without forming the out x in matrix.
        `dtype`: what to feed the base layer (the activations' dtype; default the adapter's)."""
        A, B, s = self.lora_A, self.lora_B, self.scaling
        AWt = self._base_no_bias(A.to(dtype or A.dtype)).float()  # (r, out) = A W^T: r rows through the base
        Af, Bf = A.float(), B.float()
        # ||W_i + s B_i A||^2 = ||W_i||^2 + B_i · (2s (A W_i^T) + s^2 (A A^T) B_i^T): a few small ops per layer
        M = torch.addmm(AWt.t(), Bf, Af @ Af.t(), beta=2 * s, alpha=s * s)  # (out, r)
        sq = self.base_sq_norm.float() + torch.linalg.vecdot(Bf, M)
        return sq.clamp_min(0).sqrt()  # rounding could push an exactly-zero row a hair below 0

    def _cached_norm(self, dtype: torch.dtype) -> Tensor:
        if self.training:  # A, B change every step (bnb optimizers even bypass version counters)
            return self.weight_norm(dtype)
        key = (dtype, *((p.data_ptr(), p._version) for p in (self.lora_A, self.lora_B)))
        if self._norm_cache is None or self._norm_cache[0] != key:
            self._norm_cache = (key, self.weight_norm(dtype))
        return self._norm_cache[1]

    def train(self, mode: bool = True) -> DoRALinear:
        self._norm_cache = None
        return super().train(mode)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self.merged:  # m / n already folded into the base weight (bias untouched)
            return self.base_layer(x)
        scale = self.lora_magnitude / self._cached_norm(x.dtype).clamp_min(_NORM_EPS)  # grad reaches m only
        if self._can_fuse(x):
            base = self.base_layer
            return DoRALinearFunction.apply(x, base.weight, base.bias, self.lora_A, self.lora_B, self.scaling,
                                            scale.to(x.dtype))
        result = self.base_layer(x)
        bias = getattr(self.base_layer, "bias", None)
        wx = result if bias is None else result - bias
        out = _Rescale.apply(wx + self.lora_forward(x).to(result.dtype), scale.to(result.dtype))
        return out if bias is None else out + bias

    # ------------------------------------------------------------------ merge
    def merged_weight(self, weight: Tensor) -> Tensor:
        """m * (W + s·B·A) / ||W + s·B·A|| from the fp32 base weight; keeps m / n for `unmerged_weight`."""
        adapted = weight + self.delta_weight().to(weight.device)
        self._merge_scale = self.lora_magnitude.float() / adapted.norm(dim=1).clamp_min(_NORM_EPS)
        return adapted * self._merge_scale[:, None]

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        """Undo `merged_weight` with the scale it used."""
        original = weight / self._merge_scale[:, None] - self.delta_weight().to(weight.device)
        self._merge_scale = None
        return original


class _Rescale(torch.autograd.Function):
    """out = scale * pre (scale per output feature), saving `out` instead of `pre` for backward.

    m's gradient needs sum_t g_t * pre_t; plain autograd would keep `pre` (one more activation of the
    layer's output size, per adapted layer: +50% activation memory on a Llama MLP+attention). `out`
    itself is usually kept anyway by the next op (SDPA keeps v, SiLU keeps gate, the MLP product keeps
    up), so keeping it here is mostly free, and pre = out / scale. (With a bias, `out + bias` is a new
    tensor and `out` costs one activation, as plain autograd would.)"""

    @staticmethod
    def forward(ctx, pre: Tensor, scale: Tensor) -> Tensor:
        out = pre * scale
        ctx.save_for_backward(out, scale)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        out, scale = ctx.saved_tensors
        grad_scale = None
        if ctx.needs_input_grad[1]:
            # sum over tokens first, divide once; a row with scale exactly 0 outputs 0 and gets no gradient
            summed = (grad * out).reshape(-1, out.shape[-1]).sum(0)
            grad_scale = torch.where(scale != 0, summed / scale, 0.0)
        return grad * scale, grad_scale


class DoRALinearFunction(LoRALinearFunction):
    """`LoRALinearFunction` given DoRA's scale: ``scale * (x W^T + s (x A^T) B^T) + b`` in one buffer, saving
    what a LoRA layer saves plus its output, which the next op mostly keeps anyway. A subclass only so that
    autograd graphs and profiles name DoRA's layers apart from LoRA's."""
