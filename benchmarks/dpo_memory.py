"""Benchmark (not a test): peak memory of one DPO step vs one SFT (LoRA) step at the same sequence length, on CPU.

    python benchmarks/dpo_memory.py [--seq 256] [--pairs 2] [--steps 2] [--repeats 3] [--threads 1] [--keep DIR]

The model is the SmolLM2-135M shape (random weights, written once as an fp32 litft checkpoint), LoRA r=16
alpha=32 on all seven projections, AdamW, dropout 0, fp32. Contenders, each in its own process, alternating,
`--repeats` rounds, medians:

  sft           LoRA, 2 x pairs rows of `--seq` tokens (the same tokens per step as DPO's policy forward)
  dpo           DPO, `--pairs` pairs (2 x pairs rows): the reference is the model with its adapters taken out
  dpo+init      DPO as after `--init_adapter`: the reference is the adapter at its starting values, a copy of
                only the trainable tensors swapped in for the reference forward

Reported: RSS after loading (model + optimizer built), the peak RSS during the steps (VmHWM reset via
/proc/self/clear_refs right before the first step), and the median step time after one warmup step (wall and
CPU time). The goal (issue 19): no second copy of the base, so a DPO step's peak well under 2x an SFT step's.
Every child uses `--threads` torch threads (default 1: this machine is shared); benchmarks/README.md quotes a run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: benchmarks.child, litft

from benchmarks.child import run_child  # noqa: E402

CHILD_MODULE = "benchmarks.dpo_memory"
SHAPE = "SmolLM2-135M"
CONTENDERS = ("sft", "dpo", "dpo+init")


def kib(key: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM) in bytes."""
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def child_step(ckpt: str, kind: str, seq: int, pairs: int, steps: int) -> dict:
    import torch

    from litft.methods.dpo import DPO
    from litft.methods.lora import LoRA

    kw = dict(checkpoint_dir=ckpt, r=16, alpha=32.0, dropout=0.0, targets=["all-linear"], lr=2e-4, warmup_steps=0)
    m = LoRA(**kw) if kind == "sft" else DPO(**kw)
    m.configure_model()
    if kind == "dpo+init":  # what --init_adapter sets up: a copy of the trainable tensors is the reference
        m.reference_params = {n: p.detach().clone() for n, p in m.model.named_parameters() if p.requires_grad}
    m.total_steps = steps + 1
    opt, _ = m.configure_optimizers()
    after_load = kib("VmRSS")
    g = torch.Generator().manual_seed(1234)
    rows = 2 * pairs
    x = torch.randint(0, m.model.config.vocab_size, (rows, seq), generator=g)
    labels = x.clone()
    labels[:, : seq // 4] = -100  # a prompt: the first quarter of each row is masked
    batch = {"input_ids": x, "labels": labels, "is_chosen": torch.arange(rows) < pairs,
             "pair_index": torch.arange(pairs)}
    count = m.loss_count(batch)
    reset_peak()
    times, cpu = [], []
    for _ in range(steps + 1):  # one warmup step
        t0, c0 = time.perf_counter(), time.process_time()
        loss = m.training_step(batch) / count
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"after_load": after_load, "train_peak": kib("VmHWM"), "step_s": statistics.median(times[1:]),
            "cpu_s": statistics.median(cpu[1:])}


def write_checkpoint(out: str) -> None:
    import torch

    from litft.checkpoint import expected_shapes, save_checkpoint
    from litft.models.config import Config

    cfg = Config.from_name(SHAPE)
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02)
          for k, s in expected_shapes(cfg).items()}
    save_checkpoint(sd, cfg, Path(out))


def child_main() -> None:
    kind, *rest = sys.argv[1:]
    if kind == "write":
        write_checkpoint(rest[0])
        print("{}")
    else:
        print(json.dumps(child_step(rest[0], kind, int(rest[1]), int(rest[2]), int(rest[3]))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", type=Path, default=None, help="directory to keep the random checkpoint in")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="dpo-memory-"))
    ckpt = root / SHAPE
    if not (ckpt / "model_config.yaml").is_file():
        run_child(CHILD_MODULE, args.threads, "write", str(ckpt))
    runs: dict[str, list[dict]] = {k: [] for k in CONTENDERS}
    for _ in range(args.repeats):
        for k in CONTENDERS:
            runs[k].append(run_child(CHILD_MODULE, args.threads, k, str(ckpt), str(args.seq), str(args.pairs), str(args.steps)))
    res = {k: {f: statistics.median(r[f] for r in rs) for f in rs[0]} for k, rs in runs.items()}
    print(f"{SHAPE} shape, LoRA r=16 on all linear layers, fp32, {2 * args.pairs} rows x {args.seq} tokens "
          f"({args.pairs} pairs for DPO), {args.threads} thread(s); medians of {args.repeats} alternating runs, "
          f"each {args.steps} steps after 1 warmup (load average at the end {os.getloadavg()[0]:.1f})\n")
    print("| step | RSS after load MB | peak RSS in steps MB | peak / SFT's | step s (wall) | step s (CPU) |\n"
          "|---|---|---|---|---|---|")
    sft = res["sft"]["train_peak"]
    for k, r in res.items():
        print(f"| {k} | {r['after_load'] / 1e6:.0f} | {r['train_peak'] / 1e6:.0f} | {r['train_peak'] / sft:.2f}x | "
              f"{r['step_s']:.2f} | {r['cpu_s']:.2f} |")


if __name__ == "__main__":
    main()
