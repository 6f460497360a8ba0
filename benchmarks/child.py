"""One benchmark contender in its own process (so its peak RSS is its own): the shared launcher of the memory
benchmarks. The child imports `module` (e.g. benchmarks.method_memory) and calls its `child_main()` with `args`
as sys.argv; its last stdout line is a JSON object."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_child(module: str, threads: int, *args: str, env: dict[str, str] | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), **(env or {})}
    code = f"import torch; torch.set_num_threads({threads}); import sys; sys.argv = {['x', *args]!r}; " \
           f"from {module} import child_main; child_main()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode:
        sys.exit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
