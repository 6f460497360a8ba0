"""litft.native: litft's compiled fp32 CPU kernels against float64 references -- causal attention vs SDPA
(outputs and q/k/v gradients), RMSNorm vs its formula (HF's), SwiGLU vs silu(gate) * up, the small-batch linear
of decoding vs x W^T + b -- their fallbacks to
torch, the LITFT_CPU_KERNELS switch, and the kernel cache: never a library this user did not build or one changed
since (planted, tampered, or in a directory others can write), and one compiler run for processes starting
together."""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from litft import native
from litft.models.fused import CausalAttention, SwiGLU, causal_attention
from litft.models.gpt import RMSNorm

KERNEL = native.enabled()  # builds into the session's temporary LITFT_CACHE_DIR (tests/conftest.py), not ~/.cache
needs_kernel = pytest.mark.skipif(not KERNEL, reason="no C++ compiler: litft's CPU kernels were not built")
ROOT = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")  # the compiler litft builds with


def reference(q, k, v, grad):
    """float64 SDPA (the math kernel): the output and d/dq, d/dk, d/dv of sum(output * grad)."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    out.backward(grad.double())
    return out, q64.grad, k64.grad, v64.grad


def model_layout(B, H, KV, T, D, seed=0):
    """q, k, v as the model hands them over: (B, H, T, D) views of (B, T, H, D) projection outputs."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, T, KV, D, generator=g).transpose(1, 2)
    v = torch.randn(B, T, KV, D, generator=g).transpose(1, 2)
    grad = torch.randn(B, H, T, D, generator=g)
    return q, k, v, grad


@needs_kernel
@pytest.mark.parametrize("B,H,KV,T,D", [
    (2, 9, 3, 512, 64),    # SmolLM2-135M: grouped-query, T a multiple of the 64-token blocks
    (1, 4, 2, 77, 32),     # T not a multiple of 16 or 64
    (2, 4, 4, 130, 128),   # multi-head (no grouping), Llama head size
    (1, 2, 1, 5, 16),      # multi-query, fewer tokens than a block
    (1, 3, 1, 200, 96),    # head size 96 (Phi-3): a 64 + 32 column split
    (1, 2, 2, 70, 256),    # the largest head size covered (Gemma)
    (3, 2, 1, 2, 16),      # two tokens
])
def test_matches_float64_reference(B, H, KV, T, D):
    q, k, v, grad = model_layout(B, H, KV, T, D)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = causal_attention(q, k, v)
    out.backward(grad)
    ref, dq, dk, dv = reference(q, k, v, grad)
    assert out.shape == ref.shape and q.grad.shape == q.shape and k.grad.shape == k.shape
    # fp32 rounding over D- and T-long sums: the errors seen are <= 1.1e-5 on the largest case
    for got, want in [(out, ref), (q.grad, dq), (k.grad, dk), (v.grad, dv)]:
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=1e-5)


