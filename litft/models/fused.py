"""The model's hand-written autograd Functions: the same math as the plain torch ops in `gpt.py`, with less
kept for backward and, for fp32 CPU tensors, litft's compiled kernels (`litft/native.py`) in place of torch's.

Each says in its docstring what it saves compared with autograd. The model (`litft/models/gpt.py`) calls
them; read that file first. `tests/test_model.py` checks each against autograd through the plain formulas,
`tests/test_bf16.py` in bf16 against an fp32 reference, `tests/test_native.py` the compiled kernels.

    causal_attention / CausalAttention  SDPA with is_causal=True, through litft's flash-attention kernel; also
                                        within packed samples (PackedSegments) without a dense mask
    CausalAttentionBF16                 the same in bf16: SDPA's forward, litft's AMX backward
    SwiGLU                              silu(gate) * up
    RMSNormFunction                     RMSNorm (Llama's and Gemma's rounding)
    Rope                                rotary embedding ("rotate half")
    LinearCrossEntropy                  the head matmul and the cross-entropy, gradients formed in forward
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from litft import native
from litft.cpu_kernels import linear, mm


@dataclass
class PackedSegments:
    """Packed samples (litft.data.pack_samples) as each position's first key: `starts` (B, T) int32, position t
    attends to keys starts[b, t]..t. The same attention as the dense segment mask of `gpt.attention_mask` when
    every segment is one contiguous run (`segment_starts` checks), but litft's kernel skips the key blocks of
    other samples instead of computing and masking them."""

    starts: torch.Tensor

    def dense_mask(self) -> torch.Tensor:
        """The (B, 1, T, T) boolean mask (True = attend) for SDPA."""
        T = self.starts.shape[1]
        k_pos = torch.arange(T, device=self.starts.device)
        causal = k_pos.unsqueeze(0) <= k_pos.unsqueeze(1)  # (T, T): key <= query
        return (causal & (k_pos.view(1, 1, T) >= self.starts.unsqueeze(2))).unsqueeze(1)


def segment_starts(segment_ids: torch.Tensor) -> PackedSegments | None:
    """PackedSegments of (B, T) segment ids, or None when some id occurs in more than one run of a row (then only
    the dense equality mask expresses the attention)."""
    B, T = segment_ids.shape
    new = torch.ones(B, T, dtype=torch.bool, device=segment_ids.device)
    new[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    ordered = segment_ids.sort(dim=1).values
    distinct = (ordered[:, 1:] != ordered[:, :-1]).sum(1) + 1
    if not torch.equal(new.sum(1), distinct):
        return None
    pos = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return PackedSegments(starts.to(torch.int32).contiguous())


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     segments: PackedSegments | None = None) -> torch.Tensor:
    """SDPA with is_causal=True (grouped kv heads allowed), through litft's fp32 CPU kernel where it applies;
    with `segments`, causal within each packed sample."""
    starts = None if segments is None else segments.starts
    if native.attention_supported(q, k, v):
        return CausalAttention.apply(q, k, v, starts)
    gqa = q.shape[1] != k.shape[1]
    if segments is None:
        if (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
                and native.attention_bf16_supported(q, k, v)):
            return CausalAttentionBF16.apply(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=segments.dense_mask(), enable_gqa=gqa)


class CausalAttention(torch.autograd.Function):
    """litft's CPU flash attention (litft/csrc/kernels.cpp, ~1.8x SDPA's CPU kernel on a SmolLM2 layer). Like
    SDPA's flash kernel it keeps q, k, v, the output and one log-sum-exp per row for backward. seg_start:
    PackedSegments.starts or None."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                seg_start: torch.Tensor | None = None) -> torch.Tensor:
        out, q, k, v, lse2 = native.attention_forward(q, k, v, seg_start)
        ctx.save_for_backward(q, k, v, out, lse2)
        ctx.seg_start = seg_start  # an integer input: no gradient, not part of the autograd graph
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return *native.attention_backward(*ctx.saved_tensors, grad, ctx.seg_start), None


