"""The matmuls inside litft's hand-written autograd functions, routed to oneDNN for fp32 on CPU.

For fp32 on CPU ``torch.mm`` calls MKL's sgemm. MKL picks its kernels by CPU *vendor*: on AMD CPUs it
runs its AVX2 path even where the CPU has AVX-512, while oneDNN (also shipped inside torch, and what
torch already uses for bf16 matmuls and what Inductor uses for linears) picks kernels by the CPU's
instruction set. On the AMD EPYC (AVX-512) development machine, oneDNN's fp32 GEMM ran 1.05-1.6x
faster than MKL's on every shape of a SmolLM2 LoRA step, in isolation, and the step peaked at 0.84x
MKL's memory (its step speed was within the host's noise; ``benchmarks/README.md``). It is plain fp32
(no reduced-precision ``fp32_precision`` mode): results agree with MKL's to fp32 rounding.

So: oneDNN on non-Intel x86 CPUs, MKL (torch's default) elsewhere. The vendor is the first word of the CPU name
torch's cpuinfo reports (``torch.cpu.get_capabilities()["cpu_name"]``: "AMD EPYC", "Intel Xeon ..."); a torch
without that mapping, or a CPU without a name, counts as unknown and keeps MKL. ``LITFT_CPU_MATMUL=onednn`` or
``=torch`` overrides the choice. Only products of 2-D fp32 CPU tensors large enough to repay oneDNN's
per-shape kernel compilation (``MIN_MACS``), outside autograd (inside our functions' forward/backward), take
this path; everything else is plain torch.

A product of only a few rows under inference mode (``SMALL_ROWS``: decoding, one token per step) is a stream over
the weight, bound by memory bandwidth, not by FLOPs; for fp32 on CPU it goes to litft's own kernel (`litft.native.linear_small`), which
streams the weight ~2-3x faster than MKL's or oneDNN's small-batch paths here (numbers in `benchmarks/README.md`).

A LoRA layer over a bitsandbytes 4-bit base (QLoRA) on CPU multiplies by the dequantized weight, forward and
backward, as bitsandbytes does; `frozen_4bit_ok` / `dequantize_4bit` let it dequantize with litft's kernel into one
reused buffer (`litft.native.dequantize_4bit`, bit-equal to bitsandbytes' result) instead of a fresh fp32 copy of every
weight per call.
"""

from __future__ import annotations

import os
import platform

import torch
from torch import Tensor

from litft import native
from litft.utils import LitftError

__all__ = ["mm", "linear", "use_onednn", "onednn_enabled", "SMALL_ROWS", "small_rows_ok", "litft_dequantizes",
           "frozen_4bit_ok", "quant_state_absmax", "dequantize_4bit"]


def cpu_vendor() -> str:
    """'Intel', 'AMD', ... for x86 CPUs as torch's cpuinfo names them; '' where unknown (another architecture, no
    name, or a torch before torch.cpu.get_capabilities)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return ""
    name = str(getattr(torch.cpu, "get_capabilities", dict)().get("cpu_name", ""))
    return name.split()[0] if name.strip() else ""


def _onednn_works() -> bool:
    """The private op exists in this torch build and computes a small product correctly."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return False
        a, w = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(4, 3)
        return torch.equal(op(a, w, None, "none", [], ""), a @ w.t())
    except (AttributeError, RuntimeError):
        return False


def _choose() -> bool:
    choice = os.environ.get("LITFT_CPU_MATMUL", "auto").strip().lower()
    if choice not in ("auto", "onednn", "torch"):
        raise LitftError(f"LITFT_CPU_MATMUL={choice!r}: use 'auto', 'onednn' or 'torch' (or unset it)")
    if choice == "torch":
        return False
    if choice == "auto" and cpu_vendor() in ("Intel", ""):
        return False  # MKL's own fast path; oneDNN is not expected to beat it there (not measured)
    return _onednn_works()


ONEDNN: bool | None = None  # decided on first use, so a bad LITFT_CPU_MATMUL is a CLI error, not an import error
# oneDNN JIT-compiles a kernel for every new shape (~1 ms; varying sequence lengths keep making new ones),
# which only pays off on large products; smaller ones (LoRA's rank-r products, small models) stay in MKL.
MIN_MACS = 1 << 25


def onednn_enabled() -> bool:
    global ONEDNN
    if ONEDNN is None:
        ONEDNN = _choose()
    return ONEDNN


