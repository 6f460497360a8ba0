"""QLoRA: quantized frozen base (litft.adapters.quantize), the QLoRA method, merging, bad input, and the
opt-in quantized token embedding (quantize_embedding, with a tied head on the same storage).

Oracles: bitsandbytes' own functional API called directly on the checkpoint's tensors (codes,
statistics, dequantization), the NF4 table of the QLoRA paper, full-precision LoRA on the
dequantized weights (logits and gradients), and transformers for the converted merge result.
CPU, fp32; the CUDA checks at the end skip without a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from litft.adapters.inject import is_adapter_param_name
from litft.adapters.lora import LoRALinear
from litft.adapters.quantize import (QUANTIZE_MODES, QuantizedEmbedding, QuantizedTiedHead, check_bitsandbytes,
                                     dequantize_model, dequantize_weight, is_quantized_linear, load_quantized_model,
                                     quantize_model, weight_bytes)
from litft.checkpoint import expected_shapes, load_model, load_state_dict, save_checkpoint
from litft.cli import main, run
from litft.generate import generate
from litft.methods.lora import LoRA
from litft.methods.qlora import QLoRA
from litft.models.config import Config
from litft.utils import LitftError
from tests.helpers import make_checkpoint, make_task

bnb = pytest.importorskip("bitsandbytes")
REPO = Path(__file__).resolve().parents[1]
FOUR_BIT = ["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq"]
# NF4 as published (Dettmers et al. 2023, appendix E): the 16 quantiles of N(0, 1) normalised to [-1, 1]
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ckpt_bias(tmp_path_factory) -> Path:  # biases on quantized layers (q, k, v) stay full precision
    return make_checkpoint(tmp_path_factory.mktemp("ckpt_bias"), qkv_bias=True)


@pytest.fixture(scope="module")
def ckpt_tied(tmp_path_factory) -> Path:  # the head is the embedding (SmolLM2's layout)
    return make_checkpoint(tmp_path_factory.mktemp("ckpt_tied"), tie_embeddings=True)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return make_task(tmp_path_factory.mktemp("data") / "task.json", n=64)


def layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if is_quantized_linear(m)}


# ------------------------------------------------------------------ the stored weights vs bitsandbytes
@pytest.mark.parametrize("mode", FOUR_BIT)
def test_4bit_codes_and_statistics_equal_bitsandbytes(ckpt_bias, mode):
    spec = QUANTIZE_MODES[mode]
    model = load_quantized_model(ckpt_bias, mode, device="cpu")
    fp = load_state_dict(ckpt_bias)
    quantized = layers(model)
    assert sorted({n.rsplit(".", 1)[-1] for n in quantized}) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    for name, layer in quantized.items():
        w = fp[f"{name}.weight"]
        codes, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type=spec.quant_type,
                                                    compress_statistics=spec.double_quant)
        qs = layer.weight.quant_state
        assert torch.equal(layer.weight.data, codes), name
        assert torch.equal(qs.absmax, state.absmax) and torch.equal(qs.code, state.code)
        assert (qs.blocksize, qs.quant_type, qs.nested, tuple(qs.shape)) == (64, spec.quant_type, spec.double_quant,
                                                                            tuple(w.shape))
        if spec.double_quant:
            assert qs.absmax.dtype == torch.uint8 and qs.state2.blocksize == 256
            assert torch.equal(qs.state2.absmax, state.state2.absmax) and torch.equal(qs.offset, state.offset)
        else:
            assert qs.absmax.dtype == torch.float32
        # dequantization of the model's stored weight == bitsandbytes' dequantization of its own codes
        assert torch.equal(dequantize_weight(layer), bnb.functional.dequantize_4bit(codes, state))
        assert torch.equal(dequantize_weight(layer), bnb.functional.dequantize_4bit(layer.weight.data, qs))


def test_nf4_is_the_papers_format(ckpt):
    """Independent of bitsandbytes' code: each weight is the NF4 value nearest to w / absmax(block of 64),
    two codes per byte (first in the high nibble); dequantized = NF4[code] * absmax."""
    model = load_quantized_model(ckpt, "bnb.nf4", device="cpu")
    fp = load_state_dict(ckpt)
    for name, layer in layers(model).items():
        w = fp[f"{name}.weight"].reshape(-1, 64)
        absmax = w.abs().amax(dim=1)
        codes = ((w / absmax[:, None]).unsqueeze(-1) - NF4).abs().argmin(-1).reshape(-1).to(torch.uint8)
        packed = (codes[0::2] << 4) | codes[1::2]
        assert torch.equal(layer.weight.quant_state.absmax, absmax)
        assert torch.equal(layer.weight.data.reshape(-1), packed), name
        assert torch.allclose(dequantize_weight(layer).reshape(-1, 64), NF4[codes.long()].reshape(-1, 64) * absmax[:, None],
                              atol=0, rtol=1e-6)


def test_int8_rows_equal_bitsandbytes(ckpt):
    model = load_quantized_model(ckpt, "bnb.int8", device="cpu")
    fp = load_state_dict(ckpt)
    for name, layer in layers(model).items():
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(fp[f"{name}.weight"].half())
        assert torch.equal(layer.weight.data, cb) and torch.equal(layer.weight.SCB, scb), name
        assert torch.equal(dequantize_weight(layer), bnb.functional.int8_vectorwise_dequant(cb, scb))


def test_unquantized_parts_are_explicit(tmp_path, ckpt, ckpt_bias):
    model = load_quantized_model(ckpt_bias, "bnb.nf4-dq", device="cpu")
    fp = load_state_dict(ckpt_bias)
    assert not is_quantized_linear(model.lm_head)  # default skip
    for name, p in model.named_parameters():  # embeddings, norms, head, biases: bit-exact full precision
        if type(p).__name__ != "Params4bit":
            assert p.dtype == torch.float32 and torch.equal(p.detach(), fp[name]), name
    keep = load_quantized_model(ckpt, "bnb.nf4", skip=["lm_head", "down", "blocks.0.*"], device="cpu")
    assert {n for n in layers(keep)} == {f"blocks.1.{m}" for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                                  "attn.o_proj", "mlp.gate_proj", "mlp.up_proj")}
    assert is_quantized_linear(load_quantized_model(ckpt, "bnb.nf4", skip=[], device="cpu").lm_head)
    tied = make_checkpoint(tmp_path / "tied", tie_embeddings=True)
    m = load_quantized_model(tied, "bnb.nf4", skip=[], device="cpu")
    assert m.lm_head.weight is m.embed.weight and not is_quantized_linear(m.lm_head)  # a tied head is the embedding
    with pytest.raises(LitftError, match="lm_haed.*match no Linear"):
        load_quantized_model(ckpt, "bnb.nf4", skip=["lm_haed"], device="cpu")


def test_weight_bytes_ratio(ckpt):
    fp32 = weight_bytes(load_model(ckpt))
    nf4 = weight_bytes(load_quantized_model(ckpt, "bnb.nf4", device="cpu"))
    assert fp32["quantized"] == 0 and nf4["unquantized"] < fp32["total"]
    model = load_quantized_model(ckpt, "bnb.nf4", device="cpu")
    numels = [m.in_features * m.out_features for m in layers(model).values()]
    # per layer: two codes per byte, one fp32 absmax per 64 weights, the 16-entry fp32 code book
    assert nf4["quantized"] == sum(n // 2 + n // 64 * 4 + 16 * 4 for n in numels)
    assert nf4["unquantized"] == fp32["total"] - 4 * sum(numels)


# ------------------------------------------------------------------ the method: logits, gradients
def randomize_b(model: torch.nn.Module) -> None:
    """B = 0 at init would hide a broken adapter path."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)