@needs_kernel
def test_contiguous_inputs_and_thread_counts_agree():
    """(B, H, T, D)-contiguous inputs (no model layout) give the same result; one thread gives the same
    bits as several (each output row and gradient row is summed by one task in a fixed order). At least two
    threads even on a one-core machine, so 1 is never compared with 1."""
    q, k, v, grad = model_layout(2, 6, 2, 150, 64, seed=1)
    outs = []
    threads = torch.get_num_threads()
    many = max(2, threads)
    try:
        for n, contiguous in [(many, False), (1, False), (many, True)]:
            torch.set_num_threads(n)
            leaves = [(t.contiguous() if contiguous else t).detach().requires_grad_() for t in (q, k, v)]
            out = CausalAttention.apply(*leaves)
            out.backward(grad)
            outs.append([out.detach()] + [t.grad for t in leaves])
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def packed_segment_ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    """(B, T) segment ids as pack_samples + collate make them: runs 1, 2, 3, ... then padding 0. Row 0 has
    fixed lengths (a 1-token sample, one ending exactly at the 64-key block edge, one spanning two blocks); the
    other rows random lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(B):
        lengths = [1, 63, 70] if b == 0 else torch.randint(1, 90, (T,), generator=g).tolist()
        ids, seg = [], 1
        for n in lengths:
            if len(ids) + n > T - 3:
                break
            ids += [seg] * n
            seg += 1
        rows.append(ids + [0] * (T - len(ids)))  # padding at the end: segment 0
    return torch.tensor(rows)


@needs_kernel
@pytest.mark.parametrize("B,H,KV,T,D", [(2, 9, 3, 300, 64), (3, 4, 2, 77, 32), (1, 2, 2, 200, 128)])
def test_packed_segments_match_float64_reference(B, H, KV, T, D):
    """Attention within packed samples through the kernel (no dense mask; other samples' key blocks skipped)
    equals float64 SDPA with the model's dense segment mask (gpt.attention_mask), forward and backward, and
    fp32 SDPA with that mask (the path packing took before) to fp32 rounding."""
    from litft.models.config import Config
    from litft.models.fused import segment_starts
    from litft.models.gpt import attention_mask

    seg = packed_segment_ids(B, T, seed=T)
    segments = segment_starts(seg)
    assert segments is not None
    mask = attention_mask(Config(n_layer=1, n_embd=H * D, n_head=H, n_kv_head=KV), T, 0, seg, "cpu")
    q, k, v, grad = model_layout(B, H, KV, T, D, seed=1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = causal_attention(q, k, v, segments)
    out.backward(grad)
    got = [out.detach(), q.grad, k.grad, v.grad]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask, enable_gqa=H != KV)
    ref.backward(grad.double())
    for a, b in zip(got, [ref, q64.grad, k64.grad, v64.grad]):
        torch.testing.assert_close(a.double(), b, atol=5e-5, rtol=1e-5)
    q32, k32, v32 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    sdpa = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, enable_gqa=H != KV)
    sdpa.backward(grad)
    for a, b in zip(got, [sdpa, q32.grad, k32.grad, v32.grad]):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-5)


def test_segment_starts_and_their_dense_mask():
    """Each position's first key; the dense mask they stand for equals gpt.attention_mask's; an id in two runs
    of a row cannot be expressed as starts (None: the model keeps the dense mask)."""
    from litft.models.config import Config
    from litft.models.fused import segment_starts
    from litft.models.gpt import attention_mask

    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0], [1, 1, 1, 1, 1, 1, 1]])
    segments = segment_starts(seg)
    assert segments.starts.tolist() == [[0, 0, 0, 3, 3, 5, 6], [0] * 7]
    assert segments.starts.dtype == torch.int32
    cfg = Config(n_layer=1, n_embd=64, n_head=2)
    assert torch.equal(segments.dense_mask(), attention_mask(cfg, 7, 0, seg, "cpu").expand(2, 1, 7, 7))
    assert segment_starts(torch.tensor([[1, 1, 2, 1]])) is None


def test_packed_model_uses_the_kernel_only_where_it_applies(monkeypatch):
    """A packed batch through the model: each sample's logits equal the sample alone, through the kernel's
    segments where it is usable (fp32 CPU) and through the dense mask otherwise (float64 here)."""
    from litft.models import fused
    from litft.models.config import Config
    from litft.models.gpt import GPT

    calls = []
    apply = fused.CausalAttention.apply
    monkeypatch.setattr(fused.CausalAttention, "apply",
                        lambda q, k, v, starts=None: calls.append((q.shape[2], starts is not None)) or apply(q, k, v, starts))

    torch.manual_seed(0)
    model = GPT(Config(n_layer=2, n_embd=128, n_head=4, n_kv_head=2, intermediate_size=96, vocab_size=300)).eval()
    lengths = [7, 70, 5]
    samples = [torch.randint(0, 300, (1, n)) for n in lengths]
    packed = torch.cat(samples + [torch.zeros(1, 3, dtype=torch.long)], dim=1)
    seg = torch.tensor([sum(([i + 1] * n for i, n in enumerate(lengths)), []) + [0] * 3])
    pos = torch.tensor([sum((list(range(n)) for n in lengths), []) + [0, 1, 2]])
    for dtype in (torch.float32, torch.float64):
        model = model.to(dtype)
        with torch.no_grad():
            out = model(packed, position_ids=pos, segment_ids=seg)
            at = 0
            for x, n in zip(samples, lengths):
                torch.testing.assert_close(out[:, at:at + n], model(x), atol=1e-5, rtol=1e-5)
                at += n
        packed_calls = [c for c in calls if c == (packed.shape[1], True)]
        assert len(packed_calls) == (2 if dtype == torch.float32 and KERNEL else 0)  # one per layer
        calls.clear()


@needs_kernel
def test_output_feeds_o_proj_without_a_copy():
    """The output is a (B, H, T, D) view of a (B, T, H, D) buffer, so the model's transpose + reshape into
    o_proj's input is a view (as with SDPA's CPU kernel)."""
    q, k, v, _ = model_layout(1, 4, 2, 33, 32)
    out = causal_attention(q, k, v)
    flat = out.transpose(1, 2).reshape(1, 33, 4 * 32)
    assert flat.data_ptr() == out.data_ptr() and flat.is_contiguous()


def test_unsupported_cases_use_sdpa():
    """Other dtypes, head sizes the kernel does not tile, and unequal query/key lengths go to SDPA: the
    result is SDPA's, bit for bit."""
    g = torch.Generator().manual_seed(0)
    cases = [
        (torch.randn(1, 2, 9, 64, generator=g, dtype=torch.float64),) * 3,  # float64
        (torch.randn(1, 2, 9, 8, generator=g),) * 3,                         # head size 8
    ]
    for q, k, v in cases:
        assert not native.attention_supported(q, k, v)
        assert torch.equal(causal_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    q, kv = torch.randn(1, 2, 3, 64, generator=g), torch.randn(1, 2, 7, 64, generator=g)
    assert not native.attention_supported(q, kv, kv)


def _run(code: str, **env_vars) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_vars)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)


PROBE = ("import warnings, torch; warnings.simplefilter('always'); from litft import native; "
         "q = torch.randn(1, 2, 9, 64); print(native.enabled(), native.attention_supported(q, q, q))")


