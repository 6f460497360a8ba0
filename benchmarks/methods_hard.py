"""Benchmark (not a test): every method on the demo's harder task, several seeds, one table.

Each (method, seed) runs `litft finetune <method>` with the method's demo config
(`config_hub/finetune/demo/<method>.yaml`) and only the data, the steps and the seed replaced, in its own
process, methods alternating within each seed round. Prints trainable parameters, held-out exact match
(mean and spread over seeds), final validation loss and wall time (memory: `method_memory.py`); writes the rows as JSON
and a validation-loss plot of the first seed (`litft plot`).

    python benchmarks/methods_hard.py                                  # every method in litft.methods.METHODS
    python benchmarks/methods_hard.py --methods lora dora --seeds 0 1 2 --steps 90

The harder task (`litft/demo/data/hard_*.json`, made by `litft/demo/task.py`): name the kinds of two or three
words in order, from 160 training records; every test word is unseen in training. Its held-out score jumps
from ~0 to ~100% once a run "gets" it (LoRA: 5.5% at 60 steps, 47-94% at 90 by seed, 99.5% at 120), so a
fixed 90-step budget ranks methods by how fast they learn, with a wide spread over seeds.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = "litft/demo/data"


def run_one(method: str, seed: int, steps: int, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "litft.cli", "finetune", method,
           "--config", f"config_hub/finetune/demo/{method}.yaml",
           "--data.json_path", f"{DATA}/hard_train.json", "--data.val_json_path", f"{DATA}/hard_test.json",
           "--train.max_steps", str(steps), "--eval.interval", str(max(steps // 6, 1)), "--eval.max_iters", "13",
           "--seed", str(seed), "--out_dir", str(out_dir), "--overwrite", "true"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{method} seed {seed} failed:\n{proc.stderr[-3000:]}")
    out = proc.stdout + proc.stderr

    def grab(pattern: str) -> str:
        m = re.findall(pattern, out)
        if not m:
            raise SystemExit(f"{method} seed {seed}: no {pattern!r} in its output:\n{out[-2000:]}")
        return m[-1]

    return {"method": method, "seed": seed, "steps": steps,
            "trainable": int(grab(r"([\d,]+) trainable").replace(",", "")),
            "before": float(grab(r"Exact match before fine-tuning: ([\d.]+)%")) / 100,
            "after": float(grab(r"Exact match after fine-tuning: ([\d.]+)%")) / 100,
            "val_loss": float(grab(r"step \d+: val loss ([\d.]+)")),
            "wall_s": round(wall, 1)}


def main() -> None:
    sys.path.insert(0, str(REPO))
    from litft.methods import METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if (REPO / "config_hub/finetune/demo" /
                                                                          f"{m}.yaml").is_file() and m != "dpo"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=90)  # mid-way: LoRA 5.5% at 60 steps, 47-94% at 90, 99.5% at 120
    p.add_argument("--out", type=Path, default=REPO / "out" / "methods-hard")
    args = p.parse_args()

    rows = []
    for seed in args.seeds:
        for method in args.methods:
            row = run_one(method, seed, args.steps, args.out / f"{method}-seed{seed}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")

    print(f"\n## {len(args.seeds)} seeds x {args.steps} steps, held-out exact match on litft/demo/data/hard_test.json")
    print("| method | trainable | before | after: mean | min | max | final val loss (mean) | train+eval s (mean) |")
    print("|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        rs = [r for r in rows if r["method"] == method]
        after = [r["after"] for r in rs]
        print(f"| {method} | {rs[0]['trainable']:,} | {statistics.mean(r['before'] for r in rs):.1%} | "
              f"**{statistics.mean(after):.1%}** | {min(after):.1%} | {max(after):.1%} | "
              f"{statistics.mean(r['val_loss'] for r in rs):.3f} | {statistics.mean(r['wall_s'] for r in rs):.0f} |")
    first = [str(args.out / f"{m}-seed{args.seeds[0]}") for m in args.methods]
    subprocess.run([sys.executable, "-m", "litft.cli", "plot", json.dumps(first), "--out",
                    str(args.out / "hard_val_loss.png")], cwd=REPO, check=True)
    print(f"plot: {args.out / 'hard_val_loss.png'}")


if __name__ == "__main__":
    main()
