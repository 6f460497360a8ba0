"""`litft evaluate` scores as lm-eval's own HF model (`HFLM`) scores the converted checkpoint, on three local tasks
(tests/eval_tasks: multiple choice with acc/acc_norm, generation until stop strings with exact_match, perplexity
with loglikelihood_rolling); an unmerged adapter scores as the merged checkpoint; --limit, batch sizes, bad input.

The model is a tiny Llama after four LoRA steps teaching it to answer "a" to the generation task's prompts (a random
model answers every prompt alike): some answers are "a" (right where the target is "a"), others still differ. Accuracies and exact matches must
be equal; loglikelihoods and perplexities agree to a relative 1e-5: the two run the same fp32 arithmetic in
a different order (litft's fused kernels vs transformers' modules), ~1e-7 relative on a sum of ~100 log-probs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from litft.utils import LitftError
from tests.helpers import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "eval_tasks"
ALL = ["litft_mc", "litft_gen", "litft_ppl"]
RTOL = 1e-5  # loglikelihood / perplexity: same fp32 math, other summation order


def bos_checkpoint(d: Path) -> Path:
    """helpers' tiny checkpoint with a tokenizer whose post-processor adds bos (as Llama 3's does), so litft and
    transformers agree on bos (transformers v5 ignores tokenizer_config's add_bos_token; litft honours it), and a
    generation_config.json naming eos, as real checkpoints do: the HF twin's config.json gets eos_token_id from it,
    so HF's generate stops a sequence at eos as litft does (without it, HFLM's batched generation runs a finished
    sequence on past its eos until the whole batch stops, and the specials-free decode keeps that tail)."""
    make_checkpoint(d)
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}))
    tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    """base checkpoint, a LoRA run's final/, the merged checkpoint and its HF twin."""
    import torch

    from litft.convert import convert_from_litft
    from litft.data import JSON
    from litft.methods.lora import LoRA
    from litft.methods.run_dir import merge_lora
    from litft.train import EvalArgs, TrainArgs, finetune

    d = tmp_path_factory.mktemp("eval")
    base = bos_checkpoint(d / "base")
    prompts = [json.loads(line)["prompt"] for line in (TASKS / "litft_gen.jsonl").read_text().splitlines()]
    records = [{"instruction": p, "input": "", "output": "a"} for p in prompts if len(p) < 100]  # not the long one
    (d / "train.json").write_text(json.dumps(records * 4))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finetune(LoRA(checkpoint_dir=base, lr=2e-2), JSON(d / "train.json", prompt_style="plain", val_split_fraction=0.1),
                 # random batches (not length-grouped): after these 4 steps the model answers some generation
                 # prompts right and some wrong, which the exact-match comparison needs (grouped: none right)
                 d / "run", TrainArgs(global_batch_size=8, micro_batch_size=8, max_steps=4, max_seq_length=64,
                                      group_by_length=False),
                 EvalArgs(interval=0, initial_validation=False), logger_name="none")
    finally:
        torch.set_num_threads(threads)
    merged = merge_lora(d / "run" / "final", out_dir=d / "merged")
    hf = convert_from_litft(merged, d / "hf")
    return SimpleNamespace(base=base, adapter=d / "run" / "final", merged=merged, hf=hf)


@pytest.fixture
def in_root(monkeypatch, one_thread):
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data files relative to the repository root


def run_litft(checkpoint: Path, out_dir: Path, tasks: list[str] = ALL, **kwargs) -> tuple[dict, dict]:
    from litft.evaluate import evaluate

    results = evaluate(checkpoint, ",".join(tasks), include_path=TASKS, out_dir=out_dir, bootstrap_iters=0,
                       **kwargs)
    assert json.loads((out_dir / "results.json").read_text())["results"] == results["results"]
    return results, json.loads((out_dir / "samples.json").read_text())


def responses(samples: dict, task: str) -> list:
    return [s["filtered_resps"] for s in sorted(samples[task], key=lambda s: s["doc_id"])]


def loglikelihoods(samples: dict, task: str) -> list[float]:
    """Every choice's loglikelihood (multiple choice) or each document's (rolling), flat, in doc order."""
    return [r[0] if isinstance(r, list) else r for doc in responses(samples, task) for r in doc]


