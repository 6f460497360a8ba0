"""The one Fabric training loop that drives every method module (see litft/methods/base.py).

Loss normalisation: a module returns the *summed* token loss of a micro-batch; the loop divides by
the number of target tokens in the whole global batch (all micro-batches, all ranks). So micro
batching, gradient accumulation and DDP all give the gradient of one big batch, exactly.
"""
from __future__ import annotations

import math
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader, DistributedSampler

from litft.checkpoint import iter_safetensors, save_safetensors
from litft.data.base import DataModule
from litft.generate import generate
from litft.methods.base import METHOD_CONFIG, Finetune
from litft.tokenizer import Tokenizer
from litft.utils import LitftError, atomic_write_text


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
    """

    global_batch_size: int = 16
    micro_batch_size: int = 4
    max_steps: int | None = None
    epochs: int = 1
    max_seq_length: int | None = None
    max_norm: float | None = 1.0
    log_interval: int = 1
    save_interval: int | None = None


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
    strategy: str = "auto",
    precision: str | None = None,
    seed: int = 42,
    resume: bool | Path = False,
    logger_name: str = "tensorboard",
) -> dict[str, float]:
    """Launch Fabric and train `method` on `data`; returns the final metrics.

    Args:
        data: the training data, e.g. `--data JSON --data.json_path train.json`.
        out_dir: where logs, step-N checkpoints and final/ go.
        train: training loop settings.
        eval: evaluation settings.
        devices: number of devices (GPUs, or CPU processes with strategy ddp).
        strategy: auto, ddp, ...
        precision: 32-true, bf16-true, bf16-mixed, 16-mixed; default bf16-true on GPUs with bf16, else 32-true.
        seed: random seed (data order, init, dropout).
        resume: true to continue from the latest out_dir/step-N, or a step-N directory.
        logger_name: tensorboard (logs under out_dir/logs) or none.
    """
    from litft.cli import to_yaml_value

    # The resolved run config, in the layout `litft finetune <method> --config` reads back.
    run_config = {**method.method_config()["init_args"], **{k: to_yaml_value(v) for k, v in dict(
        data=data, out_dir=out_dir, train=train, eval=eval, devices=devices, strategy=strategy, precision=precision,
        seed=seed, resume=resume, logger_name=logger_name).items()}}
    check_run_args(out_dir, devices, strategy, precision, seed, logger_name)
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
    check_train_args(train, devices, eval)
    out_dir = Path(out_dir)
    loggers = []
    if logger_name == "tensorboard":
        from lightning.fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(root_dir=out_dir / "logs", name="tensorboard"))
    try:
        fabric = L.Fabric(devices=devices, strategy=strategy, precision=precision, loggers=loggers,
                          accelerator="cuda" if torch.cuda.is_available() else "cpu")
    except (ValueError, TypeError, ImportError, RuntimeError) as e:  # a combination Lightning refuses on this machine
        raise LitftError(f"cannot run with --devices {devices} --strategy {strategy} --precision {precision} here: "
                         f"{' '.join(str(e).split())}") from None
    return fabric.launch(fit, method, data, out_dir, train, eval, seed, resume, run_config)


PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed", "64-true")


def check_run_args(out_dir: Path, devices: int, strategy: str, precision: str | None, seed: int,
                   logger_name: str) -> None:
    """The launch options, checked before anything loads: Lightning's own errors are tracebacks."""
    import difflib

    from lightning.fabric.strategies import STRATEGY_REGISTRY

    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise LitftError(f"out_dir {out_dir} is a file, not a directory: pass another --out_dir")
    if isinstance(precision, str) and precision not in PRECISIONS:
        close = difflib.get_close_matches(precision, PRECISIONS, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise LitftError(f"unknown precision {precision!r}.{hint} Use one of {', '.join(PRECISIONS)}")
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise LitftError(f"devices must be an integer >= 1, got {devices!r}")
    if torch.cuda.is_available() and devices > torch.cuda.device_count():
        raise LitftError(f"--devices {devices}: this machine has {torch.cuda.device_count()} GPU(s)")
    strategies = ["auto", *STRATEGY_REGISTRY.available_strategies()]
    if not isinstance(strategy, str):  # a Strategy object, from Python: Lightning checks it
        strategy = ""
    elif strategy not in strategies:
        close = difflib.get_close_matches(strategy, strategies, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise LitftError(f"unknown strategy {strategy!r}.{hint} Use auto, ddp, fsdp, ...: one of "
                         f"{', '.join(strategies)}")
    if "fsdp" in strategy and not torch.cuda.is_available():
        raise LitftError(f"--strategy {strategy} needs CUDA GPUs, and this machine has none: on CPU use --strategy ddp "
                         "(with --devices N) or auto")
    if strategy.startswith("deepspeed"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise LitftError(f"--strategy {strategy} needs DeepSpeed, which is not installed: pip install deepspeed, "
                             "or use --strategy ddp" + (" or fsdp" if torch.cuda.is_available() else ""))
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise LitftError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if logger_name not in ("tensorboard", "none"):
        raise LitftError(f"unknown logger_name {logger_name!r}: use tensorboard or none")


def check_train_args(train: TrainArgs, devices: int, eval: EvalArgs | None = None) -> None:
    if train.micro_batch_size < 1 or train.global_batch_size < 1:
        raise LitftError("train.micro_batch_size and train.global_batch_size must be >= 1")
    if train.global_batch_size % (train.micro_batch_size * devices):
        raise LitftError(f"train.global_batch_size ({train.global_batch_size}) must be a multiple of "
                         f"train.micro_batch_size x devices ({train.micro_batch_size} x {devices})")
    if train.max_steps is not None and train.max_steps < 1:
        raise LitftError("train.max_steps must be >= 1")
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
    tokenizer = Tokenizer(method.checkpoint_dir)
    method.configure_model()
    max_seq_length = train.max_seq_length or method.model.config.max_seq_length
    data.setup(tokenizer, max_seq_length, seed)
    if len(data.train_dataset) == 0:
        raise LitftError("the training set is empty")

    accum = train.global_batch_size // (train.micro_batch_size * world)
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

    optimizer, scheduler = method.configure_optimizers()
    model, optimizer = fabric.setup(method, optimizer)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    if resume:
        state = load_resume_state(fabric, method, optimizer, scheduler, out_dir, resume)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(run_config, sort_keys=False))
        n_train = sum(p.numel() for p in method.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in method.parameters())
        fabric.print(f"{type(method).__name__}: {n_train:,} trainable / {n_total:,} parameters; "
                     f"{len(data.train_dataset)} train / {len(data.val_dataset)} val samples; {total_steps} steps of "
                     f"{train.global_batch_size} samples ({accum} accumulation x {world} devices)")

    metrics: dict[str, float] = {}
    if eval.exact_match_samples and state["step"] == 0:
        metrics["exact_match_before"] = exact_match(method, tokenizer, data, eval)
        fabric.print(f"Exact match before fine-tuning: {metrics['exact_match_before']:.1%}")
    if eval.initial_validation and state["step"] == 0:
        metrics["val_loss_before"] = validate(fabric, method, val_loader, tokenizer, data, eval, step=0)

    batches = micro_batches(train_loader, train_sampler, state)
    progress = _progress_bar(fabric, total_steps, state["step"])
    tokens_seen, t0 = 0, time.perf_counter()
    while state["step"] < total_steps:
        micro = [next(batches) for _ in range(accum)]
        counts = torch.tensor([float((b["labels"][:, 1:] != -100).sum()) for b in micro]).sum()
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
        if not math.isfinite(total_loss):
            raise LitftError(f"the loss became {total_loss} at step {state['step'] + 1}: lower the learning rate "
                             "or check the data; no checkpoint was written for this step")
        grad_norm = clip_gradients(fabric, model, optimizer, train.max_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        step = state["step"]

        if step % train.log_interval == 0 or step == total_steps:
            elapsed = time.perf_counter() - t0
            metrics.update(loss=total_loss, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                           tokens_per_sec=tokens_seen * world / max(elapsed, 1e-9), peak_memory_gb=peak_memory_gb())
            fabric.log_dict({f"train/{k}": v for k, v in metrics.items() if not k.startswith("exact")}, step)
            if progress is not None:
                progress.set_postfix(loss=f"{total_loss:.4f}", tok_s=f"{metrics['tokens_per_sec']:.0f}")
        if progress is not None:
            progress.update(1)
        if eval.interval and step % eval.interval == 0 and step < total_steps:
            metrics["val_loss"] = validate(fabric, method, val_loader, tokenizer, data, eval, step)
        if train.save_interval and step % train.save_interval == 0:
            save_resume_state(fabric, method, optimizer, scheduler, state, out_dir / f"step-{step}")
    if progress is not None:
        progress.close()

    if eval.final_validation:
        metrics["val_loss"] = validate(fabric, method, val_loader, tokenizer, data, eval, state["step"])
    if eval.exact_match_samples:
        metrics["exact_match_after"] = exact_match(method, tokenizer, data, eval)
        fabric.print(f"Exact match after fine-tuning: {metrics['exact_match_after']:.1%}")
        fabric.log_dict({"val/exact_match": metrics["exact_match_after"]}, state["step"])
    final = out_dir / "final"
    if rank == 0:
        save_dir_atomically(final, lambda d: _save_final(method, d, out_dir))
        fabric.print(f"Saved {final}")
        if fabric.loggers:
            fabric.print(f"TensorBoard logs: {fabric.logger.log_dir}  (view: tensorboard --logdir {out_dir / 'logs'})")
    fabric.barrier()
    for logger in fabric.loggers:
        logger.finalize("success")
    return metrics


def _save_final(method: Finetune, d: Path, out_dir: Path) -> None:
    method.save_final(d)
    shutil.copy2(out_dir / "config.yaml", d / "run_config.yaml")


def micro_batches(loader: DataLoader, sampler: DistributedSampler, state: dict[str, int]) -> Iterator[dict]:
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
        return float(fabric.clip_gradients(model, optimizer, max_norm=max_norm, error_if_nonfinite=False))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


@torch.no_grad()
def validate(fabric: L.Fabric, method: Finetune, val_loader: DataLoader, tokenizer: Tokenizer, data: DataModule,
             eval: EvalArgs, step: int) -> float:
    method.eval()
    loss_sum = torch.zeros((), device=fabric.device)
    n = torch.zeros((), device=fabric.device)
    for i, batch in enumerate(val_loader):
        if eval.max_iters is not None and i >= eval.max_iters:
            break
        batch = {k: v.to(fabric.device) for k, v in batch.items()}
        s, count = method.validation_step(batch)
        loss_sum += s
        n += count
    val_loss = (fabric.all_reduce(loss_sum, reduce_op="sum") / fabric.all_reduce(n, reduce_op="sum").clamp(min=1)).item()
    sample = data.val_dataset[0]
    prompt, _ = split_prompt(sample)
    out = generate(method.model, prompt.to(fabric.device), eval.max_new_tokens, eos_ids=tokenizer.eos_ids)
    text = tokenizer.decode(out[prompt.numel():], skip_special_tokens=True)
    method.train()
    fabric.print(f"\nstep {step}: val loss {val_loss:.4f}, val ppl {math.exp(min(val_loss, 50)):.2f}\n"
                 f"sample: {tokenizer.decode(prompt, skip_special_tokens=True)!r} -> {text!r}")
    fabric.log_dict({"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50))}, step)
    if fabric.global_rank == 0 and fabric.loggers and hasattr(fabric.logger, "experiment"):
        fabric.logger.experiment.add_text("val/sample", text, step)
    return val_loss


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
        out = generate(method.model, prompt.to(device), eval.max_new_tokens, eos_ids=tokenizer.eos_ids)
        got = tokenizer.decode(out[prompt.numel():], skip_special_tokens=True).strip()
        want = tokenizer.decode(reference, skip_special_tokens=True).strip()
        hits += got == want
    method.train(was_training)
    return hits / max(n, 1)


# -- resumable checkpoints ----------------------------------------------------------------------
def save_dir_atomically(target: Path, write) -> None:
    """Write a whole directory under a temp name, then rename it into place."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_resume_state(fabric: L.Fabric, method: Finetune, optimizer, scheduler, state: dict, target: Path) -> None:
    if fabric.global_rank == 0:
        def write(d: Path) -> None:
            save_safetensors(method.trainable_state_dict(), d / method.weights_file, metadata={"format": "pt"})
            atomic_write_text(d / METHOD_CONFIG, yaml.safe_dump(method.method_config(), sort_keys=False))
            torch.save({
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "loop": dict(state),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            }, d / "state.pt")

        save_dir_atomically(target, write)
    fabric.barrier()


def load_resume_state(fabric: L.Fabric, method: Finetune, optimizer, scheduler, out_dir: Path,
                      resume: bool | Path) -> dict:
    if resume is True:
        steps = sorted(out_dir.glob("step-*"), key=lambda p: int(p.name.split("-")[1]) if p.name[5:].isdigit() else -1)
        if not steps:
            raise LitftError(f"--resume true: no step-N checkpoint in {out_dir}")
        ckpt = steps[-1]
    else:
        ckpt = Path(resume)
    if not (ckpt / "state.pt").is_file() or not (ckpt / method.weights_file).is_file():
        raise LitftError(f"{ckpt}: not a resumable checkpoint (needs state.pt and {method.weights_file})")
    method.load_trainable_state_dict(dict(iter_safetensors(ckpt / method.weights_file)))
    # weights_only: the state holds tensors, numbers and the python RNG tuple, nothing executable
    saved = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(_to_python_rng_state(saved["python_rng"]))
    if torch.cuda.is_available() and saved["cuda_rng"]:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    fabric.print(f"Resumed from {ckpt} at step {saved['loop']['step']}")
    return dict(saved["loop"])


def _to_python_rng_state(s):
    return tuple(tuple(x) if isinstance(x, list) else x for x in s)


def _progress_bar(fabric: L.Fabric, total: int, initial: int):
    if fabric.global_rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
