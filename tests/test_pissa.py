"""PiSSA (litft.adapters.pissa, litft.methods.pissa) against peft's init_lora_weights="pissa" on the same transformers
model: the same A, B (up to each singular pair's sign) and residual; the exported rank-2r LoRA applied by peft to the
ORIGINAL base gives litft's PiSSA logits; merge_lora, generate --adapter_dir, reload, QPiSSA, and what is refused."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file

from litft.adapters.inject import adapter_modules
from litft.adapters.pissa import PiSSALinear, pissa_decompose
from litft.checkpoint import load_model
from litft.cli import main, run
from litft.convert import convert_from_litft, convert_to_litft
from litft.methods.lora import LoRA
from litft.methods.pissa import PiSSA
from litft.methods.run_dir import load_method
from litft.utils import LitftError
from tests.helpers import hf_module_of, make_checkpoint
from tests.test_model import V, hf_load, make_hf_model

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q", "v", "down"]
HF_TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama3")
    make_hf_model("llama3", d / "hf")
    convert_to_litft(d / "hf", d / "lit")
    convert_from_litft(d / "lit", d / "hf_back")
    return d / "lit", hf_load(d / "hf_back")


def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))


def trained_pissa(ckpt, out=None, **kw) -> PiSSA:
    """A PiSSA method whose adapters moved away from their start (a "trained" run)."""
    method = PiSSA(checkpoint_dir=ckpt, **{"r": 4, "alpha": 8, "targets": TARGETS, **kw})
    method.configure_model()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, m in adapter_modules(method.model):
            m.lora_A.add_(torch.randn(m.lora_A.shape, generator=g) * 0.1)
            m.lora_B.add_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    if out is not None:
        method.save_final(out)
    return method.eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_init_matches_peft_pissa(base, use_rslora):
    ckpt, hf = base
    method = PiSSA(checkpoint_dir=ckpt, r=4, alpha=8, targets=TARGETS, use_rslora=use_rslora)
    method.configure_model()
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=HF_TARGETS, init_lora_weights="pissa", use_rslora=use_rslora))
    for name, m in adapter_modules(method.model):
        layer = theirs.get_submodule("base_model.model." + hf_module_of(method.model.config, name))
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        # each singular pair (row i of A, column i of B) is fixed up to a common sign flip
        sign = torch.sign((m.lora_A * A).sum(1))
        assert torch.all(sign != 0)
        torch.testing.assert_close(m.lora_A, sign[:, None] * A, rtol=0, atol=1e-5)
        torch.testing.assert_close(m.lora_B, B * sign[None, :], rtol=0, atol=1e-5)
        torch.testing.assert_close(m.base_layer.weight, layer.base_layer.weight, rtol=0, atol=1e-5)  # residual
        assert torch.equal(m.lora_A0, m.lora_A) and torch.equal(m.lora_B0, m.lora_B)
    x = ids()
    with torch.no_grad():  # a fresh PiSSA model computes the base model
        torch.testing.assert_close(method.model(x), hf(x).logits, rtol=0, atol=1e-4)


def test_decompose_is_the_top_r_truncation_and_niter_approximates_it():
    torch.manual_seed(0)
    W = torch.randn(40, 30) @ torch.diag(torch.logspace(1, -2, 30)) @ torch.linalg.qr(torch.randn(30, 30))[0]
    A, B = pissa_decompose(W, 5, scaling=0.5)
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(0.5 * B @ A, U[:, :5] @ torch.diag(S[:5]) @ Vh[:5], rtol=0, atol=1e-5)
    # randomized (peft's pissa_niter_N: q = r, no oversampling): exact on a rank-5 weight, close on this one
    low = U[:, :5] @ torch.diag(S[:5]) @ Vh[:5]
    Ar, Br = pissa_decompose(low, 5, scaling=0.5, niter=2)
    torch.testing.assert_close(0.5 * Br @ Ar, low, rtol=0, atol=1e-4)
    Ar, Br = pissa_decompose(W, 5, scaling=0.5, niter=4)
    assert (Br @ Ar - B @ A).norm() / (B @ A).norm() < 0.05


def test_exported_rank_2r_lora_on_the_original_base_gives_pissa_logits(base, tmp_path):
    ckpt, hf = base
    method = trained_pissa(ckpt, tmp_path / "final")
    run(["export_peft", str(tmp_path / "final"), str(tmp_path / "peft")])
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "peft").eval()  # hf: the ORIGINAL W
    stored = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert all(v.shape[0] == 8 for k, v in stored.items() if "lora_A" in k)  # rank 2r
    x = ids()
    with torch.no_grad():
        ours, peft_logits = method.model(x), theirs(x).logits
    assert (peft_logits - hf(x).logits).abs().max() > 1e-2
    assert (ours - peft_logits).abs().max() <= 1e-5


def test_merge_lora_generate_and_reload(ckpt, tmp_path):
    method = trained_pissa(ckpt, tmp_path / "final", r=8, alpha=16, targets=["all-linear"])
    x = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = method.model(x)
        back = load_method(tmp_path / "final").eval()  # residual rebuilt from the original base and A0, B0
        assert type(back) is PiSSA and (back.model(x) - expected).abs().max() <= 1e-6
        run(["merge_lora", str(tmp_path / "final")])  # W_res + sBA = W + s(BA - B0A0)
        assert (load_model(tmp_path / "final" / "merged")(x) - expected).abs().max() <= 1e-5
    gen = ["--prompt", "Repeat the letter", "--max_new_tokens", "6", "--temperature", "0"]
    assert run(["generate", str(ckpt), "--adapter_dir", str(tmp_path / "final"), *gen]) == run(
        ["generate", str(tmp_path / "final" / "merged"), *gen])


def test_reload_rebuilds_the_residual_from_the_saved_start(ckpt, tmp_path):
    """The saved A0, B0 -- not a new SVD, which on another machine may differ in sign or rounding -- define the
    residual base of a reloaded run."""
    trained_pissa(ckpt, tmp_path / "final", targets=["q"])
    path = tmp_path / "final" / "adapter.safetensors"
    t = load_file(str(path))
    name = "blocks.0.attn.q_proj"
    t[f"{name}.lora_A0"] = t[f"{name}.lora_A0"] * 1.5  # a start this machine's SVD does not give
    save_file(t, str(path))
    back = load_method(tmp_path / "final").eval()
    layer = back.model.get_submodule(name)
    W = load_model(ckpt).get_submodule(name).weight
    want = W - layer.scaling * t[f"{name}.lora_B0"] @ t[f"{name}.lora_A0"]
    torch.testing.assert_close(layer.base_layer.weight, want, rtol=0, atol=1e-6)
    assert torch.equal(layer.lora_A0, t[f"{name}.lora_A0"]) and torch.equal(layer.lora_A, t[f"{name}.lora_A"])


def test_qpissa_decomposes_in_full_precision_then_quantizes_the_residual(ckpt):
    pytest.importorskip("bitsandbytes")
    from litft.adapters.quantize import dequantize_weight, quantized_linear

    full = PiSSA(checkpoint_dir=ckpt, r=4, alpha=8, targets=["q", "down"])
    full.configure_model()
    q = PiSSA(checkpoint_dir=ckpt, r=4, alpha=8, targets=["q", "down"], quantize="bnb.nf4")
    q.configure_model()
    for (name, m), (_, mq) in zip(adapter_modules(full.model), adapter_modules(q.model)):
        assert isinstance(mq, PiSSALinear) and type(mq.base_layer.weight).__name__ == "Params4bit"
        assert torch.equal(m.lora_A, mq.lora_A) and torch.equal(m.lora_B, mq.lora_B)  # the same full-precision SVD
        residual = m.base_layer.weight  # W - sB0A0 in full precision; the 4-bit base is exactly its quantization
        want = dequantize_weight(quantized_linear(nn.Linear(*residual.shape[::-1]), "bnb.nf4", "cpu", residual))
        assert torch.equal(dequantize_weight(mq.base_layer), want)
        original = residual + m.scaling * m.lora_B0 @ m.lora_A0
        not_this = dequantize_weight(quantized_linear(nn.Linear(*residual.shape[::-1]), "bnb.nf4", "cpu", original))
        assert not torch.allclose(dequantize_weight(mq.base_layer) + m.scaling * m.lora_B0 @ m.lora_A0, not_this)
    x = torch.randint(0, 320, (1, 8))
    q.model(x).sum().backward()
    assert all(m.lora_B.grad is not None for _, m in adapter_modules(q.model))
    # merge_lora's default (into="original"): the full-precision residual + the trained adapter
    with torch.no_grad():
        for (_, m), (_, mq) in zip(adapter_modules(full.model), adapter_modules(q.model)):
            mq.lora_B.add_(0.1)
            m.lora_B.copy_(mq.lora_B)
        want = full.model(x)
    assert (q.merged_model("original")(x) - want).abs().max() <= 1e-5


def test_init_adapter_continues_a_pissa_run_only(ckpt, tmp_path):
    trained_pissa(ckpt, tmp_path / "pissa", targets=["q", "v"])
    lora = LoRA(checkpoint_dir=ckpt, r=4, alpha=8, targets=["q", "v"])
    lora.configure_model()
    lora.save_final(tmp_path / "lora")
    with pytest.raises(LitftError, match="is not a PiSSA run"):
        PiSSA(checkpoint_dir=ckpt, r=4, alpha=8, targets=["q", "v"], init_adapter=tmp_path / "lora")
    start = PiSSA(checkpoint_dir=ckpt, r=4, alpha=8, targets=["q", "v"], init_adapter=tmp_path / "pissa")
    start.configure_model()
    want = load_file(str(tmp_path / "pissa" / "adapter.safetensors"))
    assert all(torch.equal(v, want[k]) for k, v in start.trainable_state_dict().items())


@pytest.mark.parametrize("case", ["tied_head", "rank", "niter"])
def test_bad_options_fail_before_any_model_loads(ckpt, case, monkeypatch):
    import litft.methods.base

    monkeypatch.setattr(litft.methods.base, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    kw, expect = {"tied_head": (dict(targets=["q", "lm_head"]), "tied to the token embedding"),
                  "rank": (dict(r=40, targets=["k"]), "exceeds min\\(out, in\\) of k_proj \\(32, 64\\)"),
                  "niter": (dict(pissa_niter=-1), "pissa_niter must be")}[case]
    with pytest.raises(LitftError, match=expect):
        PiSSA(checkpoint_dir=make_tied(ckpt) if case == "tied_head" else ckpt, **kw)


def make_tied(ckpt):
    """The tiny checkpoint's twin whose head is its embedding."""
    return make_checkpoint(ckpt.parent / "tied", tie_embeddings=True)


def test_dora_is_no_option_of_pissa(ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "pissa", "--checkpoint_dir", str(ckpt), "--use_dora", "true", "--data", "JSON",
              "--data.json_path", "x.json"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "use_dora" in err


def test_ddp_two_processes_matches_one(ckpt, task, tmp_path):
    """Every rank decomposes the same weights: two DDP processes train the adapter one process does."""
    from tests.test_train import common_args, ddp_matches_one_process

    a = ddp_matches_one_process(lambda out: [*common_args(ckpt, task, out, method="pissa"), "--r", "4", "--lr", "5e-4"],
                                tmp_path)
    assert any(k.endswith("lora_A0") for k in a)
    assert any(not torch.equal(a[k], a[k + "0"]) for k in a if k.endswith(("lora_A", "lora_B")))  # it trained
