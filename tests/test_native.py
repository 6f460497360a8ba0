"""litft.native: litft's compiled fp32 CPU kernels against float64 references -- causal attention vs SDPA
(outputs and q/k/v gradients), RMSNorm vs its formula (HF's), SwiGLU vs silu(gate) * up -- their fallbacks to
torch, and the LITFT_CPU_KERNELS switch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from litft import native
from litft.models.gpt import CausalAttention, RMSNorm, SwiGLU, causal_attention
from litft.utils import cpuinfo_field

KERNEL = native.enabled()
needs_kernel = pytest.mark.skipif(not KERNEL, reason="no C++ compiler: litft's CPU kernels were not built")
ROOT = Path(__file__).resolve().parents[1]


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
    bits as several (each output row and gradient row is summed by one task in a fixed order)."""
    q, k, v, grad = model_layout(2, 6, 2, 150, 64, seed=1)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n, contiguous in [(threads, False), (1, False), (threads, True)]:
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
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("kernels-") and built[0].suffix == ".so"


def test_without_a_compiler_warns_once_and_uses_sdpa(tmp_path):
    p = _run(PROBE, CXX=str(tmp_path / "no-such-compiler"), LITFT_CACHE_DIR=str(tmp_path))
    assert p.returncode == 0 and p.stdout.split() == ["False", "False"], p.stderr
    assert p.stderr.count("CPU kernels unavailable") == 1 and "using torch's ops" in p.stderr
    # asked for explicitly, a failed build is an error naming the problem
    p = _run(PROBE, CXX=str(tmp_path / "no-such-compiler"), LITFT_CACHE_DIR=str(tmp_path), LITFT_CPU_KERNELS="litft")
    assert p.returncode != 0 and "could not be built" in p.stderr and "no-such-compiler" in p.stderr


def test_bad_env_value_is_one_cli_error_line(tmp_path):
    cmd = [sys.executable, "-m", "litft.cli", "finetune", "lora", "--config", "config_hub/finetune/demo/lora.yaml",
           "--out_dir", str(tmp_path / "out")]
    p = subprocess.run(cmd, env=dict(os.environ, LITFT_CPU_KERNELS="fast"), capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "litft: error: LITFT_CPU_KERNELS='fast'" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


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
    """With the kernels off (LITFT_CPU_KERNELS=torch, or no compiler) RMSNorm and SwiGLU run torch's ops and agree
    with the kernels to fp32 rounding."""
    g = torch.Generator().manual_seed(1)
    x, gate, up = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
    norm = RMSNorm(64, eps=1e-6)
    results = []
    for kernels in ([True, False] if KERNEL else [False]):
        if not kernels:
            monkeypatch.setattr(native, "usable", lambda *t: False)
        results.append((norm(x), SwiGLU.apply(gate, up)))
    for a, b in zip(results[0], results[-1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@needs_kernel
@pytest.mark.skipif("avx2" not in cpuinfo_field("flags").split(), reason="needs an x86 CPU with AVX2")
def test_avx2_build_matches_too(tmp_path, monkeypatch):
    """The file also builds for AVX2-only CPUs (8-float vectors, smaller tiles; the reference machine of the
    performance issue has no AVX-512) and computes the same attention and RMSNorm there."""
    import ctypes
    import shutil as sh

    cxx = os.environ.get("CXX") or sh.which("g++") or sh.which("c++")
    out = tmp_path / "kernels_avx2.so"
    flags = [f if f != "-march=native" else "-march=x86-64-v3" for f in native.FLAGS]
    subprocess.run([cxx, *flags, "-o", str(out), str(native.SOURCE)], check=True, capture_output=True)
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


def test_kernel_error_codes_become_one_clear_error():
    """The kernel returns 1 for shapes it does not cover and 2 when its work buffers cannot be allocated;
    each becomes one exception naming the problem (not a crash inside the C++ code)."""
    q = torch.empty(1, 2, 3, 16)
    with pytest.raises(MemoryError, match="out of memory.*LITFT_CPU_KERNELS=torch"):
        native._check(2, q, q)
    with pytest.raises(RuntimeError, match=r"rejected q \(1, 2, 3, 16\)"):
        native._check(1, q, q)
    native._check(0, q, q)
