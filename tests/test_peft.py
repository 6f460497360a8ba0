"""PEFT adapter files in and out (litft.adapters.peft_format), against peft + transformers as the oracle.

Every family litft supports, every adapter kind: litft run -> `export_peft` -> `peft.PeftModel.from_pretrained`
on the HF model `convert_from_litft` makes -> the same logits; and back with `import_peft`. Adapters made by peft
itself import to peft's logits. Then the CLI commands, and bad input. CPU, fp32, tiny models.
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file

from litft.adapters.inject import adapter_modules, unload_adapters
from litft.adapters.peft_format import export_peft, import_peft
from litft.checkpoint import load_model, save_checkpoint
from litft.cli import main, run
from litft.convert import convert_from_litft, convert_to_litft
from litft.methods.run_dir import load_method
from litft.methods.dora import DoRA
from litft.methods.lora import LoRA
from litft.methods.lora_plus import LoRAPlus
from litft.methods.neft import NEFT
from litft.methods.qlora import QLoRA
from litft.utils import LitftError
from tests.helpers import make_checkpoint
from tests.test_model import V, hf_load, make_hf_model

FAMILIES = ["llama3", "mistral", "qwen2", "smollm2", "phi3", "gemma", "pythia"]  # every family; phi3 / pythia fuse
KINDS = {  # partial targets leave parts of fused modules alone: zero rows in B, base norms in DoRA's magnitude
    "lora": (LoRA, dict(r=4, alpha=8, targets=["all-linear", "lm_head"])),
    "rslora": (LoRA, dict(r=4, alpha=6, use_rslora=True, targets=["q", "v", "up"])),
    "dora": (DoRA, dict(r=2, alpha=5, targets=["q", "k", "gate", "down"])),
    "qlora": (QLoRA, dict(r=4, alpha=8, quantize="bnb.nf4", targets=["all-linear"])),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """family -> (litft checkpoint, the HF model of `convert_from_litft`): the base peft loads adapters onto."""
    cache = {}

    def get(family: str) -> tuple[Path, torch.nn.Module]:
        if family not in cache:
            d = tmp_path_factory.mktemp(family)
            make_hf_model(family, d / "hf")
            convert_to_litft(d / "hf", d / "lit")
            convert_from_litft(d / "lit", d / "hf_back")
            cache[family] = (d / "lit", hf_load(d / "hf_back"))
        return cache[family]

    return get


def ids(vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def randomize(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """B = 0 and m = ||W|| at init would hide any bug in the adapter path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in adapter_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)
            if hasattr(m, "lora_magnitude"):
                m.lora_magnitude.mul_(1 + 0.2 * torch.randn(m.lora_magnitude.shape, generator=g))


def trained_run(cls: type, ckpt: Path, out: Path, seed: int = 1, std: float = 0.1, **kw):
    method = cls(checkpoint_dir=ckpt, dropout=0.0, **kw)
    method.configure_model()
    randomize(method.model, seed, std)
    method.save_final(out)
    return method


def _file_key(peft_key: str) -> str:
    key = peft_key.replace(".default", "")
    return key.removesuffix(".weight") if "lora_magnitude_vector" in key else key


def load_peft(hf: torch.nn.Module, peft_dir: Path, **kw) -> torch.nn.Module:
    """PeftModel.from_pretrained on a copy of `hf`, asserting every adapter tensor of the file was loaded into
    the model and the model has no adapter tensor the file lacks (no missing or unexpected keys)."""
    model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), peft_dir, **kw).eval()
    loaded = {_file_key(k): v for k, v in model.state_dict().items() if "lora_" in k}
    stored = load_file(str(peft_dir / "adapter_model.safetensors"))
    assert loaded.keys() == stored.keys()
    assert all(torch.equal(loaded[k], stored[k]) for k in stored)
    return model


def unquantized_twin(method: LoRA) -> LoRA:
    """The same adapter on the full-precision base (what peft gets with the HF base of convert_from_litft)."""
    kw = {k: getattr(method, k) for k in ("r", "alpha", "use_rslora")}
    twin = LoRA(checkpoint_dir=method.checkpoint_dir, dropout=0.0, targets=sorted(method.targets), **kw)
    twin.configure_model()
    twin.load_trainable_state_dict(method.trainable_state_dict())
    return twin.eval()


def deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.delta_weight() for n, m in adapter_modules(model)}


