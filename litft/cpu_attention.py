"""Causal attention for fp32 on CPU: litft's own kernel (``litft/csrc/causal_attention.cpp``), else SDPA.

torch's CPU flash-attention kernel (what ``F.scaled_dot_product_attention`` runs here) reached ~70-110 GFLOP/s
of causal work on a SmolLM2 layer (9 heads of 64, 3 kv heads, 512 tokens), against ~200 for the matmuls
around it, and was ~18% of a LoRA step. The C++ file holds one register-tiled block product and the flash
attention 2 forward/backward around it (see its header); on that layer it ran forward + backward ~1.6x faster
than SDPA, with outputs and gradients within fp32 rounding of a float64 reference (``tests/test_cpu_attention.py``).

It is compiled on first use, once per machine, with the system C++ compiler (``g++ -O3 -march=native
-fopenmp``, about a second) into ``$LITFT_CACHE_DIR`` (default ``~/.cache/litft``), and called through
``ctypes``. It runs on the same OpenMP thread pool as torch (torch's libgomp is already loaded), with
``torch.get_num_threads()`` threads. Without a compiler, or if the build fails, litft warns once and uses SDPA.
``LITFT_CPU_ATTENTION=sdpa`` always uses SDPA; ``=litft`` makes a failed build an error.

Covered: fp32 CPU tensors, a causal mask over equal query/key lengths (training, and the prefill of
generation), any number of kv heads dividing the query heads, head sizes that are multiples of 16 up to 256.
Anything else (padding/packing masks, sliding windows, other dtypes, CUDA) goes to SDPA.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from litft.utils import LitftError

__all__ = ["attention_choice", "causal_attention", "kernel_enabled", "supports"]

SOURCE = Path(__file__).with_name("csrc") / "causal_attention.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
BLOCK = 64  # the kernel's key block: packed keys/values are zero-padded to a multiple of it

_LIB: ctypes.CDLL | None = None
_TRIED = False


def attention_choice() -> str:
    """LITFT_CPU_ATTENTION, validated: 'auto' (the default), 'litft' or 'sdpa'."""
    choice = os.environ.get("LITFT_CPU_ATTENTION", "auto").strip().lower()
    if choice not in ("auto", "litft", "sdpa"):
        raise LitftError(f"LITFT_CPU_ATTENTION={choice!r}: use 'auto', 'litft' or 'sdpa' (or unset it)")
    return choice


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(cxx: str, out: Path) -> None:
    """Compile SOURCE into `out` atomically (parallel processes may build at once; the last rename wins)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        p = subprocess.run([cxx, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {p.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    global _LIB, _TRIED
    if _TRIED:
        return _LIB
    _TRIED = True
    if attention_choice() == "sdpa":
        return None
    try:
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if cxx is None:
            raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
        key = hashlib.sha256("\n".join([SOURCE.read_text(), cxx, *FLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("LITFT_CACHE_DIR") or Path.home() / ".cache" / "litft")
        lib_path = cache / "kernels" / f"causal_attention-{key}.so"
        if not lib_path.exists():
            _build(cxx, lib_path)
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        if attention_choice() == "litft":
            raise LitftError(f"LITFT_CPU_ATTENTION=litft but the CPU attention kernel could not be built: {e}") from e
        warnings.warn(f"litft: CPU attention kernel unavailable ({e}); using torch's SDPA instead", stacklevel=3)
        return None
    p, i, c_long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    head = [i, i, i, i, i, i, i, ctypes.c_float, p, c_long, c_long, c_long]
    lib.litft_attention_forward.argtypes = [*head, p, p, p, p]
    lib.litft_attention_backward.argtypes = [*head, p, p, p, p, p, p, p, p, p]
    lib.litft_attention_forward.restype = lib.litft_attention_backward.restype = i
    _LIB = lib
    return lib


def kernel_enabled() -> bool:
    """Whether litft's kernel is in use (builds it on the first call)."""
    return _load() is not None


def supports(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """q (B, H, T, Dh), k/v (B, KV, T, Dh): the cases the kernel covers, causal attention assumed."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32
            and q.dim() == 4 and q.shape[-1] % 16 == 0 and q.shape[-1] <= 256 and q.shape[1] % k.shape[1] == 0
            and q.shape[2] == k.shape[2] == v.shape[2] and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and kernel_enabled())


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`` through litft's kernel
    where `supports` says so, else through SDPA. Shapes (B, H, T, Dh), (B, KV, T, Dh); returns (B, H, T, Dh)."""
    if supports(q, k, v):
        return CausalAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def _kernel() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError("litft's CPU attention kernel is not available here (see the warning above); "
                           "call causal_attention(), which falls back to SDPA")
    return lib


def _last_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _packed(t: Tensor, transpose: bool) -> Tensor:
    """(B, KV, T, Dh) -> zero-padded (B, KV, Tp, Dh), or (B, KV, Dh, Tp) transposed; Tp a multiple of BLOCK."""
    B, KV, T, Dh = t.shape
    Tp = -(-T // BLOCK) * BLOCK
    if transpose:
        out = t.new_zeros(B, KV, Dh, Tp)
        out[..., :T] = t.transpose(2, 3)
    else:
        out = t.new_zeros(B, KV, Tp, Dh)
        out[:, :, :T] = t
    return out


def _q_args(q: Tensor) -> list:
    return [q.data_ptr(), q.stride(0), q.stride(1), q.stride(2)]


class CausalAttention(torch.autograd.Function):
    """Saves q, k, v, the output and the per-row log-sum-exp, as SDPA's flash kernel does."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
        B, H, T, Dh = q.shape
        KV = k.shape[1]
        scale = 1.0 / math.sqrt(Dh)
        kt, vp = _packed(k, transpose=True), _packed(v, transpose=False)
        o = q.new_empty(B, T, H, Dh)  # (B, T, H, Dh): the o_proj input is a view of it
        lse2 = q.new_empty(B, H, T)
        rc = _kernel().litft_attention_forward(torch.get_num_threads(), B, H, KV, T, kt.shape[-1], Dh, scale, *_q_args(q),
                                          kt.data_ptr(), vp.data_ptr(), o.data_ptr(), lse2.data_ptr())
        if rc != 0:
            raise RuntimeError(f"litft attention kernel rejected shapes q={tuple(q.shape)} k={tuple(k.shape)}")
        ctx.save_for_backward(q, k, v, o, lse2)
        return o.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, o, lse2 = ctx.saved_tensors
        B, H, T, Dh = q.shape
        KV = k.shape[1]
        dout = grad.transpose(1, 2).contiguous()  # free when the grad is (B, T, H, Dh)-contiguous, as o_proj's is
        kt, kp, vt = _packed(k, transpose=True), _packed(k, transpose=False), _packed(v, transpose=True)
        dq = q.new_empty(B, T, H, Dh)
        dk = q.new_empty(H // KV, B, T, KV, Dh)  # one partial sum per query head of a kv group
        dv = q.new_empty(H // KV, B, T, KV, Dh)
        rc = _kernel().litft_attention_backward(torch.get_num_threads(), B, H, KV, T, kt.shape[-1], Dh, 1.0 / math.sqrt(Dh),
                                           *_q_args(q), kt.data_ptr(), kp.data_ptr(), vt.data_ptr(), o.data_ptr(),
                                           dout.data_ptr(), lse2.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                                           dv.data_ptr())
        if rc != 0:
            raise RuntimeError(f"litft attention kernel rejected shapes q={tuple(q.shape)} k={tuple(k.shape)}")
        dk = dk[0] if dk.shape[0] == 1 else dk.sum(0)
        dv = dv[0] if dv.shape[0] == 1 else dv.sum(0)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
