"""DPO: the loss variants against TRL, per-sequence log-probs against transformers, the reference policy, the
preference data (conversational form, truncation, bad input), and the loop's per-pair normalisation."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from litft.checkpoint import load_model
from litft.cli import run
from litft.data import Preference
from litft.methods.dpo import DPO, preference_loss
from litft.methods.lora import LoRA
from litft.tokenizer import Tokenizer
from litft.utils import LitftError

PAIRS = [{"prompt": "Repeat the letter a", "chosen": "aaa", "rejected": "bbb"},
         {"prompt": "Repeat the letter c", "chosen": "ccc", "rejected": "cc d e f"},
         {"prompt": "Repeat the letter: abcdefghij abc", "chosen": "j", "rejected": "ab ab"},
         {"prompt": "Repeat", "chosen": "a b c d e", "rejected": "e"}]


def write_pairs(path: Path, pairs: list[dict], n: int = 1) -> Path:
    path.write_text(json.dumps(pairs * n))
    return path


def batch_of(ckpt: Path, path: Path, max_seq_length: int | None = None, **kw) -> dict[str, torch.Tensor]:
    data = Preference(json_path=path, val_json_path=path, prompt_style="plain", **kw)
    data.setup(Tokenizer(ckpt), max_seq_length)
    return data.collate_fn([data.train_dataset[i] for i in range(len(data.train_dataset))])


# -- the loss: TRL's formulas on the same log-probs ------------------------------------------------------
@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0),
                                                       ("ipo", 0.0), ("simpo", 0.0), ("simpo", 0.1)])
def test_loss_and_rewards_equal_trl(loss_type, label_smoothing):
    """TRL's preference-loss function (CPOTrainer.cpo_loss: sigmoid with label smoothing = cDPO, hinge, ipo, simpo)
    fed DPO's log-ratios (policy - reference) is DPO's loss, and its rewards beta * log-ratio are DPO's rewards;
    for simpo it is fed the length-averaged policy log-probs directly (reference-free)."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, dtype=torch.float64) * 5 - 20 for _ in range(4))
    beta = 0.1 if loss_type != "simpo" else 2.0
    trl_self = SimpleNamespace(alpha=0.0, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                               simpo_gamma=0.7, accelerator=SimpleNamespace(device="cpu"))
    if loss_type == "simpo":
        want = CPOTrainer.cpo_loss(trl_self, pc, pr)
    else:
        want = CPOTrainer.cpo_loss(trl_self, pc - rc, pr - rr)
    got = preference_loss(pc, pr, rc, rr, loss_type, beta, label_smoothing, simpo_gamma=0.7)
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-6


