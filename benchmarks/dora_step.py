"""Benchmark (not a test): what DoRA costs over LoRA, in litft and in peft, one training step on CPU.

    python benchmarks/dora_step.py [--seq 512] [--batch 2] [--steps 4] [--repeats 3] [--threads N]

Four contenders: litft LoRA, litft DoRA, peft LoRA, peft DoRA (`LoraConfig(use_dora=True)`), on the
SmolLM2-135M shape of `benchmarks/lora_step.py` (whose constants, weights and helpers it imports:
same init, same tokens, LoRA r=16 alpha=32 on q,k,v,o,gate,up,down, dropout 0, AdamW, fp32).
Each run is its own subprocess (so peak memory is per contender); the order alternates
(litft-lora, litft-dora, peft-lora, peft-dora, ...) for `--repeats` rounds, and the parent prints
medians and the ratios DoRA / LoRA per implementation:

* step time: median over `--steps` steps after one warmup step (forward + backward + AdamW step);
* peak RSS: `ru_maxrss` of the whole child; train peak: VmHWM reset right before the first step,
  i.e. the peak while training (imports and weight loading excluded);
* cpu-s / step: CPU seconds this process spent per timed step (utime + stime): less sensitive to
  other processes than wall time, though contention still inflates it;
* other cores: how many cores other processes used during the timed steps (/proc/stat): the
  machine is shared, so a run with other > ~0.2 is disturbed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_step import (ALPHA, DATA_SEED, HF_TARGETS, LR, R, SEED, TARGETS, V, busy_jiffies,  # noqa: E402
                       hf_config, loadavg, machine_info, own_jiffies)

CONTENDERS = ["litft-lora", "litft-dora", "peft-lora", "peft-dora"]


def build(impl: str):
    """(model, optimizer, loss_fn) for one contender."""
    import torch

    torch.manual_seed(SEED)
    lib, method = impl.split("-")
    if lib == "litft":
        from litft.methods.dora import DoRA
        from litft.methods.lora import LoRA

        cls = DoRA if method == "dora" else LoRA
        m = cls(checkpoint_dir=Path(ARGS.ckpt) / "litft", r=R, alpha=ALPHA, dropout=0.0, targets=TARGETS, lr=LR,
                warmup_steps=0)
        m.configure_model()
        m.train()
        opt, _ = m.configure_optimizers()
        return m.model, opt, lambda x: m.training_step({"input_ids": x, "labels": x}) / (x.shape[0] * (x.shape[1] - 1))
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(hf_config())  # seed 0: the init lora_step.prepare wrote for litft
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=HF_TARGETS,
                                             use_dora=method == "dora"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return model, opt, lambda x: model(input_ids=x, labels=x).loss


def child(impl: str) -> None:
    import torch

    if ARGS.threads:
        torch.set_num_threads(ARGS.threads)
    model, opt, loss_fn = build(impl)
    x = torch.randint(0, V, (ARGS.batch, ARGS.seq), generator=torch.Generator().manual_seed(DATA_SEED))
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the training-only peak from here
        hwm_reset = True
    except OSError:
        hwm_reset = False
    times, losses = [], []
    for i in range(ARGS.steps + 1):
        if i == 1:  # step 0 is warmup
            busy0, own0, wall0 = busy_jiffies(), own_jiffies(), time.perf_counter()
        t0 = time.perf_counter()
        loss = loss_fn(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    wall, hz = time.perf_counter() - wall0, os.sysconf("SC_CLK_TCK")
    own = (own_jiffies() - own0) / hz / wall
    hwm = next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    print("RESULT " + json.dumps(dict(
        impl=impl, step_s=statistics.median(times[1:]), min_step_s=min(times[1:]), cpu_s=own * wall / ARGS.steps,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        train_peak_mb=hwm if hwm_reset else None, loss_first=losses[0], loss_last=losses[-1],
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad), threads=torch.get_num_threads(),
        own_cores=own, other_cores=max(0.0, (busy_jiffies() - busy0) / hz / wall - own))), flush=True)


def run_child(impl: str, ckpt: str) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--ckpt", ckpt, "--seq", str(ARGS.seq), "--batch",
           str(ARGS.batch), "--steps", str(ARGS.steps), "--threads", str(ARGS.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{impl} failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(next(line for line in reversed(p.stdout.splitlines()) if line.startswith("RESULT "))[7:])


def main() -> None:
    mi = machine_info()
    print(f"# DoRA vs LoRA step, litft and peft: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"cpu: {mi['model']}, {mi['cpus']} CPUs; seq {ARGS.seq}, batch {ARGS.batch}, fp32, {ARGS.steps} timed steps "
          f"after 1 warmup, {ARGS.repeats} rounds; load average at start {loadavg()}")
    with tempfile.TemporaryDirectory(prefix="litft-dora-bench-") as tmp:
        lora_step = Path(__file__).resolve().parent / "lora_step.py"
        p = subprocess.run([sys.executable, str(lora_step), "--prepare", tmp], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"preparing the weights failed:\n{p.stderr[-3000:]}")
        results: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
        for rnd in range(ARGS.repeats):
            for impl in CONTENDERS:
                r = run_child(impl, tmp)
                results[impl].append(r)
                print(f"  round {rnd + 1} {impl:<10} step {r['step_s']:6.2f}s (min {r['min_step_s']:6.2f}s, "
                      f"{r['cpu_s']:6.2f} cpu-s)  peak_rss {r['peak_rss_mb']:6.0f}MB  "
                      f"train_peak {r['train_peak_mb'] or float('nan'):6.0f}MB  loss {r['loss_first']:.5f}->"
                      f"{r['loss_last']:.5f}  threads {r['threads']} own {r['own_cores']:.2f} other "
                      f"{r['other_cores']:.2f} cores  load {loadavg()}", flush=True)
    print(f"load average at end: {loadavg()}\n")
    keys = ("step_s", "cpu_s", "peak_rss_mb", "train_peak_mb", "other_cores")
    med = {i: {k: statistics.median(r[k] for r in rs) for k in keys if all(r[k] is not None for r in rs)}
           for i, rs in results.items()}
    print("| | step s | cpu-s / step | peak RSS MB | train peak MB | trainable | other cores |\n"
          "|---|---|---|---|---|---|---|")
    for i in CONTENDERS:
        m = med[i]
        print(f"| {i} | {m['step_s']:.2f} | {m['cpu_s']:.2f} | {m['peak_rss_mb']:.0f} | {m.get('train_peak_mb', float('nan')):.0f} | "
              f"{results[i][0]['trainable']:,} | {m['other_cores']:.2f} |")
    print("\n| DoRA / LoRA | step time | cpu-s / step | peak RSS | train peak |\n|---|---|---|---|---|")
    for lib in ("litft", "peft"):
        d, lo = med[f"{lib}-dora"], med[f"{lib}-lora"]
        per_round = ", ".join(f"{a['step_s'] / b['step_s']:.2f}" for a, b in zip(results[f"{lib}-dora"],
                                                                                 results[f"{lib}-lora"]))
        train = f"{d['train_peak_mb'] / lo['train_peak_mb']:.2f}x" if "train_peak_mb" in d else "-"
        print(f"| {lib} | {d['step_s'] / lo['step_s']:.2f}x (rounds: {per_round}) | {d['cpu_s'] / lo['cpu_s']:.2f}x | "
              f"{d['peak_rss_mb'] / lo['peak_rss_mb']:.2f}x | {train} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run (after 1 warmup step)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of alternating runs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's default)")
    ap.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ARGS = ap.parse_args()
    child(ARGS.child) if ARGS.child else main()
