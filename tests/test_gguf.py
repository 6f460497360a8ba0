"""GGUF out and in, each against transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`, which has
its own reader, dequantizer and q/k un-permutation), and bad GGUF files as one clear error."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from litft.checkpoint import iter_safetensors, load_model, save_checkpoint
from litft.cli import run
from litft.models.config import Config
from litft.tokenizer import Tokenizer
from litft.utils import LitftError
from tests.helpers import make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
REPO = Path(__file__).resolve().parents[1]
TEXTS = ["Repeat the letter: abc", "Below is an instruction that describes a task.", " two  spaces\n\nand lines",
         "<s>special</s> tokens", "ünïcödé 123 4567", ""]


def hf_gguf_model(path: Path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def perturbed_checkpoint(d: Path, seed: int = 0, **overrides) -> Path:
    """A tiny litft checkpoint whose every tensor (norms, biases too) is off its trivial init."""
    make_checkpoint(d, seed=seed, **overrides)
    config = Config.from_checkpoint(d)
    g = torch.Generator().manual_seed(seed + 1)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in iter_safetensors(d / "model.safetensors")}
    save_checkpoint(state, config, d)
    return d


FAMILIES = {
    "llama2": dict(family="llama", n_kv_head=4),
    "llama3-gqa": dict(family="llama", n_kv_head=2, rope_theta=500000.0),
    "tinyllama-head_dim": dict(family="llama", n_kv_head=2, head_dim=32),
    "mistral": dict(family="mistral", n_kv_head=2, sliding_window=4096),
    "qwen2": dict(family="qwen2", n_kv_head=2, qkv_bias=True, tie_embeddings=True, rope_theta=1000000.0),
    "smollm2": dict(family="llama", n_kv_head=1, tie_embeddings=True, rope_theta=100000.0),
}


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_f32_transformers_logits_and_tokenizer(family, tmp_path):
    from transformers import AutoTokenizer

    d = perturbed_checkpoint(tmp_path / "ckpt", **FAMILIES[family])
    out = run(["convert_from_litft", str(d), str(tmp_path / "m.gguf"), "--format", "gguf", "--gguf_type", "f32"])
    assert out == tmp_path / "m.gguf" and not [p for p in tmp_path.iterdir() if p.name.startswith(".m.gguf")]
    x = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    diff = (logits(load_model(d).eval(), x) - logits(hf_gguf_model(out), x)).abs().max().item()
    assert diff <= 1e-4, diff
    theirs, ours = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name), Tokenizer(d)
    for text in TEXTS:
        assert theirs(text).input_ids == ours.encode(text).tolist(), text


def test_export_q8_0_is_the_quantized_model(tmp_path):
    """q8_0: transformers' logits equal litft's on weights passed through gguf's own Q8_0 round trip (<= 1e-4);
    the quantization error itself (vs the float model) is stated, not hidden in a loose tolerance."""
    d = perturbed_checkpoint(tmp_path / "ckpt", family="llama", n_kv_head=2)
    out = run(["convert_from_litft", str(d), str(tmp_path), "--format", "gguf", "--gguf_type", "q8_0"])
    assert out == tmp_path / "ckpt-q8_0.gguf"
    model = load_model(d).eval()
    x = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    exact, theirs = logits(model, x), logits(hf_gguf_model(out), x)
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q8), q8)))
    assert (logits(model, x) - theirs).abs().max().item() <= 1e-4
    assert (exact - theirs).abs().max().item() <= 0.05  # Q8_0's error on this model: about 0.015
    assert out.stat().st_size < 0.4 * run(["convert_from_litft", str(d), str(tmp_path / "f32.gguf"), "--format",
                                           "gguf", "--gguf_type", "f32"]).stat().st_size


def test_export_sentencepiece_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from tests.test_tokenizer import _llama_config, _train_spm, _write_json

    d = perturbed_checkpoint(tmp_path / "ckpt", family="llama", vocab_size=512)
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.model").write_bytes(_train_spm("bpe", 500))
    _write_json(d / "tokenizer_config.json", {**_llama_config(), "chat_template": "{{ messages[0]['content'] }}"})
    out = run(["convert_from_litft", str(d), str(tmp_path / "m.gguf"), "--format", "gguf"])
    theirs, ours = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name), Tokenizer(d)
    for text in TEXTS + ["tab\there <|im_end|> end"]:
        assert theirs(text).input_ids == ours.encode(text).tolist(), text
    assert theirs.chat_template == "{{ messages[0]['content'] }}"
    # back in: litft's own import of the file tokenizes the same
    back = run(["convert_to_litft", str(out), "--out_dir", str(tmp_path / "back")])
    for text in TEXTS:
        assert Tokenizer(back).encode(text).tolist() == ours.encode(text).tolist(), text


def test_round_trip_litft_gguf_litft(tmp_path):
    d = perturbed_checkpoint(tmp_path / "ckpt", family="qwen2", n_kv_head=2, qkv_bias=True)
    out = run(["convert_from_litft", str(d), str(tmp_path / "m.gguf"), "--format", "gguf", "--gguf_type", "f32"])
    back = run(["convert_to_litft", str(out)])
    assert back == tmp_path / "m"
    x = torch.randint(0, 320, (1, 9))
    assert (logits(load_model(d), x) - logits(load_model(back), x)).abs().max().item() <= 1e-5
    ours, theirs = Tokenizer(d), Tokenizer(back)
    for text in TEXTS:
        assert theirs.encode(text).tolist() == ours.encode(text).tolist(), text
    assert (theirs.bos_id, theirs.eos_id, theirs.pad_id, theirs.use_bos) == (ours.bos_id, ours.eos_id, ours.pad_id,
                                                                           ours.use_bos)
    bf16 = run(["convert_to_litft", str(out), "--out_dir", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert {t.dtype for _, t in iter_safetensors(bf16 / "model.safetensors")} == {torch.bfloat16}


def test_merge_lora_to_gguf_in_one_step(tmp_path):
    from litft.methods.lora import LoRA
    from tests.test_peft import trained_run

    d = perturbed_checkpoint(tmp_path / "ckpt", family="llama", n_kv_head=2)
    method = trained_run(LoRA, d, tmp_path / "final", r=4, alpha=8, targets=["q", "k", "v", "down"])
    out = run(["merge_lora", str(tmp_path / "final"), "--format", "gguf", "--gguf_type", "f32"])
    assert out == tmp_path / "final" / "merged" / "merged-f32.gguf"
    x = torch.randint(0, 320, (1, 10))
    expected = logits(method.eval().model, x)
    assert (logits(hf_gguf_model(out), x) - expected).abs().max().item() <= 1e-4
    assert (logits(load_model(d), x) - expected).abs().max().item() > 1e-2  # the adapter changed the model


# -- import: GGUFs written by the gguf package from a random transformers model -----------------------------------
def write_gguf_from_hf(hf, path: Path, types: dict[str, str], arch: str = "llama", **edits) -> Path:
    """The HF model as a GGUF through gguf's writer and name map; `types` picks the type of each tensor kind
    (by a substring of its GGUF name, else F32). K-quant blocks are made up byte by byte with sane scales (gguf
    can dequantize K-quants but not quantize them), and the HF model takes the dequantized values, so the two
    hold the same weights."""
    cfg = hf.config
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     cfg.num_hidden_layers)
    w = gguf.GGUFWriter(path, edits.pop("arch_name", arch))
    w.add_name("random")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(edits.pop("block_count", cfg.num_hidden_layers))
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab"] + [f"t{i}" for i in range(3, cfg.vocab_size - 2)] + ["<s>", "</s>"])
    w.add_token_types([1] * (cfg.vocab_size - 2) + [3, 3])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(cfg.vocab_size - 2)
    w.add_eos_token_id(cfg.vocab_size - 1)
    rng = np.random.default_rng(0)
    q = gguf.GGMLQuantizationType
    state = hf.state_dict()
    for hf_name, t in state.items():
        module, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(module)
        if name is None or (hf.config.tie_word_embeddings and hf_name == "lm_head.weight"):
            continue
        x = t.detach().float().numpy()
        if arch == "llama" and module.endswith(("q_proj", "k_proj")):  # llama.cpp's interleaved RoPE rows
            n = cfg.num_attention_heads if module.endswith("q_proj") else cfg.num_key_value_heads
            x = x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
        kind = next((k for part, k in types.items() if part in name), "F32") if x.ndim == 2 else "F32"
        if kind == "F32":
            w.add_tensor(f"{name}.{suffix}", x)
            continue
        qt = q[kind]
        if kind == "F16":
            data = x.astype(np.float16)
            w.add_tensor(f"{name}.{suffix}", data)
        else:
            data = gguf.quants.quantize(x, qt) if kind in ("Q8_0", "Q4_0", "Q4_1", "BF16", "Q5_0") else \
                made_up_k_blocks(rng, x.shape, qt)
            w.add_tensor(f"{name}.{suffix}", data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def made_up_k_blocks(rng, shape: tuple[int, int], qt) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qt]
    data = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    d = np.frombuffer(np.float16(2e-4).tobytes(), dtype=np.uint8)
    dmin = np.frombuffer(np.float16(1e-4).tobytes(), dtype=np.uint8)
    if qt.name == "Q6_K":  # ql, qh, scales (int8), then d
        data[..., -2:] = np.frombuffer(np.float16(1e-5).tobytes(), dtype=np.uint8)
    else:  # Q4_K / Q5_K: d, dmin first
        data[..., 0:2], data[..., 2:4] = d, dmin
    return data.reshape(shape[0], -1)


def hf_for_import(family: str, tmp_path: Path):
    from transformers import LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    common = dict(vocab_size=160, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cls(**common, tie_word_embeddings=family == "qwen2")).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


IMPORT_CASES = {
    "f16": ("llama", {"blk": "F16", "token_embd": "F16", "output": "F16"}),
    "q8_0-q4_0-q4_1-bf16": ("llama", {"attn_q": "Q8_0", "attn_k": "Q4_0", "attn_v": "Q4_1", "ffn": "BF16",
                                      "token_embd": "Q8_0"}),
    "q4_k-q5_k-q6_k": ("llama", {"attn": "Q4_K", "ffn": "Q5_K", "token_embd": "Q6_K", "output": "Q6_K"}),
    "qwen2-q8_0-q4_k": ("qwen2", {"attn": "Q8_0", "ffn": "Q4_K", "token_embd": "Q8_0"}),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_matches_transformers_on_the_same_gguf(case, tmp_path):
    """Tolerance 1e-4 for every type: both sides dequantize the same bytes (litft through gguf.quants,
    transformers through its own dequantizer) and compute in float32."""
    family, types = IMPORT_CASES[case]
    path = write_gguf_from_hf(hf_for_import(family, tmp_path), tmp_path / "m.gguf", types, arch=family)
    out = run(["convert_to_litft", str(path), "--out_dir", str(tmp_path / "lit")])
    x = torch.randint(0, 158, (2, 11), generator=torch.Generator().manual_seed(0))
    ours, theirs = logits(load_model(out).eval(), x), logits(hf_gguf_model(path), x)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert ours.abs().max() > 0.1  # not a degenerate model
    tok = Tokenizer(out)
    assert (tok.bos_id, tok.eos_id) == (158, 159) and tok.encode("ab<s>ba", bos=False).tolist() == [2, 158, 1, 0]


# -- bad input: one clear error each, nothing written -----------------------------------------------------------------
def bad_gguf(case: str, tmp_path: Path) -> Path:
    hf = hf_for_import("llama", tmp_path)
    path = tmp_path / "bad.gguf"
    if case == "unsupported_quant":
        return write_gguf_from_hf(hf, path, {"attn_q": "Q5_0"})
    if case == "unsupported_arch":
        return write_gguf_from_hf(hf, path, {}, arch_name="gpt2")
    if case == "absurd_block_count":
        return write_gguf_from_hf(hf, path, {}, block_count=10**9)
    write_gguf_from_hf(hf, path, {})
    data = path.read_bytes()
    if case == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif case == "not_gguf":
        path.write_bytes(b"GGML" + data[4:])
    return path


BAD = {"truncated": "truncated or corrupt", "not_gguf": "truncated or corrupt",
       "unsupported_quant": "quantization type Q5_0", "unsupported_arch": "unsupported GGUF architecture 'gpt2'",
       "absurd_block_count": "block_count 1000000000 does not match"}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_gguf_one_error_nothing_written(case, tmp_path):
    path = bad_gguf(case, tmp_path)
    with pytest.raises(LitftError, match=BAD[case]) as e:
        run(["convert_to_litft", str(path), "--out_dir", str(tmp_path / "out")])
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_cli_error_lines(tmp_path):
    """Through the console script: one line on stderr, exit 1 (a family GGUF export cannot express, a file)."""
    d = perturbed_checkpoint(tmp_path / "ckpt", family="gemma", n_kv_head=1, norm_unit_offset=True,
                             activation="gelu_tanh", tie_embeddings=True, scale_embeddings=True)
    (tmp_path / "t.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    for args, expect in ((["convert_from_litft", str(d), str(tmp_path / "g.gguf"), "--format", "gguf"],
                          "GGUF export supports the Llama family"),
                         (["convert_to_litft", str(tmp_path / "t.gguf")], "truncated or corrupt"),
                         (["convert_from_litft", str(d), str(tmp_path / "g.gguf"), "--format", "ggml"],
                          "unknown format 'ggml'")):
        r = subprocess.run([sys.executable, "-m", "litft.cli", *args], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and expect in lines[0], r.stderr[-1500:]
    assert not (tmp_path / "g.gguf").exists() and not (tmp_path / "t").exists()


def test_missing_gguf_package_names_the_extra(tmp_path, monkeypatch):
    d = make_checkpoint(tmp_path / "ckpt")
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` does when it is not installed
    with pytest.raises(LitftError, match=r'pip install "litft\[gguf\]"'):
        run(["convert_from_litft", str(d), str(tmp_path / "m.gguf"), "--format", "gguf"])
    with pytest.raises(LitftError, match=r'pip install "litft\[gguf\]"'):
        run(["merge_lora", str(tmp_path / "nope"), "--format", "gguf"])


def test_llama3_rope_factors_and_linear_scaling(tmp_path):
    """Llama 3.1 RoPE: llama.cpp divides each frequency by the `rope_freqs` tensor; those divisors must be
    transformers' default over llama3 inverse frequencies. Linear scaling travels as metadata and comes back."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from litft.gguf import llama3_rope_factors

    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    config = Config(n_embd=256, n_head=2, rope_theta=500000.0, rope_scaling=scaling)
    hf = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters={"rope_theta": 500000.0, **scaling})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf)
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    factors = llama3_rope_factors(config)
    assert len(factors) == 64 and factors.min() == 1.0 and factors.max() == 8.0  # all three regimes appear
    assert torch.allclose(factors.double(), plain / scaled.double(), rtol=1e-5)
    d = perturbed_checkpoint(tmp_path / "l3", family="llama", n_kv_head=2, rope_scaling=scaling)
    out = run(["convert_from_litft", str(d), str(tmp_path / "l3.gguf"), "--format", "gguf", "--gguf_type", "f32"])
    reader = gguf.GGUFReader(out)
    stored = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert np.allclose(stored.data, llama3_rope_factors(Config.from_checkpoint(d)).numpy())
    with pytest.raises(LitftError, match="rope_freqs"):  # refused on import rather than read wrong
        run(["convert_to_litft", str(out)])
    # linear: metadata there and back
    d = perturbed_checkpoint(tmp_path / "lin", family="llama", n_kv_head=2,
                             rope_scaling={"rope_type": "linear", "factor": 4.0})
    out = run(["convert_from_litft", str(d), str(tmp_path / "lin.gguf"), "--format", "gguf", "--gguf_type", "f32"])
    back = run(["convert_to_litft", str(out), "--out_dir", str(tmp_path / "lin-back")])
    assert Config.from_checkpoint(back).rope_scaling == {"rope_type": "linear", "factor": 4.0}
    x = torch.randint(0, 320, (1, 40))
    assert (logits(load_model(d), x) - logits(load_model(back), x)).abs().max().item() <= 1e-5
