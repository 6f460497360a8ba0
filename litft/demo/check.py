"""Feasibility check for the demo: does LoRA on the shipped base learn the shipped task, fast, on CPU?

    python -m litft.demo.check                      # defaults = the numbers in README.md
    python -m litft.demo.check --seed 1 --steps 300 --lr 2e-3

Loads `base/`, scores greedy exact match on `data/test.json`, trains LoRA adapters with a minimal loop
(no litft trainer, so this checks the *assets*, independently of the training code), scores again, and
prints accuracy before/after and the wall time. Prompt formatting and tokenisation follow litft's data
module: Alpaca template, <s> + prompt + response + </s>, loss on the response and </s> only.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from litft.adapters.inject import inject_adapters, mark_only_adapters_trainable
from litft.adapters.lora import LoRALinear
from litft.checkpoint import load_model
from litft.data.prompts import PromptStyle
from litft.generate import generate
from litft.models.gpt import GPT, chunked_cross_entropy
from litft.tokenizer import Tokenizer

DEMO_DIR = Path(__file__).parent


def load_records(path: Path) -> list[dict[str, str]]:
    return json.loads(path.read_text(encoding="utf-8"))


def encode_sample(tokenizer: Tokenizer, style: PromptStyle, rec: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    prompt = tokenizer.encode(style.apply(rec["instruction"], rec.get("input", "")), bos=tokenizer.use_bos)
    response = tokenizer.encode(rec["output"], bos=False, eos=True)
    ids = torch.cat([prompt, response])
    labels = ids.clone()
    labels[: len(prompt)] = -100
    return ids, labels


@torch.no_grad()
def exact_match(model: GPT, tokenizer: Tokenizer, style: PromptStyle, records: list[dict[str, str]],
                max_new_tokens: int = 32, show: int = 0) -> float:
    """Greedy generation until </s>; a hit when the stripped response equals the stripped reference."""
    hits = 0
    for i, rec in enumerate(records):
        prompt = tokenizer.encode(style.apply(rec["instruction"], rec.get("input", "")), bos=tokenizer.use_bos)
        out = generate(model, prompt, max_new_tokens, temperature=0.0, eos_ids=tokenizer.eos_ids)
        pred = tokenizer.decode(out[len(prompt):], skip_special_tokens=True).strip()
        hits += pred == rec["output"].strip()
        if i < show:
            print(f"  {rec['instruction']!r} -> {pred!r} (want {rec['output']!r})")
    return hits / len(records)


def train_lora(
    model: GPT, samples: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int, *, r: int, alpha: float,
    lr: float, steps: int, batch_size: int, warmup: int, seed: int, log_every: int = 50,
) -> float:
    """Inject LoRA on all linear layers, train with AdamW + warmup + cosine; returns seconds spent."""
    torch.manual_seed(seed)
    inject_adapters(model, "all-linear", lambda name, lin: LoRALinear(lin, r=r, alpha=alpha))
    mark_only_adapters_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        if len(order) < batch_size:
            order = list(range(len(samples)))
            rng.shuffle(order)
        batch = [samples[order.pop()] for _ in range(batch_size)]
        T = max(len(ids) for ids, _ in batch)
        x = torch.full((batch_size, T), pad_id, dtype=torch.long)
        y = torch.full((batch_size, T), -100, dtype=torch.long)
        for b, (ids, labels) in enumerate(batch):
            x[b, : len(ids)], y[b, : len(ids)] = ids, labels
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        loss_sum, n = chunked_cross_entropy(model.lm_head, model(x, output="hidden"), y)
        loss = loss_sum / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - t0:5.1f}s", flush=True)
    model.eval()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=DEMO_DIR / "base")
    p.add_argument("--data", type=Path, default=DEMO_DIR / "data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--n-train", type=int, default=None, help="use only the first n training records")
    p.add_argument("--n-test", type=int, default=None, help="score only the first n test records")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = Tokenizer(args.base)
    model = load_model(args.base)
    style = PromptStyle.from_name("alpaca")
    train = load_records(args.data / "train.json")[: args.n_train]
    test = load_records(args.data / "test.json")[: args.n_test]
    samples = [encode_sample(tokenizer, style, rec) for rec in train]
    lengths = [len(ids) for ids, _ in samples]
    print(f"{len(train)} train / {len(test)} test records; sample length mean {sum(lengths) / len(lengths):.0f}, "
          f"max {max(lengths)} tokens")

    t0 = time.perf_counter()
    before = exact_match(model, tokenizer, style, test, show=3)
    print(f"before: exact match {before:.1%} ({time.perf_counter() - t0:.1f}s)")
    train_s = train_lora(model, samples, tokenizer.pad_id or 0, r=args.r, alpha=args.alpha, lr=args.lr,
                         steps=args.steps, batch_size=args.batch_size, warmup=args.warmup, seed=args.seed)
    t0 = time.perf_counter()
    after = exact_match(model, tokenizer, style, test, show=5)
    print(f"after:  exact match {after:.1%} ({time.perf_counter() - t0:.1f}s)")
    print(f"RESULT seed={args.seed} r={args.r} alpha={args.alpha:g} lr={args.lr:g} steps={args.steps} "
          f"batch={args.batch_size}: before {before:.1%} after {after:.1%}, training {train_s:.0f}s")


if __name__ == "__main__":
    main()
