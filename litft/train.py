"""The one Fabric training loop that drives every method module (see litft/methods/base.py).

Loss normalisation: a module returns the *summed* token loss of a micro-batch; the loop divides by
the number of target tokens in the whole global batch (all micro-batches, all ranks). So micro
batching, gradient accumulation and DDP all give the gradient of one big batch, exactly.
"""
from __future__ import annotations

import errno
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader, DistributedSampler

from litft.adapters.quantize import QuantizedEmbedding
from litft.checkpoint import iter_safetensors, save_safetensors
from litft.data.base import DataModule
from litft.data.sampler import LengthGroupedSampler
from litft.distributed import (check_devices_fit, check_launched_processes, check_resume_world, cluster_plugins,
                               fsdp_unsupported, full_state_dict, is_sharded, make_strategy, unsharded_copy)
from litft.generate import generate
from litft.threads import ThreadChooser, adaptive as adaptive_threads
from litft.methods.base import METHOD_CONFIG, Finetune
from litft.ray_launch import RayArgs, check_ray, launch_ray
from litft.tokenizer import Tokenizer
from litft.utils import (LitftError, SaveError, atomic_write_text, recover_dir, tmp_dir_name, to_yaml_value,
                         write_dir_atomically)


@dataclass
class TrainArgs:
    """Training loop settings.

    Args:
        global_batch_size: samples per optimizer step, over all devices and accumulation steps.
        micro_batch_size: samples per forward/backward on one device.
        max_steps: optimizer steps to run; default: `epochs` passes over the training set.
        epochs: passes over the training set (when max_steps is not set).
        max_seq_length: truncate samples to this many tokens; default: the model's context length.
        max_norm: clip the global gradient norm to this (null: no clipping; the norm is logged anyway).
        log_interval: log metrics every N optimizer steps.
        save_interval: write a resumable checkpoint out_dir/step-N every N steps (null: never).
        save_on_interrupt: on Ctrl-C, finish the current step and write out_dir/step-N before stopping (exit
            code 130), so `--resume true` continues from there; without it the last step-N written stays the
            resume point.
        keep_last: keep only the newest N step-N checkpoints, deleting older ones as new ones are written
            (null: keep all).
        keep_best: with keep_last, also keep the step-N checkpoint with the lowest validation loss (among those
            written at a validation step, i.e. save_interval a multiple of eval.interval); recorded in its
            state.pt, so a resumed run keeps it too.
        group_by_length: draw the training batches length-grouped (litft.data.LengthGroupedSampler: shuffled, then
            sorted by length within mega-batches of 50 steps, the steps shuffled; the longest step first), so a
            batch padded to its longest sample holds little padding; false: plain random batches
            (DistributedSampler). Losses and masks are the same either way; only which samples share a batch
            differs.
    """

    global_batch_size: int = 16
    micro_batch_size: int = 4
    max_steps: int | None = None
    epochs: int = 1
    max_seq_length: int | None = None
    max_norm: float | None = 1.0
    log_interval: int = 1
    save_interval: int | None = None
    save_on_interrupt: bool = False
    keep_last: int | None = None
    keep_best: bool = False
    group_by_length: bool = True


@dataclass
class EvalArgs:
    """Evaluation settings.

    Args:
        interval: validate every N optimizer steps (val loss + one sample generation).
        max_iters: validation batches per evaluation (null: the whole validation set).
        initial_validation: validate before training.
        final_validation: validate after training.
        max_new_tokens: tokens generated for the sample generation and for exact match.
        exact_match_samples: score greedy generations against the references of this many validation
            samples, before and after training (0: off).
    """

    interval: int = 100
    max_iters: int | None = 100
    initial_validation: bool = False
    final_validation: bool = True
    max_new_tokens: int = 64
    exact_match_samples: int = 0


def default_precision() -> str:
    if torch.cuda.is_available():
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"  # CPUs without bf16 units emulate it, many times slower: fp32 is the fast choice