class CausalAttentionBF16(torch.autograd.Function):
    """bf16 causal attention: torch's CPU flash-attention forward (what SDPA runs), litft's AMX backward
    (litft/csrc/kernels.cpp; ~2.8x torch's on a SmolLM2 layer). Keeps what SDPA keeps: q, k, v, the output and
    one log-sum-exp per row."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return native.attention_backward_bf16(*ctx.saved_tensors, grad)


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for backward (autograd also keeps silu(gate): one
    more intermediate-sized tensor per layer, the largest activation of a Llama block)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        if native.usable(gate, up, bf16=True, elementwise=True):  # one pass instead of two (litft/native.py)
            return native.swiglu_forward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        if native.usable(gate, up, grad, bf16=True, elementwise=True):
            return native.swiglu_backward(gate, up, grad)
        grad_up = F.silu(gate).mul_(grad)  # silu recomputed: one pass, instead of keeping it
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)  # torch's fused d silu / d gate
        return grad_gate, grad_up


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm keeping only x and 1/rms for backward (autograd also keeps the normalised x: one more
    hidden-sized tensor per norm); the normalised x is recomputed in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
        ctx.unit_offset = unit_offset
        if native.usable(x, weight, bf16=True, elementwise=True):  # one pass instead of four (litft/native.py)
            scale = weight.float() + 1.0 if unit_offset else weight
            out, rstd = native.rmsnorm_forward(x, scale, eps, round_normed=not unit_offset)
            ctx.save_for_backward(x, weight, rstd)
            return out
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        if unit_offset:
            return (h * rstd * (1.0 + weight.float())).type_as(x)
        return weight * (h * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        scale = weight.float() + 1.0 if ctx.unit_offset else weight.float()
        x_hat = None
        if native.usable(x, grad, bf16=True, elementwise=True):
            grad_x = native.rmsnorm_backward(x, scale, rstd, grad)
        else:
            x_hat = x.float() * rstd
            g = grad.float() * scale
            # d/dx of x * rstd(x): rstd * (g - x_hat * mean(g * x_hat))
            grad_x = (g - x_hat * (g * x_hat).mean(-1, keepdim=True)).mul_(rstd).to(x.dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:  # full fine-tuning trains the norms
            x_hat = x.float() * rstd if x_hat is None else x_hat
            grad_w = (grad.float() * x_hat).reshape(-1, x_hat.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # cos/sin repeat their first half (cat(freqs, freqs)), so with x = (x1, x2) per rotary half:
    # out1 = x1 c - x2 s, out2 = x2 c + x1 s; written into one output, no temporaries of x's size.
    # bf16-mixed: q, k come in bf16 (autocast's products) while cos/sin stay fp32. Rotate in fp32 and round once at
    # the end (as HF's fp32 rotation then SDPA's autocast cast do): into a bf16 `out`, every op below would compute
    # in fp32 and copy back, rounding twice per half.
    dtype = x.dtype
    if dtype != cos.dtype and cos.dtype == torch.float32:
        x = x.float()  # once: mixed-dtype ops would each cast their operand again
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    out = torch.empty_like(x)
    o1, o2 = out[..., :half], out[..., half : 2 * half]
    torch.mul(x1, c, out=o1)
    o1.addcmul_(x2, s, value=-1.0)
    torch.mul(x2, c, out=o2)
    o2.addcmul_(x1, s)
    if 2 * half < x.shape[-1]:  # partial rotary (NeoX, Phi): the rest passes through
        out[..., 2 * half :] = x[..., 2 * half :]
    return out.to(dtype)


class Rope(torch.autograd.Function):
    """Rotary embedding with a hand-written backward: the rotation is linear and orthogonal, so the
    gradient is the inverse rotation (sin negated) and nothing but cos/sin is kept for backward
    (autograd's version keeps q and k twice, ~12% of a Llama layer's saved activations)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b, t_i) over all target tokens, a chunk of rows at a time, with d/dh (and d/dW, d/db
    when they train) computed in forward.

    d loss / d logits = softmax(logits) - onehot(t) is known as soon as a chunk's loss is, so the forward
    turns the chunk's logits into it in place and multiplies it out right away; backward only scales the
    stored gradients by the incoming scalar. This saves the second head matmul a recomputing checkpoint needs
    (the head is ~9% of a SmolLM2 step) and keeps one chunk x vocab fp32 buffer. The chunks' gradients go into
    one buffer per input: one head-sized d/dW however many chunks (one Function per chunk kept one each).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk_size: int) -> torch.Tensor:
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if needs_h else None
        grad_w = grad_b = None
        total = h.new_zeros((), dtype=torch.float32)
        device = h.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if low is not None:
            # bf16-mixed: the products in autocast's dtype, as autocast runs them, but the head weight cast once,
            # not once per chunk and product (the casts of the (vocab x C) weight and the (chunk x vocab) gradient
            # were ~10% of a SmolLM2 step); autocast leaves products of tensors already in its dtype alone
            weight, bias = weight.to(low), None if bias is None else bias.to(low)
        for i in range(0, len(targets), chunk_size):
            h_c, t_c = h[i : i + chunk_size], targets[i : i + chunk_size]
            h_c = h_c if low is None else h_c.to(low)
            logits = linear(h_c, weight, bias)
            if native.usable(logits, bf16=True, elementwise=True) and logits.dtype == h_c.dtype:
                total = total + native.cross_entropy_(logits, t_c).sum()  # one pass, in place (litft/native.py)
                grad_logits = logits
            else:
                logits = logits.float()
                target_logits = logits.gather(1, t_c.unsqueeze(1))
                row_max = logits.amax(dim=1, keepdim=True)
                probs = logits.sub_(row_max).exp_()  # in place: exp(logits - max)
                sums = probs.sum(dim=1, keepdim=True)
                total = total + (row_max + sums.log() - target_logits).sum()
                grad_logits = probs.div_(sums)  # softmax ...
                grad_logits.scatter_add_(1, t_c.unsqueeze(1), grad_logits.new_full((len(t_c), 1), -1.0))  # - onehot
                grad_logits = grad_logits.to(h_c.dtype)
            if needs_h:
                grad_h[i : i + chunk_size] = mm(grad_logits, weight)
            if needs_w:  # accumulated in place: one head-sized buffer (in the products' dtype, as autocast's was)
                if grad_w is None:
                    grad_w = mm(grad_logits.t(), h_c)
                else:
                    grad_w.addmm_(grad_logits.t(), h_c)
            if needs_b and bias is not None:
                grad_b = grad_logits.sum(0) if grad_b is None else grad_b.add_(grad_logits.sum(0))
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_loss.to(g.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w), scale(grad_b), None, None
