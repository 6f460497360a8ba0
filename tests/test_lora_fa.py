"""LoRA-FA (litft/adapters/lora_fa.py, litft/methods/lora_fa.py): B's gradient vs autograd of the plain formula,
what backward keeps (the r-dim projection, not x), A frozen through training, and the LoRA-FA optimizer vs peft's
`create_lorafa_optimizer`."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from litft.adapters.lora import LoRALinear
from litft.adapters.lora_fa import LoRAFALinear
from litft.cli import run
from litft.methods.lora_fa import LoRAFA, LoRAFAOptimizer
from litft.utils import LitftError
from tests.test_train import common_args, load_state_dict_file

DEMO = Path(__file__).resolve().parents[1] / "litft" / "demo" / "base"


def _layer(bias: bool, seed: int = 0, cls=LoRAFALinear, **kw) -> nn.Module:
    torch.manual_seed(seed)
    layer = cls(nn.Linear(12, 10, bias=bias), r=3, alpha=6.0, **kw)
    layer.base_layer.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    return layer


@pytest.mark.parametrize("bias", [False, True])
def test_gradients_equal_autograd_of_the_plain_formula(bias):
    layer = _layer(bias)
    if bias:
        layer.base_layer.bias.requires_grad_(True)  # bias=all trains it: its gradient must come out too
    x = torch.randn(2, 5, 12, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)

    W, A, B = layer.base_layer.weight, layer.lora_A.detach(), layer.lora_B.detach().clone().requires_grad_(True)
    b = layer.base_layer.bias.detach().clone().requires_grad_(True) if bias else None
    x2 = x.detach().clone().requires_grad_(True)
    ref = x2 @ W.T + layer.scaling * (x2 @ A.T) @ B.T + (b if bias else 0)
    ref.backward(g)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=0)
    if bias:
        torch.testing.assert_close(layer.base_layer.bias.grad, b.grad, atol=1e-6, rtol=0)
    assert layer.lora_A.grad is None and not layer.lora_A.requires_grad


def _saved_shapes(layer: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    shapes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return shapes


@pytest.mark.parametrize("bias", [False, True])
def test_backward_keeps_the_projection_not_the_input(bias):
    x = torch.randn(4, 7, 12, requires_grad=True)  # an upstream layer's output: x needs its gradient
    fa = _saved_shapes(_layer(bias), x)
    assert (28, 3) in fa  # x A^T: r numbers per token
    assert not any(s in fa for s in [(28, 12), (4, 7, 12)])  # never x itself
    assert sum(torch.Size(s).numel() for s in fa) < sum(torch.Size(s).numel() for s in [(10, 12), (3, 12), (10, 3),
                                                                                            (28, 3)]) + 1
    lora = _saved_shapes(_layer(bias, cls=LoRALinear, dropout=0.0), x)  # the same check does see LoRA keep x
    assert (28, 12) in lora


def test_quantized_base_keeps_no_input_either():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
    base.load_state_dict(nn.Linear(64, 32, bias=False).state_dict())
    layer = LoRAFALinear(base, r=4, alpha=8.0)
    x = torch.randn(3, 64, requires_grad=True)
    shapes = _saved_shapes(layer, x)
    assert (3, 4) in shapes and (3, 64) not in shapes
    layer(x).sum().backward()
    assert layer.lora_B.grad is not None and x.grad is not None


def test_dropout_and_trainable_A_are_refused():
    with pytest.raises(LitftError, match="dropout 0"):
        LoRAFALinear(nn.Linear(4, 4), r=2, alpha=4.0, dropout=0.1)
    layer = _layer(False)
    layer.lora_A.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        layer(torch.randn(2, 12))


def test_training_moves_B_and_never_A(one_thread):
    method = LoRAFA(checkpoint_dir=DEMO, r=4, alpha=8, lr=1e-2, warmup_steps=0)
    method.configure_model()
    A0 = {n: p.detach().clone() for n, p in method.model.named_parameters() if n.endswith("lora_A")}
    trainable = {n for n, p in method.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("lora_B") for n in trainable)
    optimizer, _ = method.configure_optimizers()
    ids = torch.randint(0, method.model.config.vocab_size, (2, 16))
    batch = {"input_ids": ids, "labels": ids}
    for _ in range(3):
        method.training_step(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    params = dict(method.model.named_parameters())
    assert all(torch.equal(params[n], a) for n, a in A0.items())
    assert any(params[n].abs().sum() > 0 for n in trainable)  # B left 0


@pytest.mark.parametrize("use_rslora,weight_decay", [(False, 0.0), (True, 0.1)])
def test_lorafa_optimizer_matches_peft(use_rslora, weight_decay, monkeypatch):
    """Same B after 3 steps on the same gradients as peft's create_lorafa_optimizer. peft runs its projection under
    bf16 autocast when the machine has bf16; that rounding is switched off here so both compute in fp32."""
    peft = pytest.importorskip("peft")
    import peft.optimizers.lorafa as peft_lorafa
    from tests.test_lora import _tiny_llama

    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                          use_rslora=use_rslora)
    ref = peft.get_peft_model(_tiny_llama(), cfg)
    lr = 1e-2
    ref_opt = peft.optimizers.create_lorafa_optimizer(ref, r=4, lora_alpha=8, lr=lr, weight_decay=weight_decay)

    # ours: the same A, B (copies), each B's projection from its own A
    pairs, g = [], torch.Generator().manual_seed(0)
    for _, m in ref.named_modules():
        if isinstance(getattr(m, "lora_A", None), nn.ModuleDict):
            A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
            with torch.no_grad():
                B.copy_(torch.randn(B.shape, generator=g) * 0.1)
            pairs.append((B, nn.Parameter(B.detach().clone()), A.detach().clone(), m.scaling["default"]))
    ours = LoRAFAOptimizer([{"params": [p for _, p, _, _ in pairs], "weight_decay": weight_decay}],
                           {id(p): (A, s) for _, p, A, s in pairs}, lr=lr, betas=(0.9, 0.999), eps=1e-6)
    for _ in range(3):
        for B, mine, _, _ in pairs:
            grad = torch.randn(B.shape, generator=g)
            B.grad, mine.grad = grad.clone(), grad.clone()
        ref_opt.step()
        ours.step()
    for B, mine, _, _ in pairs:
        assert not torch.equal(B, mine.new_zeros(B.shape))
        torch.testing.assert_close(mine.detach(), B.detach(), atol=1e-6, rtol=1e-6)


def test_lorafa_optimizer_trains_and_resumes(ckpt, task, tmp_path, one_thread):
    """The CLI runs with the LoRA-FA optimizer; stopping at step 3 and resuming gives the same adapter."""
    extra = ["--lorafa_optimizer", "true", "--dropout", "0"]
    run(common_args(ckpt, task, tmp_path / "a", method="lora_fa") + extra + ["--train.save_interval", "3"])
    run(common_args(ckpt, task, tmp_path / "b", method="lora_fa") + extra + ["--resume", str(tmp_path / "a" / "step-3")])
    a = load_state_dict_file(tmp_path / "a" / "final" / "adapter.safetensors")
    b = load_state_dict_file(tmp_path / "b" / "final" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a LoRA-FA run is a plain LoRA adapter (A saved with B): export_peft writes it as one
    run(["export_peft", str(tmp_path / "a" / "final"), str(tmp_path / "peft")])
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_init_adapter_loads_A_and_keeps_it_frozen(ckpt, task, tmp_path, one_thread):
    run(common_args(ckpt, task, tmp_path / "lora", steps=2) + ["--dropout", "0"])
    method = LoRAFA(checkpoint_dir=ckpt, init_adapter=tmp_path / "lora" / "final", r=8, alpha=16)
    method.configure_model()
    lora = load_state_dict_file(tmp_path / "lora" / "final" / "adapter.safetensors")
    params = dict(method.model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in lora.items())
    assert all(not p.requires_grad for n, p in params.items() if n.endswith("lora_A"))


@pytest.mark.parametrize("args,match", [
    (dict(dropout=0.05), "dropout 0"),
    (dict(lorafa_optimizer=True, optimizer="SGD"), "own AdamW variant"),
    (dict(lorafa_optimizer=True, optimizer_args={"amsgrad": True}), "only eps"),
    (dict(loraplus_lr_ratio=16.0), "freezes A"),
])
def test_unsupported_options_are_refused_before_any_model_loads(args, match, tmp_path):
    with pytest.raises(LitftError, match=match):
        LoRAFA(checkpoint_dir=DEMO, **args)


def test_cli_refuses_loraplus_before_any_model_loads():
    with pytest.raises(LitftError, match="unknown option --loraplus_lr_ratio for `litft finetune lora_fa`"):
        run(["finetune", "lora_fa", "--checkpoint_dir", str(DEMO), "--loraplus_lr_ratio", "16"])


@pytest.mark.slow
def test_ddp_two_processes_match_one(ckpt, task, tmp_path):
    """Two DDP processes (gloo) train the B one process trains on the same global batch, A frozen on both."""
    from tests.test_train import ddp_matches_one_process

    a = ddp_matches_one_process(lambda out: [*common_args(ckpt, task, out, method="lora_fa"), "--dropout", "0.0"],
                                tmp_path)
    assert any(k.endswith("lora_B") and a[k].abs().max() > 0 for k in a)
