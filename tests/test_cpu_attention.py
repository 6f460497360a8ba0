"""litft.cpu_attention: litft's fp32 CPU causal attention kernel against a float64 SDPA reference (outputs and
q/k/v gradients), its fallbacks to SDPA, and the LITFT_CPU_ATTENTION switch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from litft import cpu_attention
from litft.cpu_attention import CausalAttention, causal_attention

KERNEL = cpu_attention.kernel_enabled()
needs_kernel = pytest.mark.skipif(not KERNEL, reason="no C++ compiler: litft's CPU attention kernel was not built")
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
        assert not cpu_attention.supports(q, k, v)
        assert torch.equal(causal_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    q, kv = torch.randn(1, 2, 3, 64, generator=g), torch.randn(1, 2, 7, 64, generator=g)
    assert not cpu_attention.supports(q, kv, kv)


def _run(code: str, **env_vars) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_vars)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)


PROBE = ("import warnings, torch; warnings.simplefilter('always'); from litft import cpu_attention as c; "
         "q = torch.randn(1, 2, 9, 64); print(c.kernel_enabled(), c.supports(q, q, q))")


def test_env_switch(tmp_path):
    p = _run(PROBE, LITFT_CPU_ATTENTION="sdpa", LITFT_CACHE_DIR=str(tmp_path))
    assert p.returncode == 0 and p.stdout.split() == ["False", "False"], p.stderr
    assert not (tmp_path / "kernels").exists()  # nothing built when switched off
    p = _run(PROBE, LITFT_CPU_ATTENTION="fast")
    assert p.returncode != 0 and "LITFT_CPU_ATTENTION='fast'" in p.stderr and "'litft' or 'sdpa'" in p.stderr


@needs_kernel
def test_builds_into_the_cache_dir(tmp_path):
    p = _run(PROBE, LITFT_CACHE_DIR=str(tmp_path))
    assert p.returncode == 0 and p.stdout.split() == ["True", "True"], p.stderr
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("causal_attention-") and built[0].suffix == ".so"


def test_without_a_compiler_warns_once_and_uses_sdpa(tmp_path):
    p = _run(PROBE, CXX=str(tmp_path / "no-such-compiler"), LITFT_CACHE_DIR=str(tmp_path))
    assert p.returncode == 0 and p.stdout.split() == ["False", "False"], p.stderr
    assert p.stderr.count("CPU attention kernel unavailable") == 1 and "using torch's SDPA" in p.stderr
    # asked for explicitly, a failed build is an error naming the problem
    p = _run(PROBE, CXX=str(tmp_path / "no-such-compiler"), LITFT_CACHE_DIR=str(tmp_path), LITFT_CPU_ATTENTION="litft")
    assert p.returncode != 0 and "could not be built" in p.stderr and "no-such-compiler" in p.stderr


def test_bad_env_value_is_one_cli_error_line(tmp_path):
    cmd = [sys.executable, "-m", "litft.cli", "finetune", "lora", "--config", "config_hub/finetune/demo/lora.yaml",
           "--out_dir", str(tmp_path / "out")]
    p = subprocess.run(cmd, env=dict(os.environ, LITFT_CPU_ATTENTION="fast"), capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "litft: error: LITFT_CPU_ATTENTION='fast'" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()