# -- per-sequence log-probs: transformers' logits of the converted model --------------------------------
def test_sequence_logps_equal_transformers(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    from litft.convert import convert_from_litft

    batch = batch_of(ckpt, write_pairs(tmp_path / "p.json", PAIRS))
    method = DPO(checkpoint_dir=ckpt, r=4, alpha=8, dropout=0.0)
    method.configure_model()
    method.eval()
    with torch.no_grad():
        for p in method.model.parameters():  # a non-zero adapter: the policy is not the base
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        got, counts = method.sequence_logps(method.model, batch)
        merged = method.merged_model()
    merged_dir, hf_dir = tmp_path / "merged", tmp_path / "hf"
    from litft.checkpoint import save_checkpoint
    save_checkpoint(merged.state_dict(), merged.config, merged_dir, tokenizer_dir=ckpt)
    convert_from_litft(merged_dir, hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    with torch.no_grad():
        logits = hf(batch["input_ids"]).logits.float()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    want = (token_logps * mask).sum(1)
    assert torch.equal(counts, mask.sum(1))
    assert (got - want).abs().max() <= 1e-4, (got, want)


# -- the reference policy --------------------------------------------------------------------------------
def perturb_trainable(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("use_dora", [False, True])
def test_reference_is_the_base_and_does_not_move(use_dora, ckpt, tmp_path):
    batch = batch_of(ckpt, write_pairs(tmp_path / "p.json", PAIRS))
    base = load_model(ckpt).eval()
    method = DPO(checkpoint_dir=ckpt, r=4, alpha=8, dropout=0.1, use_dora=use_dora)
    method.configure_model()
    assert method.reference_params is None  # adapters taken out: no copy of anything
    with torch.no_grad():
        want, _ = method.sequence_logps(base, batch)
    ref0 = method.reference_logps(batch)
    perturb_trainable(method.model, 1)
    ref1 = method.reference_logps(batch)
    with torch.no_grad():
        policy, _ = method.sequence_logps(method.model.eval(), batch)
    assert torch.equal(ref0, ref1)
    assert (ref0 - want).abs().max() <= 1e-5
    assert (policy - ref1).abs().max() > 1e-2  # the adapter did change the policy


def test_reference_is_the_sft_adapter_with_init_adapter(ckpt, tmp_path):
    batch = batch_of(ckpt, write_pairs(tmp_path / "p.json", PAIRS))
    sft = LoRA(checkpoint_dir=ckpt, r=4, alpha=8, dropout=0.0)
    sft.configure_model()
    perturb_trainable(sft.model, 2)  # an "SFT-trained" adapter
    sft_dir = tmp_path / "sft" / "final"
    sft_dir.mkdir(parents=True)
    sft.save_final(sft_dir)
    with torch.no_grad():
        want, _ = DPO.sequence_logps(None, sft.model.eval(), batch)
        bare, _ = DPO.sequence_logps(None, load_model(ckpt).eval(), batch)

    method = DPO(checkpoint_dir=ckpt, r=4, alpha=8, dropout=0.1, init_adapter=sft_dir)
    method.configure_model()
    n_ref = sum(t.numel() for t in method.reference_params.values())
    assert n_ref == sum(p.numel() for p in method.model.parameters() if p.requires_grad)  # adapter-sized copy only
    ref0 = method.reference_logps(batch)
    perturb_trainable(method.model, 3)
    ref1 = method.reference_logps(batch)
    assert torch.equal(ref0, ref1)
    assert (ref0 - want).abs().max() <= 1e-5  # the SFT model, ...
    assert (ref0 - bare).abs().max() > 1e-2  # ... not the bare base
    with torch.no_grad():  # the swap was undone: the policy is the perturbed model again
        policy, _ = method.sequence_logps(method.model.eval(), batch)
    assert (policy - ref1).abs().max() > 1e-2


def test_cached_reference_equals_live(ckpt, tmp_path):
    batch = batch_of(ckpt, write_pairs(tmp_path / "p.json", PAIRS))
    method = DPO(checkpoint_dir=ckpt, r=4, alpha=8, cache_reference=True)
    method.configure_model()
    live = method.reference_logps(batch)
    assert len(method.reference_cache) == len(PAIRS)
    perturb_trainable(method.model, 4)
    method.reference_cache = {k: v + 0 for k, v in method.reference_cache.items()}
    cached = method.reference_logps(batch)
    assert torch.equal(live, cached)


# -- the data ------------------------------------------------------------------------------------------
def test_conversational_records_equal_plain_ones(ckpt, tmp_path):
    conv = [{"prompt": [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in PAIRS]
    a = batch_of(ckpt, write_pairs(tmp_path / "plain.json", PAIRS))
    b = batch_of(ckpt, write_pairs(tmp_path / "conv.json", conv))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["input_ids"].shape[0] == 2 * len(PAIRS) and a["is_chosen"].tolist() == [True] * 4 + [False] * 4


def test_truncation_keeps_prompt_end_and_completion_starts(ckpt, tmp_path):
    tok = Tokenizer(ckpt)
    pair = {"prompt": "Repeat the letter: abcdefghij abcdefghij", "chosen": "a b c d e f g h", "rejected": "j i h g f"}
    path = write_pairs(tmp_path / "p.json", [pair, PAIRS[0]])
    prompt = tok.encode(pair["prompt"], bos=tok.use_bos)
    chosen = tok.encode(pair["chosen"], bos=False, eos=True)
    with pytest.warns(UserWarning, match="truncated"):
        b = batch_of(ckpt, path, max_seq_length=8, max_prompt_length=5)
    row = b["input_ids"][0]
    kept_prompt = (b["labels"][0] == -100).sum()
    assert kept_prompt == 5
    assert torch.equal(row[:1], prompt[:1]) and torch.equal(row[1:5], prompt[-4:])  # BOS + the prompt's end
    assert torch.equal(row[5:8], chosen[:3])  # the completion's start


@pytest.mark.parametrize("case", ["empty_completion", "missing_key", "all_same", "prompt_too_long",
                                  "completion_cut_to_nothing"])
def test_bad_preference_data_is_one_clear_error(case, ckpt, tmp_path):
    pairs = [dict(p) for p in PAIRS]
    expect = {"empty_completion": "empty 'rejected' completion", "missing_key": "has no 'chosen' field",
              "all_same": "the chosen and the rejected response are the same",
              "prompt_too_long": "leaves nothing of its completions.*set --data.max_prompt_length",
              "completion_cut_to_nothing": "leaves nothing of its completions.*lower --data.max_prompt_length"}[case]
    if case == "empty_completion":
        pairs[1]["rejected"] = "  "
    elif case == "missing_key":
        del pairs[2]["chosen"]
    elif case == "all_same":
        pairs = [dict(p, rejected=p["chosen"]) for p in pairs]
    path = write_pairs(tmp_path / "bad.json", pairs, n=4)
    out = tmp_path / "out"
    args = ["finetune", "dpo", "--checkpoint_dir", str(ckpt), "--data", "Preference", "--data.json_path", str(path),
            "--data.prompt_style", "plain", "--out_dir", str(out), "--train.max_steps", "2",
            "--train.global_batch_size", "4", "--train.micro_batch_size", "4", "--eval.interval", "0",
            "--logger_name", "none"]
    if case == "prompt_too_long":
        args += ["--train.max_seq_length", "6"]
    elif case == "completion_cut_to_nothing":  # the prompt is cut to max_prompt_length, which fills the sequence
        args += ["--train.max_seq_length", "6", "--data.max_prompt_length", "6"]
    with pytest.raises(LitftError, match=expect):
        run(args)
    assert not out.exists()  # nothing written


# -- the loop: a per-pair mean, rewards logged ----------------------------------------------------------
def test_first_step_loss_is_log2_per_pair_and_rewards_are_logged(ckpt, tmp_path, one_thread):
    """At the first step the policy is the reference, so every pair's sigmoid loss is log 2: the loop's loss
    is that only if it divides by the number of pairs (not tokens)."""
    path = write_pairs(tmp_path / "p.json", PAIRS, n=8)
    out = tmp_path / "out"
    metrics = run(["finetune", "dpo", "--checkpoint_dir", str(ckpt), "--data", "Preference", "--data.json_path",
                   str(path), "--data.prompt_style", "plain", "--out_dir", str(out), "--train.max_steps", "1",
                   "--train.global_batch_size", "8", "--train.micro_batch_size", "4", "--dropout", "0.0",
                   "--eval.interval", "0", "--eval.max_new_tokens", "2", "--logger_name", "tensorboard"])
    assert abs(metrics["loss"] - math.log(2)) <= 1e-5, metrics
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"):
        assert name in metrics and abs(metrics[name]) <= 1e-4  # the policy is the reference: zero rewards
    assert (out / "final" / "adapter.safetensors").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs" / "tensorboard").glob("version_*")))).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/rewards/margins", "train/rewards/accuracy", "val/rewards/margins", "val/rewards/accuracy"} <= tags


# -- what DPO refuses, and the adapter options it runs with ---------------------------------------------
DPO_ARGS = ["--data.prompt_style", "plain", "--train.max_steps", "2", "--train.global_batch_size", "4",
            "--train.micro_batch_size", "4", "--eval.interval", "0", "--eval.final_validation", "false",
            "--eval.max_new_tokens", "2", "--logger_name", "none"]


@pytest.mark.parametrize("method,data", [("lora", "Preference"), ("full", "Preference"), ("dpo", "JSON")])
def test_method_and_data_must_fit(method, data, ckpt, tmp_path):
    """An SFT method on preference pairs would train on the rejected responses too; DPO on SFT records has no
    pairs: one error before anything is loaded or written."""
    records = PAIRS if data == "Preference" else [{"instruction": p["prompt"], "output": p["chosen"]} for p in PAIRS]
    path = write_pairs(tmp_path / "d.json", records, n=4)
    out = tmp_path / "out"
    with pytest.raises(LitftError, match="preference pairs .* go with `litft finetune dpo`"):
        run(["finetune", method, "--checkpoint_dir", str(ckpt), "--data", data, "--data.json_path", str(path),
             "--out_dir", str(out), *DPO_ARGS])
    assert not out.exists()


def test_full_fine_tuning_is_refused(ckpt):
    from litft.methods.base import Finetune
    from litft.methods.dpo import Preference as PreferenceSteps
    from litft.methods.full import Full

    class FullDPO(PreferenceSteps, Full):
        pass

    with pytest.raises(LitftError, match="DPO with full fine-tuning is not supported"):
        FullDPO(checkpoint_dir=ckpt)

    class NoAdapterDPO(PreferenceSteps, Finetune):  # any other module without adapter layers: no reference
        pass

    method = NoAdapterDPO(checkpoint_dir=ckpt)
    with pytest.raises(LitftError, match="DPO needs adapter layers"):
        method.configure_model()


@pytest.mark.parametrize("options", [["--quantize", "bnb.nf4"], ["--loraplus_lr_ratio", "16"],
                                     ["--use_dora", "true"]], ids=["qlora", "lora_plus", "dora"])
def test_dpo_runs_with_qlora_loraplus_dora(options, ckpt, tmp_path, one_thread):
    """Two steps with each adapter option: the loss starts at log 2 (policy = reference) and the adapter moves."""
    if options[0] == "--quantize":
        pytest.importorskip("bitsandbytes")
    path = write_pairs(tmp_path / "p.json", PAIRS, n=2)
    out = tmp_path / "out"
    metrics = run(["finetune", "dpo", "--checkpoint_dir", str(ckpt), "--data", "Preference", "--data.json_path",
                   str(path), "--out_dir", str(out), "--dropout", "0.0", "--lr", "0.01", *options, *DPO_ARGS])
    assert math.isfinite(metrics["loss"])
    from litft.checkpoint import iter_safetensors

    saved = dict(iter_safetensors(out / "final" / "adapter.safetensors"))
    lora_b = [v for k, v in saved.items() if k.endswith("lora_B")]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # trained away from B = 0
    if "--use_dora" in options:
        assert any(k.endswith("magnitude") for k in saved)
