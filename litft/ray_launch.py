"""`--launcher ray`: the same Fabric loop (litft/train.py `run_fabric`), started in the workers of Ray Train's
TorchTrainer instead of by Fabric. Ray places the workers (on one machine or a cluster), sets each one's rank, world
size and rendezvous (MASTER_ADDR/PORT, RANK, LOCAL_RANK, ...) and creates the process group; Fabric takes them as
they are (litft.distributed.cluster_plugins). Ray is an optional extra: pip install "litft[ray]".
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litft.distributed import RAY_WORKER_ENV
from litft.utils import LitftError

RAY_MISSING = '--launcher ray needs Ray, which is not installed: pip install "litft[ray]" (or use --launcher fabric)'


@dataclass
class RayArgs:
    """Ray Train settings (used with --launcher ray).

    Args:
        num_workers: training processes Ray starts (each one device: one GPU with use_gpu, else CPU).
        address: the Ray cluster to run on (e.g. auto, or ray://head:10001); null: RAY_ADDRESS if set, else a local
            cluster started for this run.
        use_gpu: give each worker one GPU.
    """

    num_workers: int = 2
    address: str | None = None
    use_gpu: bool = False


def check_ray(ray: RayArgs) -> None:
    """Before anything loads: Ray is installed, and the worker count fits a local cluster."""
    try:
        import ray as _  # noqa: F401
    except ImportError:
        raise LitftError(RAY_MISSING) from None
    if isinstance(ray.num_workers, bool) or not isinstance(ray.num_workers, int) or ray.num_workers < 1:
        raise LitftError(f"ray.num_workers must be an integer >= 1, got {ray.num_workers!r}")
    local = ray.address is None and not os.environ.get("RAY_ADDRESS")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local and not ray.use_gpu and ray.num_workers > cores:  # Ray would wait for CPUs that never come
        raise LitftError(f"--ray.num_workers {ray.num_workers}: the local Ray cluster has {cores} CPU core(s), one per "
                         f"worker: use --ray.num_workers {cores} or fewer, or --ray.address of a larger cluster")


def launch_ray(ray_args: RayArgs, run_kwargs: dict[str, Any]) -> dict[str, float]:
    """Run `run_fabric(**run_kwargs)` in `num_workers` Ray Train workers; returns rank 0's final metrics."""
    try:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError:
        raise LitftError(RAY_MISSING) from None
    if not ray.is_initialized():
        ray.init(address=ray_args.address, include_dashboard=False, log_to_driver=True)
    out_dir = Path(run_kwargs["out_dir"]).resolve()
    trainer = TorchTrainer(
        _worker, train_loop_config=run_kwargs,
        scaling_config=ScalingConfig(num_workers=ray_args.num_workers, use_gpu=ray_args.use_gpu),
        # Ray's own run records (no model files: litft writes step-N/ and final/ itself)
        run_config=RunConfig(name="ray", storage_path=str(out_dir / "logs")))
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 -- a worker's error arrives wrapped: keep its one line
        cause = _litft_error_in(e)
        if cause is not None:
            raise LitftError(cause) from None
        raise
    return dict(result.metrics or {})


def _litft_error_in(e: BaseException) -> str | None:
    """The message of a LitftError a worker raised, from Ray's wrapped error (its type or its text)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, LitftError):
            return str(e)
        for line in str(e).splitlines():
            if "LitftError: " in line:
                return line.split("LitftError: ", 1)[1]
        e = e.__cause__ or e.__context__
    return None


def _worker(run_kwargs: dict[str, Any]) -> None:
    """One Ray Train worker: the Fabric loop with Ray's ranks; every worker reports (rank 0's numbers are the run's)."""
    from ray import train

    from litft.train import run_fabric

    os.environ[RAY_WORKER_ENV] = "1"
    local_world, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
    metrics = run_fabric(**run_kwargs, devices=local_world, num_nodes=max(1, world // local_world))
    train.report({k: float(v) for k, v in (metrics or {}).items()})
