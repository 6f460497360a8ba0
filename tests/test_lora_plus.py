"""LoRA+ (litft.methods.lora_plus): the optimizer groups, one step computed by hand, a bitsandbytes
optimizer, the options on the composed methods, and bad ratios."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from litft.adapters.lora import LoRALinear
from litft.cli import run
from litft.methods.dora import DoRA
from litft.methods.lora_plus import LoRAPlus
from litft.methods.neft import NEFT
from litft.utils import LitftError


def groups_by_name(optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in optimizer.param_groups}


def test_groups_hold_exactly_the_B_matrices_at_ratio_x_lr(ckpt):
    method = LoRAPlus(checkpoint_dir=ckpt, lr=1e-3, loraplus_lr_ratio=8, weight_decay=0.1, warmup_steps=0)
    method.configure_model()
    groups = groups_by_name(method.configure_optimizers()[0])
    named = dict(method.model.named_parameters())
    ids = lambda names: {id(named[n]) for n in names}  # noqa: E731
    B = [n for n in named if n.endswith("lora_B")]
    A = [n for n in named if n.endswith("lora_A")]
    assert len(B) == 14 and len(A) == 14  # 2 layers x 7 projections
    assert {id(p) for p in groups["B"]["params"]} == ids(B)
    assert {id(p) for p in groups["A"]["params"]} == ids(A)
    assert set(groups) == {"A", "B"}  # nothing else trains in plain LoRA
    assert groups["B"]["lr"] == pytest.approx(8e-3) and groups["A"]["lr"] == pytest.approx(1e-3)
    assert groups["B"]["weight_decay"] == groups["A"]["weight_decay"] == 0.1


def test_dora_magnitudes_and_biases_stay_at_base_lr(ckpt):
    method = DoRA(checkpoint_dir=ckpt, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1, warmup_steps=0, bias="all")
    method.configure_model()
    groups = groups_by_name(method.configure_optimizers()[0])
    names = {id(p): n for n, p in method.model.named_parameters()}
    assert all(names[id(p)].endswith("lora_B") for p in groups["B"]["params"])
    slow = [names[id(p)] for p in groups["other_no_decay"]["params"]]
    assert any(n.endswith("lora_magnitude") for n in slow) and all(p.ndim == 1 for p in groups["other_no_decay"]["params"])
    assert groups["other_no_decay"]["lr"] == pytest.approx(1e-3) and groups["other_no_decay"]["weight_decay"] == 0.0


def test_ratio_off_gives_the_base_groups(ckpt):
    method = DoRA(checkpoint_dir=ckpt, lr=1e-3, warmup_steps=0)
    method.configure_model()
    assert [g["lr"] for g in method.configure_optimizers()[0].param_groups] == [1e-3, 1e-3]


class OneLayer(nn.Module):
    """y = W x + s B A x with numbers small enough to differentiate by hand: in 3, out 2, r 1, s 1."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = LoRALinear(nn.Linear(3, 2, bias=False).requires_grad_(False), r=1, alpha=1.0)
        with torch.no_grad():
            self.q_proj.base_layer.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]))
            self.q_proj.lora_A.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
            self.q_proj.lora_B.copy_(torch.tensor([[0.5], [-1.0]]))


def one_step(ckpt: Path, optimizer: str, **kw) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    method = LoRAPlus(checkpoint_dir=ckpt, optimizer=optimizer, lr=0.1, loraplus_lr_ratio=4, warmup_steps=0, **kw)
    method.model = OneLayer()
    opt, _ = method.configure_optimizers()
    layer = method.model.q_proj
    A0, B0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    # loss = sum(y) for x = (1, 1, 2):  A x = 1 - 2 + 1 = 0... use x = (2, 1, 2): A x = 2 - 2 + 1 = 1
    layer(torch.tensor([[2.0, 1.0, 2.0]])).sum().backward()
    # by hand: dL/dB_i = s * (A x) = 1 for both rows; dL/dA = s * (B_1 + B_2) * x = -0.5 * (2, 1, 2)
    torch.testing.assert_close(layer.lora_B.grad, torch.tensor([[1.0], [1.0]]))
    torch.testing.assert_close(layer.lora_A.grad, torch.tensor([[-1.0, -0.5, -1.0]]))
    opt.step()
    return layer, A0, B0


