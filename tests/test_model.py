"""The model against transformers: same random weights, converted both ways, equal logits."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from litft.checkpoint import load_model
from litft.convert import convert_from_litft, convert_to_litft
from litft.generate import generate
from litft.models.config import Config, configs
from litft.models.gpt import GPT

V = 160
_common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128)


def hf_configs():
    from transformers import (GemmaConfig, GPTNeoXConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config)

    return {
        "llama2": LlamaConfig(**_common, num_attention_heads=4, num_key_value_heads=4),
        "llama3": LlamaConfig(**_common, num_attention_heads=4, num_key_value_heads=2, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16)),
        "mistral": MistralConfig(**_common, num_attention_heads=4, num_key_value_heads=2, sliding_window=8),
        "qwen2": Qwen2Config(**_common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
        "smollm2": LlamaConfig(**_common, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                               rope_parameters=dict(rope_type="default", rope_theta=100000.0)),
        "phi3": Phi3Config(**_common, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2),
        "gemma": GemmaConfig(**_common, num_attention_heads=4, num_key_value_heads=1, head_dim=32),
        "pythia": GPTNeoXConfig(vocab_size=V, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.25),
        "neox-sequential": GPTNeoXConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5,
                                         use_parallel_residual=False, tie_word_embeddings=False),
    }


FAMILIES = list(hf_configs())


def make_hf_model(name: str, path, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_configs()[name]
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():  # perturb every tensor, so norms and biases are not at their trivial init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return model


def hf_load(path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # missing/unexpected keys are reported as warnings
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.float().eval()


def to_v4_dialect(config_path):
    """Rewrite a transformers-5 config.json (rope_parameters) into the 4.x form (top-level keys)."""
    hf = json.loads(config_path.read_text())
    rope = hf.pop("rope_parameters", None) or {}
    hf["rope_theta"] = rope.pop("rope_theta", 10000.0)
    partial = rope.pop("partial_rotary_factor", None)
    if partial is not None:
        hf["rotary_pct" if hf["model_type"] == "gpt_neox" else "partial_rotary_factor"] = partial
    if hf["model_type"] == "gpt_neox":
        hf["rotary_emb_base"] = hf.pop("rope_theta")
    hf["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    config_path.write_text(json.dumps(hf))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dialect", ["v5", "v4"])
def test_logits_match_transformers_both_directions(name, dialect, tmp_path):
    hf_dir, lit_dir, back_dir = tmp_path / "hf", tmp_path / "lit", tmp_path / "back"
    hf_model = make_hf_model(name, hf_dir)
    if dialect == "v4":
        to_v4_dialect(hf_dir / "config.json")
    convert_to_litft(hf_dir, lit_dir)
    model = load_model(lit_dir).eval()
    torch.manual_seed(1)
    x = torch.randint(0, V, (2, 24))  # 24 > mistral's sliding window of 8: the window is exercised
    with torch.no_grad():
        expected = hf_model(x).logits
        got = model(x)
    assert (got - expected).abs().max() <= 1e-4

    convert_from_litft(lit_dir, back_dir)
    back = hf_load(back_dir)
    with torch.no_grad():
        again = back(x).logits
    assert (again - expected).abs().max() <= 1e-4


def test_generation_stops_at_a_stop_sequence():
    """Greedy decoding stops right after the new tokens end with a stop sequence (a multi-token end-of-turn marker),
    and not at the same ids inside the prompt."""
    torch.manual_seed(0)
    model = GPT(Config(name="t", vocab_size=64, n_layer=1, n_embd=32, n_head=2, intermediate_size=64,
                       max_seq_length=64)).eval()
    prompt = torch.tensor([1, 5, 9, 33])
    free = generate(model, prompt, 20)[4:].tolist()
    assert len(free) == 20
    stop = free[16:18]  # a 2-token "marker" greedy decoding produces at new tokens 17-18 (its last id also at 12)
    assert stop[-1] in free[:16]  # so a check of the last id alone would stop too early
    first = next(i for i in range(1, len(free)) if free[i - 1:i + 1] == stop)  # its first complete occurrence
    out = generate(model, prompt, 20, stop_sequences=[stop, [63, 62, 61]])[4:].tolist()
    assert out == free[:first + 1]
    # a marker that would span the prompt's end and the first new token does not count: only new tokens are searched
    across = [33, free[0]]
    assert all(free[i:i + 2] != across for i in range(len(free) - 1))
    assert generate(model, prompt, 20, stop_sequences=[across])[4:].tolist() == free


def test_thread_chooser_probe_pick_and_back_off():
    """ThreadChooser: a probe is `probe` steps with all threads then `probe` with one; all threads win only when
    clearly faster (MARGIN); after one thread wins, the next probe comes twice as late; after all threads win, EVERY
    steps on; close() gives back the caller's count."""
    from litft.threads import ThreadChooser
    from litft.utils import LitftError

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        chooser, seen = ThreadChooser(probe=3), []

        def run(steps: int, cost: dict[int, float]) -> list[int]:
            out = []
            for _ in range(steps):
                n = chooser.threads()
                out.append(n)
                chooser.record(n, cost[n])
            seen.extend(out)
            return out

        P, E = 3, ThreadChooser.EVERY
        quiet, loaded, close = {2: 0.03, 1: 0.04}, {2: 0.5, 1: 0.06}, {2: 0.97, 1: 1.0}
        assert run(2 * P + E, quiet) == [2] * P + [1] * P + [2] * E  # probe, all threads win, E steps on
        assert run(2 * P + 2 * E, loaded) == [2] * P + [1] * P + [1] * 2 * E  # one thread wins: next probe at 2E
        assert run(2 * P + 4 * E, close) == [2] * P + [1] * P + [1] * 4 * E  # not clearly faster: one, 4E
        assert run(2 * P, quiet) == [2] * P + [1] * P and run(E, quiet) == [2] * E  # quiet again: back to EVERY
        assert run(P, quiet) == [2] * P  # the next probe's all-threads half; its one-thread half runs through step():
        with chooser.step():
            assert torch.get_num_threads() == 1  # the step runs with the chosen count ...
        chooser.close()
        assert torch.get_num_threads() == 2  # ... and the caller gets its own back
        torch.set_num_threads(1)
        chooser = ThreadChooser(probe=1)
        assert set(run(100, {1: 0.1})) == {1}  # one thread: nothing to probe
        torch.set_num_threads(2)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LITFT_ADAPTIVE_THREADS", "0")
            chooser = ThreadChooser(probe=1)
            assert set(run(100, loaded)) == {2}  # switched off: torch's count throughout
            mp.setenv("LITFT_ADAPTIVE_THREADS", "yes")
            with pytest.raises(LitftError, match="LITFT_ADAPTIVE_THREADS='yes': use 1 .* or 0"):
                ThreadChooser()
    finally:
        torch.set_num_threads(threads)