# ------------------------------------------------------------------ litft -> PEFT -> litft, every family and kind
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_peft_with_litft_logits_and_imports_back(bases, family, kind, tmp_path):
    if kind == "qlora":
        pytest.importorskip("bitsandbytes")
    ckpt, hf = bases(family)
    cls, kw = KINDS[kind]
    method = trained_run(cls, ckpt, tmp_path / "final", **kw)
    ref = unquantized_twin(method) if kind == "qlora" else method.eval()
    export_peft(tmp_path / "final", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] == (kind == "dora") and config["use_rslora"] == (kind == "rslora")
    theirs = load_peft(hf, tmp_path / "peft")
    x = ids()
    with torch.no_grad():
        ours, peft_logits, base = ref.model(x), theirs(x).logits, hf(x).logits
    assert (peft_logits - base).abs().max() > 1e-2  # the adapter really acts
    assert (ours - peft_logits).abs().max() <= 1e-5

    # and back: the imported adapter is the same update, layer by layer
    import_peft(tmp_path / "peft", checkpoint_dir=ckpt, out_dir=tmp_path / "imported")
    back = load_method(tmp_path / "imported").eval()
    assert type(back) is (DoRA if kind == "dora" else LoRA)
    with torch.no_grad():
        assert (back.model(x) - ours).abs().max() <= 1e-5
    before, after = deltas(ref.model), deltas(back.model)
    assert before.keys() <= after.keys()  # a fused module's untouched parts come back as zero updates
    for name, d in after.items():
        torch.testing.assert_close(d, before.get(name, torch.zeros_like(d)), atol=1e-6, rtol=0)
    if kind == "dora":
        mods, mods_before = dict(adapter_modules(back.model)), dict(adapter_modules(ref.model))
        for name, m in mods.items():
            want = mods_before[name].lora_magnitude if name in mods_before else m.base_sq_norm.sqrt()
            torch.testing.assert_close(m.lora_magnitude, want, atol=1e-6, rtol=1e-6)


def test_qlora_export_matches_peft_on_the_dequantized_base(bases, tmp_path):
    """The QLoRA model as trained (4-bit base) vs peft on an HF base holding the dequantized weights."""
    pytest.importorskip("bitsandbytes")
    from litft.adapters.quantize import dequantize_model

    ckpt, _ = bases("phi3")
    method = trained_run(QLoRA, ckpt, tmp_path / "final", **KINDS["qlora"][1]).eval()
    export_peft(tmp_path / "final", tmp_path / "peft")
    plain = copy.deepcopy(method.model)
    dequantize_model(plain)
    plain = unload_adapters(plain)
    save_checkpoint(plain.state_dict(), plain.config, tmp_path / "deq")
    convert_from_litft(tmp_path / "deq", tmp_path / "hf_deq")
    theirs = load_peft(hf_load(tmp_path / "hf_deq"), tmp_path / "peft")
    x = ids()
    with torch.no_grad():
        assert (method.model(x) - theirs(x).logits).abs().max() <= 1e-5


# ------------------------------------------------------------------ adapters made by peft -> litft
@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_made_adapter_imports_to_peft_logits(bases, family, variant, tmp_path):
    ckpt, hf = bases(family)
    attn_out = "o_proj|dense"  # a regex key, as peft allows: its rank and alpha differ from the rest
    linears = sorted({n.rsplit(".", 1)[-1] for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)})
    cfg = dict(r=4, lora_alpha=8, target_modules=linears, init_lora_weights=False, lora_dropout=0.0,
               rank_pattern={attn_out: 6}, alpha_pattern={attn_out: 3})
    if variant == "lora":
        cfg.update(use_rslora=True)
    else:  # DoRA on layer 1 only: litft fills layer 0 with fresh (identity) adapters
        cfg.update(use_dora=True, layers_to_transform=[1])
    torch.manual_seed(0)
    model = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**cfg)).eval()
    with torch.no_grad():  # random A and B (init_lora_weights=False); B smaller, so the logits stay O(1)
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif "lora_B" in name:
                p.mul_(0.1)
    model.save_pretrained(tmp_path / "peft")
    import_peft(tmp_path / "peft", checkpoint_dir=ckpt, out_dir=tmp_path / "imported")
    method = load_method(tmp_path / "imported").eval()
    x = ids()
    with torch.no_grad():
        theirs = model(x).logits
        assert (theirs - hf(x).logits).abs().max() > 1e-2
        assert (method.model(x) - theirs).abs().max() <= 1e-5
    if variant == "dora":
        assert any(n.startswith("blocks.0.") for n, _ in adapter_modules(method.model))


# ------------------------------------------------------------------ every adapter method: merge_lora and export
@pytest.mark.parametrize("cls", [LoRA, DoRA, QLoRA, LoRAPlus, NEFT], ids=lambda c: c.__name__)
def test_merge_lora_and_export_for_every_adapter_method(bases, cls, tmp_path):
    if cls is QLoRA:
        pytest.importorskip("bitsandbytes")
    ckpt, hf = bases("llama3")
    method = trained_run(cls, ckpt, tmp_path / "final", r=4, alpha=8, targets=["q", "v", "down"])
    ref = unquantized_twin(method) if cls is QLoRA else method.eval()
    x = ids()
    with torch.no_grad():
        expected = ref.model(x)
        run(["merge_lora", str(tmp_path / "final")])
        assert (load_model(tmp_path / "final" / "merged")(x) - expected).abs().max() <= 1e-5
        run(["export_peft", str(tmp_path / "final"), str(tmp_path / "peft")])
        assert (load_peft(hf, tmp_path / "peft")(x).logits - expected).abs().max() <= 1e-5


