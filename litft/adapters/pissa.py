"""PiSSA: principal singular values and singular vectors adaptation (Meng et al., 2024, arXiv 2404.02948).

A LoRA layer whose adapter starts as the top-r part of the weight and whose frozen base is the rest:

    W = U S Vh (SVD),   A0 = sqrt(S_r / s) Vh_r  (r, in),   B0 = U_r sqrt(S_r / s)  (out, r)
    W_res = W - s B0 A0                          (the frozen base: W minus its principal part)
    y = W_res x + s B A x,   A = A0, B = B0 at the start (so a fresh model computes exactly W x)

with s LoRA's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA): dividing S by s is what peft does
(`init_lora_weights="pissa"`), so s B0 A0 is the rank-r truncation of W whatever the scaling.
`niter` picks peft's fast randomized SVD (`pissa_niter_N`: `torch.svd_lowrank(W, q=r, niter=N)`).

Training is LoRA's (`PiSSALinear` is a `LoRALinear`); the layer also keeps A0 and B0 (buffers `lora_A0`,
`lora_B0`) because the trained adapter only makes sense against W_res. Against the ORIGINAL weight the
trained model is the plain LoRA update

    W_res + s B A = W + s (B A - B0 A0) = W + s [B | B0] [A ; -A0]

of rank 2r with the same scaling (`pissa_as_lora`: r' = 2r, alpha' = 2 alpha, or sqrt(2) alpha with
rsLoRA), which is what peft's `path_initial_model_for_weight_conversion` writes, and what litft's
export_peft and named adapters use.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from litft.adapters.lora import LoRALinear

__all__ = ["pissa_decompose", "PiSSALinear", "pissa_as_lora", "PISSA_BUFFERS"]

PISSA_BUFFERS = ("lora_A0", "lora_B0")  # a PiSSA layer's starting A and B, saved with the adapter


@torch.no_grad()
def pissa_decompose(weight: Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[Tensor, Tensor]:
    """(A0 (r, in), B0 (out, r)) in fp32 from the top-r singular triplets of `weight` (out, in), computed in fp32:
    exact SVD, or with `niter` the randomized one (`torch.svd_lowrank`, which draws from torch's global RNG)."""
    W = weight.detach().float()
    if r > min(W.shape):
        raise ValueError(f"PiSSA rank {r} exceeds the weight's rank bound min{tuple(W.shape)} = {min(W.shape)}")
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
        Vh = V.t()
    root = (S / scaling).sqrt()
    return root[:, None] * Vh, U * root[None, :]


class PiSSALinear(LoRALinear):
    """A LoRA layer started at (A0, B0) over a base that already holds the residual W - s B0 A0 (the caller makes
    it, before quantizing it for QPiSSA); keeps A0, B0 for the conversion to a plain LoRA."""

    method = "PiSSA"

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, A0: Tensor, B0: Tensor, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        if tuple(A0.shape) != tuple(self.lora_A.shape) or tuple(B0.shape) != tuple(self.lora_B.shape):
            raise ValueError(f"PiSSA start A0 {tuple(A0.shape)} / B0 {tuple(B0.shape)} does not fit this layer "
                             f"(A {tuple(self.lora_A.shape)}, B {tuple(self.lora_B.shape)})")
        with torch.no_grad():
            self.lora_A.copy_(A0)
            self.lora_B.copy_(B0)
        # kept in the adapter's dtype: exactly the values training started from
        self.register_buffer("lora_A0", self.lora_A.detach().clone())
        self.register_buffer("lora_B0", self.lora_B.detach().clone())

    def reset_lora_parameters(self) -> None:
        pass  # the start comes from the SVD (see __init__), not LoRA's random A / zero B


def pissa_as_lora(tensors: dict[str, Tensor], r: int, alpha: float,
                  use_rslora: bool = False) -> tuple[dict[str, Tensor], int, float]:
    """A PiSSA adapter's tensors (<m>.lora_A, lora_B, lora_A0, lora_B0) as the equal plain LoRA against the
    original base: (tensors with A' = [A; -A0], B' = [B | B0], r' = 2r, alpha' keeping the scaling). Other
    tensors (trained biases) pass through unchanged."""
    out: dict[str, Tensor] = {}
    for key, t in tensors.items():
        module, leaf = key.rsplit(".", 1)
        if leaf in PISSA_BUFFERS:
            continue
        if leaf == "lora_A" and f"{module}.lora_A0" in tensors:
            out[key] = torch.cat([t, -tensors[f"{module}.lora_A0"].to(t.dtype)])
        elif leaf == "lora_B" and f"{module}.lora_B0" in tensors:
            out[key] = torch.cat([t, tensors[f"{module}.lora_B0"].to(t.dtype)], dim=1)
        else:
            out[key] = t
    return out, 2 * r, alpha * (math.sqrt(2) if use_rslora else 2)