def test_prefill_uses_the_thread_count_decoding_settled_on(monkeypatch):
    """The next generate() call's prefill (a chat's next turn) runs with the count the last call's decoding chose;
    the first call's with all threads. MARGIN 0: all threads never win, so decoding settles on one."""
    from litft import generate as gen
    from litft.threads import ThreadChooser

    monkeypatch.setattr(ThreadChooser, "MARGIN", 0.0)
    monkeypatch.setattr(gen, "_LAST_DECODE_THREADS", {})
    torch.manual_seed(0)
    model = GPT(Config(name="t", vocab_size=V, n_layer=1, n_embd=32, n_head=2, intermediate_size=64,
                       max_seq_length=64)).eval()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append((a[0].shape[1], torch.get_num_threads())))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        prompt = torch.tensor([1, 5, 9, 33])
        for _ in range(2):
            generate(model, prompt, 10)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    prefills = [n for t, n in seen if t == 4]
    assert prefills == [2, 1]


def test_greedy_tokens_do_not_depend_on_decode_threads():
    """generate() may switch the thread count between decoding steps; the tokens are the same as with one thread
    throughout, and the caller's thread count is restored."""
    torch.manual_seed(0)
    model = GPT(Config(name="t", vocab_size=V, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=96,
                       max_seq_length=128)).eval()
    prompt = torch.tensor([3, 14, 15, 92, 65])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        switching = generate(model, prompt, 60)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert generate(model, prompt, 60).tolist() == switching.tolist()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["llama3", "mistral", "gemma", "pythia", "phi3"])
