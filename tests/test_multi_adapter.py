"""Named adapters on one model (litft.adapters.multi.AdapterModel): switching, merge / unmerge / unload,
add_weighted_adapter against peft's, bad input, and the tutorial's code. CPU, fp32, a tiny Llama."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from litft.adapters.inject import adapter_modules
from litft.adapters.multi import AdapterModel
from litft.adapters.peft_format import export_peft
from litft.checkpoint import load_model
from litft.convert import convert_from_litft
from litft.methods.run_dir import load_method
from litft.methods.dora import DoRA
from litft.methods.lora import LoRA
from litft.models.hf import hf_to_litft
from litft.utils import LitftError
from tests.helpers import make_checkpoint
from tests.test_model import hf_load
from tests.test_peft import trained_run

REPO = Path(__file__).resolve().parents[1]
RUNS = {  # name -> (class, options): different targets, ranks, scalings, one DoRA
    "a": (LoRA, dict(r=4, alpha=8, targets=["q", "v", "down"])),
    "b": (LoRA, dict(r=4, alpha=6, use_rslora=True, targets=["q", "k", "up"])),
    "c": (LoRA, dict(r=2, alpha=4, targets=["v", "o", "lm_head"])),
    "d": (DoRA, dict(r=2, alpha=4, targets=["q", "gate"])),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("multi")
    paths = {"ckpt": make_checkpoint(d / "ckpt")}
    for i, (name, (cls, kw)) in enumerate(RUNS.items()):
        trained_run(cls, paths["ckpt"], d / name, seed=i + 1, **kw)
        paths[name] = d / name
        export_peft(d / name, d / f"{name}-peft")
        paths[f"{name}-peft"] = d / f"{name}-peft"
    return paths


def ids() -> torch.Tensor:
    return torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(1))


def base_model(setup) -> torch.nn.Module:
    return load_model(setup["ckpt"]).eval()


def loaded(setup, names=("a", "b", "c", "d")) -> AdapterModel:
    am = AdapterModel(base_model(setup))
    for n in names:
        am.load_adapter(setup[n], n)
    return am


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


# ------------------------------------------------------------------ switching
def test_named_adapters_compute_like_their_own_runs(setup):
    am = AdapterModel(base_model(setup))
    am.load_adapter(setup["a"], "a")
    am.load_adapter(setup["b-peft"], "b")  # via its PEFT export: the same adapter
    am.load_adapter(setup["d"], "d")
    assert am.adapters == ["a", "b", "d"] and am.active_adapter is None
    x = ids()
    with torch.no_grad():
        base = base_model(setup)(x)
        assert torch.equal(am(x), base)  # loading activates nothing
        for name in ("a", "b", "d", "a"):
            am.set_adapter(name)
            expected = load_method(setup[name]).eval().model(x)
            assert (am(x) - base).abs().max() > 1e-2
            assert (am(x) - expected).abs().max() <= 1e-5
            # only the active adapter is in the model: its parameters and no one else's
            lora = [n for n, _ in am.model.named_parameters() if "lora_" in n]
            per_module = 3 if name == "d" else 2
            assert len(lora) == per_module * len(adapter_modules(load_method(setup[name]).model))
        am.set_adapter(None)
        assert torch.equal(am(x), base)
    am.set_adapter("a")
    wrapper_a = am.model.get_submodule("blocks.0.attn.q_proj")
    am.set_adapter("b")
    wrapper_b = am.model.get_submodule("blocks.0.attn.q_proj")
    assert wrapper_a is not wrapper_b and wrapper_a.base_layer is wrapper_b.base_layer  # one shared base layer
    assert type(am.model.get_submodule("blocks.0.attn.v_proj")) is torch.nn.Linear  # b does not adapt v

    adopted = AdapterModel(load_method(setup["a"]).eval().model)  # a model with injected adapters: "default"
    assert adopted.adapters == ["default"] and adopted.active_adapter == "default"
    with torch.no_grad():
        assert torch.equal(adopted(x), load_method(setup["a"]).eval().model(x))
        adopted.set_adapter(None)
        assert torch.equal(adopted(x), base)


def test_merge_unmerge_restore_the_base_and_unload_returns_it(setup):
    am = loaded(setup)
    x = ids()
    before = snapshot(base_model(setup))
    with torch.no_grad():
        base = am(x)
        for name in ("a", "d", "c"):
            am.set_adapter(name)
            unmerged = am(x)
            am.merge_adapter()
            assert am.merged and all(m.merged for _, m in adapter_modules(am.model))
            assert (am(x) - unmerged).abs().max() <= 1e-5
            layer = "blocks.0.attn.v_proj" if name == "c" else "blocks.0.attn.q_proj"
            assert not torch.equal(am.model.get_submodule(layer).base_layer.weight, before[f"{layer}.weight"])
            am.unmerge_adapter()
            assert (am(x) - unmerged).abs().max() <= 1e-5
        am.set_adapter("a")
        am.merge_adapter()
        plain = am.unload()  # unmerges first
        assert am.adapters == [] and not adapter_modules(plain)
        after = plain.state_dict()
        assert after.keys() == before.keys()
        for k in before:
            assert (after[k] - before[k]).abs().max() <= 1e-6, k
        assert (plain(x) - base).abs().max() <= 1e-5
        assert torch.allclose(plain(x), base_model(setup)(x), atol=1e-5, rtol=0)

        fresh = loaded(setup, ["b"])
        fresh.set_adapter("b")
        assert torch.equal(fresh.unload()(x), base)  # never merged: the untouched base, bit for bit


def test_merge_and_unload_and_delete(setup):
    am = loaded(setup)
    x = ids()
    with torch.no_grad():
        base = am(x)
        am.set_adapter("b")
        am.delete_adapter("b")  # the active one: no adapter left active
        assert am.active_adapter is None and am.adapters == ["a", "c", "d"] and torch.equal(am(x), base)
        am.delete_adapter("a")
        am.set_adapter("c")
        expected = am(x)
        merged = am.merge_and_unload()
        assert not adapter_modules(merged) and am.adapters == []
        assert (merged(x) - expected).abs().max() <= 1e-5


def test_tied_head(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", tie_embeddings=True)
    trained_run(LoRA, ckpt, tmp_path / "run", r=2, alpha=4, targets=["q", "lm_head"])
    am = AdapterModel(load_model(ckpt).eval())
    am.load_adapter(tmp_path / "run", "head")
    am.set_adapter("head")
    x = ids()
    embed = am.model.embed.weight.detach().clone()
    snap = snapshot(am.model)
    with pytest.raises(LitftError, match="tied"):  # merging in place would change the embedding too
        am.merge_adapter()
    assert same_state(am.model, snap) and not am.merged
    with torch.no_grad():
        expected = am(x)
        with pytest.warns(UserWarning, match="untying"):
            merged = am.merge_and_unload()
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)  # tied head: logits ~20 here
    assert torch.equal(merged.embed.weight, embed) and merged.lm_head.weight is not merged.embed.weight


# ------------------------------------------------------------------ add_weighted_adapter vs peft
@pytest.mark.parametrize("combination,adapters,weights,svd_rank", [
    ("linear", ["a", "b"], [0.7, -0.4], None),  # equal ranks; b is rsLoRA, a negative weight
    ("cat", ["a", "c"], [0.6, 0.9], None),  # ranks 4 + 2, different targets
    ("svd", ["a", "b", "c"], [0.5, -0.3, 0.8], None),  # rank 4 (the largest) of a rank-10 sum
    ("svd", ["a", "c"], [1.0, 1.0], 6),  # svd_rank = the sum: no truncation, the exact sum
])
def test_add_weighted_adapter_matches_peft(setup, tmp_path, combination, adapters, weights, svd_rank):
    convert_from_litft(setup["ckpt"], tmp_path / "hf")
    hf = hf_load(tmp_path / "hf")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), setup[f"{adapters[0]}-peft"], adapter_name=adapters[0])
    for name in adapters[1:]:
        pm.load_adapter(setup[f"{name}-peft"], adapter_name=name)
    pm.add_weighted_adapter(adapters, weights, "mix", combination_type=combination, svd_rank=svd_rank)
    pm.set_adapter("mix")
    theirs = dict(hf_to_litft(load_model(setup["ckpt"]).config, pm.merge_and_unload().state_dict().items()))

    am = loaded(setup, adapters)
    am.add_weighted_adapter(adapters, weights, "mix", combination_type=combination, svd_rank=svd_rank)
    am.set_adapter("mix")
    x = ids()
    with torch.no_grad():
        mixed = am(x)
    ours = am.merge_and_unload().state_dict()
    base = load_model(setup["ckpt"]).state_dict()
    assert theirs.keys() == ours.keys()
    changed = [k for k in ours if not torch.equal(ours[k], base[k])]
    assert len(changed) >= 2 * 3  # every module some adapter adapts, in both layers
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0, msg=k)
    if svd_rank == 6:  # untruncated: the weighted sum of the adapters' updates
        exact = AdapterModel(base_model(setup))
        exact.load_adapter(setup["a"], "a")
        exact.load_adapter(setup["c"], "c")
        exact.add_weighted_adapter(["a", "c"], weights, "cat", combination_type="cat")
        exact.set_adapter("cat")
        with torch.no_grad():
            assert (exact(x) - mixed).abs().max() <= 1e-5


# ------------------------------------------------------------------ bad input
def test_bad_input_is_clear_and_leaves_everything_unchanged(setup, tmp_path):
    am = loaded(setup, ["a", "c", "d"])
    am.set_adapter("a")
    x = ids()
    with torch.no_grad():
        logits = am(x)
    snap = snapshot(am.model)

    other = make_checkpoint(tmp_path / "other", n_embd=32)  # a narrower llama
    trained_run(LoRA, other, tmp_path / "other_run", r=2, alpha=4, targets=["q"])
    missing = tmp_path / "missing_weights"
    trained_run(LoRA, setup["ckpt"], missing, r=2, alpha=4, targets=["q"])
    (missing / "adapter.safetensors").unlink()
    cases = [
        (lambda: am.load_adapter(tmp_path / "other_run", "x"),
         r"q_proj is \(64, 64\).*lora_A \(2, 32\).*another base model"),
        (lambda: am.load_adapter(tmp_path, "x"), "neither a litft adapter run"),
        (lambda: am.load_adapter(missing, "x"), "adapter.safetensors is missing"),
        (lambda: am.load_adapter(setup["a"], "c"), "named 'c' exists already"),
        (lambda: am.set_adapter("nope"), r"unknown adapter 'nope'; this model has \['a', 'c', 'd'\]"),
        (lambda: am.delete_adapter("nope"), "unknown adapter 'nope'"),
        (lambda: am.add_weighted_adapter(["a", "nope"], [1, 1], "m"), "unknown adapter 'nope'"),
        (lambda: am.add_weighted_adapter(["a", "c"], [1, 1], "m", combination_type="linear"), "equal rank"),
        (lambda: am.add_weighted_adapter(["a", "d"], [1, 1], "m", combination_type="cat"), r"\['d'\] are DoRA"),
        (lambda: am.add_weighted_adapter(["a", "c"], [1], "m"), "one weight per adapter"),
        (lambda: am.add_weighted_adapter(["a", "c"], [1, 1], "m", combination_type="ties"), "unknown combination_type"),
        (lambda: am.add_weighted_adapter(["a", "c"], [1, 1], "a"), "named 'a' exists already"),
        (lambda: am.unmerge_adapter(), "nothing to unmerge"),
    ]
    for call, message in cases:
        with pytest.raises(LitftError, match=message):
            call()
        assert am.adapters == ["a", "c", "d"] and am.active_adapter == "a" and not am.merged
        assert same_state(am.model, snap)
    with torch.no_grad():
        assert torch.equal(am(x), logits)

    am.merge_adapter()
    with pytest.raises(LitftError, match=r"unmerge_adapter\(\) first"):
        am.load_adapter(setup["b"], "b")
    with pytest.raises(LitftError, match="merged already"):
        am.merge_adapter()
    am.unmerge_adapter()
    am.set_adapter(None)
    with pytest.raises(LitftError, match=r"set_adapter\(name\) first"):
        am.merge_adapter()


# ------------------------------------------------------------------ the tutorial runs
def test_tutorial_code_runs(setup, tmp_path, monkeypatch):
    """Every ```python block of tutorials/adapters.md, in order; the first (the reader's paths) is replaced."""
    text = (REPO / "tutorials" / "adapters.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks[0].startswith("# Your paths") and len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    namespace = {"Path": Path, "checkpoint_dir": setup["ckpt"], "run_a": setup["a"], "run_b": setup["b"],
                 "peft_adapter": setup["c-peft"]}
    for block in blocks[1:]:
        exec(compile(block, "tutorials/adapters.md", "exec"), namespace)
    assert (tmp_path / "out" / "mix" / "adapter.safetensors").is_file()
    assert (tmp_path / "out" / "a-peft" / "adapter_config.json").is_file()
    assert namespace["am"].adapters == []
