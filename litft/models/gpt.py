"""One decoder-only transformer for every supported family, top to bottom.

Embedding -> n_layer x Block(norm, attention, norm, MLP) -> norm -> lm_head.
The family differences (norm type, MLP type, biases, parallel residual, partial rotary, embedding
scaling, tied head) are Config fields, not subclasses. Every projection an adapter may target is a
plain `nn.Linear` named as in HF Llama (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj, lm_head), so `litft/adapters` can wrap it by name and names map 1:1 onto HF/PEFT.
The hand-written autograd Functions it calls (RoPE, SwiGLU, RMSNorm, causal attention, the fused head +
cross-entropy: less kept for backward, litft's CPU kernels for fp32) live beside it in `fused.py`.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from litft import native
from litft.models.config import Config
from litft.models.fused import (
    LinearCrossEntropy,
    RMSNormFunction,
    Rope,
    SwiGLU,
    PackedSegments,
    causal_attention,
    segment_starts,
)


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
        x = self.embed(input_ids)
        mask: torch.Tensor | PackedSegments | None = None
        window = self.config.sliding_window
        if (segment_ids is not None and start == 0 and (window is None or T <= window)
                and native.usable(x)):
            # litft's kernel attends within each packed sample directly: no (B, T, T) mask, no other samples' keys
            mask = segment_starts(segment_ids)
        if mask is None:
            mask = attention_mask(self.config, T, start, segment_ids, input_ids.device)

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
        if isinstance(mask, PackedSegments):
            y = causal_attention(q, k, v, mask)
        elif mask is None and q.shape[2] == k.shape[2] and T > 1:
            y = causal_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


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
    `nn.Linear` head goes through `LinearCrossEntropy` (models/fused.py), which forms the gradients in the
    forward pass (no logits kept, none recomputed; one head-sized d/dW whatever the number of chunks);
    any other head (LoRA on lm_head, a quantized head) has each chunk's logits recomputed in backward
    (checkpoint).
    """
    targets = labels[:, 1:].reshape(-1)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    keep = targets != ignore_index
    n_tokens = int(keep.sum())
    if n_tokens == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph connected for DDP; contributes nothing
    if n_tokens < keep.numel():
        h, targets = h[keep], targets[keep]
    if type(head) is nn.Linear and torch.is_grad_enabled():
        return LinearCrossEntropy.apply(h, head.weight, head.bias, targets, chunk_size), n_tokens

    def chunk_loss(h_chunk: torch.Tensor, t_chunk: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h_chunk).float(), t_chunk, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n_tokens, chunk_size):
        h_c, t_c = h[i : i + chunk_size], targets[i : i + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(chunk_loss, h_c, t_c, use_reentrant=False)
        else:
            total = total + chunk_loss(h_c, t_c)
    return total, n_tokens