def cpu_bf16_units() -> bool:
    """Whether this CPU computes bf16 dot products in hardware (AVX512-BF16 or AMX), as torch's cpuinfo detects it
    (any OS; False on a torch before torch.cpu.get_capabilities, and on other architectures)."""
    caps = getattr(torch.cpu, "get_capabilities", dict)()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def finetune(
    method: Finetune,
    data: DataModule,
    out_dir: Path = Path("out/finetune"),
    train: TrainArgs = TrainArgs(),
    eval: EvalArgs = EvalArgs(),
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str | None = None,
    seed: int = 42,
    resume: bool | Path = False,
    overwrite: bool = False,
    logger_name: str = "tensorboard",
    launcher: str = "fabric",
    ray: RayArgs = RayArgs(),
) -> dict[str, float]:
    """Launch Fabric and train `method` on `data`; returns the final metrics.

    Args:
        data: the training data, e.g. `--data JSON --data.json_path train.json`.
        out_dir: where logs, step-N checkpoints and final/ go.
        train: training loop settings.
        eval: evaluation settings.
        devices: number of devices per node (GPUs, or CPU processes with strategy ddp or fsdp).
        num_nodes: number of machines; start the same command on each (torchrun --nnodes, or srun under SLURM).
        strategy: auto, ddp (the model replicated on every device), or fsdp (FSDP2: parameters, gradients and
            optimizer state sharded over the devices), ...
        precision: 32-true, bf16-true, bf16-mixed, 16-mixed; default bf16-true on GPUs with bf16, else 32-true.
        seed: random seed (data order, init, dropout).
        resume: true to continue from the latest out_dir/step-N (falling back to the one before if it is
            damaged), or a step-N directory.
        overwrite: replace the earlier run in out_dir (its step-N/, final/ and config.yaml are deleted first; logs/
            stays); without it, or resume, an out_dir that already holds a run is refused.
        logger_name: where metrics go, one or several joined by commas: tensorboard (out_dir/logs/tensorboard),
            csv (out_dir/logs/csv/version_N/metrics.csv), wandb (Weights & Biases, run dir under out_dir/logs/wandb;
            offline with WANDB_MODE=offline, `wandb sync` later; needs `pip install "litft[wandb]"`), or none.
        launcher: fabric (Fabric starts --devices processes; or torchrun / srun started them) or ray (Ray Train
            starts ray.num_workers workers, on a local or a given Ray cluster; needs pip install "litft[ray]").
        ray: Ray Train settings, with --launcher ray.
    """
    # The resolved run config, in the layout `litft finetune <method> --config` reads back.
    run_config = {**method.method_config()["init_args"], **{k: to_yaml_value(v) for k, v in dict(
        data=data, out_dir=out_dir, train=train, eval=eval, devices=devices, num_nodes=num_nodes, strategy=strategy,
        precision=precision,
        seed=seed, resume=resume, logger_name=logger_name, launcher=launcher, ray=ray).items()}}
    if launcher not in ("fabric", "ray"):
        raise LitftError(f"unknown launcher {launcher!r}: use fabric or ray")
    if launcher == "ray":
        check_ray(ray)
    check_run_args(out_dir, devices, strategy, precision, seed, logger_name, num_nodes)
    if strategy == "fsdp" and (why := fsdp_unsupported(method)):
        raise LitftError(why)
    if precision is None:
        precision = default_precision()
        if not torch.cuda.is_available():
            print("No GPU: training in fp32 (32-true). " + (
                "This CPU has bf16 units (avx512_bf16/amx): --precision bf16-true runs its matmuls about 2x faster, "
                "at bf16's precision." if cpu_bf16_units() else
                "This CPU has no bf16 units: bf16 would be emulated and run far slower."))
    elif precision.startswith("bf16") and not torch.cuda.is_available() and not cpu_bf16_units():
        print(f"Warning: --precision {precision} on a CPU without bf16 units (avx512_bf16/amx_bf16): bf16 is emulated "
              "here and runs many times slower than --precision 32-true.")
    check_train_args(train, ray.num_workers if launcher == "ray" else devices * num_nodes, eval)
    out_dir = Path(out_dir)
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0":  # DDP children: rank 0 did it
        prepare_out_dir(out_dir, resume, overwrite)
    run_kwargs = dict(method=method, data=data, out_dir=out_dir, train=train, eval=eval, strategy=strategy,
                      precision=precision, seed=seed, resume=resume, logger_name=logger_name, run_config=run_config)
    if launcher == "ray":
        return launch_ray(ray, run_kwargs)
    return run_fabric(**run_kwargs, devices=devices, num_nodes=num_nodes)


def run_fabric(method: Finetune, data: DataModule, out_dir: Path, train: TrainArgs, eval: EvalArgs, devices: int,
               num_nodes: int, strategy: str, precision: str, seed: int, resume: bool | Path, logger_name: str,
               run_config: dict[str, Any]) -> dict[str, float]:
    """Fabric on this process (and the ones it launches, or that torchrun, SLURM or Ray started): the loop `fit`."""
    check_launched_processes(devices, num_nodes)
    loggers = make_loggers(logger_name, out_dir)
    try:
        fabric = L.Fabric(devices=devices, num_nodes=num_nodes, strategy=make_strategy(strategy, devices, num_nodes),
                          precision=precision, loggers=loggers, plugins=cluster_plugins(),
                          accelerator="cuda" if torch.cuda.is_available() else "cpu")
    except (ValueError, TypeError, ImportError, RuntimeError) as e:  # a combination Lightning refuses on this machine
        raise LitftError(f"cannot run with --devices {devices} --strategy {strategy} --precision {precision} here: "
                         f"{' '.join(str(e).split())}") from None
    return fabric.launch(fit, method, data, out_dir, train, eval, seed, resume, run_config)


LOGGERS = ("tensorboard", "csv", "wandb")


def logger_names(logger_name: str) -> list[str]:
    """"tensorboard,csv" -> ["tensorboard", "csv"]; "none" -> []."""
    names = [n.strip() for n in str(logger_name).split(",") if n.strip()]
    return [] if names == ["none"] else names


def make_loggers(logger_name: str, out_dir: Path) -> list[Any]:
    """Lightning's own logger classes, all writing under out_dir/logs (`litft plot` reads tensorboard and csv)."""
    loggers: list[Any] = []
    for name in logger_names(logger_name):
        if name == "tensorboard":
            from lightning.fabric.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(root_dir=out_dir / "logs", name="tensorboard"))
        elif name == "csv":
            from lightning.fabric.loggers import CSVLogger

            loggers.append(CSVLogger(root_dir=out_dir / "logs", name="csv"))
        elif name == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            (out_dir / "logs").mkdir(parents=True, exist_ok=True)
            loggers.append(WandbLogger(save_dir=str(out_dir / "logs"), project="litft", name=out_dir.name))
    return loggers


PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed", "64-true")


