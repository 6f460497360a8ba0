"""DoRA (litft.adapters.dora, litft.methods.dora): the fast norm vs the plain definition, the layer vs a
hand-written reference (values and gradients), exact merge, a 4-bit base, parity with peft's DoRA on a
transformers Llama, and a composed run (DoRA + 4-bit base + LoRA+ + NEFTune + an 8-bit optimizer)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from litft.adapters.dora import DoRALinear
from litft.adapters.inject import adapter_state_dict, inject_adapters
from litft.checkpoint import load_model
from litft.cli import run
from litft.methods.run_dir import load_method
from litft.utils import LitftError


def reference_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """The definition: form W + s·B·A (out x in) and take each row's norm."""
    return (weight.double() + s * (B.double() @ A.double())).norm(dim=1)


def reference_forward(x, weight, bias, A, B, m, s):
    """y = m * (W + sBA) / ||W + sBA|| x + bias, the norm detached (the paper's section 4.3)."""
    adapted = weight + s * B @ A
    return F.linear(x, (m / adapted.norm(dim=1).detach())[:, None] * adapted, bias)


def make_layer(in_f=96, out_f=80, bias=True, r=8, alpha=16.0, seed=0, **kw) -> DoRALinear:
    torch.manual_seed(seed)
    layer = DoRALinear(nn.Linear(in_f, out_f, bias=bias).requires_grad_(False), r=r, alpha=alpha, **kw)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)  # nonzero: the update really changes the direction
        layer.lora_magnitude.mul_(1 + 0.3 * torch.rand_like(layer.lora_magnitude))  # a "trained" magnitude
    return layer


@pytest.mark.parametrize("use_rslora", [False, True])
def test_fast_norm_equals_reference_fp32(use_rslora):
    layer = make_layer(in_f=200, out_f=120, r=16, alpha=32, use_rslora=use_rslora)
    ref = reference_norm(layer.base_layer.weight, layer.lora_A, layer.lora_B, layer.scaling)
    assert ((layer.weight_norm().double() - ref).abs() / ref).max() <= 1e-5


def test_fast_norm_equals_reference_bnb_4bit_base():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    linear = nn.Linear(128, 64, bias=True)
    q = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(linear.state_dict())
    q = q.to("cpu")  # quantizes
    layer = DoRALinear(q, r=8, alpha=16)
    nn.init.normal_(layer.lora_B, std=0.2)
    deq = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
    assert not torch.allclose(deq, linear.weight)  # the reference must use what the base really computes with
    torch.testing.assert_close(layer.lora_magnitude.detach().double(), deq.double().norm(dim=1), rtol=1e-5, atol=0)
    ref = reference_norm(deq, layer.lora_A, layer.lora_B, layer.scaling)
    assert ((layer.weight_norm().double() - ref).abs() / ref).max() <= 1e-5
    x = torch.randn(5, 128)  # and the layer computes the reference forward on the dequantized weight
    with torch.no_grad():
        want = reference_forward(x, deq, q.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scaling)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="plain floating-point"):
        layer.merge()


def test_fresh_layer_is_identity():
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    layer = DoRALinear(base, r=4, alpha=8)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.lora_magnitude.detach(), base.weight.norm(dim=1))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_grads_match_reference(bias, fused):
    """Values and the gradients of x, A, B, m against the formula written out (norm detached, bias
    unscaled), on both paths: DoRALinearFunction (plain Linear, no dropout) and the generic one (_Rescale,
    taken with dropout or a quantized base; forced here by a no-op dropout)."""
    layer = make_layer(bias=bias)
    if not fused:
        layer.lora_dropout = nn.Dropout(0.0)
    A, B, m = (p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude))
    W, b = layer.base_layer.weight.detach(), layer.base_layer.bias
    x = torch.randn(4, 6, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(4, 6, 80)
    ours = layer(x)
    assert ours.grad_fn.name().startswith("DoRALinearFunction") == fused
    want = reference_forward(x_ref, W, None if b is None else b.detach(), A, B, m, layer.scaling)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    (ours * g).sum().backward()
    (want * g).sum().backward()
    for p, ref in ((layer.lora_A, A), (layer.lora_B, B), (layer.lora_magnitude, m), (x, x_ref)):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-4, atol=1e-5)
    if bias:  # the bias is added after the rescaling: it must not be multiplied by m / n
        with torch.no_grad():
            layer.base_layer.bias.add_(1.0)
            torch.testing.assert_close(layer(x), ours.detach() + 1.0, rtol=1e-5, atol=1e-5)
    assert layer.base_layer.weight.grad is None


def test_merge_unmerge_exact():
    layer = make_layer()
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 96)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.base_layer(x), y, rtol=1e-5, atol=1e-5)  # really inside the weight
        with pytest.raises(RuntimeError, match="already merged"):
            layer.merge()
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_eval_caches_the_norm_but_sees_new_weights():
    """Generation calls each layer once per token: eval reuses the norm, but never a stale one."""
    layer = make_layer().eval()
    x = torch.randn(3, 96)
    with torch.no_grad():
        y1 = layer(x)
        layer.lora_B.mul_(0.5)  # in place, as an optimizer or load_state_dict would
        want = reference_forward(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B,
                                 layer.lora_magnitude, layer.scaling)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(y1, want)


def test_dora_on_unsupported_layer_is_a_clear_error():
    with pytest.raises(LitftError, match="DoRA needs a Linear layer.*Embedding"):
        DoRALinear(nn.Embedding(10, 8), r=2, alpha=4)
    with pytest.raises(LitftError, match="Conv1d"):
        DoRALinear(nn.Conv1d(4, 4, 1), r=2, alpha=4)