def test_matches_lm_evals_hf_model(models, in_root, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    ours, our_samples = run_litft(models.merged, tmp_path / "ours", batch_size=4)
    hflm = HFLM(pretrained=str(models.hf), batch_size=4, device="cpu", dtype="float32")
    theirs = lm_eval.simple_evaluate(model=hflm, tasks=ALL, bootstrap_iters=0,
                                     task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    their_samples = json.loads(json.dumps(theirs["samples"], default=str))
    mine, ref = ours["results"], theirs["results"]

    for metric in ("acc,none", "acc_norm,none"):
        assert mine["litft_mc"][metric] == ref["litft_mc"][metric]
        assert 0 < mine["litft_mc"][metric] < 1
    lls, ref_lls = responses(our_samples, "litft_mc"), responses(their_samples, "litft_mc")
    assert [[g for _, g in doc] for doc in lls] == [[g for _, g in doc] for doc in ref_lls]  # is_greedy flags
    assert loglikelihoods(our_samples, "litft_mc") == pytest.approx(loglikelihoods(their_samples, "litft_mc"),
                                                                     rel=RTOL)
    picks = [max(range(4), key=lambda i: doc[i][0]) for doc in lls]
    assert len(set(picks)) > 1  # the model's choice depends on the question

    assert mine["litft_gen"]["exact_match,none"] == ref["litft_gen"]["exact_match,none"]
    answers = responses(our_samples, "litft_gen")
    assert answers == responses(their_samples, "litft_gen")  # every generated string, not only the score
    assert 0 < mine["litft_gen"]["exact_match,none"] < 1 and len({a[0] for a in answers}) > 1
    assert not any(stop in a[0] for a in answers for stop in ("\n", ".", "{", "</s>"))  # cut at the stops

    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert mine["litft_ppl"][metric] == pytest.approx(ref["litft_ppl"][metric], rel=RTOL)
    assert loglikelihoods(our_samples, "litft_ppl") == pytest.approx(loglikelihoods(their_samples, "litft_ppl"),
                                                                      rel=RTOL)
    from litft.tokenizer import Tokenizer

    def longest(task: str, key: str) -> int:  # tokens in the task's longest text
        texts = [json.loads(line)[key] for line in (TASKS / f"{task}.jsonl").read_text().splitlines()]
        return Tokenizer(models.merged).encode(max(texts, key=len)).numel()

    assert longest("litft_ppl", "text") > 2 * 128  # three rolling windows of max_seq_length
    assert longest("litft_mc", "question") > 128 and longest("litft_gen", "prompt") > 128 - 12  # cut from the left


def test_unmerged_adapter_equals_merged_checkpoint(models, in_root, tmp_path):
    tasks = ["litft_mc", "litft_gen"]
    merged, merged_samples = run_litft(models.merged, tmp_path / "merged", tasks)
    adapter, adapter_samples = run_litft(models.base, tmp_path / "adapter", tasks, adapter_dir=models.adapter)
    base, base_samples = run_litft(models.base, tmp_path / "base", tasks)
    assert adapter["results"]["litft_mc"]["acc,none"] == merged["results"]["litft_mc"]["acc,none"]
    assert adapter["results"]["litft_gen"] == merged["results"]["litft_gen"]
    assert responses(adapter_samples, "litft_gen") == responses(merged_samples, "litft_gen")
    assert loglikelihoods(adapter_samples, "litft_mc") == pytest.approx(loglikelihoods(merged_samples, "litft_mc"),
                                                                        rel=RTOL)
    assert responses(base_samples, "litft_gen") != responses(adapter_samples, "litft_gen")  # the adapter is used
    assert adapter["config"]["adapter_dir"] == str(models.adapter)


def test_limit_and_batch_size(models, in_root, tmp_path):
    one, one_samples = run_litft(models.merged, tmp_path / "b1", ["litft_mc", "litft_ppl"], limit=3, batch_size=1)
    four, four_samples = run_litft(models.merged, tmp_path / "b4", ["litft_mc", "litft_ppl"], limit=3, batch_size=4)
    written = json.loads((tmp_path / "b4" / "results.json").read_text())
    assert written["n-samples"]["litft_mc"] == {"original": 12, "effective": 3}
    assert len(four_samples["litft_mc"]) == 3 and written["config"]["batch_size"] == 4
    assert one["results"] == four["results"]
    assert responses(one_samples, "litft_mc") == responses(four_samples, "litft_mc")
    assert responses(one_samples, "litft_ppl") == responses(four_samples, "litft_ppl")


def test_cli_run_and_help(models, in_root, tmp_path, capsys):
    from litft.cli import main

    main(["evaluate", str(models.merged), "--tasks", "litft_mc", "--include_path", str(TASKS), "--limit", "2",
          "--out_dir", str(tmp_path / "cli"), "--bootstrap_iters", "0"])
    printed = capsys.readouterr().out
    assert "litft_mc" in printed and "acc_norm" in printed  # the table
    assert json.loads((tmp_path / "cli" / "results.json").read_text())["n-samples"]["litft_mc"]["effective"] == 2
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--help"])
    helped = capsys.readouterr().out
    assert exit_.value.code == 0 and "--adapter_dir" in helped and "--include_path" in helped and "--tasks" in helped


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory) -> SimpleNamespace:
    """A tiny random model with Llama 3's tokenizer setup: the post-processor adds bos and so does the chat template,
    so a rendered prompt must not get a second one (HFLM's has_bos_prefix rule); and its HF twin."""
    from litft.convert import convert_from_litft
    from litft.tokenizer import Tokenizer
    from tests.chat_fixtures import write_chat_tokenizer

    d = tmp_path_factory.mktemp("chat")
    lit = make_checkpoint(d / "lit", vocab_size=448)
    write_chat_tokenizer(lit, "llama3")
    hf_tok = HFTokenizer.from_file(str(lit / "tokenizer.json"))
    bos = hf_tok.token_to_id("<|begin_of_text|>")
    hf_tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                          special_tokens=[("<|begin_of_text|>", bos)])
    hf_tok.save(str(lit / "tokenizer.json"))
    config = json.loads((lit / "tokenizer_config.json").read_text())
    del config["add_bos_token"]  # as Llama 3's: the post-processor decides
    (lit / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer(lit)
    assert tok.use_bos
    ids = {"bos_token_id": tok.token_to_id("<|begin_of_text|>"), "eos_token_id": tok.token_to_id("<|eot_id|>")}
    (lit / "generation_config.json").write_text(json.dumps(ids))
    return SimpleNamespace(lit=lit, hf=convert_from_litft(lit, d / "hf"))


def test_chat_template_and_few_shot_match_lm_evals_hf_model(chat_models, in_root, tmp_path):
    """--apply_chat_template with --num_fewshot 1 (the example as an earlier turn of the chat): the prompts litft renders
    score as transformers' rendering of the same template does under HFLM."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = ["litft_mc", "litft_gen"]
    ours, our_samples = run_litft(chat_models.lit, tmp_path / "ours", tasks, apply_chat_template=True,
                                  num_fewshot=1, limit=4, batch_size=4)
    hflm = HFLM(pretrained=str(chat_models.hf), batch_size=4, device="cpu", dtype="float32")
    theirs = lm_eval.simple_evaluate(model=hflm, tasks=tasks, bootstrap_iters=0, apply_chat_template=True,
                                     num_fewshot=1, limit=4,
                                     task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    their_samples = json.loads(json.dumps(theirs["samples"], default=str))
    prompt = our_samples["litft_gen"][0]["arguments"][0][0]
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user") and prompt.count("<|eot_id|>") == 3
    assert prompt == their_samples["litft_gen"][0]["arguments"][0][0]
    assert ours["results"]["litft_mc"]["acc,none"] == theirs["results"]["litft_mc"]["acc,none"]
    assert loglikelihoods(our_samples, "litft_mc") == pytest.approx(loglikelihoods(their_samples, "litft_mc"),
                                                                     rel=RTOL)
    assert responses(our_samples, "litft_gen") == responses(their_samples, "litft_gen")


@pytest.mark.parametrize("case", ["unknown_task", "missing_checkpoint", "limit_0", "no_chat_template"])
def test_bad_input_one_error_nothing_written(case, models, in_root, tmp_path):
    from litft.evaluate import evaluate

    out = tmp_path / "out"
    args = dict(checkpoint_dir=models.merged, tasks="litft_mc", include_path=TASKS, out_dir=out)
    expected = {"unknown_task": "unknown task 'litft_mcq'.*Did you mean 'litft_mc'",
                "missing_checkpoint": "checkpoint directory not found",
                "limit_0": "limit must be >= 1",
                "no_chat_template": "--apply_chat_template: .* has no chat template"}[case]
    if case == "unknown_task":
        args["tasks"] = "litft_mc,litft_mcq"
    elif case == "missing_checkpoint":
        args["checkpoint_dir"] = tmp_path / "nope"
    elif case == "limit_0":
        args["limit"] = 0
    else:
        args["apply_chat_template"] = True
    with pytest.raises(LitftError, match=expected):
        evaluate(**args)
    assert not out.exists()


def test_lm_eval_not_installed(models, tmp_path, monkeypatch, capsys):
    """lm-eval missing (its import made to fail: a None entry in sys.modules): one line naming the extra, exit 1,
    nothing written."""
    from litft.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", str(models.merged), "--tasks", "litft_mc", "--out_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1  # one line, no traceback
    assert "litft: error: lm-eval is not installed" in err and 'pip install "litft[eval]"' in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exit_:  # lm_eval is imported inside the command only: --help needs none
        main(["evaluate", "--help"])
    assert exit_.value.code == 0 and "--tasks" in capsys.readouterr().out
