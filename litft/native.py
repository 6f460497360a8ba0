"""litft's compiled CPU kernels (``litft/csrc/kernels.cpp``), fp32: causal attention, RMSNorm, SwiGLU.

Why: on CPU a LoRA step of a small Llama spends most of its non-matmul time in a few places torch serves with
general kernels: SDPA's flash-attention kernel (~70-110 GFLOP/s of causal work on a SmolLM2 layer, against
~200 for the matmuls around it) and the 3-5 separate passes of RMSNorm and SwiGLU. The C++ file holds one
flash-attention-2 forward/backward around a register-tiled block product, and one-pass RMSNorm and SwiGLU
(see its header). Measured in `benchmarks/README.md`; checked against float64 references in
``tests/test_native.py``.

Build: on first use, once per machine and source version, with the system C++ compiler (``g++ -O3
-march=native -fopenmp``, ~2 s) into ``$LITFT_CACHE_DIR/kernels`` (default ``~/.cache/litft/kernels``), loaded
with ``ctypes``. The kernels run on torch's OpenMP thread pool (torch's libgomp is already loaded) with
``torch.get_num_threads()`` threads. No compiler, or a failed build: litft warns once and uses torch's ops.
``LITFT_CPU_KERNELS=torch`` always uses torch's ops; ``=litft`` makes a failed build an error.

Only fp32 CPU tensors take these paths (see `usable`); everything else is torch. Each wrapper here takes and
returns tensors; the autograd functions around them live in ``litft/models/gpt.py``.
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
from torch import Tensor

from litft.utils import LitftError, cpuinfo_field

__all__ = ["kernels_choice", "enabled", "usable", "attention_supported", "attention_forward", "attention_backward",
           "rmsnorm_forward", "rmsnorm_backward", "swiglu_forward", "swiglu_backward"]

SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
BLOCK = 64  # the attention kernel's key block: packed keys/values are zero-padded to a multiple of it
MAX_HEAD_DIM = 256

_LIB: ctypes.CDLL | None = None
_TRIED = False


def kernels_choice() -> str:
    """LITFT_CPU_KERNELS, validated: 'auto' (the default), 'litft' or 'torch'."""
    choice = os.environ.get("LITFT_CPU_KERNELS", "auto").strip().lower()
    if choice not in ("auto", "litft", "torch"):
        raise LitftError(f"LITFT_CPU_KERNELS={choice!r}: use 'auto', 'litft' or 'torch' (or unset it)")
    return choice


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


def _declare(lib: ctypes.CDLL) -> None:
    p, i, c_long, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
    attn = [i, i, i, i, i, i, i, f, p, c_long, c_long, c_long]  # threads, B, H, KV, T, Tp, Dh, scale, q + strides
    lib.litft_attention_forward.argtypes = [*attn, p, p, p, p]
    lib.litft_attention_backward.argtypes = [*attn, p, p, p, p, p, p, p, p, p]
    lib.litft_attention_forward.restype = lib.litft_attention_backward.restype = i
    lib.litft_rmsnorm_forward.argtypes = [i, c_long, i, f, p, p, p, p]
    lib.litft_rmsnorm_backward.argtypes = [i, c_long, i, p, p, p, p, p]
    lib.litft_swiglu_forward.argtypes = [i, c_long, p, p, p]
    lib.litft_swiglu_backward.argtypes = [i, c_long, p, p, p, p, p]


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on the first call; None where they are switched off or cannot be built."""
    global _LIB, _TRIED
    if _TRIED:
        return _LIB
    _TRIED = True
    if kernels_choice() == "torch":
        return None
    try:
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if cxx is None:
            raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
        # a new source, compiler, flag set or CPU (-march=native) gets its own build
        key = "\n".join([SOURCE.read_text(), cxx, *FLAGS, cpuinfo_field("flags")])
        key = hashlib.sha256(key.encode()).hexdigest()[:16]
        cache = Path(os.environ.get("LITFT_CACHE_DIR") or Path.home() / ".cache" / "litft")
        lib_path = cache / "kernels" / f"kernels-{key}.so"
        if not lib_path.exists():
            _build(cxx, lib_path)
        lib = ctypes.CDLL(str(lib_path))
        _declare(lib)
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        if kernels_choice() == "litft":
            raise LitftError(f"LITFT_CPU_KERNELS=litft but litft's CPU kernels could not be built: {e}") from e
        warnings.warn(f"litft: CPU kernels unavailable ({e}); using torch's ops instead", stacklevel=3)
        return None
    _LIB = lib
    return lib


def enabled() -> bool:
    """Whether litft's kernels are in use (builds them on the first call)."""
    return library() is not None


