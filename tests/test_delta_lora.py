"""Delta-LoRA (litft/adapters/delta_lora.py, litft/methods/delta_lora.py): the update of W against the paper's
formula computed by hand (K start step included), gradients vs autograd, resume exactness of the moved W, the saved
format read by merge_lora / load_method, export_peft's refusal, and the options it refuses."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from litft.adapters.delta_lora import DeltaLoRALinear
from litft.checkpoint import load_model
from litft.cli import run
from litft.methods.delta_lora import DeltaLoRA
from litft.methods.run_dir import load_method
from litft.utils import LitftError
from tests.test_train import common_args, load_state_dict_file

DEMO = Path(__file__).resolve().parents[1] / "litft" / "demo" / "base"


class OneLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(6, 5)


@pytest.mark.parametrize("K", [0, 2])
def test_three_steps_move_W_by_the_formula(K):
    """After step t >= K: W_eff = W + λ·s·Σ (B_t A_t - B_{t-1} A_{t-1}); W itself and steps before K untouched."""
    torch.manual_seed(0)
    method = DeltaLoRA(checkpoint_dir=DEMO, r=2, alpha=3.0, delta_update_ratio=2.0, delta_start_step=K,
                       targets=["q"])
    method.model = OneLayer()
    method.model.requires_grad_(False)
    layer = DeltaLoRALinear(method.model.q_proj, 2, 3.0)
    method.model.q_proj = layer
    layer.remember_product()
    W0 = layer.base_layer.weight.detach().clone()
    s, lam = layer.scaling, 2.0
    optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    products = [(layer.lora_B @ layer.lora_A).detach().clone()]  # B_0 A_0 (= 0)
    expected = torch.zeros_like(W0)
    x, target = torch.randn(7, 6), torch.randn(7, 5)
    for t in (1, 2, 3):
        (layer(x) - target).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        method.after_optimizer_step(t)
        products.append((layer.lora_B @ layer.lora_A).detach().clone())
        if t >= K:  # by hand, from the paper: W += λ s (B_t A_t - B_{t-1} A_{t-1})
            expected += lam * s * (products[t] - products[t - 1])
        torch.testing.assert_close(layer.lora_delta, expected, atol=1e-6, rtol=0)
        assert torch.equal(layer.base_layer.weight, W0)  # no gradient, no optimizer step on W itself
    if K == 2:  # step 1 did not move W, and step 2 moved it by B_2 A_2 - B_1 A_1, not - B_0 A_0
        torch.testing.assert_close(expected, lam * s * (products[3] - products[1]))
    assert expected.abs().max() > 1e-3
    # the layer computes with the moved weight
    with torch.no_grad():
        ref = x @ (W0 + expected).T + layer.base_layer.bias + s * x @ layer.lora_A.T @ layer.lora_B.T
        torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_gradients_equal_autograd_of_the_plain_formula():
    torch.manual_seed(0)
    layer = DeltaLoRALinear(nn.Linear(8, 6), r=3, alpha=6.0)
    layer.base_layer.weight.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        layer.lora_delta.normal_(0, 0.1)
    x = torch.randn(2, 4, 8, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    W, D = layer.base_layer.weight, layer.lora_delta
    b, A, B = (t.detach().clone().requires_grad_(True) for t in (layer.base_layer.bias, layer.lora_A, layer.lora_B))
    x2 = x.detach().clone().requires_grad_(True)
    ref = x2 @ (W + D).T + b + layer.scaling * (x2 @ A.T) @ B.T
    ref.backward(g)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    for mine, theirs in [(x.grad, x2.grad), (layer.base_layer.bias.grad, b.grad), (layer.lora_A.grad, A.grad),
                         (layer.lora_B.grad, B.grad)]:
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)


def test_merge_folds_the_moved_weight():
    torch.manual_seed(0)
    layer = DeltaLoRALinear(nn.Linear(8, 6).requires_grad_(False), r=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        layer.lora_delta.normal_(0, 0.1)
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=0)


def _delta_args(ckpt, task, out, steps=6):
    return common_args(ckpt, task, out, steps=steps, method="delta_lora") + ["--delta_start_step", "2"]


def test_resume_keeps_the_moved_weight_exact_and_merge_reads_it(ckpt, task, tmp_path, one_thread):
    """Stop at step 3, resume: the same lora_A, lora_B and lora_delta as straight through, to the bit. Then the saved
    run: load_method and merge_lora compute with the moved W; export_peft refuses it clearly."""
    run(_delta_args(ckpt, task, tmp_path / "a") + ["--train.save_interval", "3"])
    run(_delta_args(ckpt, task, tmp_path / "b") + ["--resume", str(tmp_path / "a" / "step-3")])
    a = load_state_dict_file(tmp_path / "a" / "final" / "adapter.safetensors")
    b = load_state_dict_file(tmp_path / "b" / "final" / "adapter.safetensors")
    assert a.keys() == b.keys() and any(k.endswith(".lora_delta") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert max(v.abs().max() for k, v in a.items() if k.endswith(".lora_delta")) > 0

    final = tmp_path / "a" / "final"
    method = load_method(final)
    x = torch.randint(0, 320, (2, 10))
    with torch.no_grad():
        adapted = method.model.eval()(x)
        for m in method.delta_layers():
            m.lora_delta.zero_()
        unmoved = method.model(x)
    assert (adapted - unmoved).abs().max() > 1e-4  # the moved W matters
    run(["merge_lora", str(final), "--out_dir", str(tmp_path / "merged")])
    with torch.no_grad():
        assert (load_model(tmp_path / "merged").eval()(x) - adapted).abs().max() <= 1e-5
    gen = ["--prompt", "a", "--max_new_tokens", "6", "--temperature", "0"]
    text = run(["generate", str(ckpt), "--adapter_dir", str(final), *gen])
    assert isinstance(text, str) and text == run(["generate", str(tmp_path / "merged"), *gen])
    with pytest.raises(LitftError, match="Delta-LoRA run: it moved the base weights"):
        run(["export_peft", str(final), str(tmp_path / "peft")])
    assert not (tmp_path / "peft").exists()


def test_init_adapter_from_a_lora_run_starts_unmoved(ckpt, task, tmp_path, one_thread):
    run(common_args(ckpt, task, tmp_path / "lora", steps=2) + ["--dropout", "0"])
    method = DeltaLoRA(checkpoint_dir=ckpt, init_adapter=tmp_path / "lora" / "final", r=8, alpha=16)
    method.configure_model()
    lora = load_state_dict_file(tmp_path / "lora" / "final" / "adapter.safetensors")
    state = method.trainable_state_dict()
    assert all(torch.equal(state[k], v) for k, v in lora.items())
    assert all(not v.any() for k, v in state.items() if k.endswith(".lora_delta"))


@pytest.mark.parametrize("args,match", [
    (dict(quantize="bnb.nf4"), "quantized base"),
    (dict(dropout=0.1), "dropout 0"),
    (dict(delta_update_ratio=-1.0), "delta_update_ratio"),
    (dict(delta_start_step=-2), "delta_start_step"),
])
def test_unsupported_options_are_refused_before_any_model_loads(args, match):
    with pytest.raises(LitftError, match=match):
        DeltaLoRA(checkpoint_dir=DEMO, **args)


def test_layer_refuses_a_quantized_base():
    bnb = pytest.importorskip("bitsandbytes")
    with pytest.raises(LitftError, match="plain floating-point nn.Linear"):
        DeltaLoRALinear(bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False), r=2, alpha=4.0)


def test_ddp_two_processes_match_one(ckpt, task, tmp_path):
    """Every rank moves W by the same update: two CPU processes end with the adapter (and lora_delta) of one."""
    from tests.test_train import ddp_matches_one_process

    a = ddp_matches_one_process(lambda out: [str(x) for x in _delta_args(ckpt, task, out)], tmp_path)
    assert any(k.endswith(".lora_delta") and v.abs().max() > 0 for k, v in a.items())