def test_greedy_generation_matches_transformers(name, tmp_path):
    hf_model = make_hf_model(name, tmp_path / "hf", seed=3)
    convert_to_litft(tmp_path / "hf", tmp_path / "lit")
    model = load_model(tmp_path / "lit")
    prompt = torch.tensor([5, 17, 42, 7, 99, 3])
    n_new = 20  # prompt + 20 > mistral's window of 8: cached decoding with a window is exercised
    with torch.no_grad():
        ref = hf_model.generate(prompt[None], max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                                pad_token_id=0, min_new_tokens=n_new)[0]
    cached = generate(model, prompt, n_new)
    uncached = generate(model, prompt, n_new, use_cache=False)
    assert cached.tolist() == ref.tolist()
    assert uncached.tolist() == cached.tolist()


def test_packed_segments_equal_separate_samples():
    """Two samples packed in one row (segment_ids + restarted positions) give each sample's own logits."""
    torch.manual_seed(0)
    model = GPT(Config(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=96, vocab_size=V)).eval()
    a, b = torch.randint(0, V, (1, 7)), torch.randint(0, V, (1, 5))
    packed = torch.cat([a, b], dim=1)
    seg = torch.tensor([[1] * 7 + [2] * 5])
    pos = torch.tensor([list(range(7)) + list(range(5))])
    with torch.no_grad():
        out = model(packed, position_ids=pos, segment_ids=seg)
        assert torch.allclose(out[:, :7], model(a), atol=1e-5)
        assert torch.allclose(out[:, 7:], model(b), atol=1e-5)


def test_chunked_cross_entropy_equals_full_and_grads():
    from litft.models.gpt import chunked_cross_entropy

    torch.manual_seed(0)
    model = GPT(Config(n_layer=1, n_embd=32, n_head=2, intermediate_size=64, vocab_size=V))
    x = torch.randint(0, V, (2, 20))
    labels = x.clone()
    labels[:, :5] = -100
    hidden = model(x, output="hidden")
    loss_sum, n = chunked_cross_entropy(model.lm_head, hidden, labels, chunk_size=7)
    (loss_sum / n).backward()
    g_chunked = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logits = model(x)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    ref.backward()
    assert n == 2 * 15  # 19 shifted targets per row, 4 of them masked
    assert torch.allclose(loss_sum / n, ref, atol=1e-6)
    assert torch.allclose(g_chunked, model.lm_head.weight.grad, atol=1e-6)


@pytest.mark.parametrize("bias,frozen_weight", [(False, True), (True, False)])
def test_fused_linear_cross_entropy_grads_equal_autograd(bias, frozen_weight):
    """LinearCrossEntropy forms d/dh, d/dW, d/db in forward: they must equal autograd's through
    F.cross_entropy, for a frozen head (LoRA) and a trainable one with a bias (full fine-tuning)."""
    from litft.models.gpt import chunked_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    head.weight.requires_grad_(not frozen_weight)
    h = torch.randn(3, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = -100
    loss_sum, n = chunked_cross_entropy(head, h, labels, chunk_size=5)
    assert loss_sum.grad_fn.name().startswith("LinearCrossEntropy")  # the fused path ran
    (loss_sum / n * 2.5).backward()
    params = [t for t in (h, head.weight, head.bias) if t is not None and t.requires_grad]
    fused = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    ref = torch.nn.functional.cross_entropy(head(h)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1)) * 2.5
    ref.backward()
    assert torch.allclose(loss_sum / n * 2.5, ref, atol=1e-6)
    for a, t in zip(fused, params):
        assert torch.allclose(a, t.grad, atol=1e-6)