def usable(*tensors: Tensor) -> bool:
    """All fp32 CPU tensors, no CPU autocast (which would run these ops in bf16), outside tracing/compiling, and
    the kernels are built."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and enabled())


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("litft's CPU kernels are not available here (see the warning above); check usable() first")
    return lib


def _threads() -> int:
    return torch.get_num_threads()


# ------------------------------------------------------------------------------------------ attention
def attention_supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """q (B, H, T, Dh), k/v (B, KV, T, Dh), causal over equal lengths: what the kernel covers."""
    return (q.dim() == 4 and q.shape[-1] % 16 == 0 and q.shape[-1] <= MAX_HEAD_DIM and q.shape[1] % k.shape[1] == 0
            and q.shape[2] == k.shape[2] == v.shape[2] and usable(q, k, v))


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


def _check(rc: int, q: Tensor, k: Tensor) -> None:
    if rc == 2:
        raise MemoryError(f"litft attention kernel: out of memory for its work buffers (q {tuple(q.shape)}); "
                          "use a smaller batch or sequence, or LITFT_CPU_KERNELS=torch")
    if rc != 0:
        raise RuntimeError(f"litft attention kernel rejected q {tuple(q.shape)}, k {tuple(k.shape)}")


def attention_forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """softmax(q k^T / sqrt(Dh), causal) v. Returns the output (B, H, T, Dh) -- a view of a (B, T, H, Dh)
    buffer, so the o_proj input is a free reshape -- plus what `attention_backward` needs: q, k, v (last
    dimension made contiguous) and the per-row log2-sum-exp (B, H, T)."""
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    B, H, T, Dh = q.shape
    kt, vp = _packed(k, transpose=True), _packed(v, transpose=False)
    o = q.new_empty(B, T, H, Dh)
    lse2 = q.new_empty(B, H, T)
    rc = _lib().litft_attention_forward(_threads(), B, H, k.shape[1], T, kt.shape[-1], Dh, 1 / math.sqrt(Dh),
                                        q.data_ptr(), *q.stride()[:3], kt.data_ptr(), vp.data_ptr(), o.data_ptr(),
                                        lse2.data_ptr())
    _check(rc, q, k)
    return o.transpose(1, 2), q, k, v, lse2


def attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse2: Tensor, grad: Tensor):
    """d/dq, d/dk, d/dv (shapes of q, k, v) of sum(grad * out), out as returned by `attention_forward`."""
    B, H, T, Dh = q.shape
    KV = k.shape[1]
    o = out.transpose(1, 2)  # the (B, T, H, Dh) buffer
    dout = grad.transpose(1, 2).contiguous()  # free when the grad is (B, T, H, Dh)-contiguous, as o_proj's is
    kt, kp, vt = _packed(k, transpose=True), _packed(k, transpose=False), _packed(v, transpose=True)
    dq = q.new_empty(B, T, H, Dh)
    dk = q.new_empty(H // KV, B, T, KV, Dh)  # one partial sum per query head of a kv group
    dv = q.new_empty(H // KV, B, T, KV, Dh)
    rc = _lib().litft_attention_backward(_threads(), B, H, KV, T, kt.shape[-1], Dh, 1 / math.sqrt(Dh), q.data_ptr(),
                                         *q.stride()[:3], kt.data_ptr(), kp.data_ptr(), vt.data_ptr(), o.data_ptr(),
                                         dout.data_ptr(), lse2.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr())
    _check(rc, q, k)
    dk = dk[0] if dk.shape[0] == 1 else dk.sum(0)
    dv = dv[0] if dv.shape[0] == 1 else dv.sum(0)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ------------------------------------------------------------------------------------------ RMSNorm, SwiGLU
def rmsnorm_forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """weight * x / rms(x) over the last dimension; returns it and 1/rms with shape (..., 1). `weight` is the
    effective one (Gemma's 1 + w formed by the caller)."""
    x, weight = x.contiguous(), weight.contiguous()
    C = x.shape[-1]
    out, rstd = torch.empty_like(x), x.new_empty(*x.shape[:-1], 1)
    _lib().litft_rmsnorm_forward(_threads(), x.numel() // C, C, eps, x.data_ptr(), weight.data_ptr(), out.data_ptr(),
                                 rstd.data_ptr())
    return out, rstd


def rmsnorm_backward(x: Tensor, weight: Tensor, rstd: Tensor, grad: Tensor) -> Tensor:
    """d/dx of sum(grad * rmsnorm(x)), with `rstd` from `rmsnorm_forward`."""
    x, weight, grad = x.contiguous(), weight.contiguous(), grad.contiguous()
    C = x.shape[-1]
    grad_x = torch.empty_like(x)
    _lib().litft_rmsnorm_backward(_threads(), x.numel() // C, C, x.data_ptr(), weight.data_ptr(), rstd.data_ptr(),
                                  grad.data_ptr(), grad_x.data_ptr())
    return grad_x


def swiglu_forward(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, elementwise (same shapes)."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    _lib().litft_swiglu_forward(_threads(), gate.numel(), gate.data_ptr(), up.data_ptr(), out.data_ptr())
    return out


def swiglu_backward(gate: Tensor, up: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """d/dgate, d/dup of sum(grad * silu(gate) * up)."""
    gate, up, grad = gate.contiguous(), up.contiguous(), grad.contiguous()
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(gate)
    _lib().litft_swiglu_backward(_threads(), gate.numel(), gate.data_ptr(), up.data_ptr(), grad.data_ptr(),
                                 grad_gate.data_ptr(), grad_up.data_ptr())
    return grad_gate, grad_up
