"""`litft evaluate`: lm-eval-harness benchmarks on a litft checkpoint, optionally with an unmerged adapter.

litft's GPT sits behind lm-eval's `LM` interface (`LitftLM`), so nothing is converted to Hugging Face.
lm-eval is an optional extra (`pip install "litft[eval]"`), imported only when the command runs.

Tokenization follows lm-eval's own `HFLM` (the reference every published lm-eval number comes from), so a
litft checkpoint scores what its HF twin scores under `lm_eval --model hf`:
- text is encoded as `tokenizer.encode(text)` would with transformers' default `add_special_tokens=True`: bos
  when the tokenizer adds one (`Tokenizer.use_bos`), except when the text already starts with the prefix token's
  text (a chat template that writes its own bos);
- a (context, continuation) pair moves the context's trailing whitespace into the continuation, encodes
  context + continuation as one string and splits it after the context's own token count, because BPE merges
  the space into the next word (" Paris" is one token);
- an empty context is the prefix token: bos, or eos for a tokenizer without bos; the continuation is then encoded
  without special tokens (unless it starts with the prefix token itself);
- `loglikelihood_rolling` (perplexity) encodes the whole document the same way (so with a bos-adding tokenizer
  the document's first token is that bos, scored after the prefix token, as HFLM does) and cuts it into
  windows of the model's max_seq_length, each token scored once with as much context as fits;
- `generate_until` decodes greedily until an eos id, a stop string (`until`, plus the eos token's text) in the
  decoded new text, or max_gen_toks; the answer is decoded without special tokens and cut at the first stop.
  (HFLM's batched generate stops a row at eos only when the model's config names its eos id; real checkpoints do.)

Scoring is batched (`--batch_size`, right-padded: exact under the causal mask, so batch sizes give equal numbers);
generation runs one prompt at a time with the KV cache, which has no padding mask for a left-padded batch.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from litft.checkpoint import check_checkpoint_dir
from litft.generate import generate, load_for_generation, precision_dtype
from litft.models.gpt import GPT
from litft.tokenizer import Tokenizer
from litft.utils import LitftError, atomic_write_text

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.json"
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task does not say


def import_lm_eval() -> Any:
    """The lm_eval package, or one error naming the extra that installs it."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError as e:
        raise LitftError(f'lm-eval is not installed ({e}): pip install "litft[eval]"') from None
    return lm_eval


