"""CLI start-up: wall time and CPU time of `litft <args>` calls that do no work (help, a mistyped command), for two
checkouts of litft run alternately (each call its own `python -m litft.cli` process, the checkout's directory first
on sys.path), so that a busy machine slows both alike. Prints per-call medians and the after/before ratios.

    python benchmarks/startup.py --before /path/to/old/checkout [--after .] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CALLS = [["--help"], ["finetune", "--help"], ["finetune", "lora", "--help"], ["plot", "--help"],
         ["convert_to_litft", "--help"], ["generate", "--help"], ["fnetune"]]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def one_call(tree: Path, args: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one `python -m litft.cli ARGS` in `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "litft.cli", *args], cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode not in (0, 1) or "Traceback" in p.stderr:
        sys.exit(f"`litft {' '.join(args)}` in {tree} failed:\n{p.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="a checkout with the old CLI")
    p.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[1], help="default: this checkout")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    print(f"{sys.executable}; load average at start {loadavg()}; {args.rounds} rounds, before/after alternating")
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for call in CALLS:
            for name, tree in (trees.items() if r % 2 == 0 else reversed(trees.items())):
                times.setdefault((" ".join(call), name), []).append(one_call(tree, call))
        print(f"round {r + 1} done, load average {loadavg()}", flush=True)
    print(f"load average at end {loadavg()}\n")
    print("| call | before wall s | after wall s | after / before | before CPU s | after CPU s |\n"
          "|---|---|---|---|---|---|")
    for call in CALLS:
        c = " ".join(call)
        wall = {n: statistics.median(w for w, _ in times[(c, n)]) for n in trees}
        cpu = {n: statistics.median(u for _, u in times[(c, n)]) for n in trees}
        print(f"| `litft {c}` | {wall['before']:.2f} | {wall['after']:.2f} | {wall['after'] / wall['before']:.2f}x "
              f"| {cpu['before']:.2f} | {cpu['after']:.2f} |")


if __name__ == "__main__":
    main()
