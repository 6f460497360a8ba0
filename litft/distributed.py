"""Training on several processes: FSDP2 sharding, the strategy Fabric gets, consolidated state for final/.

DDP replicates the model and averages gradients; `--strategy fsdp` shards parameters, gradients and optimizer state
over the ranks with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), through Fabric's ModelParallelStrategy:
each transformer block is one shard group (all-gathered just before it runs, freed after), then the root (embedding,
final norm, head). A rank holds 1/world of every parameter, its gradient and its Adam moments; a frozen base is
sharded too, so LoRA/DoRA save the base's memory as well.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from litft.methods.base import Finetune
from litft.utils import LitftError

RAY_WORKER_ENV = "LITFT_RAY_WORKER"  # set by litft.ray_launch inside each Ray Train worker


def fsdp_unsupported(method: Finetune) -> str | None:
    """Why FSDP cannot train this method, or None. A bitsandbytes 4-bit base loses its quant_state when FSDP2
    all-gathers the packed Params4bit (the shards come back as plain uint8 tensors), so it is refused."""
    if getattr(method, "quantize", None):
        return (f"--strategy fsdp cannot shard a quantized base (--quantize {method.quantize}): bitsandbytes keeps "
                "each 4-bit weight's quant_state outside the tensor FSDP all-gathers. Use --strategy ddp (the "
                "4-bit base is replicated: it is small), or drop --quantize to shard a full-precision base")
    return None


def parallelize(module: nn.Module, device_mesh: Any) -> nn.Module:
    """FSDP2 over the data-parallel ranks: each block its own shard group, then the root GPT (embedding, norm, head).

    The root keeps its parameters gathered after forward (reshard_after_forward=False): the loss reads lm_head.weight
    after GPT.forward returns (chunked_cross_entropy), and generation calls the model token after token."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    model = module.model
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return module


def make_strategy(strategy: str, devices: int, num_nodes: int) -> Any:
    """What Fabric gets for --strategy: the name itself, except fsdp: FSDP2 via ModelParallelStrategy, every rank
    one data-parallel shard (no tensor parallelism)."""
    if strategy != "fsdp":
        return strategy
    from lightning.fabric.strategies import ModelParallelStrategy

    return ModelParallelStrategy(parallelize_fn=parallelize, data_parallel_size=devices * num_nodes,
                                 tensor_parallel_size=1, save_distributed_checkpoint=True)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0 (CPU), gathered from the shards; {} on the other ranks. A collective:
    every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_copy(method: Finetune, state_dict: dict[str, torch.Tensor]) -> Finetune:
    """A plain (unsharded) module of the same method, holding `state_dict`: what save_final writes from, so that
    final/ is the same files a one-process run leaves."""
    copy = type(method)(**dict(method.hparams))
    copy.configure_model()
    copy.model.load_state_dict(state_dict, strict=True)
    return copy


def check_devices_fit(devices: int) -> None:
    """CPU processes beyond the cores only slow every rank down (and a 64-process gloo run on a laptop is a typo)."""
    if torch.cuda.is_available():
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if devices > cores:
        raise LitftError(f"--devices {devices}: this machine has no GPU and {cores} CPU core(s); each device is one "
                         f"process on CPU: use --devices {cores} or fewer")


def check_launched_processes(devices: int, num_nodes: int) -> None:
    """Under torchrun (or another launcher that sets WORLD_SIZE and LOCAL_WORLD_SIZE), --devices and --num_nodes must
    describe the processes it started; Lightning's own error is a traceback."""
    if os.environ.get(RAY_WORKER_ENV) == "1" or "WORLD_SIZE" not in os.environ or "LOCAL_WORLD_SIZE" not in os.environ:
        return
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
    if devices != local or devices * num_nodes != world:
        raise LitftError(f"the launcher started {world} process(es), {local} per node, but --devices {devices} "
                         f"--num_nodes {num_nodes} ask for {devices * num_nodes}: pass --devices {local} --num_nodes "
                         f"{max(1, world // local)}")


def check_resume_world(saved_world: int | None, world: int, ckpt: str) -> None:
    if saved_world is not None and saved_world != world:
        raise LitftError(f"{ckpt} was written by {saved_world} process(es) and this run has {world}: the data position "
                         f"is per rank, so resume with the same --devices x --num_nodes ({saved_world})")


def cluster_plugins() -> list[Any]:
    """Fabric's cluster environment: Ray's inside a Ray Train worker (rank, world size and the process group come
    from Ray), else none (Fabric detects torchrun, SLURM, or launches the processes itself)."""
    if os.environ.get(RAY_WORKER_ENV) != "1":
        return []
    from lightning.fabric.plugins.environments import ClusterEnvironment

    class RayEnvironment(ClusterEnvironment):
        """Ray Train started the processes and their process group, and set these variables in each."""

        @property
        def creates_processes_externally(self) -> bool:
            return True

        @property
        def main_address(self) -> str:
            return os.environ["MASTER_ADDR"]

        @property
        def main_port(self) -> int:
            return int(os.environ["MASTER_PORT"])

        @staticmethod
        def detect() -> bool:
            return os.environ.get(RAY_WORKER_ENV) == "1"

        def world_size(self) -> int:
            return int(os.environ["WORLD_SIZE"])

        def set_world_size(self, size: int) -> None:
            pass  # Ray's, as it is

        def global_rank(self) -> int:
            return int(os.environ["RANK"])

        def set_global_rank(self, rank: int) -> None:
            pass  # Ray's, as it is

        def local_rank(self) -> int:
            return int(os.environ["LOCAL_RANK"])

        def node_rank(self) -> int:
            return int(os.environ.get("NODE_RANK", 0))

    return [RayEnvironment()]