def test_env_switch(tmp_path):
    p = _run(PROBE, LITFT_CPU_KERNELS="torch", LITFT_CACHE_DIR=str(tmp_path))
    assert p.returncode == 0 and p.stdout.split() == ["False", "False"], p.stderr
    assert not (tmp_path / "kernels").exists()  # nothing built when switched off
    p = _run(PROBE, LITFT_CPU_KERNELS="fast")
    assert p.returncode != 0 and "LITFT_CPU_KERNELS='fast'" in p.stderr and "'litft' or 'torch'" in p.stderr


@needs_kernel
def test_builds_into_the_cache_dir(tmp_path):
    p = _run(PROBE, LITFT_CACHE_DIR=str(tmp_path))
    assert p.returncode == 0 and p.stdout.split() == ["True", "True"], p.stderr
    built = list((tmp_path / "kernels").glob("*.so"))
    assert len(built) == 1 and built[0].name.startswith("kernels-")
    # with its sha256 beside it, readable by all but writable only by its owner; the directory private
    digest = built[0].with_name(built[0].name + ".sha256").read_text().strip()
    assert digest == hashlib.sha256(built[0].read_bytes()).hexdigest()
    assert stat.S_IMODE(built[0].stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "kernels").stat().st_mode) == 0o700


def test_without_a_compiler_warns_once_and_uses_sdpa(tmp_path):
    p = _run(PROBE, CXX=str(tmp_path / "no-such-compiler"), LITFT_CACHE_DIR=str(tmp_path))
    assert p.returncode == 0 and p.stdout.split() == ["False", "False"], p.stderr
    assert p.stderr.count("CPU kernels unavailable") == 1 and "using torch's ops" in p.stderr
    # asked for explicitly, a failed build is an error naming the problem
    p = _run(PROBE, CXX=str(tmp_path / "no-such-compiler"), LITFT_CACHE_DIR=str(tmp_path), LITFT_CPU_KERNELS="litft")
    assert p.returncode != 0 and "could not be built" in p.stderr and "no-such-compiler" in p.stderr
    # ... on every use, not only the first (a later call must not fall back to torch's ops silently)
    p = _run(EVERY_USE, CXX=str(tmp_path / "no-such-compiler"), LITFT_CACHE_DIR=str(tmp_path),
             LITFT_CPU_KERNELS="litft")
    assert p.returncode == 0 and p.stdout.split() == ["LitftError"] * 3, (p.stdout, p.stderr)


EVERY_USE = ("import torch; from litft import native\n"
             "for _ in range(3):\n"
             "    try: native.usable(torch.ones(1)); print('no-error')\n"
             "    except Exception as e: print(type(e).__name__)")


