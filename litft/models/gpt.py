"""One decoder-only transformer for every supported family, top to bottom.

Embedding -> n_layer x Block(norm, attention, norm, MLP) -> norm -> lm_head.
The family differences (norm type, MLP type, biases, parallel residual, partial rotary, embedding
scaling, tied head) are Config fields, not subclasses. Every projection an adapter may target is a
plain `nn.Linear` named as in HF Llama (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj, lm_head), so `litft/adapters` can wrap it by name and names map 1:1 onto HF/PEFT.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from litft import native
from litft.cpu_kernels import linear, mm
from litft.models.config import Config


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.gradient_checkpointing = False  # recompute each block in backward: less memory, ~1/3 more compute

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        input_pos: int | None = None,
        output: Literal["logits", "last", "hidden"] = "logits",
    ) -> torch.Tensor:
        """input_ids: (B, T).

        position_ids: (B, T) RoPE positions (packed samples restart at 0); default input_pos + arange(T).
        segment_ids: (B, T) sample ids of packed sequences: attention stays within a segment.
        input_pos: use the KV cache (see `set_kv_cache`), the tokens sitting at input_pos..input_pos+T-1.
        output: "logits" (B, T, V); "last" logits of the last position only (B, 1, V), as generation
            needs; "hidden" the final normed hidden states (B, T, C), for `chunked_cross_entropy`.
        """
        B, T = input_ids.shape
        start = input_pos or 0
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).unsqueeze(0)
        cos, sin = rope_cos_sin(self.config, position_ids, dtype=self.embed.weight.dtype)
        mask = attention_mask(self.config, T, start, segment_ids, input_ids.device)

        x = self.embed(input_ids)
        if self.config.scale_embeddings:  # Gemma: multiply in the activation dtype, as HF does
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, input_pos)
        x = self.norm(x)
        if output == "hidden":
            return x
        if output == "last":
            x = x[:, -1:]
        return self.lm_head(x)

    # -- KV cache for generation ------------------------------------------------------------
    def set_kv_cache(self, batch_size: int, max_length: int, device=None, dtype=None) -> None:
        p = self.embed.weight
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch_size, self.config, max_length, device or p.device, dtype or p.dtype)

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = GatedMLP(config) if config.mlp == "gated" else MLP(config)
        self.parallel_residual = config.parallel_residual

    def forward(self, x, cos, sin, mask, input_pos):
        h = self.attn(self.attn_norm(x), cos, sin, mask, input_pos)
        if self.parallel_residual:
            return x + h + self.mlp(self.mlp_norm(x))
        x = x + h
        return x + self.mlp(self.mlp_norm(x))


class Attention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        hd, nh, nkv = config.head_dim, config.n_head, config.n_kv_head
        self.q_proj = nn.Linear(config.n_embd, nh * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, nkv * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, nkv * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, config.n_embd, bias=config.o_bias)
        self.n_head, self.n_kv_head, self.head_dim = nh, nkv, hd
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call model.set_kv_cache(...) first")
            k, v = self.kv_cache.update(input_pos, k, v)
        if mask is None and q.shape[2] == k.shape[2] and T > 1:
            y = causal_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA with is_causal=True (grouped kv heads allowed), through litft's fp32 CPU kernel where it applies."""
    if native.attention_supported(q, k, v):
        return CausalAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


class CausalAttention(torch.autograd.Function):
    """litft's CPU flash attention (litft/csrc/kernels.cpp, ~1.8x SDPA's CPU kernel on a SmolLM2 layer). Like
    SDPA's flash kernel it keeps q, k, v, the output and one log-sum-exp per row for backward."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, q, k, v, lse2 = native.attention_forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse2)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return native.attention_backward(*ctx.saved_tensors, grad)


class GatedMLP(nn.Module):
    """SwiGLU / GeGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.act is F.silu:
            return self.down_proj(SwiGLU.apply(gate, up))
        return self.down_proj(self.act(gate) * up)


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for backward (autograd also keeps silu(gate): one
    more intermediate-sized tensor per layer, the largest activation of a Llama block)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        if native.usable(gate, up):  # one pass instead of two (litft/native.py)
            return native.swiglu_forward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        if native.usable(gate, up, grad):
            return native.swiglu_backward(gate, up, grad)
        grad_up = F.silu(gate).mul_(grad)  # silu recomputed: one pass, instead of keeping it
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)  # torch's fused d silu / d gate
        return grad_gate, grad_up