def test_magnitude_is_an_adapter_parameter():
    model = nn.Sequential()
    model.q_proj = nn.Linear(8, 8)
    inject_adapters(model, ["q"], lambda n, lin: DoRALinear(lin, r=2, alpha=4))
    assert set(adapter_state_dict(model)) == {"q_proj.lora_A", "q_proj.lora_B", "q_proj.lora_magnitude"}


def test_matches_peft_dora_on_litft_model(tmp_path):
    """litft's GPT + DoRALinear vs transformers + peft `use_dora=True`: same base (converted), same A, B
    and magnitude: same logits and the same gradients for A, B and m."""
    from peft import LoraConfig, get_peft_model

    from litft.convert import convert_to_litft
    from tests.helpers import hf_module_of
    from tests.test_model import make_hf_model

    hf = make_hf_model("llama3", tmp_path / "hf")
    convert_to_litft(tmp_path / "hf", tmp_path / "lit")
    model = load_model(tmp_path / "lit").eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                               use_dora=True)).eval()
    names = inject_adapters(model, targets, lambda name, lin: DoRALinear(lin, r=4, alpha=8))
    peft_modules = dict(peft_model.named_modules())
    pairs = []
    torch.manual_seed(0)
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            layer.lora_B.normal_(0, 0.1)
            layer.lora_magnitude.mul_(1 + 0.2 * torch.randn_like(layer.lora_magnitude))
            p = peft_modules["base_model.model." + hf_module_of(model.config, name)]
            theirs = (p.lora_A["default"].weight, p.lora_B["default"].weight, p.lora_magnitude_vector["default"].weight)
            for mine, t in zip((layer.lora_A, layer.lora_B, layer.lora_magnitude), theirs):
                t.copy_(mine)
            pairs.append(((layer.lora_A, layer.lora_B, layer.lora_magnitude), theirs))
    for mine, theirs in pairs:
        for p in (*mine, *theirs):
            p.requires_grad_(True)
    x = torch.randint(0, 160, (2, 12))
    ours, theirs = model(x), peft_model(x).logits
    assert (ours - theirs).abs().max() <= 1e-5
    with torch.no_grad():
        assert (ours - load_model(tmp_path / "lit")(x)).abs().max() > 1e-3  # the adapters really act
    w = torch.randn_like(ours)
    (ours * w).sum().backward()
    (theirs * w).sum().backward()
    for mine, theirs_ in pairs:
        for a, b in zip(mine, theirs_):  # fp32 sums in another order: within 1e-5 of the gradient's scale
            assert (a.grad - b.grad).abs().max() <= 1e-5 * b.grad.abs().max()


def finetune_args(method: str, ckpt: Path, task: Path, out: Path, steps: int = 6) -> list[str]:
    return ["finetune", method, "--checkpoint_dir", str(ckpt), "--data", "JSON", "--data.json_path", str(task),
            "--data.prompt_style", "plain", "--out_dir", str(out), "--train.max_steps", str(steps),
            "--train.global_batch_size", "8", "--train.micro_batch_size", "4", "--lr", "1e-2", "--warmup_steps", "0",
            "--eval.interval", "0", "--eval.max_new_tokens", "4", "--logger_name", "none", "--dropout", "0.0"]


def test_dora_run_saves_reloads_and_merges(ckpt, task, tmp_path):
    metrics = run(finetune_args("dora", ckpt, task, tmp_path / "out", steps=15) + ["--eval.initial_validation", "true",
                                                                                  "--targets", "[all-linear, lm_head]"])
    assert metrics["val_loss"] < 0.8 * metrics["val_loss_before"]
    final = tmp_path / "out" / "final"
    method = load_method(final)
    assert any(k.endswith("lora_magnitude") for k in method.trainable_state_dict())
    x = torch.randint(0, 320, (2, 10))
    with torch.no_grad():
        unmerged = method.model.eval()(x)
    run(["merge_lora", str(final), "--out_dir", str(tmp_path / "merged")])
    merged = load_model(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(x) - unmerged).abs().max() <= 1e-4
        assert (merged(x) - load_model(ckpt)(x)).abs().max() > 1e-2


def test_composed_run_dora_qlora_loraplus_neftune_8bit_optimizer(ckpt, task, tmp_path):
    pytest.importorskip("bitsandbytes")
    metrics = run(finetune_args("dora", ckpt, task, tmp_path / "out", steps=15) + [
        "--quantize", "bnb.nf4-dq", "--loraplus_lr_ratio", "16", "--neftune_alpha", "5",
        "--optimizer", "bnb.AdamW8bit", "--eval.initial_validation", "true"])
    assert metrics["val_loss"] < 0.8 * metrics["val_loss_before"]
    method = load_method(tmp_path / "out" / "final")
    assert (method.quantize, method.loraplus_lr_ratio, method.neftune_alpha) == ("bnb.nf4-dq", 16.0, 5.0)
    assert type(method.model.blocks[0].attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert not method.model.embed._forward_hooks  # NEFTune left nothing behind
    # merged into the dequantized weights it trained against: the same model, without adapters
    x = torch.randint(0, 320, (2, 10))
    with torch.no_grad():
        unmerged = method.model.eval()(x)
    run(["merge_lora", str(tmp_path / "out" / "final"), "--merge_into", "dequantized", "--out_dir",
         str(tmp_path / "merged")])
    with torch.no_grad():
        assert (load_model(tmp_path / "merged").eval()(x) - unmerged).abs().max() <= 1e-4