def test_sgd_step_by_hand(ckpt):
    layer, A0, B0 = one_step(ckpt, "SGD")
    torch.testing.assert_close(layer.lora_B.detach(), B0 - 0.4 * torch.tensor([[1.0], [1.0]]))  # lr x ratio = 0.4
    torch.testing.assert_close(layer.lora_A.detach(), A0 - 0.1 * torch.tensor([[-1.0, -0.5, -1.0]]))


def test_adamw_first_step_by_hand(ckpt):
    """Adam's first step is lr * g / (|g| + eps) (bias-corrected moments m = g, v = g^2), after the
    decoupled decay p * (1 - lr * wd): B moves lr x ratio = 0.4 per element, A moves 0.1."""
    layer, A0, B0 = one_step(ckpt, "AdamW", weight_decay=0.5)
    torch.testing.assert_close(layer.lora_B.detach(), B0 * (1 - 0.4 * 0.5) - 0.4 * torch.ones(2, 1))
    torch.testing.assert_close(layer.lora_A.detach(), A0 * (1 - 0.1 * 0.5) + 0.1 * torch.ones(1, 3))


def test_bitsandbytes_8bit_optimizer_keeps_the_groups(ckpt):
    pytest.importorskip("bitsandbytes")
    layer, A0, B0 = one_step(ckpt, "bnb.AdamW8bit")  # tiny tensors: bnb keeps their state in 32 bit
    torch.testing.assert_close((layer.lora_B.detach() - B0).abs(), torch.full((2, 1), 0.4), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close((layer.lora_A.detach() - A0).abs(), torch.full((1, 3), 0.1), rtol=1e-4, atol=1e-6)


class EmbeddingAdapter(nn.Module):
    """A stand-in adapter on an embedding (litft injects Linear adapters only), to check its group."""

    def __init__(self) -> None:
        super().__init__()
        self.base_layer = nn.Embedding(10, 4).requires_grad_(False)
        self.lora_A = nn.Parameter(torch.zeros(2, 10))
        self.lora_B = nn.Parameter(torch.zeros(4, 2))

    def merge(self) -> None: ...

    def unmerge(self) -> None: ...


def test_adapter_embeddings_get_their_own_lr(ckpt):
    method = LoRAPlus(checkpoint_dir=ckpt, lr=0.1, loraplus_lr_embedding=1e-5, warmup_steps=0)
    method.model = nn.ModuleDict({"embed": EmbeddingAdapter(), "layer": OneLayer()})
    groups = groups_by_name(method.configure_optimizers()[0])
    assert {id(p) for p in groups["embedding"]["params"]} == {id(method.model.embed.lora_A),
                                                              id(method.model.embed.lora_B)}
    assert groups["embedding"]["lr"] == 1e-5 and groups["B"]["params"] == [method.model.layer.q_proj.lora_B]


@pytest.mark.parametrize("cls", [LoRAPlus, DoRA, NEFT])
@pytest.mark.parametrize("ratio", [-1.0, 0.0])
def test_bad_ratio_is_a_clear_error(ckpt, cls, ratio):
    with pytest.raises(LitftError, match="loraplus_lr_ratio must be > 0"):
        cls(checkpoint_dir=ckpt, loraplus_lr_ratio=ratio)


def test_bad_ratio_on_the_command_line(ckpt, tmp_path):
    with pytest.raises(LitftError, match="loraplus_lr_ratio must be > 0"):
        run(["finetune", "lora_plus", "--checkpoint_dir", str(ckpt), "--data", "JSON", "--data.json_path",
             str(tmp_path / "x.json"), "--loraplus_lr_ratio", "-2"])
