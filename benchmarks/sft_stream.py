"""Benchmark (not a test): LoRA fine-tuning on a realistic SFT batch stream (samples of very different lengths),
litft vs HF transformers + peft, on CPU. What counts is *useful* (non-pad) tokens per second.

    python benchmarks/sft_stream.py [--samples 32] [--batch 4] [--repeats 3] [--pack-len 1024]
                                    [--only hf,litft,...] [--tiny]

`--tiny` (2 layers, 8 short samples, one round) checks the script in well under a minute.

The stream: `--samples` samples (default 32) whose lengths come from a fixed, seeded long-tailed distribution
(`sample_lengths`): log-normal with median 160 tokens and sigma 0.9, clipped to 20..1000 tokens -- most
samples short, a tail of long ones, as instruction data (Alpaca-like: a prompt, then a response). Tokens are
random ids (seeded); the first 30% of each sample (its "prompt") has label -100, so loss is on the rest. The
histogram is printed. Every contender trains on the same samples, one optimizer step per batch of `--batch`
samples (4: a batch of 8 padded to 1000 tokens got HF's process killed for memory on this 24 GB machine), after
one untimed warmup step on a small fixed batch; its time is the wall time over all batches.

Model and method as benchmarks/lora_step.py: SmolLM2-135M shape, the same random weights (HF init, seed 0) for
litft and HF, LoRA r16 alpha 32 on q,k,v,o,gate,up,down, dropout 0, AdamW lr 2e-4, fp32, torch's threads (2 here).

Contenders, each in its own process (its peak RSS its own), alternating within every round:

* `hf`: HF `LlamaForCausalLM` (sdpa) + peft, batches in random order, right-padded to the longest sample of
  the batch with an attention mask -- what `Trainer` + `DataCollatorForSeq2Seq` does without `group_by_length`.
* `hf_flat`: TRL-style padding-free: HF's `DataCollatorWithFlattening` concatenates the batch's samples into one
  row with `position_ids` restarting per sample; transformers detects the packed layout from the position_ids
  and builds a block-causal mask for sdpa. This works on CPU (checked: per-sample logits equal separate runs to
  1e-7) *only with use_cache=False*: with the default use_cache=True the model creates a cache and silently
  attends across samples. All HF contenders pass use_cache=False.
* `litft_pad`: litft with random batches right-padded to the longest (litft's default before length grouping;
  now `train.group_by_length: false`).
* `litft`: litft's default: length-grouped batches (`litft.data.LengthGroupedSampler`, world 1, as the training
  loop builds it; batches of similar length, so little padding), padded to the longest.
* `litft_packed`: `packing: true`: `pack_samples` into rows of `--pack-len` tokens, `--batch * mean length /
  pack-len` rows per step (about the same tokens per step); attention within each sample through litft's kernel
  (`PackedSegments`), no dense mask.

litft runs through `LoRA.training_step` (the `litft finetune lora` path minus Fabric), normalised per batch by its
target tokens; HF through `model(...).loss`. Reported per run: useful tokens/s (real sample tokens / wall time),
padding fraction (pad tokens / tokens computed), peak RSS (ru_maxrss of the child), and "other cores" (cores
other processes used during the timed part, from /proc/stat: on this shared 2-core machine above ~0.1 means the
times are disturbed). The parent prints medians and the per-round ratios vs `hf`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_step import (ALPHA, D, FF, HF_TARGETS, LR, NH, NKV, SEED, TARGETS, V, busy_jiffies,  # noqa: E402
                       loadavg, machine_info, own_jiffies)

R = 16
CONTENDERS = ["hf", "hf_flat", "litft_pad", "litft", "litft_packed"]
LENGTH_SEED, TOKEN_SEED, ORDER_SEED = 2026, 7, 42
PROMPT_FRACTION = 0.3


# ----------------------------------------------------------------------------- the stream
def sample_lengths(n: int, hi: int = 1000, lo: int = 20, median: float = 160.0, sigma: float = 0.9) -> list[int]:
    """n lengths, log-normal (median `median`, sigma `sigma`) clipped to lo..hi, from a fixed seed: long-tailed."""
    import torch

    g = torch.Generator().manual_seed(LENGTH_SEED)
    x = torch.exp(math.log(median) + sigma * torch.randn(n, generator=g, dtype=torch.float64))
    return [int(v) for v in x.round().clamp(lo, hi).tolist()]


def make_samples(lengths: list[int]) -> list[dict]:
    """litft samples: random token ids, the first 30% of each sample masked (-100) as its prompt."""
    import torch

    g = torch.Generator().manual_seed(TOKEN_SEED)
    out = []
    for n in lengths:
        ids = torch.randint(0, V, (n,), generator=g)
        labels = ids.clone()
        labels[: int(n * PROMPT_FRACTION)] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def histogram(lengths: list[int]) -> str:
    edges = [20, 50, 100, 200, 400, 700, 1001]
    counts = [sum(a <= n < b for n in lengths) for a, b in zip(edges, edges[1:])]
    s = sorted(lengths)
    return (" ".join(f"[{a},{b - 1}]:{c}" for a, b, c in zip(edges, edges[1:], counts))
            + f"; mean {statistics.mean(s):.0f}, median {statistics.median(s):.0f}, max {s[-1]}, total {sum(s)}")


def random_batches(n: int, batch: int) -> list[list[int]]:
    """Indices in a seeded random order, cut into batches (what a shuffling DataLoader does)."""
    import torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(ORDER_SEED)).tolist()
    return [order[i: i + batch] for i in range(0, n - batch + 1, batch)]


def grouped_batches(samples: list[dict], batch: int) -> list[list[int]]:
    """The batches litft's training loop draws by default (one device, no accumulation)."""
    from litft.data import LengthGroupedSampler

    sampler = LengthGroupedSampler(samples, micro_batch_size=batch, accumulation=1, num_replicas=1, rank=0,
                                   seed=ORDER_SEED)
    sampler.set_epoch(0)
    order = list(sampler)
    return [order[i: i + batch] for i in range(0, len(order), batch)]


