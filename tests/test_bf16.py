"""Every hand-written autograd Function, run in bf16 (forward and backward), against a plain-torch fp32 reference.

The model trains in bf16 (precision "bf16-true", the default on GPUs with bf16), but litft's Functions were
only checked in fp32, where on CPU the compiled kernels run instead of their torch code. Here each one takes
bf16 inputs; the reference takes the same values upcast to fp32 (exact) and runs the plain formula through
autograd, never litft's own Function. Compared: the output and the gradient of every input, as relative errors
||got - want|| / ||want||, and the dtypes (bf16 in, bf16 out).

Tolerance: bf16 keeps 8 significant bits, a relative rounding step of 2^-8 = 0.0039 (one rounding errs by at
most half of it). Each Function here rounds its inputs' products a few times (a matmul output, a scale, a cast back), so
its error against fp32 is a few 1e-3 (measured: at most 0.006 over these tests). TOL = 0.02 (~5 rounding
steps) passes that with margin; what it catches is a Function whose result is wrong, not merely rounded: a term
dropped (the inputs are drawn so that each term weighs 8% or more of its result), bf16 data read as something
else, or an output silently returned in another dtype (checked exactly).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from litft.adapters.dora import DoRALinear
from litft.adapters.lora import LoRALinear
from litft.models.fused import RMSNormFunction, Rope, SwiGLU, causal_attention
from litft.models.gpt import chunked_cross_entropy

TOL = 0.02
BF16 = torch.bfloat16


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def bf16_leaf(*shape, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(BF16).requires_grad_()


def check(fn, ref, leaves: list[torch.Tensor], out_dtype: torch.dtype = BF16) -> dict[str, float]:
    """fn(*leaves) in bf16 vs ref(*fp32 copies of leaves): output and every leaf's gradient within TOL."""
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    out, want = fn(*leaves), ref(*ref_leaves)
    assert out.dtype == out_dtype
    grad = torch.randn(out.shape).to(out.dtype)  # one upstream gradient for both, exact in fp32
    out.backward(grad)
    want.backward(grad.float())
    errors = {"out": rel_err(out, want)}
    for i, (t, r) in enumerate(zip(leaves, ref_leaves)):
        assert t.grad is not None and t.grad.dtype == t.dtype, i
        errors[f"grad {i}"] = rel_err(t.grad, r.grad)
    assert max(errors.values()) <= TOL, errors
    return errors