def test_bad_env_value_is_one_cli_error_line(tmp_path):
    cmd = [sys.executable, "-m", "litft.cli", "finetune", "lora", "--config", "config_hub/finetune/demo/lora.yaml",
           "--out_dir", str(tmp_path / "out")]
    p = subprocess.run(cmd, env=dict(os.environ, LITFT_CPU_KERNELS="fast"), capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "litft: error: LITFT_CPU_KERNELS='fast'" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ the kernel cache
PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) { FILE* f = fopen(MARKER, "w"); if (f) fclose(f); }
"""


def planted_library(path: Path, marker: Path) -> None:
    """A shared object whose constructor creates `marker` when it is loaded: code litft must never run."""
    src = path.with_suffix(".c")
    src.write_text(PLANTED)
    subprocess.run([CXX, "-x", "c", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(path), str(src)],
                   check=True, capture_output=True)
    src.unlink()


def copying_compiler(tmp_path: Path, sleep: float = 0) -> Path:
    """A stand-in for g++ (cheap on a shared CI machine): it logs each run, waits `sleep` s, and "builds" by
    copying the session's real build (so what it makes is a working library)."""
    good = native.library_path(CXX)
    script = tmp_path / "copying-cxx"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo run >> {tmp_path / "cxx.log"}
        sleep {sleep}
        while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done
        cp {good} "$out"
        """))
    script.chmod(0o755)
    return script


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh private cache with the copying compiler; returns where litft will look for the library."""
    cxx = copying_compiler(tmp_path)
    monkeypatch.setenv("LITFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(cxx))
    lib_path = native.library_path(str(cxx))
    native._private_dirs(tmp_path / "cache", lib_path.parent)
    return lib_path


def _record_digest(lib_path: Path) -> None:
    lib_path.with_name(lib_path.name + ".sha256").write_text(hashlib.sha256(lib_path.read_bytes()).hexdigest())


@needs_kernel
@pytest.mark.parametrize("how", ["owned by another user", "group-writable", "world-writable"])
def test_a_library_planted_by_someone_else_is_not_loaded(cache, tmp_path, how):
    """A .so another user put in the cache (or one others could have rewritten) never runs, even with a
    correct sha256 beside it: litft says why, rebuilds, and loads its own build."""
    if how == "owned by another user" and os.getuid() != 0:
        pytest.skip("giving a file to another user needs root")
    marker = tmp_path / "MARKER"
    planted_library(cache, marker)
    _record_digest(cache)
    if how == "owned by another user":
        os.chown(cache, 4321, 4321)
    else:
        cache.chmod(0o775 if how == "group-writable" else 0o757)
    why = "owned by uid 4321" if how == "owned by another user" else "writable by others"
    with pytest.warns(UserWarning, match=why):
        lib = native._load()
    assert not marker.exists()
    assert lib.litft_attention_forward is not None and cache.stat().st_uid == os.getuid()
    assert (tmp_path / "cxx.log").read_text().count("run") == 1  # rebuilt


@needs_kernel
def test_a_tampered_library_is_not_loaded(cache, tmp_path):
    """litft's own build, later replaced by other bytes (its recorded sha256 no longer matches), never runs."""
    native._build(os.environ["CXX"], cache)
    marker = tmp_path / "MARKER"
    planted_library(cache, marker)  # same owner and mode: only the content differs
    with pytest.warns(UserWarning, match="does not match the sha256 recorded"):
        lib = native._load()
    assert not marker.exists() and lib.litft_attention_forward is not None
    # and with no recorded sha256 at all
    planted_library(cache, marker)
    cache.with_name(cache.name + ".sha256").unlink()
    with pytest.warns(UserWarning, match="sha256.*missing"):
        native._load()
    assert not marker.exists()


def test_a_cache_dir_others_can_write_is_refused(tmp_path):
    """One clear line naming the directory and the fix, and nothing built or loaded there: a warning and
    torch's ops by default, a LitftError (one CLI line, no traceback) under LITFT_CPU_KERNELS=litft."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    p = _run(PROBE, LITFT_CACHE_DIR=str(shared))
    assert p.returncode == 0 and p.stdout.split() == ["False", "False"], p.stderr
    assert p.stderr.count("CPU kernels unavailable") == 1 and f"the cache directory {shared} is writable by others" \
        in p.stderr and "chmod 700" in p.stderr and "Traceback" not in p.stderr
    assert not list(shared.rglob("*.so"))
    # a directory inside one others can write (no sticky bit): they could swap it for their own
    p = _run(PROBE, LITFT_CACHE_DIR=str(shared / "mine"))
    assert p.stdout.split() == ["False", "False"] and f"lies under {shared}, which another user can change" in p.stderr
    cmd = [sys.executable, "-m", "litft.cli", "finetune", "lora", "--config", "config_hub/finetune/demo/lora.yaml",
           "--out_dir", str(tmp_path / "out"), "--train.max_steps", "1"]
    p = subprocess.run(cmd, env=dict(os.environ, LITFT_CPU_KERNELS="litft", LITFT_CACHE_DIR=str(shared)),
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"litft: error: LITFT_CPU_KERNELS=litft but litft's CPU kernels are unavailable: the cache directory " \
        f"{shared} is writable by others" in p.stderr
    assert not list(shared.rglob("*.so"))


@needs_kernel
def test_processes_building_at_once_run_the_compiler_once(tmp_path):
    """Two processes starting together on an empty cache: one builds (a slow compiler), the other waits on the
    file lock and loads that build; both get working kernels."""
    cxx = copying_compiler(tmp_path, sleep=4)
    env = dict(os.environ, CXX=str(cxx), LITFT_CACHE_DIR=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.split() == ["True", "True"], err
    assert (tmp_path / "cxx.log").read_text().count("run") == 1


# ------------------------------------------------------------------------------------------ RMSNorm, SwiGLU
def rmsnorm_reference(x, weight, eps, unit_offset):
    """HF's formula in float64: x / sqrt(mean(x^2) + eps) * w (Gemma: * (1 + w))."""
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    scale = 1.0 + w64 if unit_offset else w64
    return x64, w64, x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * scale


@needs_kernel
@pytest.mark.parametrize("C,unit_offset,train_weight", [(576, False, False), (40, True, False), (576, False, True),
                                                         (2050, True, True)])
def test_rmsnorm_matches_float64_reference(C, unit_offset, train_weight):
    """C = 40 and 2050 leave a tail past the 16-wide vectors; a trained weight (full fine-tuning) gets its
    gradient too; the incoming gradient is non-contiguous, as a transpose's would be."""
    g = torch.Generator().manual_seed(C)
    norm = RMSNorm(C, eps=1e-5, unit_offset=unit_offset)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(C, generator=g) + 0.5)
    norm.weight.requires_grad_(train_weight)
    x = (torch.randn(3, 7, C, generator=g) * 3).requires_grad_()
    grad = torch.randn(C, 7, 3, generator=g).permute(2, 1, 0)
    out = norm(x)
    out.backward(grad)
    x64, w64, ref = rmsnorm_reference(x, norm.weight, 1e-5, unit_offset)
    ref.backward(grad.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    if train_weight:
        torch.testing.assert_close(norm.weight.grad.double(), w64.grad, atol=1e-4, rtol=1e-5)
    else:
        assert norm.weight.grad is None


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 9, 1536), (5, 3)])
def test_swiglu_matches_float64_reference(shape):
    """Large |gate| (+-30: e^-|g| underflows in the polynomial) and a tail past the 16-wide vectors (5 x 3)."""
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(*shape, generator=g) * 6).clamp(-30, 30)
    gate.view(-1)[:2] = torch.tensor([30.0, -30.0])
    gate.requires_grad_()
    up = torch.randn(*shape, generator=g).requires_grad_()
    grad = torch.randn(*shape, generator=g)
    out = SwiGLU.apply(gate, up)
    out.backward(grad)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    ref = F.silu(g64) * u64
    ref.backward(grad.double())
    for got, want in [(out, ref), (gate.grad, g64.grad), (up.grad, u64.grad)]:
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_torch_path_is_the_same_math(monkeypatch):
    """With the kernels off (LITFT_CPU_KERNELS=torch, or no compiler) RMSNorm and SwiGLU run torch's ops: they
    match the float64 formulas, as the kernels do (so the two paths agree to fp32 rounding)."""
    g = torch.Generator().manual_seed(1)
    x, gate, up = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=g) + 0.5)
    _, _, norm_ref = rmsnorm_reference(x, norm.weight, 1e-6, False)
    swiglu_ref = F.silu(gate.double()) * up.double()
    results = {}
    for path in (["litft", "torch"] if KERNEL else ["torch"]):
        monkeypatch.setenv("LITFT_CPU_KERNELS", path)
        assert native.usable(x) == (path == "litft")
        results[path] = (norm(x), SwiGLU.apply(gate, up))
        torch.testing.assert_close(results[path][0].double(), norm_ref.detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(results[path][1].double(), swiglu_ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(results["torch"], results.get("litft", results["torch"])):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@needs_kernel
@pytest.mark.skipif(not getattr(torch.cpu, "get_capabilities", dict)().get("avx2"), reason="needs an x86 CPU with AVX2")
def test_avx2_build_matches_too(tmp_path, monkeypatch):
    """The file also builds for AVX2-only CPUs (8-float vectors, smaller tiles; the reference machine of the
    performance issue has no AVX-512) and computes the same attention and RMSNorm there."""
    import ctypes

    out = tmp_path / "kernels_avx2.so"
    flags = [f if f != "-march=native" else "-march=x86-64-v3" for f in native.FLAGS]
    subprocess.run([CXX, *flags, "-o", str(out), str(native.SOURCE)], check=True, capture_output=True)
    lib = ctypes.CDLL(str(out))
    native._declare(lib)
    monkeypatch.setattr(native, "_LIB", lib)
    q, k, v, grad = model_layout(1, 4, 2, 77, 96)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out_ = causal_attention(q, k, v)
    out_.backward(grad)
    ref, dq, dk, dv = reference(q, k, v, grad)
    for got, want in [(out_, ref), (q.grad, dq), (k.grad, dk), (v.grad, dv)]:
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=1e-5)
    x = torch.randn(5, 40)
    norm = RMSNorm(40, eps=1e-5)
    _, _, ref_n = rmsnorm_reference(x, norm.weight, 1e-5, False)
    torch.testing.assert_close(norm(x).double(), ref_n, atol=1e-5, rtol=1e-5)
    w, b = torch.randn(37, 40), torch.randn(37)
    torch.testing.assert_close(native.linear_small(x[:3], w, b).double(), x[:3].double() @ w.double().t() + b.double(),
                               atol=1e-5, rtol=1e-5)
    for quant_type in ("nf4", "fp4"):
        codes, absmax, code, ref = bnb_4bit((48, 70), quant_type, double_quant=True)
        assert torch.equal(native.dequantize_4bit(codes, absmax, code, 64, torch.empty(48, 70)), ref)


@needs_kernel
def test_kernel_error_codes_become_one_clear_error():
    """The kernel returns 1 for shapes it does not cover and 2 when its work buffers cannot be allocated;
    each becomes one exception naming the problem (not a crash inside the C++ code). Both come from the real
    kernel: a head size it does not tile (8), and an empty batch over 2^31 - 64 tokens, whose per-thread
    (tokens x 256)-float key/value gradient buffers (2 TiB each) cannot be allocated (nothing is read)."""
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match=r"rejected q \(1, 2, 3, 8\)"):
        native.attention_forward(q, q, q)
    if Path("/proc/sys/vm/overcommit_memory").exists() and \
            Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("vm.overcommit_memory=1: a 2 TiB allocation would succeed")
    T = 2**31 - 64
    q, lse2 = torch.empty(0, 2, T, 256), torch.empty(0, 2, T)
    out = torch.empty(0, T, 2, 256).transpose(1, 2)
    with pytest.raises(MemoryError, match="out of memory.*LITFT_CPU_KERNELS=torch"):
        native.attention_backward(q, q, q, out, lse2, q)


