"""Several nodes: 2 "nodes" x 1 process, started by torchrun on loopback as on two machines, train the weights of
1 node x 2 processes (DDP and FSDP)."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.test_fsdp import ENV, REPO, assert_same_weights, train_args, trained


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_nodes(args: list[str], timeout: int = 600) -> list[tuple[int, str]]:
    """`torchrun --nnodes 2 --node_rank {0,1}` of the same litft command, both on 127.0.0.1; (exit code, stderr) each.
    A node still running at the timeout is killed (a rendezvous that never completes must not hang the suite)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "-m", "litft.cli", *args], cwd=REPO, env=ENV, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for rank in (0, 1)]
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, err))
    return results


@pytest.mark.slow
def test_two_nodes_of_one_process_equal_one_node_of_two(shared_runs, tmp_path):
    one_node = shared_runs.train("lora", "--devices", "2", "--strategy", "ddp")  # conftest.py: shared with test_fsdp
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / f"two_nodes_{strategy}"
        results = torchrun_two_nodes([*train_args(shared_runs.ckpt, shared_runs.task, out, "lora", 3), "--devices", "1",
                                      "--num_nodes", "2", "--strategy", strategy])
        for code, err in results:
            assert code == 0, err[-3000:]
        assert_same_weights(trained(one_node, "lora"), trained(out, "lora"))


def test_devices_that_do_not_match_what_torchrun_started_are_one_error(ckpt, task, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "1",
                        "--master_port", str(free_port()), "-m", "litft.cli",
                        *train_args(ckpt, task, out, "lora", 1), "--devices", "2", "--strategy", "ddp"],
                       cwd=REPO, env=ENV, text=True, capture_output=True, timeout=300)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("litft: error:")]
    assert lines == ["litft: error: the launcher started 1 process(es), 1 per node, but --devices 2 --num_nodes 1 ask "
                     "for 2: pass --devices 1 --num_nodes 1"], r.stderr[-3000:]
    assert not (out / "final").exists() and not (out / "config.yaml").exists()
