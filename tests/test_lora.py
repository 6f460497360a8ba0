"""LoRA math (litft.adapters.lora) and adapter plumbing (litft.adapters.inject).

CPU, fp32, small. The last tests check the math against peft on a tiny HF Llama, which is
independent of litft's own GPT implementation.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from litft.adapters.inject import (
    TARGET_ALIASES,
    adapter_state_dict,
    inject_adapters,
    load_adapter_state_dict,
    mark_only_adapters_trainable,
    merge_adapters,
    resolve_targets,
    unload_adapters,
    unmerge_adapters,
)
from litft.adapters.lora import LoRALinear
from litft.checkpoint import DIGEST_KEY, iter_safetensors, safetensors_header, save_safetensors, tensors_digest
from litft.utils import LitftError

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------- toy model
class ToyAttn(nn.Module):
    def __init__(self, d: int, bias: bool) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d // 2, bias=bias)  # GQA-like: narrower k/v
        self.v_proj = nn.Linear(d, d // 2, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = torch.cat([torch.tanh(self.k_proj(x)), self.v_proj(x)], dim=-1)
        return self.o_proj(torch.tanh(self.q_proj(x)) * kv)


class ToyMLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, 2 * d, bias=False)
        self.up_proj = nn.Linear(d, 2 * d, bias=False)
        self.down_proj = nn.Linear(2 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ToyBlock(nn.Module):
    def __init__(self, d: int, bias: bool) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(d)
        self.attn = ToyAttn(d, bias)
        self.norm_2 = nn.LayerNorm(d)
        self.mlp = ToyMLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class ToyGPT(nn.Module):
    """Same module names as litft's GPT; lm_head tied to the embedding."""

    def __init__(self, vocab: int = 50, d: int = 32, n_layer: int = 2, bias: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(ToyBlock(d, bias) for _ in range(n_layer))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def make_lora(r: int = 4, alpha: float = 8.0, **kw):
    return lambda name, linear: LoRALinear(linear, r=r, alpha=alpha, **kw)


def randomize_B(model: nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """B is zero at init, which would hide any bug in the adapter path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


@pytest.fixture
def idx() -> torch.Tensor:
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def toy() -> ToyGPT:
    torch.manual_seed(0)
    return ToyGPT().eval()


# ------------------------------------------------------------------- LoRALinear
def test_forward_matches_hand_computation():
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=True)
    lora = LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(lora.lora_B)
    x = torch.randn(3, 5, 16)
    W, b, A, B = base.weight, base.bias, lora.lora_A, lora.lora_B
    expected = x @ W.T + b + (8 / 4) * (x @ A.T) @ B.T
    assert lora.scaling == 2.0
    torch.testing.assert_close(lora(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bias,train_base", [(False, False), (True, True)])
def test_fused_forward_backward_equals_unfused(bias, train_base):
    """LoRALinearFunction (the default path for a plain Linear base without dropout) computes the same
    output and gradients as base(x) + lora_forward(x) through autograd."""
    from litft.adapters.lora import LoRALinearFunction

    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=bias).requires_grad_(train_base)
    layer = LoRALinear(base, r=4, alpha=8.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 24, requires_grad=True)
    g = torch.randn(3, 5, 40)
    params = [t for t in (x, base.weight, base.bias, layer.lora_A, layer.lora_B) if t is not None and t.requires_grad]
    out = layer(x)
    assert out.grad_fn.name() == LoRALinearFunction.__name__ + "Backward"  # the fused path ran
    out.backward(g)
    fused = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    ref = base(x) + layer.lora_forward(x)
    ref.backward(g)
    # fp32 tolerances: the fused path's matmuls may run in oneDNN, autograd's in MKL (litft/cpu_kernels.py)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, t in zip(fused, params):
        torch.testing.assert_close(a, t.grad, atol=1e-5, rtol=1e-5)


def test_fresh_adapter_is_identity():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    lora = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(4, 16)
    assert torch.equal(lora(x), base(x))


def test_merge_unmerge_roundtrip():
    torch.manual_seed(0)
    base = nn.Linear(32, 24, bias=True)
    lora = LoRALinear(base, r=8, alpha=16)
    nn.init.normal_(lora.lora_B)
    w0 = base.weight.detach().clone()
    x = torch.randn(6, 32)
    y_unmerged = lora(x)

    lora.merge()
    assert lora.merged
    torch.testing.assert_close(base.weight, w0 + lora.delta_weight(), atol=1e-6, rtol=0)
    torch.testing.assert_close(lora(x), y_unmerged, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        lora.merge()

    lora.unmerge()
    assert not lora.merged
    assert (base.weight - w0).abs().max().item() <= 1e-6
    torch.testing.assert_close(lora(x), y_unmerged, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="not merged"):
        lora.unmerge()


def test_delta_weight_shape_and_value():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(10, 6), r=2, alpha=3)
    nn.init.normal_(lora.lora_B)
    d = lora.delta_weight()
    assert d.shape == (6, 10) and d.dtype == torch.float32
    torch.testing.assert_close(d, 1.5 * lora.lora_B @ lora.lora_A)


def test_merge_into_bf16_is_computed_in_fp32():
    torch.manual_seed(0)
    base = nn.Linear(32, 16, bias=False).to(torch.bfloat16)
    lora = LoRALinear(base, r=4, alpha=4)
    assert lora.lora_A.dtype == torch.bfloat16  # adapter follows the base dtype by default
    nn.init.normal_(lora.lora_B)
    w0 = base.weight.detach().clone()
    expected = (w0.float() + lora.delta_weight()).to(torch.bfloat16)
    lora.merge()
    assert base.weight.dtype == torch.bfloat16
    assert torch.equal(base.weight, expected)


def test_adapter_path_runs_in_adapter_dtype_and_casts_back():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    lora = LoRALinear(base, r=4, alpha=8)
    lora.lora_A.data = lora.lora_A.data.float()  # fp32 adapter on a bf16 base (QLoRA-style)
    lora.lora_B.data = torch.randn(8, 4)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = lora(x)
    assert y.dtype == torch.bfloat16
    ref_delta = 2.0 * (x.float() @ lora.lora_A.T) @ lora.lora_B.T
    torch.testing.assert_close(y, base(x) + ref_delta.to(torch.bfloat16))


@pytest.mark.parametrize("r,alpha", [(16, 8), (4, 8), (1, 2)])
def test_rslora_scaling(r, alpha):
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    assert LoRALinear(base, r=r, alpha=alpha).scaling == pytest.approx(alpha / r)
    rs = LoRALinear(base, r=r, alpha=alpha, use_rslora=True)
    assert rs.scaling == pytest.approx(alpha / math.sqrt(r))
    nn.init.normal_(rs.lora_B)
    x = torch.randn(2, 8)
    expected = base(x) + alpha / math.sqrt(r) * (x @ rs.lora_A.T) @ rs.lora_B.T
    torch.testing.assert_close(rs(x), expected, atol=1e-5, rtol=0)


def test_init_distributions():
    torch.manual_seed(0)
    fan_in = 256
    lora = LoRALinear(nn.Linear(fan_in, 128), r=64, alpha=16)
    assert lora.lora_A.shape == (64, fan_in) and lora.lora_B.shape == (128, 64)
    assert torch.count_nonzero(lora.lora_B) == 0
    # kaiming_uniform(a=sqrt(5)): gain = sqrt(2 / (1 + 5)), bound = gain * sqrt(3 / fan_in) = 1/sqrt(fan_in)
    bound = 1 / math.sqrt(fan_in)
    A = lora.lora_A.detach()
    assert A.abs().max() <= bound
    assert A.abs().max() > 0.98 * bound  # fills the interval, not a narrower one
    assert abs(A.mean().item()) < 0.05 * bound
    assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)  # std of U(-b, b)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(r=0), "rank"),
        (dict(r=-2), "rank"),
        (dict(r=2.5), "rank"),
        (dict(alpha=0), "alpha"),
        (dict(alpha=-1.0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
    ],
)
def test_validation(kw, msg):
    args = dict(r=4, alpha=8.0, dropout=0.0) | kw
    with pytest.raises(ValueError, match=msg):
        LoRALinear(nn.Linear(4, 4), **args)


def test_dropout_skipped_at_zero_and_applied_otherwise():
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    assert LoRALinear(base, r=4, alpha=8).lora_dropout is None
    lora = LoRALinear(base, r=4, alpha=8, dropout=0.5)
    nn.init.normal_(lora.lora_B)
    x = torch.randn(8, 64)
    lora.train()
    assert not torch.equal(lora(x), lora(x))  # different masks
    lora.eval()
    assert torch.equal(lora(x), lora(x))


def test_extra_repr():
    s = repr(LoRALinear(nn.Linear(4, 6), r=2, alpha=16, use_rslora=True))
    assert "r=2" in s and "alpha=16" in s and "use_rslora=True" in s and "base_layer" in s


def test_quantized_base_runs_but_refuses_merge():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    base = base.to("cpu")  # .to(device) is what quantizes a bnb layer
    assert base.weight.dtype == torch.uint8  # packed: the adapter must not take shapes/dtype from it
    lora = LoRALinear(base, r=4, alpha=8)
    assert lora.lora_A.shape == (4, 64) and lora.lora_A.dtype == torch.float32
    nn.init.normal_(lora.lora_B)
    x = torch.randn(3, 64)
    y = lora(x)
    # independent of LoRALinear: the weights the base really computes with (dequantized), the update by hand
    W = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    A, B = lora.lora_A.detach(), lora.lora_B.detach()
    torch.testing.assert_close(y, x @ W.T + (8 / 4) * (x @ A.T) @ B.T, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="plain floating-point"):
        lora.merge()
    assert not lora.merged


@pytest.mark.parametrize("merge", [merge_adapters, lambda m: unload_adapters(m, merge=True)],
                         ids=["merge_adapters", "unload_adapters"])
def test_a_failed_merge_rolls_back(merge):
    """All or none: when one adapter cannot merge (a quantized base), the ones merged before it are unmerged."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    quantized = bnb.nn.Linear4bit(32, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    model = nn.Sequential(LoRALinear(nn.Linear(32, 32), r=4, alpha=8), LoRALinear(quantized, r=4, alpha=8))
    nn.init.normal_(model[0].lora_B)
    before = model[0].base_layer.weight.detach().clone()
    with pytest.raises(TypeError, match="plain floating-point"):
        merge(model)
    assert not model[0].merged  # and its weight is back (up to the rounding of adding and subtracting B·A)
    torch.testing.assert_close(model[0].base_layer.weight.detach(), before, atol=1e-6, rtol=0)
    assert isinstance(model[0], LoRALinear)  # still the adapter model, not half-unloaded


# ---------------------------------------------------------------- resolve_targets
def test_resolve_targets():
    assert resolve_targets(["q", "v"]) == {"q_proj", "v_proj"}
    assert resolve_targets(["q_proj", "down"]) == {"q_proj", "down_proj"}
    assert resolve_targets("q,v") == {"q_proj", "v_proj"}
    assert resolve_targets("lm_head") == {"lm_head"}
    assert resolve_targets("all-linear") == set(ALL7)
    assert resolve_targets(["all-linear", "lm_head"]) == set(TARGET_ALIASES.values())


def test_resolve_targets_typo_and_empty():
    with pytest.raises(ValueError, match=r"(?s)unknown adapter target 'q_prj'.*[Dd]id you mean 'q_proj'.*Valid"):
        resolve_targets(["q_prj"])
    with pytest.raises(ValueError, match="all-linear"):
        resolve_targets("all_linear")
    with pytest.raises(ValueError, match="no adapter targets"):
        resolve_targets([])


# ------------------------------------------------------------------- injection
def test_inject_all_linear(toy, idx):
    y0 = toy(idx)
    originals = {n: m for n, m in toy.named_modules() if isinstance(m, nn.Linear)}
    names = inject_adapters(toy, "all-linear", make_lora())
    expected = [f"blocks.{i}.{p}.{n}" for i in range(2) for p, ns in (("attn", ALL7[:4]), ("mlp", ALL7[4:])) for n in ns]
    assert names == expected
    for n in names:
        m = toy.get_submodule(n)
        assert isinstance(m, LoRALinear) and m.base_layer is originals[n]
    assert isinstance(toy.lm_head, nn.Linear)  # all-linear leaves the head alone
    assert torch.equal(toy(idx), y0)  # B = 0: identical outputs


def test_inject_passes_full_name_and_errors(toy):
    seen = []
    inject_adapters(toy, ["q"], lambda name, lin: seen.append(name) or LoRALinear(lin, 2, 4))
    assert seen == ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]
    with pytest.raises(ValueError, match="already holds an adapter"):
        inject_adapters(toy, ["q"], make_lora())

    mlp_only = nn.Sequential()
    mlp_only.add_module("fc", nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"no Linear layer matched.*\['fc'\]"):
        inject_adapters(mlp_only, "all-linear", make_lora())


def test_tied_lm_head(toy, idx):
    y0 = toy(idx)
    names = inject_adapters(toy, ["q", "lm_head"], make_lora())
    assert "lm_head" in names
    assert toy.lm_head.base_layer.weight is toy.embed.weight  # tie kept
    assert torch.equal(toy(idx), y0)

    randomize_B(toy)
    y_lora = toy(idx)
    embed0 = toy.embed.weight.detach().clone()
    # in-place merge would also change the embedding -> refused, nothing merged
    with pytest.raises(ValueError, match="tied"):
        merge_adapters(toy)
    assert not any(m.merged for m in toy.modules() if isinstance(m, LoRALinear))

    with pytest.warns(UserWarning, match="untying"):
        merged = unload_adapters(toy, merge=True)
    assert isinstance(merged.lm_head, nn.Linear) and merged.lm_head.weight is not merged.embed.weight
    assert torch.equal(merged.embed.weight, embed0)
    torch.testing.assert_close(merged(idx), y_lora, atol=1e-5, rtol=1e-5)


def test_make_adapter_breaking_tie_is_rejected(toy):
    def copying_adapter(name, lin):
        clone = copy.deepcopy(lin)  # e.g. a careless quantizer building a new layer
        return LoRALinear(clone, 2, 4)

    with pytest.raises(RuntimeError, match="tied"):
        inject_adapters(toy, ["q", "lm_head"], copying_adapter)
    assert not any(isinstance(m, LoRALinear) for m in toy.modules())  # untouched


# ------------------------------------------------------------------ trainability
def test_only_adapters_get_grads_and_base_is_bit_identical(toy, idx):
    inject_adapters(toy, "all-linear", make_lora())
    randomize_B(toy)
    trainable = mark_only_adapters_trainable(toy)
    assert trainable and all(("lora_A" in n or "lora_B" in n) for n in trainable)
    base_before = {n: p.detach().clone() for n, p in toy.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in toy.named_parameters() if "lora_" in n}

    opt = torch.optim.AdamW([p for p in toy.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    toy.train()
    loss = F.cross_entropy(toy(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    for n, p in toy.named_parameters():
        if "lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    opt.step()
    for n, p in toy.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
        else:
            assert not torch.equal(p, lora_before[n]), n


def test_bias_modes(toy):
    inject_adapters(toy, ["q", "v"], make_lora())

    def trainable_biases():
        return {n for n, p in toy.named_parameters() if p.requires_grad and n.endswith("bias")}

    mark_only_adapters_trainable(toy, bias="none")
    assert trainable_biases() == set()

    mark_only_adapters_trainable(toy, bias="lora_only")
    wrapped = {f"blocks.{i}.attn.{p}.base_layer.bias" for i in range(2) for p in ("q_proj", "v_proj")}
    assert trainable_biases() == wrapped  # not k_proj's bias, not norms

    mark_only_adapters_trainable(toy, bias="all")
    all_biases = {n for n, _ in toy.named_parameters() if n.endswith(".bias")}
    assert trainable_biases() == all_biases
    assert "blocks.0.attn.k_proj.bias" in all_biases and "norm.bias" in all_biases
    assert all(not p.requires_grad for n, p in toy.named_parameters() if n.endswith("weight"))

    assert set(adapter_state_dict(toy, bias="lora_only")) - set(adapter_state_dict(toy)) == wrapped
    assert set(adapter_state_dict(toy, bias="all")) - set(adapter_state_dict(toy)) == all_biases

    with pytest.raises(ValueError, match="bias must be one of"):
        mark_only_adapters_trainable(toy, bias="lora")
    with pytest.raises(ValueError, match="bias must be one of"):
        adapter_state_dict(toy, bias="everything")


def test_mark_trainable_without_adapters_errors(toy):
    with pytest.raises(ValueError, match="inject_adapters"):
        mark_only_adapters_trainable(toy)


def test_custom_adapter_predicate(toy):
    # How DoRA-style extra params plug in: a predicate (or extending ADAPTER_PARAM_PREFIXES).
    inject_adapters(toy, ["q"], make_lora())
    pred = lambda n: "lora_" in n or n.endswith("norm.weight")  # noqa: E731
    names = mark_only_adapters_trainable(toy, is_adapter_param=pred)
    assert "norm.weight" in names
    assert "norm.weight" in adapter_state_dict(toy, is_adapter_param=pred)


# ------------------------------------------------------------ merge / unload model
def test_model_merge_unmerge_unload(toy, idx):
    y_base = toy(idx)
    w_base = {n: p.detach().clone() for n, p in toy.named_parameters()}
    inject_adapters(toy, "all-linear", make_lora())
    randomize_B(toy)
    y_lora = toy(idx)
    assert not torch.allclose(y_lora, y_base)

    merge_adapters(toy)
    torch.testing.assert_close(toy(idx), y_lora, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_adapters(toy)
    unmerge_adapters(toy)
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_adapters(toy)
    # model-level: per-weight fp32 rounding (~1e-7) grows through the layers
    torch.testing.assert_close(toy(idx), y_lora, atol=1e-5, rtol=1e-5)

    merge_adapters(toy)
    plain = unload_adapters(toy)  # merge=False: unmerges, then drops the adapters
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    for n, p in plain.named_parameters():
        assert (p - w_base[n]).abs().max() <= 1e-6, n
    torch.testing.assert_close(plain(idx), y_base, atol=1e-5, rtol=1e-5)
    assert plain.lm_head.weight is plain.embed.weight


def test_unload_merge_matches_lora_outputs(toy, idx):
    inject_adapters(toy, "all-linear", make_lora(r=8, alpha=4))
    randomize_B(toy)
    y_lora = toy(idx)
    merged = unload_adapters(toy, merge=True)
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(tuple(ALL7)))
    assert set(merged.state_dict()) == set(ToyGPT().state_dict())  # plain checkpoint layout again
    torch.testing.assert_close(merged(idx), y_lora, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- state / files
def test_state_dict_save_load_roundtrip(toy, idx, tmp_path: Path):
    inject_adapters(toy, "all-linear", make_lora())
    randomize_B(toy)
    y_lora = toy(idx)
    sd = adapter_state_dict(toy)
    assert len(sd) == 2 * 14 and all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for k in sd)
    assert set(sd) <= set(toy.state_dict())
    assert all(v.device.type == "cpu" and v.is_contiguous() and not v.requires_grad for v in sd.values())
    # a copy, not a view of the live parameters
    assert sd["blocks.0.attn.q_proj.lora_A"].data_ptr() != toy.blocks[0].attn.q_proj.lora_A.data_ptr()

    path = tmp_path / "sub" / "adapter.safetensors"
    save_safetensors(sd, path, {"method": "lora", "r": "4"})
    assert list(path.parent.iterdir()) == [path]
    adapter_bytes = sum(v.numel() * v.element_size() for v in sd.values())
    full_bytes = sum(v.numel() * v.element_size() for v in toy.state_dict().values())
    assert path.stat().st_size < adapter_bytes + 16_384 and adapter_bytes < full_bytes / 3

    loaded, meta = load_file(path)
    assert meta == {"method": "lora", "r": "4", DIGEST_KEY: tensors_digest(sorted(sd.items()))}
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)

    # a fresh wrap of the same base (different adapter init) reproduces the outputs
    torch.manual_seed(0)
    other = ToyGPT().eval()
    torch.manual_seed(123)
    inject_adapters(other, "all-linear", make_lora())
    result = load_adapter_state_dict(other, loaded)
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(other(idx), y_lora, atol=0, rtol=0)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_load_wrong_shape_is_clear_and_atomic(toy):
    inject_adapters(toy, "all-linear", make_lora(r=8))
    sd_r4 = adapter_state_dict(ToyWrapped(r=4))
    snap = _snapshot(toy)
    with pytest.raises(ValueError, match=r"(?s)shape mismatch.*\(4, 32\) vs model \(8, 32\).*another base model"):
        load_adapter_state_dict(toy, sd_r4)
    assert _unchanged(toy, snap)
    with pytest.raises(ValueError, match="shape mismatch"):  # shapes matter even when not strict
        load_adapter_state_dict(toy, sd_r4, strict=False)
    assert _unchanged(toy, snap)


def ToyWrapped(r: int = 4, targets="all-linear") -> ToyGPT:
    torch.manual_seed(7)
    m = ToyGPT()
    inject_adapters(m, targets, make_lora(r=r))
    randomize_B(m, seed=7)
    return m


def test_load_wrong_keys_is_clear_and_atomic(toy):
    inject_adapters(toy, ["q", "v"], make_lora())
    snap = _snapshot(toy)
    full = adapter_state_dict(ToyWrapped(targets="all-linear"))
    with pytest.raises(ValueError, match=r"(?s)unexpected \d+ key\(s\): blocks\.0\.attn\.k_proj\.lora_A.*likely"):
        load_adapter_state_dict(toy, full)
    assert _unchanged(toy, snap)

    q_only = adapter_state_dict(ToyWrapped(targets=["q"]))
    with pytest.raises(ValueError, match=r"missing 4 key\(s\): blocks\.0\.attn\.v_proj\.lora_A"):
        load_adapter_state_dict(toy, q_only)
    assert _unchanged(toy, snap)

    # an "adapter" that smuggles a base weight in is rejected, not silently applied
    evil = adapter_state_dict(toy) | {"blocks.0.attn.q_proj.base_layer.weight": torch.zeros(32, 32)}
    with pytest.raises(ValueError, match="unexpected 1 key"):
        load_adapter_state_dict(toy, evil)
    assert _unchanged(toy, snap)

    # non-strict loads the overlap and reports the rest
    res = load_adapter_state_dict(toy, q_only, strict=False)
    assert len(res.missing_keys) == 4 and res.unexpected_keys == []
    assert torch.equal(toy.blocks[0].attn.q_proj.lora_B, q_only["blocks.0.attn.q_proj.lora_B"])


def test_load_into_merged_model_refused(toy):
    inject_adapters(toy, ["q"], make_lora())
    sd = adapter_state_dict(ToyWrapped(targets=["q"]))
    merge_adapters(toy)
    with pytest.raises(RuntimeError, match="unmerge first"):
        load_adapter_state_dict(toy, sd)


def load_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return dict(iter_safetensors(path)), safetensors_header(path)[1]


def test_load_missing_corrupt_truncated_files(tmp_path: Path):
    with pytest.raises(LitftError, match="nope.safetensors"):
        load_file(tmp_path / "nope.safetensors")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(LitftError, match=r"garbage\.safetensors.*truncated or corrupt"):
        load_file(garbage)

    good = tmp_path / "good.safetensors"
    save_safetensors(adapter_state_dict(ToyWrapped()), good, {"method": "lora"})
    truncated = tmp_path / "truncated.safetensors"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(LitftError, match=r"truncated\.safetensors.*truncated or corrupt"):
        load_file(truncated)


def test_atomic_save_leaves_no_tmp(tmp_path: Path):
    path = tmp_path / "a.safetensors"
    sd1 = {"x.lora_A": torch.ones(2, 3)}
    save_safetensors(sd1, path, {"v": "1"})
    save_safetensors({"x.lora_A": torch.zeros(2, 3)}, path, {"v": "2"})  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    sd, meta = load_file(path)
    assert meta["v"] == "2" and torch.equal(sd["x.lora_A"], torch.zeros(2, 3))

    # a failing write (non-str metadata) keeps the previous file and leaves no temp file
    with pytest.raises(TypeError, match="not an instance of .str."):
        save_safetensors(sd1, path, {"r": 4})
    # shared storage makes safetensors itself refuse mid-write
    t = torch.ones(4)
    with pytest.raises(RuntimeError, match="Some tensors share memory"):
        save_safetensors({"a.lora_A": t, "b.lora_A": t}, path, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    assert load_file(path)[1]["v"] == "2"


# ---------------------------------------------------------------- peft oracle
def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: k/v are 64 -> 32
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_lora_on_hf_llama(use_rslora):
    peft = pytest.importorskip("peft")
    base = _tiny_llama()
    ours = copy.deepcopy(base)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))

    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL7, use_rslora=use_rslora)
    ref = peft.get_peft_model(base, cfg).eval()
    names = inject_adapters(ours, "all-linear", make_lora(r=4, alpha=8, use_rslora=use_rslora))
    assert len(names) == 2 * 7

    # Give peft random nonzero B, then copy its A/B into ours by module name.
    g = torch.Generator().manual_seed(3)
    n_copied = 0
    with torch.no_grad():
        for name, m in ref.base_model.model.named_modules():
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and "default" in m.lora_A:
                m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=g) * 0.1)
                mine = ours.get_submodule(name)
                assert isinstance(mine, LoRALinear)
                assert mine.scaling == pytest.approx(m.scaling["default"])
                mine.lora_A.copy_(m.lora_A["default"].weight)
                mine.lora_B.copy_(m.lora_B["default"].weight)
                n_copied += 1
    assert n_copied == len(names)

    with torch.no_grad():
        ref_logits = ref(input_ids=ids).logits
        our_logits = ours(input_ids=ids).logits
        with ref.disable_adapter():
            base_logits = ref(input_ids=ids).logits
    assert (ref_logits - base_logits).abs().max() > 1e-2  # the adapters really do something
    torch.testing.assert_close(our_logits, ref_logits, atol=1e-5, rtol=0)

    # merging agrees too: peft's merge_and_unload vs ours, weight by weight and on logits
    merged_ref = ref.merge_and_unload()
    merged_ours = unload_adapters(ours, merge=True)
    ref_sd, our_sd = merged_ref.state_dict(), merged_ours.state_dict()
    assert ref_sd.keys() == our_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(our_sd[k], ref_sd[k], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged_ours(input_ids=ids).logits, ref_logits, atol=1e-5, rtol=0)