def test_fused_cross_entropy_keeps_one_head_gradient_for_all_chunks():
    """Full fine-tuning trains the head, and LinearCrossEntropy forms its gradient in forward: that gradient
    must be kept once, not once per loss chunk (a Function per chunk kept 8 head-sized gradients here, 8x the
    head's memory until backward; ~16 GB for Llama-3-8B at 8k targets). Counted with autograd's saved-tensor
    hooks, which see every tensor any op or Function keeps for backward; the gradients must still be autograd's."""
    from litft.models.gpt import chunked_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    h = torch.randn(2, 33, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 33))  # every position has a target: 2 x 32 = 64, 8 chunks of 8
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        loss_sum, n = chunked_cross_entropy(head, h, labels, chunk_size=8)
    assert n == 64
    assert [tuple(t.shape) for t in kept if t.shape == head.weight.shape] == [(50, 16)]
    # all that waits for backward: one d/dh for the 64 targets, one d/dW, one d/db
    assert sum(t.numel() for t in kept) <= 64 * 16 + 50 * 16 + 50
    (loss_sum / n).backward()
    fused = [t.grad.clone() for t in (h, head.weight, head.bias)]
    for t in (h, head.weight, head.bias):
        t.grad = None
    ref = torch.nn.functional.cross_entropy(head(h)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss_sum / n, ref, atol=1e-6, rtol=1e-6)
    for a, t in zip(fused, (h, head.weight, head.bias)):
        torch.testing.assert_close(a, t.grad, atol=1e-6, rtol=1e-5)


def test_named_configs_build():
    for c in configs:
        cfg = Config.from_name(c["name"])
        with torch.device("meta"):
            GPT(cfg)
    with pytest.raises(ValueError, match="Did you mean"):
        Config.from_name("SmolLM2-135")


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (None, 0.9), (20, 0.5), (None, 0.05)])
def test_sampling_filters_match_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from litft.generate import filter_logits

    torch.manual_seed(0)
    logits = torch.randn(4, V) * 3
    ref = logits.clone()
    if top_k is not None:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = filter_logits(logits, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.equal(ours[~torch.isinf(ours)], logits[~torch.isinf(ours)])


def _grads(fn, inputs, grad_out):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [t.grad.clone() for t in inputs]


@pytest.mark.parametrize("rotary_fraction", [1.0, 0.25])
def test_hand_written_backwards_equal_autograd(rotary_fraction):
    """Rope, SwiGLU and RMSNormFunction save less for backward than autograd would; their outputs and
    gradients must equal autograd's through the plain formulas."""
    from litft.models.fused import RMSNormFunction, Rope, SwiGLU

    torch.manual_seed(0)
    D = 16
    rd = int(D * rotary_fraction)
    x = torch.randn(2, 3, 5, D, requires_grad=True)
    freqs = torch.randn(1, 1, 5, rd // 2)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()

    def rope_ref(x):
        x_rot, x_pass = x[..., :rd], x[..., rd:]
        x1, x2 = x_rot.chunk(2, dim=-1)
        return torch.cat((x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin, x_pass), dim=-1)

    g = torch.randn_like(x)
    for a, b in zip(_grads(lambda x: Rope.apply(x, cos, sin), [x], g), _grads(rope_ref, [x], g)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)

    gate, up = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    g = torch.randn(4, 6)
    swiglu = _grads(SwiGLU.apply, [gate, up], g)
    for a, b in zip(swiglu, _grads(lambda gt, u: torch.nn.functional.silu(gt) * u, [gate, up], g)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)

    for unit_offset in (False, True):
        h, w = torch.randn(2, 5, 8, requires_grad=True), torch.randn(8, requires_grad=True)
        g = torch.randn(2, 5, 8)

        def norm_ref(h, w):
            n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
            return n * (1.0 + w) if unit_offset else w * n

        fused = _grads(lambda h, w: RMSNormFunction.apply(h, w, 1e-5, unit_offset), [h, w], g)
        for a, b in zip(fused, _grads(norm_ref, [h, w], g)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