class MLP(nn.Module):
    """Plain MLP (GPT-NeoX): down(act(up(x)))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x):
        return self.down_proj(self.act(self.up_proj(x)))


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32. unit_offset (Gemma) scales by (1 + weight) before casting back;
    Llama casts back first, then scales: the two differ only in low precision, but we match each."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps, self.unit_offset)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm keeping only x and 1/rms for backward (autograd also keeps the normalised x: one more
    hidden-sized tensor per norm); the normalised x is recomputed in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
        ctx.unit_offset = unit_offset
        if native.usable(x, weight):  # one pass instead of four (litft/native.py)
            out, rstd = native.rmsnorm_forward(x, weight + 1.0 if unit_offset else weight, eps)
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
        if native.usable(x, scale, grad):
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


def make_norm(config: Config) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.norm_bias)
    return RMSNorm(config.n_embd, config.norm_eps, config.norm_unit_offset)


# -- rotary position embedding (HF "rotate half" convention: no q/k permutation on conversion) ---
def rope_inv_freq(config: Config, device=None) -> torch.Tensor:
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rope_cos_sin(config: Config, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B or 1, 1, T, rotary_dim), computed in fp32 then cast (as HF does)."""
    inv_freq = rope_inv_freq(config, position_ids.device)
    freqs = position_ids.float().unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin on the first rotary_dim channels (HF's convention)."""
    return Rope.apply(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # cos/sin repeat their first half (cat(freqs, freqs)), so with x = (x1, x2) per rotary half:
    # out1 = x1 c - x2 s, out2 = x2 c + x1 s; written into one output, no temporaries of x's size.
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
    return out


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


def attention_mask(
    config: Config, T: int, start: int, segment_ids: torch.Tensor | None, device
) -> torch.Tensor | None:
    """A boolean mask (True = attend) or None when SDPA's own causal path is exact.

    Needed for packed samples (segment_ids), a sliding window shorter than the keys, and for
    several new tokens appended to a KV cache (chunked prefill).
    """
    n_keys = start + T
    window = config.sliding_window
    needs_window = window is not None and n_keys > window
    if segment_ids is None and not needs_window and (start == 0 or T == 1):
        return None
    q_pos = torch.arange(start, start + T, device=device).unsqueeze(1)
    k_pos = torch.arange(n_keys, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if needs_window:
        mask = mask & (q_pos - k_pos < window)
    mask = mask.unsqueeze(0).unsqueeze(0)  # (1, 1, T, n_keys)
    if segment_ids is not None:
        if start != 0:
            raise ValueError("segment_ids (packed samples) cannot be combined with a KV cache")
        same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)  # (B, T, T)
        mask = mask & same.unsqueeze(1)
    return mask


class KVCache(nn.Module):
    """Preallocated keys/values of one attention layer: (B, n_kv_head, max_length, head_dim)."""

    def __init__(self, batch_size: int, config: Config, max_length: int, device, dtype) -> None:
        super().__init__()
        shape = (batch_size, config.n_kv_head, max_length, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: int, k: torch.Tensor, v: torch.Tensor):
        end = input_pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; asked to write up to {end}")
        self.k[:, :, input_pos:end] = k
        self.v[:, :, input_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def chunked_cross_entropy(
    head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int = 512, ignore_index: int = -100
) -> tuple[torch.Tensor, int]:
    """Sum of next-token losses and the number of target tokens, never holding full fp32 logits.

    hidden: (B, T, C) from `GPT(..., output="hidden")`; labels: (B, T) aligned with the inputs
    (-100 = no loss); position t predicts labels[t + 1]. Only positions with a target go through
    the head, in chunks, so at most one chunk x vocab of fp32 logits is alive at a time. A plain
    `nn.Linear` head goes through `LinearCrossEntropy`, which forms the gradients in the forward pass
    (no logits kept, none recomputed); any other head (LoRA on lm_head, a quantized head) has each
    chunk's logits recomputed in backward (checkpoint).
    """
    targets = labels[:, 1:].reshape(-1)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    keep = targets != ignore_index
    n_tokens = int(keep.sum())
    if n_tokens == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph connected for DDP; contributes nothing
    if n_tokens < keep.numel():
        h, targets = h[keep], targets[keep]
    fused = type(head) is nn.Linear

    def chunk_loss(h_chunk: torch.Tensor, t_chunk: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h_chunk).float(), t_chunk, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n_tokens, chunk_size):
        h_c, t_c = h[i : i + chunk_size], targets[i : i + chunk_size]
        if fused and torch.is_grad_enabled():
            total = total + LinearCrossEntropy.apply(h_c, head.weight, head.bias, t_c)
        elif torch.is_grad_enabled():
            total = total + checkpoint(chunk_loss, h_c, t_c, use_reentrant=False)
        else:
            total = total + chunk_loss(h_c, t_c)
    return total, n_tokens


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b, t_i), with d/dh (and d/dW, d/db when they train) computed in forward.

    d loss / d logits = softmax(logits) - onehot(t) is known as soon as the loss is, so the forward
    turns the chunk's logits into it in place and multiplies it out right away; backward only scales
    the stored gradients by the incoming scalar. This saves the second head matmul a recomputing
    checkpoint needs (the head is ~9% of a SmolLM2 step) and keeps one chunk x vocab fp32 buffer.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor):
        logits = linear(h, weight, bias).float()
        target_logits = logits.gather(1, targets.unsqueeze(1))
        row_max = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(row_max).exp_()  # in place: exp(logits - max)
        sums = probs.sum(dim=1, keepdim=True)
        loss = (row_max + sums.log() - target_logits).sum()
        grad_logits = probs.div_(sums)  # softmax ...
        grad_logits.scatter_add_(1, targets.unsqueeze(1), grad_logits.new_full((len(targets), 1), -1.0))  # ... - onehot
        grad_logits = grad_logits.to(h.dtype)
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        grad_h = mm(grad_logits, weight) if needs_h else None
        grad_w = mm(grad_logits.t(), h) if needs_w else None
        grad_b = grad_logits.sum(0) if needs_b and bias is not None else None
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_loss.to(g.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w), scale(grad_b), None