def check_run_args(out_dir: Path, devices: int, strategy: str, precision: str | None, seed: int,
                   logger_name: str, num_nodes: int = 1) -> None:
    """The launch options, checked before anything loads: Lightning's own errors are tracebacks."""
    import difflib

    from lightning.fabric.strategies import STRATEGY_REGISTRY

    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise LitftError(f"out_dir {out_dir} is a file, not a directory: pass another --out_dir")
    adaptive_threads()  # a bad LITFT_ADAPTIVE_THREADS fails here, before out_dir is touched
    if isinstance(precision, str) and precision not in PRECISIONS:
        close = difflib.get_close_matches(precision, PRECISIONS, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise LitftError(f"unknown precision {precision!r}.{hint} Use one of {', '.join(PRECISIONS)}")
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise LitftError(f"devices must be an integer >= 1, got {devices!r}")
    if torch.cuda.is_available() and devices > torch.cuda.device_count():
        raise LitftError(f"--devices {devices}: this machine has {torch.cuda.device_count()} GPU(s)")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise LitftError(f"num_nodes must be an integer >= 1, got {num_nodes!r}")
    check_devices_fit(devices)
    strategies = ["auto", *STRATEGY_REGISTRY.available_strategies()]
    if not isinstance(strategy, str):  # a Strategy object, from Python: Lightning checks it
        strategy = ""
    elif strategy not in strategies:
        close = difflib.get_close_matches(strategy, strategies, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise LitftError(f"unknown strategy {strategy!r}.{hint} Use auto, ddp, fsdp, ...: one of "
                         f"{', '.join(strategies)}")
    if "fsdp" in strategy and strategy != "fsdp" and not torch.cuda.is_available():
        raise LitftError(f"--strategy {strategy} needs CUDA GPUs, and this machine has none: on CPU use --strategy fsdp "
                         "or ddp (with --devices N)")
    if strategy.startswith("deepspeed"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise LitftError(f"--strategy {strategy} needs DeepSpeed, which is not installed: pip install deepspeed, "
                             "or use --strategy ddp" + (" or fsdp" if torch.cuda.is_available() else ""))
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise LitftError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    names = logger_names(logger_name)
    unknown = [n for n in names if n not in LOGGERS]
    if unknown or (not names and str(logger_name).strip() != "none"):
        raise LitftError(f"unknown logger_name {logger_name!r}: use tensorboard, csv, wandb (several joined by "
                         "commas, e.g. tensorboard,csv) or none")
    if "wandb" in names:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise LitftError('--logger_name wandb needs the wandb package, which is not installed: '
                             'pip install "litft[wandb]" (or use tensorboard or csv)')


def check_train_args(train: TrainArgs, devices: int, eval: EvalArgs | None = None) -> None:
    if train.micro_batch_size < 1 or train.global_batch_size < 1:
        raise LitftError("train.micro_batch_size and train.global_batch_size must be >= 1")
    if train.global_batch_size % (train.micro_batch_size * devices):
        raise LitftError(f"train.global_batch_size ({train.global_batch_size}) must be a multiple of "
                         f"train.micro_batch_size x devices ({train.micro_batch_size} x {devices})")
    if train.max_steps is not None and train.max_steps < 1:
        raise LitftError("train.max_steps must be >= 1")
    if train.keep_last is not None and train.keep_last < 1:
        raise LitftError(f"train.keep_last must be >= 1 or null (keep all), got {train.keep_last}")
    if train.max_steps is None and train.epochs < 1:
        raise LitftError(f"train.epochs must be >= 1, got {train.epochs} (or set train.max_steps)")
    if train.max_seq_length is not None and train.max_seq_length < 1:
        raise LitftError(f"train.max_seq_length must be >= 1 (or null: the model's context length), got "
                         f"{train.max_seq_length}")
    if train.log_interval < 1:
        raise LitftError(f"train.log_interval must be >= 1, got {train.log_interval}")
    if train.save_interval is not None and train.save_interval < 0:
        raise LitftError(f"train.save_interval must be >= 1 (or null: never), got {train.save_interval}")
    if train.max_norm is not None and not train.max_norm > 0:  # a negative norm would flip every gradient
        raise LitftError(f"train.max_norm must be > 0 (or null: no clipping), got {train.max_norm}")
    if eval is None:
        return
    if eval.interval < 0 or (eval.max_iters is not None and eval.max_iters < 1):
        raise LitftError(f"eval.interval must be >= 0 (0: no validation during training) and eval.max_iters >= 1 (or "
                         f"null: the whole validation set), got {eval.interval} and {eval.max_iters}")
    if eval.max_new_tokens < 1 or eval.exact_match_samples < 0:
        raise LitftError(f"eval.max_new_tokens must be >= 1 and eval.exact_match_samples >= 0, got "
                         f"{eval.max_new_tokens} and {eval.exact_match_samples}")


def fit(fabric: L.Fabric, method: Finetune, data: DataModule, out_dir: Path, train: TrainArgs, eval: EvalArgs,
        seed: int, resume: bool | Path, run_config: dict[str, Any]) -> dict[str, float]:
    fabric.seed_everything(seed)
    world, rank = fabric.world_size, fabric.global_rank
    if getattr(data, "preference_pairs", False) != getattr(method, "preference_pairs", False):
        # an SFT method on pairs would train on the rejected responses too; DPO on SFT data has no pairs
        raise LitftError(f"{type(method).__name__} and --data {type(data).__name__} do not fit: preference pairs "
                         "(litft.data.Preference) go with `litft finetune dpo`, and dpo needs them; use a matching "
                         "pair (SFT: --data JSON / Alpaca)")
    tokenizer = Tokenizer(method.checkpoint_dir)
    method.configure_model()
    max_seq_length = train.max_seq_length or method.model.config.max_seq_length
    data.setup(tokenizer, max_seq_length, seed)
    if len(data.train_dataset) == 0:
        raise LitftError("the training set is empty")

    accum = train.global_batch_size // (train.micro_batch_size * world)
    train_sampler: LengthGroupedSampler | DistributedSampler
    if train.group_by_length:  # samples of similar length share a batch: little compute spent on padding
        train_sampler = LengthGroupedSampler(data.train_dataset, train.micro_batch_size, accum, num_replicas=world,
                                             rank=rank, seed=seed)
    else:
        train_sampler = DistributedSampler(data.train_dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                           drop_last=True)
    # Own generators: a DataLoader iterator otherwise draws from the global RNG, which would shift
    # the dropout stream of a resumed run by one draw.
    train_loader = DataLoader(data.train_dataset, batch_size=train.micro_batch_size, sampler=train_sampler,
                              collate_fn=data.collate_fn, drop_last=True, generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(data.val_dataset, batch_size=train.micro_batch_size, collate_fn=data.collate_fn,
                            sampler=DistributedSampler(data.val_dataset, world, rank, shuffle=False),
                            generator=torch.Generator().manual_seed(seed))
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch == 0:
        raise LitftError(f"the training set ({len(data.train_dataset)} samples) is smaller than one global batch "
                         f"({train.global_batch_size}); lower train.global_batch_size")
    total_steps = train.max_steps or steps_per_epoch * train.epochs
    method.total_steps = total_steps

    if shards_parameters(fabric):  # FSDP2 replaces the parameters with shards: the optimizer is made after
        model = fabric.setup_module(method)
        optimizer, scheduler = method.configure_optimizers()
        optimizer = fabric.setup_optimizers(optimizer)
    else:
        optimizer, scheduler = method.configure_optimizers()
        model, optimizer = fabric.setup(method, optimizer)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    if resume:
        state = load_resume_state(fabric, method, model, optimizer, scheduler, out_dir, resume)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(run_config, sort_keys=False))
        n_train = sum(p.numel() for p in method.parameters() if p.requires_grad)
        fabric.print(f"{type(method).__name__}: {n_train:,} trainable / {count_parameters(method):,} parameters; "
                     f"{len(data.train_dataset)} train / {len(data.val_dataset)} val samples; {total_steps} steps of "
                     f"{train.global_batch_size} samples ({accum} accumulation x {world} devices)")

    metrics: dict[str, float] = {}
    try:
        if eval.exact_match_samples and state["step"] == 0:
            metrics["exact_match_before"] = exact_match(method, tokenizer, data, eval)
            fabric.print(f"Exact match before fine-tuning: {metrics['exact_match_before']:.1%}")
        if eval.initial_validation and state["step"] == 0:
            metrics["val_loss_before"] = validate(fabric, method, val_loader, tokenizer, data, eval, step=0)
        with sigint_stops_after_step() as stop:
            train_loop(fabric, method, model, optimizer, scheduler, data, tokenizer, train_loader, train_sampler,
                       val_loader, train, eval, state, total_steps, accum, out_dir, metrics, stop)

        if eval.final_validation:
            metrics["val_loss"] = validate(fabric, method, val_loader, tokenizer, data, eval, state["step"])
        if eval.exact_match_samples:
            metrics["exact_match_after"] = exact_match(method, tokenizer, data, eval)
            fabric.print(f"Exact match after fine-tuning: {metrics['exact_match_after']:.1%}")
            fabric.log_dict({"val/exact_match": metrics["exact_match_after"]}, state["step"])
        final = out_dir / "final"
        saver = method
        if is_sharded(method):  # final/ is consolidated: gathered from the shards, written by rank 0 alone
            whole = full_state_dict(method.model)
            saver = unsharded_copy(method, whole) if rank == 0 else None
        save_on_rank0(fabric, final, lambda d: _save_final(saver, d, out_dir), out_dir)
        if rank == 0:
            fabric.print(f"Saved {final}")
            for logger in fabric.loggers:
                kind = type(logger).__name__.removesuffix("Logger")
                where = Path(logger.save_dir) / "wandb" if kind == "Wandb" else logger.log_dir
                view = {"TensorBoard": f"  (view: tensorboard --logdir {out_dir / 'logs'})",
                        "Wandb": f"  (an offline run uploads with: wandb sync {where}/offline-run-*)"}.get(kind, "")
                fabric.print(f"{kind} logs: {where}{view}")
    except KeyboardInterrupt as e:  # Ctrl-C: one line for the CLI (exit 130), the loggers flushed
        for logger in fabric.loggers:
            logger.finalize("interrupted")
        if isinstance(e, TrainingInterrupted):
            raise
        raise TrainingInterrupted(interrupted_message(state["step"], out_dir)) from None
    fabric.barrier()
    for logger in fabric.loggers:
        logger.finalize("success")
    return metrics


def train_loop(fabric: L.Fabric, method: Finetune, model, optimizer, scheduler, data: DataModule, tokenizer: Tokenizer,
               train_loader: DataLoader, train_sampler: LengthGroupedSampler | DistributedSampler,
               val_loader: DataLoader, train: TrainArgs, eval: EvalArgs, state: dict, total_steps: int, accum: int,
               out_dir: Path, metrics: dict[str, float], stop: list[bool]) -> None:
    """Optimizer steps from state["step"] to total_steps: log, validate, save step-N, prune; on Ctrl-C, stop
    after the step."""
    world = fabric.world_size
    batches = micro_batches(train_loader, train_sampler, state)
    progress = _progress_bar(fabric, total_steps, state["step"])
    tokens_seen, t0 = 0, time.perf_counter()
    # a single CPU process: the step's thread count is chosen by timing steps (litft/threads.py), so a machine
    # other jobs keep busy does not stall every parallel region of the step; several processes share the cores
    # by their own settings (torchrun: one thread each)
    step_threads = ThreadChooser(probe=1) if fabric.device.type == "cpu" and world == 1 else None
    try:
        while state["step"] < total_steps:
            with step_threads.step() if step_threads else nullcontext():
                micro = [next(batches) for _ in range(accum)]
                counts = torch.tensor([float(method.loss_count(b)) for b in micro]).sum()  # target tokens (DPO: pairs)
                n_global = fabric.all_reduce(counts.to(fabric.device), reduce_op="sum").item()
                if n_global == 0:
                    raise LitftError("a global batch has no target tokens (every label is masked); check the data")
                loss_sum = torch.zeros((), device=fabric.device)
                for i, batch in enumerate(micro):
                    with fabric.no_backward_sync(model, enabled=i < accum - 1):
                        loss = model.training_step(batch)
                        fabric.backward(loss * (world / n_global))  # DDP averages over ranks: undo that, see module doc
                    loss_sum += loss.detach()
                    tokens_seen += batch["input_ids"].numel()
                total_loss = fabric.all_reduce(loss_sum, reduce_op="sum").item() / n_global
                extra = {k: fabric.all_reduce(v, reduce_op="sum").item() / n_global  # e.g. DPO's rewards, per pair
                         for k, v in sorted(method.pop_metric_sums().items())}
                if not math.isfinite(total_loss):
                    raise LitftError(f"the loss became {total_loss} at step {state['step'] + 1}: lower the learning "
                                     "rate or check the data; no checkpoint was written for this step")
                grad_norm = clip_gradients(fabric, model, optimizer, train.max_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            step = state["step"]
            method.after_optimizer_step(step)  # e.g. Delta-LoRA moves W; before any save of this step

            if step % train.log_interval == 0 or step == total_steps:
                elapsed = time.perf_counter() - t0
                step_metrics = dict(loss=total_loss, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                                    tokens_per_sec=tokens_seen * world / max(elapsed, 1e-9),
                                    peak_memory_gb=peak_memory_gb(), **extra)
                metrics.update(step_metrics)
                # only this step's training metrics: validation logs val/* itself, once, at the step it ran
                fabric.log_dict({f"train/{k}": v for k, v in step_metrics.items()}, step)
                if progress is not None:
                    shown = {k.split("/")[-1]: f"{v:.3f}" for k, v in extra.items() if k.startswith("rewards/")}
                    progress.set_postfix(loss=f"{total_loss:.4f}", **shown, tok_s=f"{metrics['tokens_per_sec']:.0f}")
            if progress is not None:
                progress.update(1)
            val_loss = None
            if eval.interval and step % eval.interval == 0 and step < total_steps:
                val_loss = metrics["val_loss"] = validate(fabric, method, val_loader, tokenizer, data, eval, step)
            stopping = stop_requested(fabric, stop)
            saving = bool(train.save_interval and step % train.save_interval == 0)
            if saving or (stopping and train.save_on_interrupt):
                if val_loss is not None and (state.get("best_val_loss") is None or val_loss < state["best_val_loss"]):
                    state["best_val_loss"], state["best_step"] = val_loss, step  # in state.pt: survives a resume
                save_resume_state(fabric, method, model, optimizer, scheduler, state, out_dir / f"step-{step}")
                if train.keep_last is not None and fabric.global_rank == 0:
                    prune_step_dirs(out_dir, train.keep_last, state.get("best_step") if train.keep_best else None)
            if stopping:
                raise TrainingInterrupted(interrupted_message(step, out_dir))
    finally:  # the bar ends its line before any message below it
        if step_threads is not None:
            step_threads.close()
        if progress is not None:
            progress.close()


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run; the message says where and what can be resumed (the CLI prints it, exit 130)."""


def interrupted_message(step: int, out_dir: Path) -> str:
    steps = step_dirs(out_dir)
    if steps:
        return f"interrupted at step {step}; last complete checkpoint: {steps[-1]} (resume with --resume true)"
    return (f"interrupted at step {step}; no checkpoint was written (--train.save_interval N or "
            "--train.save_on_interrupt true make a run resumable)")


@contextmanager
def sigint_stops_after_step() -> Iterator[list[bool]]:
    """While training, the first Ctrl-C only sets a flag that the loop reads after the step (so it can stop with a
    consistent state, and save it); a second one interrupts at once."""
    stop = [False]

    def handler(signum, frame) -> None:
        if stop[0]:
            raise KeyboardInterrupt
        stop[0] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C as it is
        yield stop
        return
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_requested(fabric: L.Fabric, stop: list[bool]) -> bool:
    if fabric.world_size == 1:
        return stop[0]
    # every rank must stop after the same step, or the others would wait for it in the next all_reduce
    return fabric.all_reduce(torch.tensor(float(stop[0]), device=fabric.device), reduce_op="sum").item() > 0


def count_parameters(module: torch.nn.Module) -> int:
    """Parameters of the model as it is, not of its storage: a bitsandbytes Params4bit packs two 4-bit weights
    per byte (its logical shape is in quant_state.shape), and so does litft's QuantizedEmbedding."""
    total, seen = 0, set()
    for m in module.modules():
        for p in m.parameters(recurse=False):
            if id(p) in seen:  # a tied weight counts once
                continue
            seen.add(id(p))
            shape = getattr(getattr(p, "quant_state", None), "shape", None)
            if isinstance(m, QuantizedEmbedding) and p is m.weight:
                shape = (m.num_embeddings, m.embedding_dim)
            total += math.prod(shape) if shape is not None else p.numel()
    return total


def _save_final(method: Finetune, d: Path, out_dir: Path) -> None:
    method.save_final(d)
    shutil.copy2(out_dir / "config.yaml", d / "run_config.yaml")


def micro_batches(loader: DataLoader, sampler: LengthGroupedSampler | DistributedSampler,
                  state: dict[str, int]) -> Iterator[dict]:
    """Micro-batches forever, epoch after epoch, in a deterministic order (seed + epoch), starting
    at the position `state` records, so a resumed run sees exactly the batches it would have seen."""
    while True:
        sampler.set_epoch(state["epoch"])
        it = iter(loader)
        for _ in range(state["batch_in_epoch"]):
            next(it)
        for batch in it:
            state["batch_in_epoch"] += 1
            yield batch
        state["epoch"] += 1
        state["batch_in_epoch"] = 0


def clip_gradients(fabric: L.Fabric, model, optimizer, max_norm: float | None) -> float:
    if max_norm is not None:
        return float(_whole(fabric.clip_gradients(model, optimizer, max_norm=max_norm, error_if_nonfinite=False)))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    # under FSDP a gradient is a shard (DTensor): the norm of a shard is partial, full_tensor() sums over the ranks
    return float(torch.linalg.vector_norm(torch.stack([_whole(torch.linalg.vector_norm(g)) for g in grads]))) \
        if grads else 0.0


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shards_parameters(fabric: L.Fabric) -> bool:
    from lightning.fabric.strategies import ModelParallelStrategy

    return isinstance(fabric.strategy, ModelParallelStrategy)


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


@torch.no_grad()
def validate(fabric: L.Fabric, method: Finetune, val_loader: DataLoader, tokenizer: Tokenizer, data: DataModule,
             eval: EvalArgs, step: int) -> float:
    method.eval()
    method.pop_metric_sums()  # only this validation's sums below
    loss_sum = torch.zeros((), device=fabric.device)
    n = torch.zeros((), device=fabric.device)
    for i, batch in enumerate(val_loader):
        if eval.max_iters is not None and i >= eval.max_iters:
            break
        batch = {k: v.to(fabric.device) for k, v in batch.items()}
        s, count = method.validation_step(batch)
        loss_sum += s
        n += count
    n_all = fabric.all_reduce(n, reduce_op="sum").clamp(min=1)
    val_loss = (fabric.all_reduce(loss_sum, reduce_op="sum") / n_all).item()
    extra = {k: (fabric.all_reduce(v, reduce_op="sum") / n_all).item() for k, v in sorted(method.pop_metric_sums().items())}
    sample = data.val_dataset[0]
    prompt, _ = split_prompt(sample)
    out = generate(method.model, prompt.to(fabric.device), eval.max_new_tokens, eos_ids=stop_ids(tokenizer))
    text = tokenizer.decode(out[prompt.numel():], skip_special_tokens=True)
    method.train()
    # printed with its special tokens: a chat prompt without its role markers would misread as plain text
    scores = {"loss": val_loss, **({"ppl": math.exp(min(val_loss, 50))} if method.reports_perplexity else {}), **extra}
    shown = ", ".join(f"val {k} {v:.4f}" if k != "ppl" else f"val ppl {v:.2f}" for k, v in scores.items())
    fabric.print(f"\nstep {step}: {shown}\n"
                 f"sample: {tokenizer.decode(prompt)!r} -> {tokenizer.decode(out[prompt.numel():])!r}")
    fabric.log_dict({f"val/{k}": v for k, v in scores.items()}, step)
    if fabric.global_rank == 0:
        for logger in fabric.loggers:
            if hasattr(logger.experiment, "add_text"):  # TensorBoard: the sample generation as text
                logger.experiment.add_text("val/sample", text, step)
    return val_loss


def stop_ids(tokenizer: Tokenizer) -> set[int]:
    """Where evaluation's generations end: eos, and the chat template's end-of-turn token (Gemma's <end_of_turn>,
    Phi-3's <|end|>: not eos, yet the end of every reply the model was trained on)."""
    return set(tokenizer.eos_ids) | set(tokenizer.end_of_turn_ids())


def split_prompt(sample: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids, response ids) of a tokenised sample: the prompt is the masked prefix."""
    ids, labels = sample["input_ids"], sample["labels"]
    targets = (labels != -100).nonzero()
    start = int(targets[0]) if len(targets) else ids.numel()
    return ids[:start], ids[start:]


@torch.no_grad()
def exact_match(method: Finetune, tokenizer: Tokenizer, data: DataModule, eval: EvalArgs) -> float:
    """Fraction of validation samples whose greedy generation equals the reference response."""
    was_training = method.training
    method.eval()
    n = min(eval.exact_match_samples, len(data.val_dataset))
    hits = 0
    device = next(method.parameters()).device
    for i in range(n):
        prompt, reference = split_prompt(data.val_dataset[i])
        if prompt.numel() == 0:
            raise LitftError("exact match needs prompt-masked samples (data.mask_prompt true)")
        out = generate(method.model, prompt.to(device), eval.max_new_tokens, eos_ids=stop_ids(tokenizer))
        got = tokenizer.decode(out[prompt.numel():], skip_special_tokens=True).strip()
        want = tokenizer.decode(reference, skip_special_tokens=True).strip()
        hits += got == want
    method.train(was_training)
    return hits / max(n, 1)


# -- run directories and resumable checkpoints ------------------------------------------------------
RESUME_STATE = "state.pt"


def step_dirs(out_dir: Path) -> list[Path]:
    """The out_dir/step-N directories, oldest first."""
    found = [p for p in out_dir.glob("step-*") if p.name[5:].isdigit() and p.is_dir()] if out_dir.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def prepare_out_dir(out_dir: Path, resume: bool | Path, overwrite: bool) -> None:
    """Before any model loads: out_dir must be a writable directory (or creatable), and may hold an earlier run
    only when resuming it or when asked to overwrite it. Overwriting deletes that run's step-N/ and final/, so a
    later `--resume true` cannot pick up the wrong run."""
    if resume and overwrite:
        raise LitftError("--resume and --overwrite exclude each other: resume continues the run in out_dir, "
                         "overwrite deletes it")
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LitftError(f"out_dir {out_dir}: {existing} is a file, not a directory; choose another --out_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LitftError(f"out_dir {out_dir}: {existing} is not writable; choose another --out_dir")
    if not out_dir.is_dir():
        return
    for backup in out_dir.glob(".*.old"):  # a replacement stopped half-way (see utils.write_dir_atomically)
        recover_dir(out_dir / backup.name[1:-4])
    for tmp in out_dir.glob(".*.tmp"):  # partial directories of a killed run: never complete, never read
        shutil.rmtree(tmp, ignore_errors=True)
    earlier = step_dirs(out_dir) + [p for p in (out_dir / "final", out_dir / "config.yaml") if p.exists()]
    if not earlier or resume:
        return
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in earlier[-3:])
    if not overwrite:
        raise LitftError(f"out_dir {out_dir} already holds a run ({names}); continue it with --resume true, replace "
                         "it with --overwrite true, or choose another --out_dir")
    for p in earlier:
        if p.is_dir():
            trash = tmp_dir_name(p)  # renamed first: a kill while deleting leaves no half step-N
            os.rename(p, trash)
            shutil.rmtree(trash)
        else:
            p.unlink()


def prune_step_dirs(out_dir: Path, keep_last: int, keep_step: int | None = None) -> None:
    """Delete all but the newest `keep_last` step-N directories (and step-`keep_step`, the best one)."""
    steps = step_dirs(out_dir)
    keep = set(steps[-keep_last:]) | ({out_dir / f"step-{keep_step}"} if keep_step is not None else set())
    for d in steps:
        if d not in keep:
            trash = tmp_dir_name(d)
            os.rename(d, trash)  # gone in one step; a kill before rmtree leaves a temp dir, cleaned up later
            shutil.rmtree(trash, ignore_errors=True)


def save_failed(e: SaveError, out_dir: Path) -> LitftError:
    """The one error for a failed save: what failed, which checkpoint is still intact, what to do."""
    fix = "free space" if e.error.errno in (errno.ENOSPC, errno.EDQUOT) else "fix the cause"
    parts = [str(e)]
    if e.target.name == "final" and e.target.is_dir():
        parts.append(f"the earlier {e.target} is intact")
    steps = step_dirs(out_dir)
    if steps:
        parts.append(f"the previous checkpoint {steps[-1]} is intact; {fix} and rerun with --resume true")
    else:
        parts.append(f"no step checkpoint was written; {fix} and rerun with --overwrite true")
    return LitftError("; ".join(parts))


SHARDED_DIR = "sharded"  # in a step-N of an FSDP run: one shard file per rank (torch distributed checkpoint)


def save_resume_state(fabric: L.Fabric, method: Finetune, model, optimizer, scheduler, state: dict,
                      target: Path) -> None:
    rng = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
           "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
           "world_size": fabric.world_size}
    if is_sharded(method):
        # every rank writes its own shard of weights and optimizer state into rank 0's temp directory (fabric.save
        # takes rank 0's path); rank 0 adds the rest and swaps the directory in once all shards are written
        sharded = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "loop": dict(state), **rng}

        def write(d: Path) -> None:
            fabric.save(d / SHARDED_DIR, sharded)
            atomic_write_text(d / METHOD_CONFIG, yaml.safe_dump(method.method_config(), sort_keys=False))

        save_on_rank0(fabric, target, write, target.parent, others=lambda: fabric.save(target / SHARDED_DIR, sharded))
        fabric.barrier()
        return

    def write(d: Path) -> None:  # on rank 0
        save_safetensors(method.trainable_state_dict(), d / method.weights_file, metadata={"format": "pt"})
        atomic_write_text(d / METHOD_CONFIG, yaml.safe_dump(method.method_config(), sort_keys=False))
        with open(d / RESUME_STATE, "wb", buffering=0) as f:  # unbuffered: a write error surfaces as OSError
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "loop": dict(state),
                        **rng}, f)

    save_on_rank0(fabric, target, write, target.parent)
    fabric.barrier()


def save_on_rank0(fabric: L.Fabric, target: Path, write, out_dir: Path, others=None) -> None:
    """Rank 0 writes the directory `target`; every rank learns whether that failed, so that none waits forever
    at the next collective while rank 0 stops with the error. `others`: what the other ranks do meanwhile (their
    part of a collective save inside `write`)."""
    error = None
    if fabric.global_rank == 0:
        try:
            write_dir_atomically(target, write)
        except SaveError as e:
            error = save_failed(e, out_dir)
    elif others is not None:
        try:
            others()
        except Exception as e:  # noqa: BLE001 -- rank 0 reports the failure of a shared save
            error = LitftError(f"rank {fabric.global_rank} could not write its shard of {target}: {e}")
    if fabric.world_size > 1:
        failed = fabric.all_reduce(torch.tensor(float(error is not None), device=fabric.device), reduce_op="sum")
        if failed.item() > 0 and error is None:
            raise LitftError(f"rank 0 could not write {target} (its error says why)")
    if error is not None:
        raise error


def read_resume_checkpoint(ckpt: Path, weights_file: str, sharded: bool = False
                           ) -> tuple[dict[str, torch.Tensor], dict]:
    """The trained weights and the loop state of a step-N directory; a missing, truncated, corrupt or hostile
    file is one LitftError naming it (nothing is applied to the model before both read whole). An FSDP run's
    step-N (sharded=True) is only checked here: its shards are read by every rank in load_resume_state."""
    has_shards = (ckpt / SHARDED_DIR / ".metadata").is_file()
    if sharded != has_shards and (has_shards or (ckpt / RESUME_STATE).is_file()):
        raise LitftError(f"{ckpt} was written by a run {'with' if has_shards else 'without'} --strategy fsdp: resume "
                         f"it with the strategy that wrote it ({ckpt.parent / 'config.yaml'})")
    if sharded:
        for name in (".metadata", "meta.pt"):
            if not (ckpt / SHARDED_DIR / name).is_file():
                raise LitftError(f"{ckpt}: not a resumable checkpoint ({SHARDED_DIR}/{name} is missing)")
        return {}, {}
    for name in (weights_file, RESUME_STATE):
        if not (ckpt / name).is_file():
            raise LitftError(f"{ckpt}: not a resumable checkpoint ({name} is missing; needs {RESUME_STATE} and "
                             f"{weights_file})")
    weights = dict(iter_safetensors(ckpt / weights_file))
    path = ckpt / RESUME_STATE
    try:
        # weights_only: the state holds tensors, numbers and the python RNG tuple; anything else (a pickle that
        # would import or call something) is refused before it runs
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch.load raises many types for a bad file; all mean the same
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LitftError(f"{path}: cannot load the resume state (truncated, corrupt, or not a litft state file; "
                         f"only tensors and numbers are loaded): {first}") from e
    keys = set(saved) if isinstance(saved, dict) else set()
    missing = {"optimizer", "scheduler", "loop", "torch_rng", "python_rng"} - keys
    if missing:
        raise LitftError(f"{path}: not a litft resume state (no {', '.join(sorted(missing))})")
    return weights, saved


def load_resume_state(fabric: L.Fabric, method: Finetune, model, optimizer, scheduler, out_dir: Path,
                      resume: bool | Path) -> dict:
    if resume is True:
        candidates = step_dirs(out_dir)[::-1]  # newest first; a damaged one falls back to the one before
        if not candidates:
            raise LitftError(f"--resume true: no step-N checkpoint in {out_dir}")
    else:
        candidates = [Path(resume)]
    sharded = is_sharded(method)
    for i, ckpt in enumerate(candidates):
        try:
            weights, saved = read_resume_checkpoint(ckpt, method.weights_file, sharded)
            break
        except LitftError as e:
            if i + 1 == len(candidates):
                raise LitftError(f"{e} (and no earlier step-N checkpoint to fall back to)" if i else str(e)) from e
            fabric.print(f"Warning: {e}; falling back to {candidates[i + 1]}")
    if sharded:
        saved = load_sharded_state(fabric, model, optimizer, ckpt)
        weights = None
    check_resume_world(saved.get("world_size"), fabric.world_size, str(ckpt))
    try:
        if weights is not None:
            method.load_trainable_state_dict(weights)
    except (RuntimeError, ValueError) as e:  # size mismatch / missing keys: the run was made with other options
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line or "Missing" in line),
                      str(e).splitlines()[0])
        detail = detail if len(detail) < 300 else detail[:297] + ".."
        raise LitftError(f"{ckpt / method.weights_file}: does not fit this model ({detail}); it was written with other "
                         f"method options (r, targets, ...): resume with the options in {ckpt.parent / 'config.yaml'}"
                         ) from e
    try:
        if not sharded:  # a sharded run's optimizer state was loaded shard by shard
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        random.setstate(_to_python_rng_state(saved["python_rng"]))
        if torch.cuda.is_available() and saved["cuda_rng"]:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise LitftError(f"{ckpt / RESUME_STATE}: does not fit this run ({e}); resume with the options of the run "
                         f"that wrote it ({ckpt.parent / 'config.yaml'})") from e
    fabric.print(f"Resumed from {ckpt} at step {saved['loop']['step']}")
    return dict(saved["loop"])


def load_sharded_state(fabric: L.Fabric, model, optimizer, ckpt: Path) -> dict:
    """Every rank reads its shards of the weights and the optimizer state of an FSDP run's step-N (a collective);
    returns the rest: scheduler, loop and RNG states."""
    try:
        # the scheduler comes back as its state dict among the rest (fabric.load would only replace the entry)
        rest = fabric.load(ckpt / SHARDED_DIR, {"model": model, "optimizer": optimizer}, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch.distributed.checkpoint raises many types for a bad directory
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise LitftError(f"{ckpt / SHARDED_DIR}: cannot load this sharded checkpoint (damaged, or written with other "
                         f"method options; resume with the options in {ckpt.parent / 'config.yaml'}): {first}") from e
    missing = {"scheduler", "loop", "torch_rng", "python_rng"} - set(rest)
    if missing:
        raise LitftError(f"{ckpt / SHARDED_DIR}: not a litft resume state (no {', '.join(sorted(missing))})")
    return rest


def _to_python_rng_state(s):
    return tuple(tuple(x) if isinstance(x, list) else x for x in s)


def _progress_bar(fabric: L.Fabric, total: int, initial: int):
    if fabric.global_rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