def configured_pair(make_q, make_ref) -> tuple:
    """The module under test (adapters' B randomized) and its reference, configured from the same seed;
    the caller makes the reference's frozen weights equal and copies the adapters over."""
    torch.manual_seed(0)
    q = make_q()
    q.configure_model()
    randomize_b(q.model)
    ref = make_ref()
    ref.configure_model()
    return q, ref


def qlora_and_dequantized_lora(ckpt: Path, mode: str) -> tuple[QLoRA, LoRA]:
    kw = dict(checkpoint_dir=ckpt, r=4, alpha=8, dropout=0.0, targets=["all-linear", "lm_head"], bias="all")
    q, ref = configured_pair(lambda: QLoRA(quantize=mode, **kw), lambda: LoRA(**kw))
    q_mods = dict(q.model.named_modules())
    for name, m in ref.model.named_modules():
        if isinstance(m, LoRALinear) and is_quantized_linear(q_mods[name].base_layer):
            m.base_layer.weight = torch.nn.Parameter(dequantize_weight(q_mods[name].base_layer), requires_grad=False)
    ref.load_trainable_state_dict(q.trainable_state_dict())
    return q, ref


@pytest.mark.parametrize("mode", ["bnb.nf4-dq", "bnb.fp4", "bnb.int8"])
def test_logits_and_grads_match_lora_on_dequantized_weights(ckpt_bias, mode):
    q, ref = qlora_and_dequantized_lora(ckpt_bias, mode)
    x = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": x, "labels": x}
    # int8 dequantizes as int8 * (absmax / 127) in its matmul vs int8 * absmax / 127 in the oracle: 1 ulp
    tol = 1e-5 if mode != "bnb.int8" else 1e-4
    for mod in (q, ref):
        mod.train()
    assert (q.model(x) - ref.model(x)).abs().max() <= tol
    q.training_step(batch).backward()
    ref.training_step(batch).backward()
    grads = {n: p.grad for n, p in q.model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in q.model.named_parameters() if p.requires_grad}
    assert set(grads) == trainable and all(is_adapter_param_name(n) or n.endswith("bias") for n in trainable)
    for name, layer in layers(q.model).items():
        assert layer.weight.grad is None and not layer.weight.requires_grad
    assert grads["blocks.0.attn.q_proj.lora_A"].abs().sum() > 0  # reached the first layer through 4-bit ones
    ref_grads = dict(ref.model.named_parameters())
    for n, g in grads.items():
        assert torch.allclose(g, ref_grads[n].grad, atol=tol, rtol=1e-4), n
    if mode != "bnb.int8":  # bnb's eval path for int8 is LLM.int8 (int8 activations): not the training math
        q.eval(), ref.eval()
        with torch.no_grad():
            assert (q.model(x) - ref.model(x)).abs().max() <= tol
            assert (q.model(x) - ref.model(x)).abs().max() <= tol  # eval twice: the stored layout is unchanged
        # Training after validation still gets the same gradients: bnb's default on AVX512-BF16 CPUs
        # repacks the weights on the first eval pass, after which no gradient passes the layer.
        q.train()
        q.model.zero_grad()
        q.training_step(batch).backward()
        for n, g in grads.items():
            assert torch.allclose(dict(q.model.named_parameters())[n].grad, g, atol=tol, rtol=1e-4), n


