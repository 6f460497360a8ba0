"""litft's compiled CPU kernels (``litft/csrc/kernels.cpp``), fp32: causal attention (also within packed samples),
RMSNorm, SwiGLU and the cross-entropy's softmax gradient (these three in bf16 too), the small-batch linear of
decoding, and 4-bit dequantization (QLoRA); bf16: causal attention backward on AMX tiles where the CPU has them.

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
``LITFT_CPU_KERNELS=torch`` always uses torch's ops; ``=litft`` makes unavailable kernels an error, raised on
every use.

Loading a shared object runs its code, so the cache is trusted only as far as this user controls it:
- the cache directory and everything above it must not be writable by anyone else (directories owned by this
  user or root; a group/world-writable one only with the sticky bit, like /tmp), and the two directories litft
  uses must be this user's own (they are created 0700). Otherwise the kernels are refused: one warning and
  torch's ops, or a LitftError under ``LITFT_CPU_KERNELS=litft`` -- never a load.
- a library is loaded only if it is a regular file owned by this user, not group/world-writable, and its sha256
  matches the one recorded beside it (``kernels-<key>.so.sha256``) when it was built. Anything else found there
  is not loaded: litft says why and rebuilds it.
- builds take a file lock (``filelock``, released by the OS if a process dies), so N ranks or test workers
  starting together run the compiler once and the others load the result.
The cache key covers the source, compiler, flags, machine architecture and the CPU's features as torch detects
them (a shared home directory across different machines never hands one a binary built for another's CPU).

Why not ``torch.utils.cpp_extension.load``: it builds *and* loads in one call, so a library already in its build
directory is dlopen'ed (constructor run) before any check of ours -- ninja only compares timestamps, and a
planted newer ``.so`` was loaded when tried; its FileBaton lock is an O_EXCL file that a killed build leaves
behind, after which every later process waits forever; and it links this plain-C library against libtorch
and needs ninja. The build below uses the same compiler flags as before (``FLAGS``), so the speed is unchanged.

Only fp32 CPU tensors take these paths (see `usable`; bf16 where a kernel says so); everything else is torch.
Each wrapper here takes and returns tensors; the autograd functions around them live in
``litft/models/fused.py``.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import stat
import subprocess
import warnings
from pathlib import Path

import filelock
import torch
from torch import Tensor

from litft.utils import LitftError, atomic_path

__all__ = ["kernels_choice", "enabled", "usable", "attention_supported", "attention_forward", "attention_backward",
           "amx_available", "attention_bf16_supported", "attention_backward_bf16",
           "rmsnorm_forward", "rmsnorm_backward", "swiglu_forward", "swiglu_backward", "cross_entropy_", "linear_small",
           "dequantize_4bit"]

SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
BLOCK = 64  # the attention kernel's key block: packed keys/values are zero-padded to a multiple of it
MAX_HEAD_DIM = 256
LOCK_TIMEOUT = 600  # seconds to wait for another process's build (one takes ~2 s; g++ itself times out at 300)

_LIB: ctypes.CDLL | None = None
_UNAVAILABLE: str | None = None  # why they could not be loaded: LITFT_CPU_KERNELS=litft raises it on every use
_TRIED = False
_AMX: bool | None = None  # whether the bf16 attention backward (AMX tiles) runs here; asked once per process


class _Unavailable(Exception):
    """The kernels cannot be used here; the message says why and what to do."""


def kernels_choice() -> str:
    """LITFT_CPU_KERNELS, validated: 'auto' (the default), 'litft' or 'torch'."""
    choice = os.environ.get("LITFT_CPU_KERNELS", "auto").strip().lower()
    if choice not in ("auto", "litft", "torch"):
        raise LitftError(f"LITFT_CPU_KERNELS={choice!r}: use 'auto', 'litft' or 'torch' (or unset it)")
    return choice


# ------------------------------------------------------------------------------------------ the cache
def cache_dir() -> Path:
    """$LITFT_CACHE_DIR, else ~/.cache/litft: per user by default (never a shared place such as /tmp)."""
    if os.environ.get("LITFT_CACHE_DIR"):
        return Path(os.environ["LITFT_CACHE_DIR"]).expanduser().absolute()
    try:
        return Path.home().absolute() / ".cache" / "litft"
    except RuntimeError as e:  # no HOME and no passwd entry
        raise _Unavailable(f"no home directory for the kernel cache ({e}): set LITFT_CACHE_DIR") from e


def _writable_by_others(st: os.stat_result) -> bool:
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _private_dirs(root: Path, leaf: Path) -> None:
    """Create `root` and `leaf` (below it) mode 0700 where missing; refuse a chain another user could change."""
    uid = os.getuid()
    for d in reversed([leaf, *leaf.parents]):
        if not d.exists():
            try:
                d.mkdir(mode=0o700)
            except FileExistsError:
                pass  # another process made it meanwhile; checked below like any other
            except OSError as e:
                raise _Unavailable(f"cannot create the cache directory {d} ({e.strerror}); set LITFT_CACHE_DIR to "
                                   "a directory of yours") from e
    for d in (root, leaf):
        st = d.stat()
        wrong = ([f"owned by uid {st.st_uid}, not you"] if st.st_uid != uid else []) + \
                (["writable by others"] if _writable_by_others(st) else [])
        if wrong:
            raise _Unavailable(f"the cache directory {d} is {' and '.join(wrong)} "
                               f"(mode {stat.S_IMODE(st.st_mode):o}), so another user could plant code litft would "
                               f"run: `chmod 700 {d}` if it is yours, or set LITFT_CACHE_DIR to a directory only "
                               "you can write")
    # the literal path and the real one (symlinks followed): each directory a name is looked up in
    for d in dict.fromkeys([*root.parents, *root.resolve().parents]):
        st = d.stat()
        if st.st_uid not in (uid, 0) or (_writable_by_others(st) and not st.st_mode & stat.S_ISVTX):
            raise _Unavailable(f"the cache directory {root} lies under {d}, which another user can change "
                               f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); set LITFT_CACHE_DIR "
                               "to a directory only you can write")


def _cpu_key() -> list[str]:
    """What -march=native depends on, as torch detects it: architecture, ATen's capability level, CPU name and
    instruction-set features (torch.cpu.get_capabilities, where this torch has it)."""
    caps = getattr(torch.cpu, "get_capabilities", dict)()
    features = sorted(name for name, value in caps.items() if value is True)
    return [platform.machine(), torch.backends.cpu.get_cpu_capability(), str(caps.get("cpu_name", "")), *features]


def library_path(cxx: str) -> Path:
    """Where the build for this source, compiler, flag set and CPU lives (one file per combination)."""
    key = "\n".join([SOURCE.read_text(), cxx, *FLAGS, *_cpu_key()])
    return cache_dir() / "kernels" / f"kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _digest_path(lib_path: Path) -> Path:
    return lib_path.with_name(lib_path.name + ".sha256")


def _sha256(fd: int) -> str:
    h = hashlib.sha256()
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _owned_file_problem(path: Path, fd: int) -> str | None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return f"{path.name} is not a regular file"
    if st.st_uid != os.getuid():
        return f"{path.name} is owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    if _writable_by_others(st):
        return f"{path.name} is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _problem(lib_path: Path) -> str | None:
    """None when `lib_path` is this user's build, unchanged since; else what is wrong with it."""
    digest_path = _digest_path(lib_path)
    try:
        fd = os.open(digest_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return f"{digest_path.name} (its recorded sha256) is missing or unreadable"
    try:
        problem = _owned_file_problem(digest_path, fd)
        recorded = os.read(fd, 256).decode(errors="replace").strip()
    finally:
        os.close(fd)
    if problem:
        return problem
    try:
        fd = os.open(lib_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        return f"{lib_path.name} cannot be opened ({e.strerror})"
    try:
        problem = _owned_file_problem(lib_path, fd)
        if problem:
            return problem
        if _sha256(fd) != recorded:
            return f"{lib_path.name} does not match the sha256 recorded when litft built it"
    finally:
        os.close(fd)
    return None


def _build(cxx: str, out: Path) -> None:
    """Compile SOURCE into `out` and record its sha256 beside it (atomically: a reader sees whole files)."""
    with atomic_path(out) as tmp:
        try:
            p = subprocess.run([cxx, *FLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True,
                               timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            raise _Unavailable(f"could not be built: {e}") from e
        if p.returncode != 0:
            raise _Unavailable(f"could not be built: {cxx} failed: {p.stderr.strip()[-2000:]}")
        with open(tmp, "rb") as f:
            digest = _sha256(f.fileno())
    os.chmod(out, 0o755)  # atomic_path's umask-based mode could leave it group-writable (umask 002)
    with atomic_path(_digest_path(out)) as tmp:
        tmp.write_text(digest + "\n")
    os.chmod(_digest_path(out), 0o644)


def _load() -> ctypes.CDLL:
    """Build (if needed), check and load the kernels; raises _Unavailable saying why not."""
    if not hasattr(os, "getuid"):
        raise _Unavailable("the kernel cache's owner checks need a POSIX system (no os.getuid here)")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise _Unavailable("could not be built: no C++ compiler found (install g++, or set CXX)")
    try:
        lib_path = library_path(cxx)
        _private_dirs(cache_dir(), lib_path.parent)
        with filelock.FileLock(str(lib_path) + ".lock", timeout=LOCK_TIMEOUT):
            problem = _problem(lib_path)
            if problem is not None:
                if os.path.lexists(lib_path) or os.path.lexists(_digest_path(lib_path)):
                    warnings.warn(f"litft: not loading {lib_path} ({problem}); rebuilding it", stacklevel=4)
                _build(cxx, lib_path)
                problem = _problem(lib_path)
                if problem is not None:
                    raise _Unavailable(f"the fresh build at {lib_path} failed its check: {problem}")
            lib = ctypes.CDLL(str(lib_path))  # under the lock: no other process replaces it between check and load
    except filelock.Timeout as e:
        raise _Unavailable(f"waited {LOCK_TIMEOUT} s for another process building into {e.lock_file}") from e
    except OSError as e:  # an unreadable cache directory, or dlopen's error
        raise _Unavailable(f"could not be loaded: {e}") from e
    try:
        _declare(lib)
    except AttributeError as e:
        raise _Unavailable(f"{lib_path} lacks a kernel ({e})") from e
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    p, i, c_long, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
    attn = [i, i, i, i, i, i, i, f, p, c_long, c_long, c_long]  # threads, B, H, KV, T, Tp, Dh, scale, q + strides
    lib.litft_attention_forward.argtypes = [*attn, p, p, p, p, p]
    lib.litft_attention_backward.argtypes = [*attn, p, p, p, p, p, p, p, p, p, p]
    lib.litft_attention_forward.restype = lib.litft_attention_backward.restype = i
    lib.litft_rmsnorm_forward.argtypes = [i, c_long, i, f, p, p, p, p]
    lib.litft_rmsnorm_forward_bf16.argtypes = [i, c_long, i, f, p, p, p, p, i]
    lib.litft_rmsnorm_backward.argtypes = lib.litft_rmsnorm_backward_bf16.argtypes = [i, c_long, i, p, p, p, p, p]
    lib.litft_swiglu_forward.argtypes = lib.litft_swiglu_forward_bf16.argtypes = [i, c_long, p, p, p]
    lib.litft_swiglu_backward.argtypes = lib.litft_swiglu_backward_bf16.argtypes = [i, c_long, p, p, p, p, p]
    lib.litft_linear_small.argtypes = [i, i, i, i, p, p, p, p]
    lib.litft_dequantize_4bit.argtypes = [i, c_long, i, p, p, p, p]
    lib.litft_cross_entropy.argtypes = lib.litft_cross_entropy_bf16.argtypes = [i, c_long, i, p, p, p]
    lib.litft_cross_entropy.restype = lib.litft_cross_entropy_bf16.restype = i
    lib.litft_amx_available.argtypes = []
    lib.litft_amx_available.restype = i
    lib.litft_attention_backward_bf16.argtypes = [i, i, i, i, i, i, i, f, p, c_long, c_long, c_long, p, p, p,
                                                  p, c_long, c_long, c_long, p, c_long, c_long, c_long, p, p, p, p]
    lib.litft_attention_backward_bf16.restype = i


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on the first call; None where they are switched off or unavailable (with one
    warning), or a LitftError on every call under LITFT_CPU_KERNELS=litft when they are unavailable."""
    global _LIB, _TRIED, _UNAVAILABLE
    choice = kernels_choice()
    if choice == "torch":
        return None
    if not _TRIED:
        _TRIED = True
        try:
            _LIB = _load()
        except _Unavailable as e:
            _UNAVAILABLE = str(e)
            if choice == "auto":
                warnings.warn(f"litft: CPU kernels unavailable ({e}); using torch's ops instead", stacklevel=3)
    if _LIB is None and choice == "litft":
        raise LitftError(f"LITFT_CPU_KERNELS=litft but litft's CPU kernels are unavailable: {_UNAVAILABLE}")
    return _LIB


def enabled() -> bool:
    """Whether litft's kernels are in use (builds them on the first call)."""
    return library() is not None


def usable(*tensors: Tensor, bf16: bool = False, elementwise: bool = False) -> bool:
    """All fp32 CPU tensors (or, with bf16=True, all fp32 or all bf16: RMSNorm and SwiGLU take both), outside
    tracing/compiling, the kernels are built, and no CPU autocast -- unless `elementwise`: autocast would run
    attention and products in bf16, but leaves elementwise ops (RMSNorm's and SwiGLU's) in their inputs' dtype, and
    has nothing to cast in tensors already bf16 (the bf16 attention backward's inputs)."""
    dtype = tensors[0].dtype if bf16 and tensors[0].dtype == torch.bfloat16 else torch.float32
    return (all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
            and (elementwise or not torch.is_autocast_enabled("cpu")) and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and enabled())


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("litft's CPU kernels are not available here (see the warning above); check usable() first")
    return lib


def _threads() -> int:
    return torch.get_num_threads()


# ------------------------------------------------------------------------------------------ attention
def _causal_shapes(q: Tensor, k: Tensor, v: Tensor, head_multiple: int) -> bool:
    """q (B, H, T, Dh), k/v (B, KV, T, Dh) with KV dividing H, equal lengths, Dh a multiple of `head_multiple` and at
    most MAX_HEAD_DIM: the shapes the attention kernels tile."""
    return (q.dim() == 4 and q.shape[-1] % head_multiple == 0 and q.shape[-1] <= MAX_HEAD_DIM
            and q.shape[1] % k.shape[1] == 0 and q.shape[2] == k.shape[2] == v.shape[2])


def attention_supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """q (B, H, T, Dh), k/v (B, KV, T, Dh), causal over equal lengths: what the kernel covers."""
    return _causal_shapes(q, k, v, 16) and usable(q, k, v)


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


def _segment_starts_arg(seg_start: Tensor | None, B: int, T: int) -> int | None:
    if seg_start is None:
        return None
    if seg_start.shape != (B, T) or seg_start.dtype != torch.int32 or not seg_start.is_contiguous():
        raise ValueError(f"seg_start must be a contiguous int32 (B, T) = ({B}, {T}) tensor, got "
                         f"{seg_start.dtype} {tuple(seg_start.shape)}")
    return seg_start.data_ptr()


def attention_forward(q: Tensor, k: Tensor, v: Tensor, seg_start: Tensor | None = None
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """softmax(q k^T / sqrt(Dh), causal) v. Returns the output (B, H, T, Dh) -- a view of a (B, T, H, Dh)
    buffer, so the o_proj input is a free reshape -- plus what `attention_backward` needs: q, k, v (last
    dimension made contiguous) and the per-row log2-sum-exp (B, H, T).

    seg_start (B, T) int32, packed samples: query t attends to keys seg_start[b, t]..t only; non-decreasing
    along t (contiguous segments, see `litft.models.fused.segment_starts`)."""
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    B, H, T, Dh = q.shape
    ss = _segment_starts_arg(seg_start, B, T)
    kt, vp = _packed(k, transpose=True), _packed(v, transpose=False)
    o = q.new_empty(B, T, H, Dh)
    lse2 = q.new_empty(B, H, T)
    rc = _lib().litft_attention_forward(_threads(), B, H, k.shape[1], T, kt.shape[-1], Dh, 1 / math.sqrt(Dh),
                                        q.data_ptr(), *q.stride()[:3], kt.data_ptr(), vp.data_ptr(), ss, o.data_ptr(),
                                        lse2.data_ptr())
    _check(rc, q, k)
    return o.transpose(1, 2), q, k, v, lse2


def attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse2: Tensor, grad: Tensor,
                       seg_start: Tensor | None = None):
    """d/dq, d/dk, d/dv (shapes of q, k, v) of sum(grad * out), out as returned by `attention_forward` (with the
    same seg_start)."""
    B, H, T, Dh = q.shape
    ss = _segment_starts_arg(seg_start, B, T)
    KV = k.shape[1]
    o = out.transpose(1, 2)  # the (B, T, H, Dh) buffer
    dout = grad.transpose(1, 2).contiguous()  # free when the grad is (B, T, H, Dh)-contiguous, as o_proj's is
    kt, kp, vt = _packed(k, transpose=True), _packed(k, transpose=False), _packed(v, transpose=True)
    dq = q.new_empty(B, T, H, Dh)
    dk = q.new_empty(H // KV, B, T, KV, Dh)  # one partial sum per query head of a kv group
    dv = q.new_empty(H // KV, B, T, KV, Dh)
    rc = _lib().litft_attention_backward(_threads(), B, H, KV, T, kt.shape[-1], Dh, 1 / math.sqrt(Dh), q.data_ptr(),
                                         *q.stride()[:3], kt.data_ptr(), kp.data_ptr(), vt.data_ptr(), o.data_ptr(),
                                         dout.data_ptr(), lse2.data_ptr(), ss, dq.data_ptr(), dk.data_ptr(),
                                         dv.data_ptr())
    _check(rc, q, k)
    dk = dk[0] if dk.shape[0] == 1 else dk.sum(0)
    dv = dv[0] if dv.shape[0] == 1 else dv.sum(0)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def amx_available() -> bool:
    """Whether `attention_backward_bf16` runs here: the kernels are built, this CPU has AMX (bf16 tiles) and the
    OS grants them to this process (Linux: arch_prctl, asked once)."""
    global _AMX
    if _AMX is None and enabled():
        _AMX = bool(_lib().litft_amx_available())
    return bool(_AMX) and enabled()


def attention_bf16_supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """bf16 q (B, H, T, Dh), k/v (B, KV, T, Dh), causal over equal lengths, head size a multiple of 32, and AMX:
    what `attention_backward_bf16` covers (autocast or not: the inputs are bf16 either way)."""
    # usable(elementwise=True): autocast is allowed, as it has nothing to cast in inputs that are bf16 already
    return (_causal_shapes(q, k, v, 32) and q.dtype == torch.bfloat16
            and usable(q, k, v, bf16=True, elementwise=True) and amx_available())


def attention_backward_bf16(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad: Tensor
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """d/dq, d/dk, d/dv (bf16, shapes of q, k, v) of sum(grad * out) for causal attention, out and lse (natural
    log, (B, H, T) fp32) as torch's CPU flash-attention forward returns them
    (`torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`)."""
    q, out, grad = _last_contiguous(q), _last_contiguous(out), _last_contiguous(grad)
    B, H, T, Dh = q.shape
    KV = k.shape[1]
    kp, kt, vp = _packed(k, transpose=False), _packed(k, transpose=True), _packed(v, transpose=False)
    lse = lse.float().contiguous()
    dq = q.new_empty(B, T, H, Dh)
    dk = torch.empty(H // KV, B, T, KV, Dh)  # fp32 partial sums per query head of a kv group, summed below
    dv = torch.empty(H // KV, B, T, KV, Dh)
    rc = _lib().litft_attention_backward_bf16(_threads(), B, H, KV, T, kp.shape[2], Dh, 1 / math.sqrt(Dh),
                                              q.data_ptr(), *q.stride()[:3], kp.data_ptr(), kt.data_ptr(),
                                              vp.data_ptr(), out.data_ptr(), *out.stride()[:3], grad.data_ptr(),
                                              *grad.stride()[:3], lse.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                                              dv.data_ptr())
    if rc == 3:
        raise RuntimeError("litft's bf16 attention backward needs AMX; check attention_bf16_supported() first")
    _check(rc, q, k)
    dk = (dk[0] if dk.shape[0] == 1 else dk.sum(0)).to(torch.bfloat16)
    dv = (dv[0] if dv.shape[0] == 1 else dv.sum(0)).to(torch.bfloat16)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ------------------------------------------------------------------------------------------ RMSNorm, SwiGLU
def _suffix(t: Tensor) -> str:
    return "_bf16" if t.dtype == torch.bfloat16 else ""


def rmsnorm_forward(x: Tensor, weight: Tensor, eps: float, round_normed: bool = True) -> tuple[Tensor, Tensor]:
    """weight * x / rms(x) over the last dimension, for fp32 or bf16 x; returns it (x's dtype) and 1/rms (fp32) with
    shape (..., 1). `weight` is the effective one (Gemma's 1 + w formed by the caller), used in fp32. In bf16,
    round_normed rounds x / rms(x) to bf16 before the weight multiplies it (Llama's order; Gemma: False)."""
    x, weight = x.contiguous(), weight.float().contiguous()
    C = x.shape[-1]
    out, rstd = torch.empty_like(x), torch.empty(*x.shape[:-1], 1, dtype=torch.float32)
    args = [_threads(), x.numel() // C, C, eps, x.data_ptr(), weight.data_ptr(), out.data_ptr(), rstd.data_ptr()]
    if x.dtype == torch.bfloat16:
        _lib().litft_rmsnorm_forward_bf16(*args, int(round_normed))
    else:
        _lib().litft_rmsnorm_forward(*args)
    return out, rstd


def rmsnorm_backward(x: Tensor, weight: Tensor, rstd: Tensor, grad: Tensor) -> Tensor:
    """d/dx of sum(grad * rmsnorm(x)), with `rstd` from `rmsnorm_forward` (x and grad fp32, or both bf16)."""
    x, weight, grad, rstd = x.contiguous(), weight.float().contiguous(), grad.contiguous(), rstd.float().contiguous()
    C = x.shape[-1]
    grad_x = torch.empty_like(x)
    getattr(_lib(), "litft_rmsnorm_backward" + _suffix(x))(
        _threads(), x.numel() // C, C, x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), grad.data_ptr(),
        grad_x.data_ptr())
    return grad_x


def swiglu_forward(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, elementwise (same shapes; fp32, or bf16 computed in fp32 and rounded once)."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    getattr(_lib(), "litft_swiglu_forward" + _suffix(gate))(_threads(), gate.numel(), gate.data_ptr(), up.data_ptr(),
                                                           out.data_ptr())
    return out


def swiglu_backward(gate: Tensor, up: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """d/dgate, d/dup of sum(grad * silu(gate) * up)."""
    gate, up, grad = gate.contiguous(), up.contiguous(), grad.contiguous()
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(gate)
    getattr(_lib(), "litft_swiglu_backward" + _suffix(gate))(_threads(), gate.numel(), gate.data_ptr(), up.data_ptr(),
                                                            grad.data_ptr(), grad_gate.data_ptr(), grad_up.data_ptr())
    return grad_gate, grad_up


# ------------------------------------------------------------------------------------------ small-batch linear
def cross_entropy_(logits: Tensor, targets: Tensor) -> Tensor:
    """In place: each row of `logits` (rows, V; fp32 or bf16, contiguous) becomes softmax(row) - onehot(target), in
    its dtype (fp32 math, rounded once). Returns the rows' losses logsumexp(row) - row[target] (fp32). Raises
    IndexError, with logits unchanged, when a target lies outside [0, V)."""
    if not logits.is_contiguous() or logits.dim() != 2:
        raise ValueError(f"cross_entropy_ takes contiguous (rows, V) logits, got {tuple(logits.shape)}")
    targets = targets.to(torch.int64).contiguous()
    loss = torch.empty(logits.shape[0], dtype=torch.float32)
    rc = getattr(_lib(), "litft_cross_entropy" + _suffix(logits))(_threads(), logits.shape[0], logits.shape[1],
                                                                  logits.data_ptr(), targets.data_ptr(),
                                                                  loss.data_ptr())
    if rc != 0:
        raise IndexError(f"a target token id lies outside the vocabulary [0, {logits.shape[1]}) (targets range "
                         f"{int(targets.min())}..{int(targets.max())}): the labels do not match this model's "
                         "tokenizer, or use -100 for positions without a loss")
    return loss


def linear_small(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (M, K) @ weight (N, K)^T + bias for a few rows (decoding): streams the weight at memory speed (see the
    kernel's comment). No autograd."""
    x, weight = x.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    y = x.new_empty(M, N)
    _lib().litft_linear_small(_threads(), M, N, K, x.data_ptr(), weight.data_ptr(),
                              None if bias is None else bias.data_ptr(), y.data_ptr())
    return y


# ------------------------------------------------------------------------------------------ 4-bit dequantization
def dequantize_4bit(codes: Tensor, absmax: Tensor, lut: Tensor, blocksize: int, out: Tensor) -> Tensor:
    """bitsandbytes' 4-bit layout (codes: uint8, two values per byte, high nibble first; absmax: fp32, one per
    block of `blocksize` values; lut: the 16 fp32 values of the code) dequantized into `out` (fp32, contiguous,
    any shape of n values): ``out[i] = lut[code_i] * absmax[i // blocksize]``. Returns `out`."""
    n = out.numel()
    if (codes.dtype != torch.uint8 or codes.numel() != (n + 1) // 2 or absmax.dtype != torch.float32
            or absmax.numel() != -(-n // blocksize) or lut.dtype != torch.float32 or lut.numel() != 16
            or out.dtype != torch.float32 or not out.is_contiguous() or blocksize % 2):
        raise ValueError(f"dequantize_4bit: codes {tuple(codes.shape)} {codes.dtype}, absmax {tuple(absmax.shape)} "
                         f"{absmax.dtype}, lut {tuple(lut.shape)}, blocksize {blocksize} do not describe "
                         f"{n} fp32 values")
    codes, absmax, lut = codes.contiguous(), absmax.contiguous(), lut.contiguous()
    _lib().litft_dequantize_4bit(_threads(), n, blocksize, codes.data_ptr(), absmax.data_ptr(), lut.data_ptr(),
                                 out.data_ptr())
    return out