# ------------------------------------------------------------------ the CLI end to end
def test_cli_export_import_merge_generate_and_train_further(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")  # a real tokenizer, for generate
    trained_run(LoRA, ckpt, tmp_path / "final", std=0.5, r=4, alpha=8, targets=["all-linear"])
    assert run(["export_peft", str(tmp_path / "final"), str(tmp_path / "peft")]) == tmp_path / "peft"
    convert_from_litft(ckpt, tmp_path / "hf")
    theirs = load_peft(hf_load(tmp_path / "hf"), tmp_path / "peft")
    imported = run(["import_peft", str(tmp_path / "peft"), "--checkpoint_dir", str(ckpt)])
    assert imported == tmp_path / "peft" / "litft" and (imported / "tokenizer.json").is_file()
    assert run(["import_peft", str(tmp_path / "peft"), "--checkpoint_dir", str(ckpt)]) == imported  # replaces it
    with pytest.raises(LitftError, match=r"holds other files \(litft\)"):  # never deletes what it did not write
        run(["export_peft", str(tmp_path / "final"), str(tmp_path / "peft")])
    run(["merge_lora", str(imported)])
    x = ids(320)
    with torch.no_grad():
        peft_logits = theirs(x).logits
        assert (load_model(imported / "merged")(x) - peft_logits).abs().max() <= 1e-5

    gen = ["--prompt", "Repeat the letter", "--max_new_tokens", "8", "--temperature", "0"]
    through_adapter = run(["generate", str(ckpt), "--adapter_dir", str(imported), *gen])
    assert through_adapter == run(["generate", str(imported / "merged"), *gen])
    assert through_adapter != run(["generate", str(ckpt), *gen])  # the adapter changes what it says
    if importlib.util.find_spec("bitsandbytes"):  # a QLoRA run generates on its 4-bit base, unmerged
        trained_run(QLoRA, ckpt, tmp_path / "q", std=0.5, r=4, alpha=8, targets=["all-linear"], quantize="bnb.nf4")
        run(["merge_lora", str(tmp_path / "q"), "--merge_into", "dequantized"])
        assert run(["generate", str(ckpt), "--adapter_dir", str(tmp_path / "q"), *gen]) == run(
            ["generate", str(tmp_path / "q" / "merged"), *gen])

    # further training starts from the imported weights: `litft finetune lora --init_adapter`
    from tests.helpers import make_task

    start = load_file(str(imported / "adapter.safetensors"))
    task = make_task(tmp_path / "task.json", n=16)
    more = ["finetune", "lora", "--checkpoint_dir", str(ckpt), "--init_adapter", str(imported), "--targets",
            "[all-linear]", "--alpha", "8", "--dropout", "0", "--data", "JSON", "--data.json_path", str(task),
            "--data.prompt_style", "plain", "--train.global_batch_size", "8", "--train.micro_batch_size", "8",
            "--train.max_steps", "2", "--eval.interval", "0", "--eval.final_validation", "false",
            "--logger_name", "none", "--out_dir"]
    with pytest.raises(LitftError, match="does not fit this run .*r: 4 there, 8 here"):
        run([*more, str(tmp_path / "wrong"), "--r", "8"])
    run([*more, str(tmp_path / "more"), "--r", "4"])
    trained = load_file(str(tmp_path / "more" / "final" / "adapter.safetensors"))
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert max((trained[k] - start[k]).abs().max() for k in start) < 0.1  # moved from the import, not re-initialised
    with torch.no_grad():  # and the finished run rebuilds without its init_adapter (load_method drops it)
        assert load_method(tmp_path / "more" / "final").model(x).shape == peft_logits.shape


# ------------------------------------------------------------------ bad input
def _no_output(out: Path) -> bool:
    return not out.exists() and not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


@pytest.mark.parametrize("case", ["no_method_config", "missing_weights", "full_run", "other_base", "biases",
                                  "out_dir_taken"])
def test_export_bad_input(bases, case, tmp_path):
    ckpt, _ = bases("qwen2" if case == "biases" else "llama3")  # qwen2: q, k, v have biases to train
    run_dir, out = tmp_path / "final", tmp_path / "peft"
    trained_run(LoRA, ckpt, run_dir, r=2, alpha=4, targets=["q", "v"], bias="all" if case == "biases" else "none")
    args, expect = [run_dir, out], {
        "no_method_config": "no method_config.yaml", "missing_weights": "adapter.safetensors is missing",
        "full_run": "not an adapter run", "other_base": "another base model", "biases": "litft merge_lora",
        "out_dir_taken": r"exists and holds other files \(notes.txt\)"}[case]
    if case == "no_method_config":
        (run_dir / "method_config.yaml").unlink()
    elif case == "missing_weights":
        (run_dir / "adapter.safetensors").unlink()
    elif case == "full_run":
        cfg = yaml.safe_load((run_dir / "method_config.yaml").read_text())
        cfg = {"class_path": "litft.methods.full.Full",
               "init_args": {"checkpoint_dir": cfg["init_args"]["checkpoint_dir"]}}
        (run_dir / "method_config.yaml").write_text(yaml.safe_dump(cfg))
    elif case == "other_base":
        args.append(make_checkpoint(tmp_path / "other", n_embd=32))  # a llama too, but narrower
    elif case == "out_dir_taken":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    with pytest.raises(LitftError, match=expect):
        export_peft(*args)
    if case == "out_dir_taken":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert _no_output(out)


def _peft_adapter(hf: torch.nn.Module, out: Path, config) -> Path:
    torch.manual_seed(0)
    peft.get_peft_model(copy.deepcopy(hf), config).save_pretrained(out)
    return out


@pytest.mark.parametrize("case", ["ia3", "loha", "dora_modules_to_save", "lora_bias", "missing_config",
                                  "missing_weights", "truncated", "other_family", "other_shapes", "no_dir",
                                  "resized_head"])
def test_import_bad_input(bases, case, tmp_path):
    ckpt, hf = bases("llama3")
    peft_dir, out = tmp_path / "peft", tmp_path / "imported"
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    config, base, expect = lora, ckpt, {
        "ia3": "peft_type 'IA3' is not supported", "loha": "peft_type 'LOHA' is not supported",
        "dora_modules_to_save": "modules_to_save", "lora_bias": "lora_bias",
        "missing_config": "no adapter_config.json", "missing_weights": "adapter_model.safetensors is missing",
        "truncated": "truncated or corrupt", "other_family": "qkv_proj, which this llama model",
        "other_shapes": "another base model", "no_dir": "directory not found",
        "resized_head": "carries its own weights for lm_head"}[case]
    if case == "ia3":
        config = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    elif case == "loha":
        config = peft.LoHaConfig(r=2, target_modules=["q_proj"])
    elif case == "dora_modules_to_save":
        config = peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, modules_to_save=["lm_head"])
    elif case == "lora_bias":
        config = peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True)
    elif case == "other_family":
        hf = bases("phi3")[1]
        config = peft.LoraConfig(r=2, target_modules=["qkv_proj"])
    elif case == "other_shapes":
        base = make_checkpoint(tmp_path / "other", n_embd=32)  # a narrower llama
    elif case == "resized_head":  # peft saves the head's base weight next to its adapter: here not the base's
        hf = copy.deepcopy(hf)
        hf.resize_token_embeddings(V + 8)
        config = peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"])
    if case != "no_dir":
        _peft_adapter(hf, peft_dir, config)
    if case == "missing_config":
        (peft_dir / "adapter_config.json").unlink()
    elif case == "missing_weights":
        (peft_dir / "adapter_model.safetensors").unlink()
    elif case == "truncated":
        data = (peft_dir / "adapter_model.safetensors").read_bytes()
        (peft_dir / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LitftError, match=expect):
        import_peft(peft_dir, checkpoint_dir=base, out_dir=out)
    assert _no_output(out)


def test_cli_errors_are_one_line(bases, tmp_path, capsys):
    ckpt, hf = bases("llama3")
    _peft_adapter(hf, tmp_path / "ia3", peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with pytest.raises(SystemExit) as e:
        main(["import_peft", str(tmp_path / "ia3"), "--checkpoint_dir", str(ckpt)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "peft_type 'IA3'" in err and "LoRA" in err
    assert not (tmp_path / "ia3" / "litft").exists()
    with pytest.raises(SystemExit) as e:
        main(["export_peft", str(tmp_path / "nothing"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "method_config.yaml" in err


def test_truncated_litft_adapter_is_named(bases, tmp_path):
    ckpt, _ = bases("llama3")
    trained_run(LoRA, ckpt, tmp_path / "final", r=2, alpha=4, targets=["q"])
    path = tmp_path / "final" / "adapter.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LitftError, match="adapter.safetensors.*truncated or corrupt"):
        export_peft(tmp_path / "final", tmp_path / "peft")
    assert _no_output(tmp_path / "peft")
    save_file({"x.lora_A": torch.zeros(2, 2)}, str(path))  # an A without its B
    with pytest.raises(LitftError, match="x needs lora_A"):
        export_peft(tmp_path / "final", tmp_path / "peft")