@pytest.mark.parametrize("mode", ["bnb.nf4-dq", "bnb.fp4"])
def test_fused_4bit_path_equals_bitsandbytes_own(ckpt_bias, mode, monkeypatch):
    """On CPU a LoRA layer over a 4-bit base dequantizes with litft's kernel into a reused buffer
    (`cpu_kernels.dequantize_4bit`); the oracle is the same model through bitsandbytes' own Linear4bit forward and
    backward (`base_layer(x) + lora(x)`): logits and every gradient agree to fp32 rounding, and the buffer is not
    what autograd keeps (a second step gives the same gradients)."""
    from litft import native

    if not native.enabled():
        pytest.skip("no C++ compiler: litft's CPU kernels were not built")
    torch.manual_seed(0)
    q = QLoRA(checkpoint_dir=ckpt_bias, quantize=mode, r=4, alpha=8, dropout=0.0, targets=["all-linear"], bias="all")
    q.configure_model()
    randomize_b(q.model)  # a non-zero update, so the LoRA half of each gradient is checked too
    x = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": x, "labels": x}
    qlora_layers = [m for m in q.model.modules() if isinstance(m, LoRALinear) and is_quantized_linear(m.base_layer)]
    assert qlora_layers and all(m._can_fuse_4bit(x.float()) for m in qlora_layers)

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        q.model.zero_grad()
        q.training_step(batch).backward()
        return q.model(x).detach(), {n: p.grad.clone() for n, p in q.model.named_parameters() if p.grad is not None}

    fused, fused_again = step(), step()
    monkeypatch.setattr(LoRALinear, "_can_fuse_4bit", lambda self, x: False)  # bitsandbytes' Linear4bit path
    own = step()
    assert (fused[0] - own[0]).abs().max() <= 1e-5
    assert set(fused[1]) == set(own[1]) and any("lora_A" in n for n in own[1])
    for n, g in own[1].items():
        torch.testing.assert_close(fused[1][n], g, atol=1e-5, rtol=1e-4, msg=n)
        assert torch.equal(fused_again[1][n], fused[1][n]), n