# ------------------------------------------------------------------------------------------ small-batch linear
@needs_kernel
@pytest.mark.parametrize("M,N,K,bias", [(1, 1000, 576, False), (4, 1536, 576, True), (3, 37, 19, True),
                                        (2, 15, 40, False), (1, 5, 3, True)])
def test_linear_small_matches_float64_reference(M, N, K, bias):
    """Decoding's products (a few rows times a whole weight): N not a multiple of the 16-row blocks and K not a
    multiple of the 16-wide vectors leave tails; a non-contiguous x (a transpose's); 1 and 2 threads give the same
    bits (each output is one dot product in a fixed order)."""
    g = torch.Generator().manual_seed(N)
    x = torch.randn(K, M, generator=g).t()
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    ref = x.double() @ w.double().t() + (b.double() if bias else 0)
    out = native.linear_small(x, w, b)
    torch.testing.assert_close(out.double(), ref, atol=1e-5 * K**0.5, rtol=1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.linear_small(x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, out)


@needs_kernel
def test_small_rows_go_to_the_kernel_only_without_grad(monkeypatch):
    """cpu_kernels.linear sends products of up to SMALL_ROWS rows to the kernel under inference mode (generation),
    and everything else to torch (training's small batches too); generate() routes plain nn.Linear layers through
    it only while decoding."""
    from litft import cpu_kernels
    from litft.generate import small_rows_linears

    calls = []
    real = native.linear_small
    monkeypatch.setattr(native, "linear_small", lambda *a: calls.append(a[0].shape) or real(*a))
    w = torch.randn(64, 32)
    with torch.inference_mode():
        cpu_kernels.linear(torch.randn(cpu_kernels.SMALL_ROWS, 32), w)
        cpu_kernels.linear(torch.randn(cpu_kernels.SMALL_ROWS + 1, 32), w)
    with torch.no_grad():
        cpu_kernels.linear(torch.randn(1, 32), w)  # e.g. inside a LoRA function's forward in training
    assert calls == [(cpu_kernels.SMALL_ROWS, 32)]
    layer = torch.nn.Linear(32, 64)
    x = torch.randn(1, 1, 32)
    with torch.inference_mode(), small_rows_linears(layer):
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-6, rtol=1e-6)
    assert len(calls) == 2 and "forward" not in layer.__dict__  # used, then the class's forward is back
    with torch.inference_mode():
        layer(x)
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------ bf16 RMSNorm, SwiGLU
@needs_kernel
@pytest.mark.parametrize("unit_offset", [False, True])
def test_rmsnorm_bf16_equals_torchs_bf16_rounding_and_backward_is_close(monkeypatch, unit_offset):
    """bf16 in, bf16 out: the kernel computes in fp32 and rounds where torch's bf16 path rounds (Llama: the
    normalised x, then the product with the weight; Gemma: once), so the forward matches torch's bit for bit; the
    input gradient (rounded once, torch's path rounds more often) is within one bf16 step of float64's. C = 2050
    leaves a tail past the vectors; one NaN stays a NaN (not an infinity) and only in its own row."""
    g = torch.Generator().manual_seed(2)
    C = 2050
    weight = (torch.rand(C, generator=g) + 0.5).to(torch.bfloat16)
    x = (torch.randn(6, C, generator=g) * 3).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(6, C, generator=g).to(torch.bfloat16)
    results = {}
    for path in ("litft", "torch"):
        monkeypatch.setenv("LITFT_CPU_KERNELS", path)
        x.grad = None
        out = RMSNorm(C, eps=1e-5, unit_offset=unit_offset).to(torch.bfloat16)
        with torch.no_grad():
            out.weight.copy_(weight)
        y = out(x)
        y.backward(grad)
        results[path] = (y.detach(), x.grad.clone())
    assert results["litft"][0].dtype == results["litft"][1].dtype == torch.bfloat16
    assert torch.equal(results["litft"][0], results["torch"][0])
    x64, w64, ref = rmsnorm_reference(x, weight.float(), 1e-5, unit_offset)
    ref.backward(grad.double())
    err = ((results["litft"][1].double() - x64.grad).norm() / x64.grad.norm()).item()
    assert err <= 2**-8, err
    monkeypatch.setenv("LITFT_CPU_KERNELS", "litft")
    bad = x.detach().clone()
    bad[1, 7] = float("nan")
    y = native.rmsnorm_forward(bad, weight, 1e-5)[0]
    assert y[1].isnan().all() and not y[[0, 2, 3, 4, 5]].isnan().any()