# ------------------------------------------------------------------ the model's Functions (litft/models/fused.py)
@pytest.mark.parametrize("rotary_fraction", [1.0, 0.5])
def test_rope(rotary_fraction):
    torch.manual_seed(0)
    D = 32
    rd = int(D * rotary_fraction)
    freqs = torch.rand(1, 1, 9, rd // 2) * 3
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(BF16), emb.sin().to(BF16)  # as the model passes them: in the activation dtype

    def reference(x):
        x_rot, x_pass = x[..., :rd], x[..., rd:]
        x1, x2 = x_rot.chunk(2, dim=-1)
        return torch.cat((x_rot * cos.float() + torch.cat((-x2, x1), dim=-1) * sin.float(), x_pass), dim=-1)

    check(lambda x: Rope.apply(x, cos, sin), reference, [bf16_leaf(2, 4, 9, D)])


@pytest.mark.parametrize("rotary_fraction", [1.0, 0.5])
def test_rope_bf16_with_fp32_tables_rounds_once(rotary_fraction):
    """bf16-mixed: q, k in bf16 (autocast's products), cos/sin in fp32 (the fp32 model's). The rotation runs in fp32
    and rounds to bf16 once: exactly the fp32 rotation of the same values, rounded (as HF's fp32 rotation followed by
    autocast's cast); the gradient likewise."""
    torch.manual_seed(0)
    D = 32
    rd = int(D * rotary_fraction)
    freqs = torch.rand(1, 1, 9, rd // 2) * 3
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    def rotate(x, sin):  # HF's formula, fp32
        x_rot, x_pass = x[..., :rd], x[..., rd:]
        x1, x2 = x_rot.chunk(2, dim=-1)
        return torch.cat((x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin, x_pass), dim=-1)

    x, grad = bf16_leaf(2, 4, 9, D), torch.randn(2, 4, 9, D).to(BF16)
    out = Rope.apply(x, cos, sin)
    out.backward(grad)
    assert out.dtype == x.grad.dtype == BF16
    torch.testing.assert_close(out, rotate(x.detach().float(), sin).to(BF16), atol=0, rtol=0)
    torch.testing.assert_close(x.grad, rotate(grad.float(), -sin).to(BF16), atol=0, rtol=0)


def test_swiglu():
    torch.manual_seed(0)
    check(SwiGLU.apply, lambda gate, up: F.silu(gate) * up, [bf16_leaf(6, 48, scale=2.0), bf16_leaf(6, 48)])


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rmsnorm(unit_offset):
    torch.manual_seed(0)
    D = 32  # the mean-projection term of d/dx weighs ~1/sqrt(D): 18% of the gradient here

    def reference(x, w):
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        return normed * (1.0 + w) if unit_offset else normed * w

    w = (torch.randn(D) * 0.5 + (0.0 if unit_offset else 1.0)).to(BF16).requires_grad_()
    check(lambda x, w: RMSNormFunction.apply(x, w, 1e-5, unit_offset), reference, [bf16_leaf(3, 7, D, scale=3.0), w])


@pytest.mark.parametrize("head_dim", [16, 32])
def test_causal_attention(head_dim):
    """bf16 never reaches litft's fp32 attention kernel (`native.attention_supported`): head size 16 goes to SDPA,
    32 (a multiple of the AMX tiles) to SDPA's forward and litft's AMX backward where the CPU has AMX
    (`native.attention_bf16_supported`), else to SDPA. Either stays exact to bf16 rounding, grouped kv heads
    included."""
    torch.manual_seed(0)

    def reference(q, k, v):
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v

    D = head_dim
    check(causal_attention, reference, [bf16_leaf(2, 4, 70, D), bf16_leaf(2, 2, 70, D), bf16_leaf(2, 2, 70, D)])


def test_rmsnorm_and_swiglu_kernels_run_under_autocast(monkeypatch):
    """Autocast leaves elementwise ops in their inputs' dtype, so bf16-mixed still gets the one-pass kernels: RMSNorm
    on the fp32 residual stream, SwiGLU on the bf16 products. Their results equal those of torch's ops under
    autocast (RMSNorm in fp32 to rounding; SwiGLU within TOL: the kernel rounds once, torch twice)."""
    from litft import native

    if not native.enabled():
        pytest.skip("no C++ compiler: litft's CPU kernels were not built")
    calls = []
    for name in ("rmsnorm_forward", "swiglu_forward"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    torch.manual_seed(0)
    x, w = torch.randn(4, 7, 32), torch.rand(32) + 0.5
    gate, up = torch.randn(4, 7, 64).to(BF16), torch.randn(4, 7, 64).to(BF16)
    with torch.autocast("cpu", dtype=BF16):
        normed, swiglu = RMSNormFunction.apply(x, w, 1e-5, False), SwiGLU.apply(gate, up)
    assert calls == ["rmsnorm_forward", "swiglu_forward"]
    assert normed.dtype == torch.float32 and swiglu.dtype == BF16
    monkeypatch.setenv("LITFT_CPU_KERNELS", "torch")
    with torch.autocast("cpu", dtype=BF16):
        torch.testing.assert_close(normed, RMSNormFunction.apply(x, w, 1e-5, False), atol=1e-5, rtol=1e-5)
        assert rel_err(swiglu, SwiGLU.apply(gate, up).float()) <= TOL
    assert calls == ["rmsnorm_forward", "swiglu_forward"]


def test_linear_cross_entropy():
    """LinearCrossEntropy through `chunked_cross_entropy`: a trainable head with a bias (full fine-tuning),
    several chunks, masked targets. The loss is fp32 by design; the gradients bf16."""
    torch.manual_seed(0)
    V, C = 96, 32
    head = nn.Linear(C, V).to(BF16)
    labels = torch.randint(0, V, (2, 21))
    labels[0, :5] = -100

    def fused(h, *params):  # params: the head's own, checked through their .grad
        loss, n = chunked_cross_entropy(head, h, labels, chunk_size=8)
        assert loss.grad_fn.name() == "LinearCrossEntropyBackward" and n == 36  # 5 chunks
        return loss

    def reference(h, w, b):
        logits = h[:, :-1].reshape(-1, C) @ w.t() + b
        return F.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction="sum")

    check(fused, reference, [bf16_leaf(2, 21, C, scale=2.0), head.weight, head.bias], out_dtype=torch.float32)


def test_linear_cross_entropy_under_autocast():
    """bf16-mixed: fp32 weights, matmuls autocast to bf16 inside the Function, several chunks accumulating into
    one head gradient (in-place ops are not autocast: the accumulation must cast as autocast does)."""
    torch.manual_seed(0)
    V, C = 96, 32
    head = nn.Linear(C, V)
    labels = torch.randint(0, V, (2, 21))

    def fused(h, *params):
        with torch.autocast("cpu", dtype=BF16):
            loss, n = chunked_cross_entropy(head, h, labels, chunk_size=8)
        assert loss.grad_fn.name() == "LinearCrossEntropyBackward" and n == 40  # 5 chunks
        return loss

    def reference(h, w, b):
        return F.cross_entropy(h[:, :-1].reshape(-1, C) @ w.t() + b, labels[:, 1:].reshape(-1), reduction="sum")

    check(fused, reference, [(torch.randn(2, 21, C) * 2).requires_grad_(), head.weight, head.bias],
          out_dtype=torch.float32)


# ------------------------------------------------------------------ the adapters' Functions (litft/adapters)
def test_lora_fused():
    """LoRALinearFunction, base weight and bias trained too (all five gradients)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(48, 40).to(BF16), r=4, alpha=8)
    nn.init.normal_(layer.lora_B)  # the update is as large as the base output: dropping it cannot hide
    base = layer.base_layer

    def fused(x, *params):
        out = layer(x)
        assert out.grad_fn.name() == "LoRALinearFunctionBackward"
        return out

    def reference(x, W, b, A, B):
        return x @ W.t() + b + 2.0 * (x @ A.t()) @ B.t()

    check(fused, reference, [bf16_leaf(3, 5, 48), base.weight, base.bias, layer.lora_A, layer.lora_B])


@pytest.mark.parametrize("frozen_base", [True, False])
def test_lora_fused_under_autocast(frozen_base, monkeypatch):
    """bf16-mixed: fp32 weights, the forward under CPU bf16 autocast. The layer runs LoRALinearFunction in bf16 on
    one cast of x (and a cast of the frozen weight kept between calls); against the fp32 formula within TOL, and
    against torch's own autocast of the unfused layer (each product cast and rounded by autocast) within TOL too.
    The kept cast follows the weight: after an in-place change (a merge, a load) the output changes with it."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(48, 40), r=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    base = layer.base_layer
    base.requires_grad_(not frozen_base)
    leaves = [(torch.randn(3, 5, 48)).requires_grad_(), layer.lora_A, layer.lora_B]
    leaves += [] if frozen_base else [base.weight, base.bias]

    def fused(x, *params):
        with torch.autocast("cpu", dtype=BF16):
            out = layer(x)
        assert out.grad_fn.name() == "LoRALinearFunctionBackward"
        return out

    def reference(x, A, B, W=base.weight.detach(), b=base.bias.detach()):
        return x @ W.float().t() + b.float() + 2.0 * (x @ A.t()) @ B.t()

    check(fused, reference, leaves)
    x = torch.randn(3, 5, 48)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        ours = layer(x)
        monkeypatch.setattr(LoRALinear, "_can_fuse_autocast", lambda self, x: False)
        torchs = layer(x)
        assert torchs.dtype == BF16 and rel_err(ours, torchs.float()) <= TOL
        monkeypatch.undo()
        base.weight.mul_(2.0)  # bumps the weight's version: a frozen base's kept cast is made again
        assert rel_err(layer(x), reference(x, layer.lora_A, layer.lora_B, base.weight, base.bias)) <= TOL


@pytest.mark.parametrize("fused", [True, False])
def test_dora(fused):
    """DoRALinearFunction (plain Linear) and the generic path's _Rescale (forced by a no-op dropout): x, A, B and
    the magnitude m; the norm is detached (paper, section 4.3), the bias not rescaled."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(48, 40).to(BF16).requires_grad_(False), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.lora_magnitude.mul_(1 + 0.5 * torch.rand_like(layer.lora_magnitude))
    if not fused:
        layer.lora_dropout = nn.Dropout(0.0)
    W, b = layer.base_layer.weight.float(), layer.base_layer.bias.float()

    def ours(x, *params):
        out = layer(x)
        name = "DoRALinearFunctionBackward" if fused else "AddBackward0"  # the generic path adds the bias last
        assert out.grad_fn.name() == name
        return out

    def reference(x, A, B, m):
        adapted = W + 2.0 * B @ A
        return F.linear(x, (m / adapted.norm(dim=1).detach())[:, None] * adapted, b)

    check(ours, reference, [bf16_leaf(3, 5, 48), layer.lora_A, layer.lora_B, layer.lora_magnitude])
