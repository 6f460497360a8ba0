"""Fixtures shared by several test files."""
import os
import tempfile
from pathlib import Path

import pytest
import torch

from tests.helpers import make_checkpoint, make_task

# No test builds litft's CPU kernels into the real ~/.cache: one private temporary cache for the session, set
# here (before test modules are imported: test_native builds at import) and inherited by CLI subprocesses.
KERNEL_CACHE = tempfile.TemporaryDirectory(prefix="litft-test-cache-")
os.environ["LITFT_CACHE_DIR"] = KERNEL_CACHE.name


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: the CI machine is shared, and tiny models gain nothing from two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny random litft checkpoint with a trained-on-the-fly BPE tokenizer (tests/helpers.py)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    """A small Alpaca-format task file the tiny model can learn (a file may override it, as test_qlora does)."""
    return make_task(tmp_path_factory.mktemp("data") / "task.json", n=96)


class SharedRuns:
    """3-step training runs on one tiny checkpoint and task, each trained once per session, when a test first asks
    for it: test_train, test_fsdp, test_ray and test_multinode compare against the same references (LoRA on one
    process; on two DDP processes), and every launch costs each of its processes seconds of imports."""

    def __init__(self, root: Path):
        self.root, self.outs, self.attempts = root, {}, 0
        self.ckpt = make_checkpoint(root / "ckpt")
        self.task = make_task(root / "task.json", n=96)

    def train(self, method: str, *extra: str) -> Path:
        """The out_dir of `litft finetune <method>` with tests/test_fsdp.py's train_args (3 steps, no dropout) and
        `extra`. Several processes (--devices in extra) are launched as a user would; one process runs in this one."""
        from litft.cli import run
        from tests.test_fsdp import litft, train_args

        key = (method, *extra)
        if key not in self.outs:
            self.attempts += 1  # a failed run (its test failed) leaves its directory: a retry gets another
            out = self.root / f"run-{self.attempts}"
            args = train_args(self.ckpt, self.task, out, method, 3, *extra)
            if "--devices" in extra:
                r = litft(*args)
                assert r.returncode == 0, r.stderr[-3000:]
            else:
                run(args)
            self.outs[key] = out
        return self.outs[key]


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory) -> SharedRuns:
    return SharedRuns(tmp_path_factory.mktemp("shared_runs"))