def score_pairs(model: GPT, pairs: list[tuple[list[int], list[int]]], batch_size: int, max_length: int,
                desc: str = "loglikelihood") -> list[tuple[float, bool]]:
    """(log p(continuation | context), is the continuation the greedy one) for token-id pairs.

    The last max_length tokens of context + continuation go in (the final token is only predicted). Rows are
    right-padded: under the causal mask a real token never sees the padding after it, and the padded positions'
    logits are not read. Longest first, so a batch pads little."""
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    device = model.embed.weight.device
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start:start + batch_size]
        rows = [(pairs[i][0] + pairs[i][1])[-(max_length + 1):][:-1] for i in idx]
        width = max(len(r) for r in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for j, r in enumerate(rows):
            batch[j, :len(r)] = torch.tensor(r)
        with torch.inference_mode():
            logprobs = model(batch.to(device)).float().log_softmax(dim=-1)
        for j, i in enumerate(idx):
            cont = torch.tensor(pairs[i][1], device=device)
            n = len(rows[j])
            lp = logprobs[j, n - len(cont):n]  # the positions that predict the continuation's tokens
            out[i] = (float(lp.gather(1, cont[:, None]).sum()), bool((lp.argmax(-1) == cont).all()))
    return out  # type: ignore[return-value]


def rolling_windows(tokens: list[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score every token of `tokens` exactly once: the first window predicts
    from the prefix token, each later one predicts the next max_length tokens (fewer at the end) with the
    max_length tokens before each as context."""
    if not tokens:
        return []
    windows = [([prefix_id], tokens[:max_length])]
    done = len(windows[0][1])
    while done < len(tokens):
        end = min(done + max_length, len(tokens))
        windows.append((tokens[max(0, end - max_length - 1):done], tokens[done:end]))
        done = end
    return windows


def greedy_until(model: GPT, tokenizer: Tokenizer, prompt: list[int], max_new_tokens: int, stops: list[str],
                 temperature: float = 0.0, generator: torch.Generator | None = None) -> list[int]:
    """New token ids after `prompt` (greedy at temperature 0), stopping at an eos id, once the decoded new text
    holds a stop string, or after max_new_tokens. The KV cache holds one sequence: no padding to mask."""
    def holds_a_stop(new: list[int]) -> bool:
        text = tokenizer.decode(new)  # specials kept: a stop may be a special token's text
        return any(s and s in text for s in stops)

    ids = torch.tensor(prompt, device=model.embed.weight.device)
    out = generate(model, ids, max_new_tokens, temperature, eos_ids=tokenizer.eos_ids, generator=generator,
                   stop_when=holds_a_stop)
    return out[len(prompt):].tolist()


def generation_settings(gen_kwargs: dict[str, Any], eos_text: str | None) -> tuple[list[str], int, float]:
    """(stop strings, max new tokens, temperature) from a task's generation_kwargs, read as lm-eval's HF model
    reads them: `until` (a string or a list) plus the eos token's text, `max_gen_toks` (or `max_new_tokens`),
    sampling only with do_sample true and a temperature > 0."""
    until = gen_kwargs.get("until")
    stops = [until] if isinstance(until, str) else list(until or [])
    if eos_text and eos_text not in stops:
        stops.append(eos_text)
    max_new = int(gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens", DEFAULT_MAX_GEN_TOKS)))
    temperature = float(gen_kwargs.get("temperature") or 0.0) if gen_kwargs.get("do_sample") else 0.0
    return stops, max_new, temperature


def litft_lm_class() -> type:
    """LitftLM, defined once lm_eval is importable (its base class is lm-eval's LM)."""
    from lm_eval.api.model import LM

    class LitftLM(LM):
        """A litft GPT (plain, or with an unmerged adapter) as an lm-eval language model."""

        def __init__(self, model: GPT, tokenizer: Tokenizer, batch_size: int = 1, name: str = "litft",
                     seed: int = 1234) -> None:
            super().__init__()
            model.eval()
            self.model, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name
            self.max_length = model.config.max_seq_length
            self._device = model.embed.weight.device
            # the token an empty context (and a perplexity document) is conditioned on: bos, else eos
            self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
            if self.prefix_id is None:
                raise LitftError(f"the tokenizer in {tokenizer.checkpoint_dir} has neither a bos nor an eos token:"
                                 " lm-eval needs one to score text from an empty context")
            self.prefix_text = tokenizer.decode([self.prefix_id])
            self.generator = torch.Generator(device=self._device).manual_seed(seed)

        def encode(self, text: str) -> list[int]:
            """transformers' encode with add_special_tokens=True, unless the text brings its own prefix token."""
            bos = self.tokenizer.use_bos and not (self.prefix_text and text.startswith(self.prefix_text))
            return self.tokenizer.encode(text, bos=bos).tolist()

        def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            if context == "":
                cont = self.tokenizer.encode(continuation, bos=False).tolist()
                if cont and cont[0] == self.prefix_id:
                    return cont[:1], cont[1:]
                return [self.prefix_id], cont
            stripped = context.rstrip()
            context, continuation = stripped, context[len(stripped):] + continuation
            whole, ctx = self.encode(context + continuation), self.encode(context)
            return ctx, whole[len(ctx):]

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            pairs = [self.encode_pair(*r.args) for r in requests]
            empty = [r.args for r, (_, cont) in zip(requests, pairs) if not cont]
            if empty:
                raise LitftError(f"a continuation encodes to no tokens: {empty[0]!r}")
            return score_pairs(self.model, pairs, self.batch_size, self.max_length)

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            windows, owner = [], []
            for i, r in enumerate(requests):
                for w in rolling_windows(self.encode(r.args[0]), self.prefix_id, self.max_length):
                    windows.append(w)
                    owner.append(i)
            totals = [0.0] * len(requests)
            for i, (logprob, _) in zip(owner, score_pairs(self.model, windows, self.batch_size, self.max_length,
                                                              "loglikelihood_rolling")):
                totals[i] += logprob
            return totals

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            eos_text = (self.tokenizer.decode([self.tokenizer.eos_id]) if self.tokenizer.eos_id is not None
                        else None)
            answers = []
            for r in tqdm(requests, desc="generate_until"):
                context, gen_kwargs = r.args
                stops, max_new, temperature = generation_settings(gen_kwargs, eos_text)
                if max_new >= self.max_length:
                    raise LitftError(f"max_gen_toks {max_new} leaves no room for a prompt in the model's"
                                     f" max_seq_length {self.max_length}")
                prompt = self.encode(context)[-(self.max_length - max_new):] or [self.prefix_id]  # keep the end
                new = greedy_until(self.model, self.tokenizer, prompt, max_new, stops, temperature, self.generator)
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                for s in stops:
                    if s:
                        text = text.split(s)[0]
                answers.append(text)
            return answers

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            """The checkpoint's chat template; add_generation_prompt False continues the last (assistant)
            message, cut right after its text, as transformers' continue_final_message does."""
            text = self.tokenizer.render_chat(chat_history, add_generation_prompt=add_generation_prompt)
            if not add_generation_prompt and chat_history:
                last = chat_history[-1]["content"].strip()
                if last and last in text:
                    text = text[:text.rindex(last) + len(last)]
            return text

        @property
        def tokenizer_name(self) -> str:
            return self.name.replace("/", "__")

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return self.tokenizer.chat_template if chat_template else None

    return LitftLM


def find_tasks(task_names: list[str], include_path: Path | None) -> Any:
    """An lm-eval TaskManager that knows every name, or one error with lm-eval's closest task names. With
    --include_path, a run whose tasks are all local skips indexing lm-eval's ~15k built-in task files."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in task_names):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    for name in task_names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            where = f" (lm-eval's tasks and those under {include_path})" if include_path else " (lm-eval's tasks)"
            raise LitftError(f"unknown task {name!r}{where}.{hint} List them with `lm_eval ls tasks`; a local task"
                             " is a YAML file under --include_path")
    return manager


def evaluate(
    checkpoint_dir: Path,
    tasks: str | None = None,
    adapter_dir: Path | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
    include_path: Path | None = None,
    out_dir: Path | None = None,
    precision: str = "32-true",
    apply_chat_template: bool = False,
    bootstrap_iters: int = 100000,
    seed: int = 1234,
) -> dict[str, Any]:
    """Score a litft checkpoint on lm-eval-harness tasks (needs `pip install "litft[eval]"`).

    Args:
        checkpoint_dir: a litft checkpoint directory; with adapter_dir, the base model the adapter applies to.
        tasks: comma-separated lm-eval task names (e.g. hellaswag,arc_easy), or names of local tasks under
            include_path.
        adapter_dir: the `final/` directory of an adapter run: evaluate with its adapter on checkpoint_dir,
            unmerged (a QLoRA run keeps its quantized base).
        limit: evaluate only the first N samples of each task (a quick check; not a comparable score).
        batch_size: sequences per forward pass when scoring (generation runs one prompt at a time).
        num_fewshot: few-shot examples in each prompt (default: each task's own setting).
        include_path: a directory of local lm-eval task YAMLs (with local data files: works offline). Task YAMLs
            can run Python (`!function`): include only task directories you trust.
        out_dir: where results.json (metrics, sample counts, task configs) and samples.json (each sample's
            prompt, responses and metrics) go; default: `evaluate/` in adapter_dir, else in checkpoint_dir.
        precision: 32-true, bf16-true or 16-true.
        apply_chat_template: frame prompts with the checkpoint's chat template (for instruction-tuned models).
        bootstrap_iters: resamples for the standard errors of metrics that are not plain means (perplexity,
            BLEU: slow); 0 skips every standard error.
        seed: random seed (lm-eval's few-shot sampling, and sampling where a task asks for it).
    """
    names = [t.strip() for t in str(tasks or "").split(",") if t.strip()]
    if not names:
        raise LitftError("no tasks: pass --tasks NAME[,NAME...] (e.g. --tasks hellaswag,arc_easy)")
    if limit is not None and limit < 1:
        raise LitftError(f"limit must be >= 1 (samples per task), got {limit}; leave it out to evaluate all samples")
    if batch_size < 1:
        raise LitftError(f"batch_size must be >= 1, got {batch_size}")
    if num_fewshot is not None and num_fewshot < 0:
        raise LitftError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if bootstrap_iters < 0:
        raise LitftError(f"bootstrap_iters must be >= 0 (0: no standard errors), got {bootstrap_iters}")
    precision_dtype(precision)  # checked before anything is loaded
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        raise LitftError(f"{adapter_dir}: adapter directory not found (pass a run's final/ directory)")
    if include_path is not None and not Path(include_path).is_dir():
        raise LitftError(f"{include_path}: include_path is not a directory of task YAML files")
    out_dir = Path(out_dir) if out_dir is not None else Path(adapter_dir or checkpoint_dir) / "evaluate"
    if out_dir.exists() and not out_dir.is_dir():
        raise LitftError(f"out_dir {out_dir} is a file, not a directory: pass another --out_dir")
    tokenizer = Tokenizer(checkpoint_dir)
    if apply_chat_template and tokenizer.chat_template is None:
        raise LitftError(f"--apply_chat_template: {checkpoint_dir} has no chat template (a base model): leave the"
                         " option out")

    lm_eval = import_lm_eval()
    from lm_eval.utils import handle_non_serializable, make_table

    task_manager = find_tasks(names, include_path)
    model, _ = load_for_generation(checkpoint_dir, adapter_dir, precision)
    lm = litft_lm_class()(model, tokenizer, batch_size=batch_size, name=str(adapter_dir or checkpoint_dir),
                          seed=seed)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
        apply_chat_template=apply_chat_template, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, bootstrap_iters=bootstrap_iters,
    )
    samples = results.pop("samples", {})
    results["config"] = {**results.get("config", {}), "model": "litft", "checkpoint_dir": str(checkpoint_dir),
                         "adapter_dir": str(adapter_dir) if adapter_dir else None, "precision": precision,
                         "batch_size": batch_size}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / SAMPLES_FILE, json.dumps(samples, indent=1, default=handle_non_serializable) + "\n")
    atomic_write_text(out_dir / RESULTS_FILE, json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    print(f"Wrote {out_dir / RESULTS_FILE}")
    return json.loads(json.dumps(results, default=handle_non_serializable))
