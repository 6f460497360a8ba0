"""VeRA (litft.adapters.vera, litft.methods.vera) against peft's VeraConfig on the same transformers model: the same
projections from the same seed, logits and gradients of lambda_d / lambda_b; export_peft loads in peft with the same
logits; merge_lora and generate --adapter_dir; the shared projections; what is refused, and how."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file

from litft.adapters.inject import adapter_modules
from litft.adapters.multi import AdapterModel
from litft.adapters.peft_format import export_peft
from litft.adapters.vera import VeRALinear, vera_projections
from litft.checkpoint import load_model
from litft.cli import main, run
from litft.convert import convert_from_litft, convert_to_litft
from litft.methods.lora import LoRA
from litft.methods.run_dir import load_method
from litft.methods.vera import VeRA
from litft.utils import LitftError
from tests.helpers import hf_module_of
from tests.test_model import V, hf_load, make_hf_model

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q", "v", "down", "lm_head"]  # different shapes: q (64, 64), v (32, 64), down (64, 96), lm_head (160, 64)
HF_TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    cache = {}

    def get(family: str):
        if family not in cache:
            d = tmp_path_factory.mktemp(family)
            make_hf_model(family, d / "hf")
            convert_to_litft(d / "hf", d / "lit")
            convert_from_litft(d / "lit", d / "hf_back")
            cache[family] = (d / "lit", hf_load(d / "hf_back"))
        return cache[family]

    return get


def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))


def trained_vera(ckpt, out=None, seed: int = 1, **kw) -> VeRA:
    """A VeRA method with random ("trained") lambdas: lambda_b = 0 at init would hide any bug in the update."""
    method = VeRA(checkpoint_dir=ckpt, **{"r": 8, "targets": TARGETS, "projection_seed": 3, **kw})
    method.configure_model()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in adapter_modules(method.model):
            m.vera_lambda_b.copy_(torch.randn(m.vera_lambda_b.shape, generator=g) * 0.5)
            m.vera_lambda_d.copy_(torch.randn(m.vera_lambda_d.shape, generator=g))
    if out is not None:
        method.save_final(out)
    return method.eval()


def test_init_and_projections_are_peft_s(bases):
    ckpt, hf = bases("llama3")
    method = VeRA(checkpoint_dir=ckpt, r=8, targets=TARGETS, projection_seed=3)
    method.configure_model()
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.VeraConfig(r=8, target_modules=HF_TARGETS,
                                                                   projection_prng_key=3))
    # peft sizes the pair for the largest adapted layer and draws it from the seed: the same numbers here
    assert torch.equal(method.projections.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(method.projections.vera_B, theirs.base_model.vera_B["default"])
    layers = adapter_modules(method.model)
    assert len(layers) == 2 * 3 + 1 and all(m.projections is method.projections for _, m in layers)  # one shared pair
    for _, m in layers:
        assert torch.all(m.vera_lambda_d == 0.1) and torch.all(m.vera_lambda_b == 0)
    x = ids()
    with torch.no_grad():  # a fresh adapter computes the base model
        torch.testing.assert_close(method.model(x), hf(x).logits, rtol=0, atol=1e-5)
    # only the lambdas train; the projections are in no state dict (regenerated from the seed)
    trainable = {n for n, p in method.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("vera_lambda_d", "vera_lambda_b")) for n in trainable)
    assert not any("vera_A" in k or "vera_B" in k for k in method.model.state_dict())
    assert sum(method.model.get_parameter(n).numel() for n in trainable) == 7 * 8 + 2 * (64 + 32 + 64) + 160


def test_logits_and_lambda_gradients_match_peft(bases):
    ckpt, hf = bases("llama3")
    method = trained_vera(ckpt)
    method.train()
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.VeraConfig(r=8, target_modules=HF_TARGETS,
                                                                   projection_prng_key=3))
    ours_params = {n: m for n, m in adapter_modules(method.model)}
    with torch.no_grad():  # the same lambdas in both
        for name, m in ours_params.items():
            layer = theirs.get_submodule("base_model.model." + hf_module_of(method.model.config, name))
            layer.vera_lambda_d["default"].copy_(m.vera_lambda_d)
            layer.vera_lambda_b["default"].copy_(m.vera_lambda_b)
    x = ids()
    ours, peft_logits = method.model(x), theirs(x).logits
    assert (peft_logits - hf(x).logits).abs().max() > 1e-2  # the adapter really acts
    assert (ours - peft_logits).abs().max() <= 1e-5
    labels = torch.randint(0, V, x.shape, generator=torch.Generator().manual_seed(2)).flatten()
    F.cross_entropy(ours.flatten(0, 1), labels).backward()  # the training loss (mean over tokens)
    F.cross_entropy(peft_logits.flatten(0, 1), labels).backward()
    for name, m in ours_params.items():
        layer = theirs.get_submodule("base_model.model." + hf_module_of(method.model.config, name))
        for leaf in ("vera_lambda_d", "vera_lambda_b"):
            mine, want = getattr(m, leaf).grad, getattr(layer, leaf)["default"].grad
            assert want.abs().max() > 0 and (mine - want).abs().max() <= 1e-5, (name, leaf)


def test_export_peft_loads_in_peft_with_the_same_logits(bases, tmp_path):
    ckpt, hf = bases("llama3")
    method = trained_vera(ckpt, tmp_path / "final")
    assert run(["export_peft", str(tmp_path / "final"), str(tmp_path / "peft")]) == tmp_path / "peft"
    stored = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "peft").eval()
    assert isinstance(theirs.peft_config["default"], peft.VeraConfig)
    loaded = {k.replace(".default", ""): v for k, v in theirs.state_dict().items() if "vera_lambda" in k}
    assert {k for k in stored if "vera_lambda" in k} == loaded.keys()  # every lambda read, none missing
    x = ids()
    with torch.no_grad():
        assert (method.model(x) - theirs(x).logits).abs().max() <= 1e-5
    # peft regenerating the projections itself from the seed (save_projection off) agrees too
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "noproj").mkdir()
    (tmp_path / "noproj" / "adapter_config.json").write_text(json.dumps({**cfg, "save_projection": False}))
    save_file({k: v for k, v in stored.items() if "vera_lambda" in k},
              str(tmp_path / "noproj" / "adapter_model.safetensors"))
    regenerated = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "noproj").eval()
    with torch.no_grad():
        assert (method.model(x) - regenerated(x).logits).abs().max() <= 1e-5


def test_merge_lora_generate_and_reload(ckpt, tmp_path):
    method = trained_vera(ckpt, tmp_path / "final", targets=["all-linear"], r=16)
    x = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = method.model(x)
        back = load_method(tmp_path / "final").eval()  # the lambdas + the regenerated, fingerprint-checked pair
        assert type(back) is VeRA and torch.equal(back.model(x), expected)
        run(["merge_lora", str(tmp_path / "final")])
        assert (load_model(tmp_path / "final" / "merged")(x) - expected).abs().max() <= 1e-5
    gen = ["--prompt", "Repeat the letter", "--max_new_tokens", "6", "--temperature", "0"]
    assert run(["generate", str(ckpt), "--adapter_dir", str(tmp_path / "final"), *gen]) == run(
        ["generate", str(tmp_path / "final" / "merged"), *gen])
    layer = adapter_modules(method.model)[0][1]  # merge / unmerge round trip on one layer
    before = layer.base_layer.weight.clone()
    layer.merge()
    assert not torch.equal(layer.base_layer.weight, before)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=0, atol=1e-6)


def test_other_projections_are_refused(ckpt, tmp_path):
    """The projections are regenerated, not stored: a run whose fingerprint does not match them is an error."""
    trained_vera(ckpt, tmp_path / "final", targets=["q", "v"])
    path = tmp_path / "final" / "adapter.safetensors"
    tensors = load_file(str(path))
    tensors["vera_projections.fingerprint"] = tensors["vera_projections.fingerprint"] * 1.001
    save_file(tensors, str(path))
    with pytest.raises(LitftError, match="projections regenerated from projection_seed 3 are not the ones"):
        load_method(tmp_path / "final")
    with pytest.raises(LitftError, match="not the ones this run trained with"):
        export_peft(tmp_path / "final", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    A, B = vera_projections(4, 10, 12, seed=3)  # and the pair depends on the seed
    assert not torch.equal(A, vera_projections(4, 10, 12, seed=4)[0])


def test_fused_hf_module_and_lora_readers_refuse_vera(bases, tmp_path):
    ckpt, _ = bases("phi3")  # q, k, v are one qkv_proj in HF: peft would share one lambda_d over them
    trained_vera(ckpt, tmp_path / "final", targets=["q", "o"])
    with pytest.raises(LitftError, match="fused HF module model.layers.0.self_attn.qkv_proj"):
        export_peft(tmp_path / "final", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    trained_vera(ckpt, tmp_path / "o_only", targets=["o", "down"])  # unfused targets export fine
    export_peft(tmp_path / "o_only", tmp_path / "peft_o")
    model = AdapterModel(load_model(ckpt))
    with pytest.raises(LitftError, match="a VeRA run is not a LoRA adapter"):
        model.load_adapter(tmp_path / "o_only", "v")


@pytest.mark.parametrize("option", ["--alpha", "--use_rslora", "--loraplus_lr_ratio"])
def test_lora_only_options_are_refused_in_one_line(ckpt, option, capsys):
    """VeRA has no scaling and no A / B that train: alpha, rsLoRA and LoRA+ are no options of it."""
    with pytest.raises(SystemExit) as e:
        main(["finetune", "vera", "--checkpoint_dir", str(ckpt), option, "2", "--data", "JSON",
              "--data.json_path", "x.json", "--out_dir", "nowhere"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and option.lstrip("-") in err


def test_init_adapter_must_be_a_fitting_vera_run(ckpt, tmp_path):
    trained_vera(ckpt, tmp_path / "vera", targets=["q", "v"])
    lora = LoRA(checkpoint_dir=ckpt, r=8, targets=["q", "v"])
    lora.configure_model()
    lora.save_final(tmp_path / "lora")
    with pytest.raises(LitftError, match="is not a VeRA run"):
        VeRA(checkpoint_dir=ckpt, r=8, targets=["q", "v"], projection_seed=3, init_adapter=tmp_path / "lora")
    with pytest.raises(LitftError, match="projection_seed: 3 there, 0 here"):
        VeRA(checkpoint_dir=ckpt, r=8, targets=["q", "v"], init_adapter=tmp_path / "vera")
    start = VeRA(checkpoint_dir=ckpt, r=8, targets=["q", "v"], projection_seed=3, init_adapter=tmp_path / "vera")
    start.configure_model()
    want = load_file(str(tmp_path / "vera" / "adapter.safetensors"))
    assert all(torch.equal(v, want[k]) for k, v in start.trainable_state_dict().items())


def test_quantized_base(ckpt):
    pytest.importorskip("bitsandbytes")
    method = VeRA(checkpoint_dir=ckpt, r=8, targets=["all-linear"], quantize="bnb.nf4")
    method.configure_model()
    layer = adapter_modules(method.model)[0][1]
    assert isinstance(layer, VeRALinear) and type(layer.base_layer.weight).__name__ == "Params4bit"
    assert layer.vera_lambda_b.dtype == torch.float32
    x = torch.randint(0, 320, (1, 8))
    method.model(x).sum().backward()
    assert layer.vera_lambda_b.grad is not None and layer.vera_lambda_b.grad.abs().max() > 0
    full = VeRA(checkpoint_dir=ckpt, r=8, targets=["all-linear"])  # the same lambdas on the full-precision base
    full.configure_model()
    with torch.no_grad():
        for (_, m), (_, mq) in zip(adapter_modules(full.model), adapter_modules(method.model)):
            mq.vera_lambda_b.normal_(0, 0.5)
            m.vera_lambda_b.copy_(mq.vera_lambda_b)
        want = full.model(x)
        assert (method.merged_model("original")(x) - want).abs().max() <= 1e-5  # merge_lora's default


def test_ddp_two_processes_matches_one(ckpt, task, tmp_path):
    """Every rank draws the same projections from the seed: two DDP processes train the lambdas one process does."""
    from tests.test_train import common_args, ddp_matches_one_process

    a = ddp_matches_one_process(lambda out: [*common_args(ckpt, task, out, method="vera"), "--r", "16", "--lr", "2e-2"],
                                tmp_path)
    assert any(k.endswith("vera_lambda_b") and a[k].abs().max() > 0 for k in a)
