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