@needs_kernel
def test_swiglu_bf16_rounds_once(monkeypatch):
    """bf16 SwiGLU: silu(gate) * up and both gradients computed in fp32 and rounded once: nearly every value is
    float64's result rounded to bf16, the rest (fp32's own error deciding a near-tie) one bf16 step away; torch's
    bf16 path (two roundings) misses far more often. n = 6 x 1537 leaves a tail past the vectors."""
    g = torch.Generator().manual_seed(3)
    gate = (torch.randn(6, 1537, generator=g) * 3).to(torch.bfloat16).requires_grad_()
    up = torch.randn(6, 1537, generator=g).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(6, 1537, generator=g).to(torch.bfloat16)
    out = SwiGLU.apply(gate, up)
    out.backward(grad)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    ref = F.silu(g64) * u64
    ref.backward(grad.double())
    monkeypatch.setenv("LITFT_CPU_KERNELS", "torch")
    torch_out = SwiGLU.apply(gate.detach(), up.detach())
    for got, want in [(out, ref), (gate.grad, g64.grad), (up.grad, u64.grad)]:
        assert got.dtype == torch.bfloat16
        rounded = want.detach().to(torch.bfloat16)
        missed = got != rounded
        assert missed.float().mean() < 0.01, missed.float().mean()
        step = rounded.double().abs() * 2**-7  # one bf16 step (8 significant bits) at most
        assert ((got.double() - rounded.double()).abs()[missed] <= step[missed]).all()
    assert (torch_out != ref.detach().to(torch.bfloat16)).float().mean() > 0.05  # torch's path: two roundings