@pytest.mark.parametrize("name", ["bnb.AdamW8bit", "bnb.PagedAdamW", "bnb.PagedAdamW8bit"])
def test_bnb_optimizers_step_on_cpu(ckpt, name):
    q = QLoRA(checkpoint_dir=ckpt, optimizer=name, optimizer_args={"min_8bit_size": 0}, lr=1e-2, warmup_steps=0)
    q.configure_model()
    opt, sched = q.configure_optimizers()
    before = {n: p.detach().clone() for n, p in q.model.named_parameters() if p.requires_grad}
    x = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(2))
    q.training_step({"input_ids": x, "labels": x}).backward()
    opt.step()
    sched.step()
    after = dict(q.model.named_parameters())
    assert all(torch.isfinite(after[n]).all() for n in before)
    assert any(not torch.equal(before[n], after[n]) for n in before if n.endswith("lora_B"))  # (A: zero grad while B = 0)
    state = opt.state[after["blocks.0.attn.q_proj.lora_B"]]
    assert state["state1"].dtype == (torch.uint8 if name.endswith("8bit") else torch.float32)


# ------------------------------------------------------------------ train, merge, convert
def test_qlora_trains_merges_and_converts(ckpt, task, tmp_path):
    out = tmp_path / "out"
    metrics = run(["finetune", "qlora", "--checkpoint_dir", str(ckpt), "--data", "JSON", "--data.json_path", str(task),
                   "--data.prompt_style", "plain", "--out_dir", str(out), "--train.max_steps", "16",
                   "--train.global_batch_size", "8", "--train.micro_batch_size", "4", "--lr", "1e-2",
                   "--warmup_steps", "0", "--dropout", "0.0", "--eval.interval", "0", "--eval.max_iters", "2",
                   "--eval.initial_validation", "true", "--eval.max_new_tokens", "2", "--logger_name", "none"])
    assert metrics["val_loss"] < 0.8 * metrics["val_loss_before"]
    final = out / "final"
    assert "quantize: bnb.nf4-dq" in (final / "method_config.yaml").read_text()
    adapter = load_file(str(final / "adapter.safetensors"))
    assert all(is_adapter_param_name(k) for k in adapter)
    base = load_state_dict(ckpt)
    scaling = 16.0 / 8

    def delta(layer: str) -> torch.Tensor:
        return scaling * adapter[f"{layer}.lora_B"] @ adapter[f"{layer}.lora_A"]

    run(["merge_lora", str(final)])  # default: into the original full-precision weights
    merged = load_state_dict(final / "merged")
    run(["merge_lora", str(final), "--merge_into", "dequantized", "--out_dir", str(tmp_path / "dq")])
    merged_dq = load_state_dict(tmp_path / "dq")
    assert merged.keys() == base.keys() == merged_dq.keys()
    for k, w in base.items():
        layer = k.removesuffix(".weight")
        if f"{layer}.lora_A" not in adapter:
            assert torch.equal(merged[k], w) and torch.equal(merged_dq[k], w), k
            continue
        assert torch.allclose(merged[k], w + delta(layer), atol=1e-6), k
        codes, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert torch.allclose(merged_dq[k], bnb.functional.dequantize_4bit(codes, state) + delta(layer), atol=1e-6), k

    transformers = pytest.importorskip("transformers")
    run(["convert_from_litft", str(final / "merged"), str(tmp_path / "hf")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    x = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = load_model(final / "merged").eval()(x)
        assert (hf(x).logits - ours).abs().max() <= 1e-4


# ------------------------------------------------------------------ quantize_embedding: the token embedding
def bnb_table(table: torch.Tensor, mode: str) -> tuple[torch.Tensor, object, torch.Tensor]:
    """bitsandbytes' own quantization of an embedding table: (codes, statistics, dequantized table)."""
    spec = QUANTIZE_MODES[mode]
    if spec.bits == 8:
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(table.half())
        return cb, scb, bnb.functional.int8_vectorwise_dequant(cb, scb)
    codes, state = bnb.functional.quantize_4bit(table, blocksize=64, quant_type=spec.quant_type,
                                                compress_statistics=spec.double_quant)
    return codes, state, bnb.functional.dequantize_4bit(codes, state)


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.int8"])
def test_embedding_rows_equal_bitsandbytes(ckpt_tied, mode, monkeypatch):
    model = load_quantized_model(ckpt_tied, mode, device="cpu", quantize_embedding=True)
    emb, head = model.embed, model.lm_head
    assert isinstance(emb, QuantizedEmbedding) and isinstance(head, QuantizedTiedHead) and head.table is emb
    assert head.weight is emb.weight and emb.weight.dtype == torch.float32 and not emb.weight.requires_grad
    codes, stats, full = bnb_table(load_state_dict(ckpt_tied)["embed.weight"], mode)
    assert torch.equal(emb.codes, codes)  # the storage is bitsandbytes' own, bit for bit
    if mode == "bnb.int8":
        assert torch.equal(emb.row_absmax, stats)
    else:
        qs = emb.quant_state
        assert torch.equal(qs.absmax, stats.absmax) and (qs.blocksize, qs.nested) == (64, stats.nested)
        if qs.nested:
            assert torch.equal(qs.state2.absmax, stats.state2.absmax) and torch.equal(qs.offset, stats.offset)
    assert torch.equal(emb.dequantize(), full) and torch.equal(dequantize_weight(emb), full)

    # A lookup returns exactly those rows of the whole dequantized table, and bitsandbytes is only ever
    # asked to dequantize the looked-up rows (spied on, not replaced).
    asked = []
    for fn in ("dequantize_4bit", "int8_vectorwise_dequant"):
        real = getattr(bnb.functional, fn)
        monkeypatch.setattr(bnb.functional, fn, lambda a, *args, _real=real, **kw: asked.append(a.numel())
                            or _real(a, *args, **kw))
    ids = torch.tensor([[0, 5, 5, 319], [17, 318, 2, 0]])
    rows = emb(ids)
    row_codes = 64 if mode == "bnb.int8" else 32  # int8: one byte per value; 4 bit: two values per byte
    assert torch.equal(rows, full[ids]) and asked == [ids.numel() * row_codes]
    monkeypatch.undo()

    # Casting the model (as Fabric's bf16-true does) re-views the codes' bytes: they stay bnb's codes.
    model.to(torch.bfloat16)
    assert emb.weight.dtype == torch.bfloat16 and torch.equal(emb.codes, codes)
    assert torch.equal(emb(ids), full[ids].bfloat16())
    model.float()
    assert torch.equal(emb(ids), full[ids])


def quantized_embedding_and_reference(ckpt: Path, mode: str) -> tuple[LoRA, LoRA]:
    """QLoRA with quantize_embedding, and the same QLoRA (same quantized Linear layers, same adapters,
    LoRA on the head too) whose embedding and tied head are a plain table: the dequantized one."""
    kw = dict(checkpoint_dir=ckpt, r=4, alpha=8, dropout=0.0, targets=["all-linear", "lm_head"], quantize=mode)
    q, ref = configured_pair(lambda: LoRA(quantize_embedding=True, **kw), lambda: LoRA(**kw))
    ref.model.embed.weight = torch.nn.Parameter(q.model.embed.dequantize(), requires_grad=False)
    ref.model.lm_head.base_layer.weight = ref.model.embed.weight
    ref.load_trainable_state_dict(q.trainable_state_dict())
    return q, ref


@pytest.mark.parametrize("mode", ["bnb.nf4-dq", "bnb.fp4", "bnb.int8"])
def test_quantized_embedding_logits_grads_generation(ckpt_tied, mode):
    q, ref = quantized_embedding_and_reference(ckpt_tied, mode)
    assert isinstance(q.model.lm_head.base_layer, QuantizedTiedHead)  # the adapter wraps the quantized tied head
    x = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": x, "labels": x}
    q.train(), ref.train()
    assert (q.model(x) - ref.model(x)).abs().max() <= 1e-5
    # training_step = chunked_cross_entropy(lm_head, ...), the head under activation checkpointing
    q.training_step(batch).backward()
    ref.training_step(batch).backward()
    grads = {n: p.grad for n, p in q.model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in q.model.named_parameters() if p.requires_grad}
    assert set(grads) == trainable and all(is_adapter_param_name(n) for n in trainable)
    assert q.model.embed.weight.grad is None and not q.model.embed.weight.requires_grad
    assert grads["blocks.0.attn.q_proj.lora_A"].abs().sum() > 0  # through the head's backward to the first layer
    ref_grads = dict(ref.model.named_parameters())
    for n, g in grads.items():
        assert torch.allclose(g, ref_grads[n].grad, atol=1e-5, rtol=1e-4), n
    prompt = torch.tensor([1, 17, 42, 5])
    assert torch.equal(generate(q.model, prompt, 6), generate(ref.model, prompt, 6))


def test_weight_bytes_with_quantized_embedding(ckpt, ckpt_tied):
    fp32 = weight_bytes(load_model(ckpt_tied))
    linear_only = weight_bytes(load_quantized_model(ckpt_tied, "bnb.nf4-dq", device="cpu"))
    model = load_quantized_model(ckpt_tied, "bnb.nf4-dq", device="cpu", quantize_embedding=True)
    wb = weight_bytes(model)
    _, s, _ = bnb_table(load_state_dict(ckpt_tied)["embed.weight"], "bnb.nf4-dq")
    # codes (two per byte), uint8 absmax per 64, fp32 scale per 256 absmaxes, offset, the two code books:
    # once, although the tied head computes from the same storage
    table = (320 * 64 // 2 + s.absmax.numel()
             + 4 * (s.state2.absmax.numel() + 1 + s.code.numel() + s.state2.code.numel()))
    assert wb["quantized"] == linear_only["quantized"] + table
    assert wb["unquantized"] == linear_only["unquantized"] - 320 * 64 * 4  # the fp32 table
    assert wb["total"] / fp32["total"] < 0.6 * linear_only["total"] / fp32["total"]
    in_memory = load_model(ckpt_tied)  # quantize_model: the same, on a model already in memory
    assert quantize_model(in_memory, "bnb.nf4-dq", device="cpu", quantize_embedding=True)[-1] == "embed"
    assert weight_bytes(in_memory) == wb and torch.equal(in_memory.embed.codes, model.embed.codes)

    untied = load_quantized_model(ckpt, "bnb.nf4", device="cpu", quantize_embedding=True)
    assert isinstance(untied.embed, QuantizedEmbedding)  # an untied head follows quantize_skip: lm_head kept
    assert type(untied.lm_head) is torch.nn.Linear and untied.lm_head.weight.dtype == torch.float32

    full = model.embed.dequantize()
    names = dequantize_model(model)
    assert {"embed", "lm_head"} <= set(names) and type(model.embed) is torch.nn.Embedding
    assert torch.equal(model.embed.weight, full) and model.lm_head.weight is model.embed.weight  # re-tied


def test_qlora_quantized_embedding_trains_and_merges(ckpt_tied, task, tmp_path):
    out = tmp_path / "out"
    metrics = run(["finetune", "qlora", "--checkpoint_dir", str(ckpt_tied), "--quantize_embedding", "true",
                   "--data", "JSON", "--data.json_path", str(task), "--data.prompt_style", "plain",
                   "--out_dir", str(out), "--train.max_steps", "16", "--train.global_batch_size", "8",
                   "--train.micro_batch_size", "4", "--lr", "1e-2", "--warmup_steps", "0", "--dropout", "0.0",
                   "--eval.interval", "0", "--eval.max_iters", "2", "--eval.initial_validation", "true",
                   "--eval.max_new_tokens", "2", "--logger_name", "none"])
    assert metrics["val_loss"] < 0.8 * metrics["val_loss_before"]
    final = out / "final"
    assert "quantize_embedding: true" in (final / "method_config.yaml").read_text()
    adapter = load_file(str(final / "adapter.safetensors"))
    base = load_state_dict(ckpt_tied)
    _, _, table_dq = bnb_table(base["embed.weight"], "bnb.nf4-dq")

    run(["merge_lora", str(final)])  # default: the original full-precision weights, embedding untouched
    merged = load_state_dict(final / "merged")
    run(["merge_lora", str(final), "--merge_into", "dequantized", "--out_dir", str(tmp_path / "dq")])
    merged_dq = load_state_dict(tmp_path / "dq")
    assert merged.keys() == base.keys() == merged_dq.keys()  # still tied: no separate lm_head.weight
    assert torch.equal(merged["embed.weight"], base["embed.weight"])
    assert torch.equal(merged_dq["embed.weight"], table_dq)  # what the run computed with
    for k, w in base.items():
        layer = k.removesuffix(".weight")
        if f"{layer}.lora_A" in adapter:
            delta = 16.0 / 8 * adapter[f"{layer}.lora_B"] @ adapter[f"{layer}.lora_A"]
            assert torch.allclose(merged[k], w + delta, atol=1e-6), k
            assert torch.allclose(merged_dq[k], bnb_table(w, "bnb.nf4-dq")[2] + delta, atol=1e-6), k


# ------------------------------------------------------------------ memory of loading
def test_quantized_load_streams(tmp_path):
    """A ~135 MB fp32 checkpoint loads as nf4 with a peak well under its fp32 size (fresh process).

    Peak = VmHWM after resetting it (/proc/self/clear_refs) right before loading, minus VmRSS then;
    ru_maxrss alone is polluted by import transients and, in a forked child, by the parent's size."""
    cfg = Config(name="mem", vocab_size=512, n_layer=8, n_embd=512, n_head=8, intermediate_size=2048)
    g = torch.Generator().manual_seed(0)
    save_checkpoint({k: torch.randn(shape, generator=g) * 0.02 for k, shape in expected_shapes(cfg).items()}, cfg,
                    tmp_path / "big")
    size = (tmp_path / "big" / "model.safetensors").stat().st_size
    code = (
        "import json, sys, torch; torch.set_num_threads(1)\n"
        "from litft.adapters.quantize import load_quantized_model, _bnb, weight_bytes; _bnb()\n"
        "kib = lambda k: int(open('/proc/self/status').read().split(k + ':')[1].split()[0]) * 1024\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = kib('VmRSS')\n"
        "m = load_quantized_model(sys.argv[1], 'bnb.nf4', device='cpu')\n"
        "print(json.dumps({'peak': kib('VmHWM') - before, 'weights': weight_bytes(m)['total']}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big")], capture_output=True, text=True,
                         cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    if "clear_refs" in out.stderr:
        pytest.skip("cannot reset the RSS high-water mark here (/proc/self/clear_refs)")
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert size > 130e6 and r["weights"] < 0.16 * size  # 4.5 bits per Linear weight + fp32 embedding / head
    # measured: ~0.38x (quantized model + a few copies of the largest 4 MB tensor while it quantizes)
    assert r["peak"] < 0.5 * size, f"loading peaked at +{r['peak'] / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint"


# ------------------------------------------------------------------ bad input
def test_bad_quantize_input(ckpt, capsys):
    with pytest.raises(LitftError, match="bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8"):
        LoRA(checkpoint_dir=ckpt, quantize="nf4")
    with pytest.raises(LitftError, match="litft finetune lora"):
        QLoRA(checkpoint_dir=ckpt, quantize=None)
    args = ["--checkpoint_dir", str(ckpt), "--data", "JSON", "--data.json_path", "x.json"]
    with pytest.raises(SystemExit) as e:
        main(["finetune", "qlora", *args, "--quantize", "bnb.int4"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "unknown quantize mode 'bnb.int4'" in err
    with pytest.raises(SystemExit) as e:  # full fine-tuning has no quantized base: no such option
        main(["finetune", "full", *args, "--quantize", "bnb.nf4"])
    assert e.value.code != 0 and "quantize" in capsys.readouterr().err
    with pytest.raises(LitftError, match="merge_into"):
        run(["merge_lora", str(ckpt), "--merge_into", "fp8"])


def test_bad_quantize_embedding_input(ckpt, tmp_path, capsys):
    with pytest.raises(LitftError, match=r"quantize_embedding applies to a quantized base only.*--quantize bnb"):
        LoRA(checkpoint_dir=ckpt, quantize_embedding=True)
    args = ["--checkpoint_dir", str(ckpt), "--data", "JSON", "--data.json_path", "x.json"]
    with pytest.raises(SystemExit) as e:
        main(["finetune", "lora", *args, "--quantize_embedding", "true"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "quantize_embedding applies to a quantized base" in err
    odd = make_checkpoint(tmp_path / "odd", n_embd=96, n_head=4, n_kv_head=2)  # 96 = 1.5 blocks of 64 per row
    with pytest.raises(LitftError, match="quantize_embedding needs n_embd divisible by 64.*n_embd=96"):
        load_quantized_model(odd, "bnb.nf4", device="cpu", quantize_embedding=True)


def test_old_or_missing_bitsandbytes_is_named():
    with pytest.raises(LitftError, match=r"bitsandbytes 0.48.2 is too old .* pip install -U 'bitsandbytes>=0.49'"):
        check_bitsandbytes("cpu", version="0.48.2")
    check_bitsandbytes("cpu", version="0.49.0")
    check_bitsandbytes("cuda", version="0.45.5")  # CUDA kernels are older than the CPU ones
    check_bitsandbytes("cpu")  # the installed one
    with pytest.raises(LitftError, match="CPU or CUDA"):
        check_bitsandbytes("mps", version="0.50.0")


def test_qlora_command_documents_its_options(capsys):
    with pytest.raises(SystemExit):
        run(["finetune", "qlora", "--help"])
    out = capsys.readouterr().out
    for opt in ("--quantize", "--quantize_skip", "--r", "--optimizer_args", "bnb.nf4-dq"):
        assert opt in out
    with pytest.raises(SystemExit):
        run(["merge_lora", "--help"])
    assert "--merge_into" in capsys.readouterr().out


# ------------------------------------------------------------------ CUDA (skipped without a GPU)
def cuda(fn):
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn))


@cuda
@pytest.mark.parametrize("mode", ["bnb.nf4-dq", "bnb.fp4"])
def test_cuda_codes_equal_bitsandbytes(ckpt, mode):
    spec = QUANTIZE_MODES[mode]
    model = load_quantized_model(ckpt, mode, device="cuda")
    fp = load_state_dict(ckpt)
    for name, layer in layers(model).items():
        assert layer.weight.device.type == "cuda"
        codes, state = bnb.functional.quantize_4bit(fp[f"{name}.weight"].cuda(), blocksize=64,
                                                    quant_type=spec.quant_type, compress_statistics=spec.double_quant)
        assert torch.equal(layer.weight.data, codes) and torch.equal(layer.weight.quant_state.absmax, state.absmax)
        assert torch.equal(dequantize_weight(layer), bnb.functional.dequantize_4bit(codes, state))


@cuda
@pytest.mark.parametrize("mode", ["bnb.nf4-dq", "bnb.int8"])
def test_cuda_qlora_matches_dequantized_lora(ckpt, mode):
    q, ref = qlora_and_dequantized_lora(ckpt, mode)  # QLoRA quantizes on the current CUDA device
    ref.model.cuda()
    assert next(l for l in layers(q.model).values()).weight.device.type == "cuda"
    x = torch.randint(0, 320, (2, 12), device="cuda")
    q.train(), ref.train()
    out, want = q.model(x), ref.model(x)
    # CUDA int8 matmuls quantize the activations too (LLM.int8): close, not equal
    tol = 1e-4 if mode != "bnb.int8" else 5e-2 * want.abs().max().item()
    assert (out - want).abs().max() <= tol
    q.training_step({"input_ids": x, "labels": x}).backward()
    assert all(p.grad is None for n, p in q.model.named_parameters() if not p.requires_grad)
    assert q.model.blocks[0].attn.q_proj.lora_A.grad.abs().sum() > 0
