"""The intra-op thread count of repeated CPU work (decoding steps, training steps), chosen by timing it.

Why: every op torch or litft's kernels run on several threads is a parallel region that ends when its slowest
thread does. When other processes hold the cores, the scheduler puts one of our threads aside for a time slice in
most regions, and a step made of hundreds of small regions stalls hundreds of times: on the 2-core development
machine with other jobs running, two threads decoded ~5x slower than one (`benchmarks/README.md`). One thread needs
no other to finish. Which count is faster depends on the load, which changes while a run goes on, so the steps
probe: `probe` steps with all threads, then `probe` with one; all threads serve until the next probe only if their
median step was faster by a margin (`MARGIN`: a lull in the other jobs can flatter them, and a wrong pick of all
threads costs far more than a wrong pick of one; on a quiet host two threads decoded in 0.66-0.86x one thread's step
time, so the margin is small). The next probe comes `EVERY` steps later, and twice as late each
time one thread wins again (up to `MAX_EVERY`), since under load the all-threads probe steps are the slow ones.

``LITFT_ADAPTIVE_THREADS=0`` keeps torch's thread count fixed throughout (e.g. to measure a given count).

The count changes how work is split, not what is summed in which order for litft's kernels and the matmuls measured
(a training run and greedy decoding gave the same bits with 1 and 2 threads; `tests/test_train.py`,
`tests/test_model.py`).
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from litft.utils import LitftError


def adaptive() -> bool:
    """LITFT_ADAPTIVE_THREADS, validated: '1' (the default) or '0'."""
    value = os.environ.get("LITFT_ADAPTIVE_THREADS", "1").strip()
    if value not in ("0", "1"):
        raise LitftError(f"LITFT_ADAPTIVE_THREADS={value!r}: use 1 (choose the thread count by timing steps, the "
                         "default) or 0 (keep torch's count)")
    return value == "1"


class ThreadChooser:
    """Use as `with chooser.step(): <one step>` around each step (it sets the count, times the step, restores the
    caller's count on `close()`)."""

    EVERY, MAX_EVERY, MARGIN = 32, 512, 0.95

    def __init__(self, probe: int = 3) -> None:
        self.full = torch.get_num_threads()
        self.enabled = adaptive()
        self.probe = probe
        self.best, self.n_steps, self.probe_at, self.every = self.full, 0, 0, self.EVERY
        self.timed: dict[int, list[float]] = {}

    def _probe_step(self) -> int | None:
        """This step's place in the current probe (0 .. 2 probe - 1), or None outside one."""
        k = self.n_steps - self.probe_at
        return k if self.enabled and self.full > 1 and 0 <= k < 2 * self.probe else None

    def threads(self) -> int:
        """The count the next step runs with."""
        k = self._probe_step()
        if k is None:
            return self.best
        return self.full if k < self.probe else 1

    def record(self, threads: int, seconds: float) -> None:
        """The step just run took `seconds` with `threads` threads."""
        k = self._probe_step()
        if k is not None:
            self.timed.setdefault(threads, []).append(seconds)
            if k == 2 * self.probe - 1:
                full, one = (statistics.median(self.timed.pop(n)) for n in (self.full, 1))
                self.best = self.full if full < self.MARGIN * one else 1
                self.every = self.EVERY if self.best == self.full else min(2 * self.every, self.MAX_EVERY)
                self.probe_at = self.n_steps + 1 + self.every
        self.n_steps += 1

    @contextmanager
    def step(self) -> Iterator[None]:
        threads = self.threads()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        yield
        self.record(threads, time.perf_counter() - t0)

    def close(self) -> None:
        """Give the caller back the thread count it had."""
        if torch.get_num_threads() != self.full:
            torch.set_num_threads(self.full)