# ------------------------------------------------------------------------------------------ 4-bit dequantization
def bnb_4bit(shape, quant_type, double_quant, blocksize=64, seed=0):
    """A random weight quantized by bitsandbytes: (codes, fp32 absmax, code table, bitsandbytes' dequantization)."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    codes, qs = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    absmax = bnb_f.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    return codes.view(-1), absmax.float(), qs.code.float(), bnb_f.dequantize_4bit(codes, qs)


def format_dequantized(codes, absmax, code, blocksize, shape):
    """The 4-bit format written out (QLoRA paper; bitsandbytes' layout): value i is code[nibble i] * absmax[i // bs],
    nibbles high first, over the row-major flattened weight."""
    nibbles = torch.stack((codes.long() >> 4, codes.long() & 15), dim=1).reshape(-1)[: math.prod(shape)]
    return (code[nibbles] * absmax.repeat_interleave(blocksize)[: nibbles.numel()]).view(shape)


@needs_kernel
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((256, 192), 64), ((3, 50), 64), ((7, 9), 64), ((33, 128), 128),
                                             ((64, 96), 64)])
def test_dequantize_4bit_equals_the_format_and_bitsandbytes(quant_type, double_quant, shape, blocksize):
    """Bit for bit against the format written out, and against `bitsandbytes.functional.dequantize_4bit`: the vector
    loop (blocks of 64, 128), a last short block (3 x 50 = 150 values), an odd count (7 x 9: the last byte's low
    nibble is padding), both code tables, plain and double-quantized absmaxes. For 64 x 96 (rows of 1.5 blocks)
    bitsandbytes 0.50.2's CPU kernel returns other values (0.04 from the weight where the quantization error is 0.009;
    its pure-torch reference agrees with the format), so there only the format is the oracle."""
    codes, absmax, code, ref = bnb_4bit(shape, quant_type, double_quant, blocksize)
    out = torch.full(shape, float("nan"))
    assert native.dequantize_4bit(codes, absmax, code, blocksize, out) is out
    assert torch.equal(out, format_dequantized(codes, absmax, code, blocksize, shape))
    if shape != (64, 96):
        assert torch.equal(out, ref)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        assert torch.equal(native.dequantize_4bit(codes, absmax, code, blocksize, torch.empty(shape)), out)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_dequantize_4bit_refuses_a_wrong_description():
    codes, absmax, code, _ = bnb_4bit((8, 64), "nf4", False)
    with pytest.raises(ValueError, match="do not describe 512 fp32 values"):
        native.dequantize_4bit(codes[:-1], absmax, code, 64, torch.empty(8, 64))
    with pytest.raises(ValueError, match="do not describe"):
        native.dequantize_4bit(codes, absmax, code, 64, torch.empty(8, 64, dtype=torch.bfloat16))


# ------------------------------------------------------------------------------------------ bf16 attention (AMX)
AMX = KERNEL and native.amx_available()
needs_amx = pytest.mark.skipif(not AMX, reason="this CPU (or this build, or the OS) has no AMX bf16 tiles")


def sdpa_bf16_grads(q, k, v, grad):
    """torch's own bf16 backward (its CPU flash-attention kernel), the bar litft's is held to."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]).backward(grad)
    return [t.grad for t in leaves]


def max_rel(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@needs_amx
@pytest.mark.parametrize("B,H,KV,T,D", [
    (2, 9, 3, 512, 64),    # SmolLM2-135M
    (1, 4, 2, 77, 32),     # T not a multiple of 32 or 64, the smallest head size covered
    (2, 4, 4, 130, 128),   # multi-head, Llama head size, a 2-token last block
    (1, 3, 1, 200, 96),    # multi-query, head size 96 (Phi-3)
    (1, 2, 2, 40, 256),    # the largest head size
    (3, 2, 1, 2, 32),      # two tokens
])
def test_bf16_backward_is_as_exact_as_torchs(B, H, KV, T, D):
    """bf16 q, k, v (model layout, scaled so that softmax is peaked, as trained attention is): the forward is SDPA's
    bit for bit, and each gradient's largest error against float64 (computed from the same bf16 values) is at most
    torch's own bf16 backward's (+ 1e-3, one bf16 rounding step of slack): both round P and dS to bf16 once."""
    q, k, v, grad = model_layout(B, H, KV, T, D, seed=2)
    q, k, v = (q * 2).bfloat16(), (k * 2).bfloat16(), v.bfloat16()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grad = grad.bfloat16()
    assert native.attention_bf16_supported(q, k, v)
    out = causal_attention(q, k, v)
    assert out.grad_fn is not None and "CausalAttentionBF16" in type(out.grad_fn).__name__
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != KV))
    out.backward(grad)
    _, *want = reference(q, k, v, grad)
    for got, torchs, w in zip((q.grad, k.grad, v.grad), sdpa_bf16_grads(q, k, v, grad), want):
        assert got.dtype == torch.bfloat16 and got.shape == w.shape
        assert max_rel(got, w) <= max_rel(torchs, w) + 1e-3, (max_rel(got, w), max_rel(torchs, w))