# ----------------------------------------------------------------------------- weights
def hf_config(n_layer: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=n_layer,
                      num_attention_heads=NH, num_key_value_heads=NKV, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, use_cache=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def prepare(out: Path, n_layer: int) -> None:
    """HF init (seed 0) converted to a litft checkpoint; the HF children rebuild the same init."""
    import torch
    from transformers import LlamaForCausalLM

    from litft.checkpoint import save_checkpoint
    from litft.models.config import Config
    from litft.models.hf import hf_to_litft

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(hf_config(n_layer))
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    config = Config.from_name("SmolLM2-135M", n_layer=n_layer)
    save_checkpoint(dict(hf_to_litft(config, sd.items())), config, out / "litft")


# ----------------------------------------------------------------------------- child
def child(args) -> None:
    import torch

    torch.manual_seed(SEED)
    impl = args.child
    samples = make_samples(sample_lengths(args.samples, hi=args.max_len, median=160.0 * args.max_len / 1000))
    pad_id = 0

    if impl.startswith("litft"):
        from litft.data.base import collate
        from litft.data.json_data import pack_samples
        from litft.methods.lora import LoRA

        m = LoRA(checkpoint_dir=Path(args.ckpt) / "litft", r=R, alpha=ALPHA, dropout=0.0, targets=TARGETS, lr=LR,
                 warmup_steps=0)
        m.configure_model()
        m.train()
        opt, _ = m.configure_optimizers()
        model = m.model
        if impl == "litft_packed":
            rows = pack_samples(samples, args.pack_len)
            per_step = max(1, round(args.batch * statistics.mean(len(s["input_ids"]) for s in samples) / args.pack_len))
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(ORDER_SEED)).tolist()
            batches = [collate([rows[i] for i in order[j: j + per_step]], pad_id) for j in range(0, len(rows), per_step)]
            useful = sum(len(r["input_ids"]) for r in rows)  # every row is used once
        else:
            index_batches = grouped_batches(samples, args.batch) if impl == "litft" else random_batches(len(samples), args.batch)
            batches = [collate([samples[i] for i in b], pad_id) for b in index_batches]
            useful = sum(len(samples[i]["input_ids"]) for b in index_batches for i in b)

        def step_loss(b):
            return m.training_step(b) / max(1, m.loss_count(b))
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import DataCollatorWithFlattening, LlamaForCausalLM

        model = LlamaForCausalLM(hf_config(args.n_layer))  # seed 0: the init `prepare` converted for litft
        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=HF_TARGETS))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        index_batches = random_batches(len(samples), args.batch)
        useful = sum(len(samples[i]["input_ids"]) for b in index_batches for i in b)
        if impl == "hf_flat":
            flatten = DataCollatorWithFlattening()
            batches = [flatten([{k: samples[i][k].tolist() for k in ("input_ids", "labels")} for i in b])
                       for b in index_batches]
        else:
            batches = []
            for b in index_batches:  # DataCollatorForSeq2Seq's layout: right padding, labels -100, attention mask
                longest = max(len(samples[i]["input_ids"]) for i in b)
                ids = torch.full((len(b), longest), pad_id)
                labels = torch.full((len(b), longest), -100)
                mask = torch.zeros((len(b), longest), dtype=torch.long)
                for row, i in enumerate(b):
                    n = len(samples[i]["input_ids"])
                    ids[row, :n], labels[row, :n], mask[row, :n] = samples[i]["input_ids"], samples[i]["labels"], 1
                batches.append(dict(input_ids=ids, labels=labels, attention_mask=mask))

        def step_loss(b):
            return model(**b, use_cache=False).loss

    used = sum(int(b["input_ids"].numel()) for b in batches)

    # untimed warmup step (first-call allocations, oneDNN primitives); the same batch for all, before any update:
    # its loss shows that litft and HF start from the same weights
    warm = make_samples([40, 40])
    wb = dict(input_ids=torch.stack([w["input_ids"] for w in warm]), labels=torch.stack([w["labels"] for w in warm]))
    warm_loss = step_loss(wb)
    warm_loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

    busy0, own0, t0 = busy_jiffies(), own_jiffies(), time.perf_counter()
    losses, step_times = [], []
    for b in batches:
        ts = time.perf_counter()
        loss = step_loss(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_times.append(time.perf_counter() - ts)
    wall = time.perf_counter() - t0
    hz = os.sysconf("SC_CLK_TCK")
    own_cores = (own_jiffies() - own0) / hz / wall
    other_cores = max(0.0, (busy_jiffies() - busy0) / hz / wall - own_cores)
    res = dict(impl=impl, steps=len(batches), useful_tokens=useful, computed_tokens=used,
               pad_fraction=1 - useful / used, wall_s=wall, useful_tok_s=useful / wall, computed_tok_s=used / wall,
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, warmup_loss=warm_loss.item(), loss_first=losses[0],
               loss_last=losses[-1], own_cores=own_cores, other_cores=other_cores,
               shapes=[list(b["input_ids"].shape) for b in batches], step_s=step_times)
    print("RESULT " + json.dumps(res), flush=True)


def run_child(impl: str, args, ckpt: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--ckpt", str(ckpt), "--samples", str(args.samples),
           "--batch", str(args.batch), "--pack-len", str(args.pack_len), "--n-layer", str(args.n_layer),
           "--max-len", str(args.max_len)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{impl} child failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(next(l for l in reversed(p.stdout.splitlines()) if l.startswith("RESULT "))[7:])


# ----------------------------------------------------------------------------- parent
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4, help="samples per optimizer step")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of alternating runs")
    ap.add_argument("--pack-len", type=int, default=1024, help="row length of litft_packed")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(CONTENDERS)}")
    ap.add_argument("--tiny", action="store_true", help="2 layers, 8 samples of 20..200 tokens (the same distribution scaled down), batch 4, 1 round")
    ap.add_argument("--n-layer", type=int, default=30, help=argparse.SUPPRESS)
    ap.add_argument("--max-len", type=int, default=1000, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        args.n_layer, args.samples, args.batch, args.repeats, args.max_len, args.pack_len = 2, 8, 4, 1, 200, 200
    if args.prepare:
        return prepare(Path(args.prepare), args.n_layer)
    if args.child:
        return child(args)

    import torch

    impls = args.only.split(",") if args.only else CONTENDERS
    if unknown := set(impls) - set(CONTENDERS):
        sys.exit(f"--only: unknown contender(s) {sorted(unknown)}; choose from {CONTENDERS}")
    mi = machine_info()
    lengths = sample_lengths(args.samples, hi=args.max_len, median=160.0 * args.max_len / 1000)
    print(f"# SFT batch stream: litft vs HF+peft, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"cpu: {mi['model']}, {mi['cpus']} CPUs; torch threads {torch.get_num_threads()}; torch {torch.__version__}")
    print(f"load average at start: {loadavg()}")
    print(f"stream: {args.samples} samples, batch {args.batch}, {args.n_layer} layers, LoRA r{R} all 7 projections, fp32; "
          f"lengths: {histogram(lengths)}")
    results: dict[str, list[dict]] = {i: [] for i in impls}
    with tempfile.TemporaryDirectory(prefix="litft-sft-bench-") as tmp:
        p = subprocess.run([sys.executable, __file__, "--prepare", tmp, "--n-layer", str(args.n_layer)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"preparing the weights failed:\n{p.stderr[-3000:]}")
        for rnd in range(args.repeats):
            for impl in (impls if rnd % 2 == 0 else impls[::-1]):  # alternate the order too
                r = run_child(impl, args, Path(tmp))
                results[impl].append(r)
                print(f"  round {rnd + 1} {impl:<12} {r['useful_tok_s']:7.1f} useful tok/s  pad {r['pad_fraction']:5.1%}  "
                      f"{r['steps']} steps {r['wall_s']:6.1f}s  peak_rss {r['peak_rss_mb']:5.0f}MB  "
                      f"loss warmup {r['warmup_loss']:.5f} {r['loss_first']:.4f}->{r['loss_last']:.4f}  own {r['own_cores']:.2f} other "
                      f"{r['other_cores']:.2f} cores  load {loadavg()}", flush=True)
    print(f"load average at end: {loadavg()}")
    print(f"\n## medians over {args.repeats} round(s)\n")
    print("| contender | useful tokens/s | computed tokens/s | padding | peak RSS MB | batch shapes (first round) | "
          "other cores (max) | useful tok/s / hf, per round |")
    print("|---|---|---|---|---|---|---|---|")
    for impl in impls:
        rs = results[impl]
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        ratios = (", ".join(f"{a['useful_tok_s'] / b['useful_tok_s']:.2f}" for a, b in zip(rs, results["hf"]))
                  if "hf" in results else "-")
        shapes = " ".join("x".join(map(str, s)) for s in rs[0]["shapes"])
        print(f"| {impl} | {med('useful_tok_s'):.1f} | {med('computed_tok_s'):.1f} | {med('pad_fraction'):.1%} | "
              f"{med('peak_rss_mb'):.0f} | {shapes} | {max(r['other_cores'] for r in rs):.2f} | {ratios} |")


if __name__ == "__main__":
    main()
