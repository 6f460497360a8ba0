"""Per-rank memory of parameters + gradients + optimizer state for full fine-tuning, FSDP2 on N processes vs 1,
and the step time that sharding costs (CPU, gloo). A benchmark, not a test.

    python benchmarks/fsdp_memory.py                         # a 0.3B-parameter shape, 1 vs 2 processes
    python benchmarks/fsdp_memory.py --n_layer 2 --n_embd 64 --steps 2    # a tiny shape: checks that it runs

The bytes are counted from the tensors each rank holds after a step (its shards of the parameters, of their
gradients and of AdamW's two moments), so they are exact and not blurred by the allocator; peak RSS is printed too.
The model is litft's GPT sharded by litft.distributed.parallelize, as `--strategy fsdp` shards it.
"""
from __future__ import annotations

import argparse
import os
import resource
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(tensors) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors if isinstance(t, torch.Tensor))


def worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    from litft.distributed import parallelize
    from litft.models.config import Config
    from litft.models.gpt import GPT, chunked_cross_entropy

    torch.set_num_threads(max(1, args.threads // world))
    torch.manual_seed(0)
    cfg = Config(name="bench", vocab_size=args.vocab, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                 n_kv_head=args.n_head, intermediate_size=4 * args.n_embd, max_seq_length=args.seq)
    holder = nn.Module()
    holder.model = GPT(cfg)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        parallelize(holder, mesh)
    model = holder.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, args.vocab, (args.batch // world, args.seq), generator=torch.Generator().manual_seed(rank))
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss, n = chunked_cross_entropy(model.lm_head, model(x, output="hidden"), x)
        (loss / n).backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
        grads = nbytes(p.grad for p in model.parameters())  # before zero_grad: the gradients a step holds
        optimizer.zero_grad(set_to_none=True)
    unique = {id(p): p for p in model.parameters()}.values()
    row = dict(params=nbytes(unique), grads=grads,
               optim=nbytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim),
               step_s=sorted(times[1:] or times)[len(times[1:] or times) // 2],
               rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
    results[rank] = row
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(world, port, args, results), nprocs=world, join=True)
    return dict(results[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n_layer", type=int, default=16)
    p.add_argument("--n_embd", type=int, default=1024)
    p.add_argument("--n_head", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2, help="global batch (split over the processes)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, shared by the processes")
    args = p.parse_args()
    one, many = measure(1, args), measure(args.processes, args)
    print(f"full fine-tuning, n_layer {args.n_layer}, n_embd {args.n_embd}, vocab {args.vocab}, fp32, AdamW; "
          f"per rank (rank 0):")
    print(f"{'':24}{'1 process':>14}{f'FSDP x{args.processes}':>14}{'ratio':>8}")
    for key, label in (("params", "parameters MB"), ("grads", "gradients MB"), ("optim", "optimizer state MB")):
        print(f"{label:24}{one[key] / 1e6:14.1f}{many[key] / 1e6:14.1f}{many[key] / max(one[key], 1):8.3f}")
    total1 = sum(one[k] for k in ("params", "grads", "optim"))
    total2 = sum(many[k] for k in ("params", "grads", "optim"))
    print(f"{'sum MB':24}{total1 / 1e6:14.1f}{total2 / 1e6:14.1f}{total2 / total1:8.3f}")
    print(f"{'peak RSS GB':24}{one['rss_gb']:14.2f}{many['rss_gb']:14.2f}{many['rss_gb'] / one['rss_gb']:8.3f}")
    print(f"{'step time s (median)':24}{one['step_s']:14.3f}{many['step_s']:14.3f}{many['step_s'] / one['step_s']:8.3f}"
          f"   (same global batch; on one shared CPU the processes compete for the same cores)")


if __name__ == "__main__":
    main()