@needs_amx
def test_bf16_backward_thread_counts_agree():
    """Each (batch, head) task sums its rows in a fixed order: one thread gives the bits several give."""
    q, k, v, grad = (t.bfloat16() for t in model_layout(2, 6, 2, 150, 64, seed=3))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (max(2, threads), 1):
            torch.set_num_threads(n)
            results.append(native.attention_backward_bf16(q, k, v, out, lse, grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_kernel
def test_bf16_attention_goes_to_the_kernel_only_where_it_applies(monkeypatch):
    """With AMX: bf16 attention that needs gradients takes litft's backward; without gradients (generation), head
    sizes not a multiple of 32, or LITFT_CPU_KERNELS=torch it is SDPA's, bit for bit. Without AMX: always SDPA."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 64, generator=g).bfloat16().requires_grad_() for _ in range(3))
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = causal_attention(q, k, v)
    assert ("CausalAttentionBF16" in type(out.grad_fn).__name__) == AMX
    with torch.no_grad():
        assert torch.equal(causal_attention(q, k, v), sdpa)
    small = [t.detach()[..., :16].requires_grad_() for t in (q, k, v)]
    assert not native.attention_bf16_supported(*small)
    assert "CausalAttentionBF16" not in type(causal_attention(*small).grad_fn).__name__
    monkeypatch.setenv("LITFT_CPU_KERNELS", "torch")
    assert not native.attention_bf16_supported(q, k, v)
    assert "CausalAttentionBF16" not in type(causal_attention(q, k, v).grad_fn).__name__


@needs_amx
def test_bf16_backward_refuses_shapes_it_does_not_tile():
    """A head size the kernel does not tile is refused with the kernel's error, not computed wrong."""
    q = torch.randn(1, 2, 8, 48).bfloat16()
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q, 0.0, True)[:2]
    with pytest.raises(RuntimeError, match="rejected"):
        native.attention_backward_bf16(q, q, q, out, lse, out)


# ------------------------------------------------------------------------------------------ cross-entropy
def cross_entropy_reference(logits, targets):
    """float64: each row's logsumexp - target logit, and softmax - onehot."""
    x = logits.double()
    loss = torch.logsumexp(x, 1) - x.gather(1, targets.unsqueeze(1)).squeeze(1)
    grad = x.softmax(1)
    grad[torch.arange(len(targets)), targets] -= 1
    return loss, grad


@needs_kernel
@pytest.mark.parametrize("rows,V", [(37, 1003), (4, 49152), (1, 7)])
def test_cross_entropy_matches_float64_reference(rows, V):
    """fp32 logits spread like a trained head's (std 4, a few rows peaked): the loss and the gradient written in
    place agree with float64 to fp32 rounding."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, V, generator=g) * 4
    logits[0, 3 % V] += 30  # a confident row: nearly all mass on one token
    targets = torch.randint(0, V, (rows,), generator=g)
    targets[0] = 3 % V
    want_loss, want_grad = cross_entropy_reference(logits, targets)
    got = logits.clone()
    loss = native.cross_entropy_(got, targets)
    torch.testing.assert_close(loss.double(), want_loss, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), want_grad, atol=1e-6, rtol=1e-5)


@needs_kernel
def test_cross_entropy_bf16_rounds_once():
    """bf16 logits: fp32 math on the exact values, each gradient rounded to bf16 once -- within one bf16 rounding
    of float64 (half a step, plus fp32 noise), as torch's fp32 softmax cast to bf16 is."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(9, 515, generator=g) * 4).bfloat16()
    targets = torch.randint(0, 515, (9,), generator=g)
    want_loss, want_grad = cross_entropy_reference(logits, targets)
    got = logits.clone()
    loss = native.cross_entropy_(got, targets)
    assert got.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want_loss, atol=2e-5, rtol=1e-5)
    assert ((got.double() - want_grad).abs() <= want_grad.abs() * 2 ** -8 * 1.01 + 1e-12).all()


@needs_kernel
def test_cross_entropy_refuses_a_target_outside_the_vocabulary():
    logits = torch.randn(3, 10)
    before = logits.clone()
    with pytest.raises(IndexError, match=r"outside the vocabulary \[0, 10\)"):
        native.cross_entropy_(logits, torch.tensor([1, 10, 2]))
    with pytest.raises(IndexError, match="outside the vocabulary"):
        native.cross_entropy_(logits, torch.tensor([-1, 0, 2]))
    assert torch.equal(logits, before)