def use_onednn(t: Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu" and onednn_enabled()


SMALL_ROWS = 4  # up to this many rows, a product is a weight stream (decoding): litft's kernel


def small_rows_ok(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """`x` (rows, in) has at most SMALL_ROWS rows, under inference mode (generation: training keeps torch's
    products, so its results do not move by a rounding when a batch happens to be small), and the kernel takes
    these tensors."""
    return (x.dim() == 2 and x.shape[0] <= SMALL_ROWS and weight.dim() == 2 and torch.is_inference_mode_enabled()
            and native.usable(x, weight, *(() if bias is None else (bias,))))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight^T + bias`` for 2-D ``x`` (any strides); no autograd through the oneDNN or small-rows path."""
    if small_rows_ok(x, weight, bias):
        return native.linear_small(x, weight, bias)
    if (use_onednn(x) and weight.dtype == torch.float32 and weight.dim() == 2 and x.dim() == 2
            and x.shape[0] * x.shape[1] * weight.shape[0] >= MIN_MACS):
        if (bias is None and not x.is_contiguous()
                and (weight.is_contiguous() or weight.numel() < x.numel())):
            # oneDNN copies a strided input (slowly, when transposed: g^T in a LoRA B gradient) but reads
            # a strided weight in place; so when the weight is the cheaper copy, use (x W^T)^T = W x^T.
            return torch.ops.mkldnn._linear_pointwise(weight, x, None, "none", [], "").t()
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)


def mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for 2-D tensors (any strides)."""
    return linear(a, b.t())



def litft_dequantizes(layer: torch.nn.Module) -> bool:
    """`layer` is a bitsandbytes Linear4bit on CPU in the plain layout with an fp32 QuantState, and litft's kernels are
    built: `dequantize_4bit` takes its weight. (bitsandbytes 0.50.2's own CPU kernel returns wrong values for some
    shapes, e.g. a 64 x 96 weight, where its pure-torch reference and litft's kernel agree with the quantization;
    `tests/test_native.py`. So where litft computes with its dequantization, it merges and exports with it too.)"""
    weight = getattr(layer, "weight", None)
    qs = getattr(weight, "quant_state", None)
    return (type(layer).__name__ == "Linear4bit" and type(weight).__name__ == "Params4bit" and qs is not None
            and qs.dtype == torch.float32 and len(qs.shape) == 2 and qs.blocksize % 2 == 0
            and not getattr(qs, "packing_format_for_cpu", False) and qs.code is not None and qs.code.numel() == 16
            and (not qs.nested or qs.state2.blocksize == 256)
            and weight.device.type == "cpu" and native.enabled())


def frozen_4bit_ok(x: Tensor, layer: torch.nn.Module) -> bool:
    """`litft_dequantizes(layer)`, and `x` is an fp32 CPU tensor (no autocast): a LoRA layer can compute with
    `dequantize_4bit`'s weight."""
    return native.usable(x) and litft_dequantizes(layer)


_SCRATCH = torch.empty(0)  # the buffer `dequantize_4bit` writes into, grown to the largest weight


def quant_state_absmax(qs) -> Tensor:
    """The fp32 absmax per block of a bnb 4-bit QuantState, as `bitsandbytes.functional.dequantize_4bit` forms it:
    with double quantization the 8-bit absmaxes are dequantized first (1/64 of the weight's size, cheap)."""
    if not qs.nested:
        return qs.absmax.float()
    from bitsandbytes.functional import dequantize_blockwise

    return (dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()


def dequantize_4bit(weight: Tensor, out: Tensor | None = None) -> Tensor:
    """The (out, in) fp32 weight of a bnb `Params4bit` (see `litft_dequantizes`): into `out` if given, else into a
    buffer shared by all calls, valid until the next call, so use it and drop it (autograd functions re-dequantize in
    backward)."""
    global _SCRATCH
    qs = weight.quant_state
    n = qs.shape[0] * qs.shape[1]
    if out is None:
        if _SCRATCH.numel() < n:
            _SCRATCH = torch.empty(0)  # free the smaller one first
            _SCRATCH = torch.empty(n)
        out = _SCRATCH[:n].view(qs.shape)
    return native.dequantize_4bit(weight.data.view(torch.uint8).view(-1), quant_state_absmax(qs), qs.code.float(),
                                  qs.blocksize, out)
