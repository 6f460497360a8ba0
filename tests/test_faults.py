"""Faults never lose a saved checkpoint: kill -9 while saving, a full disk, Ctrl-C, damaged or hostile step-N files,
an out_dir that holds another run; plus pruning of step checkpoints and what goes to TensorBoard."""
from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from litft import utils
from litft.cli import run
from litft.train import prune_step_dirs, read_resume_checkpoint, step_dirs
from litft.utils import LitftError, SaveError, write_dir_atomically
from tests.test_train import REPO, common_args, litft_cmd, litft_main, load_state_dict_file


def lora_args(ckpt: Path, task: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [*common_args(ckpt, task, out, steps=steps), "--dropout", "0.1", "--train.save_interval", "1", *extra]


def write_version(d: Path, version: int) -> None:
    for name in ("a.txt", "b.txt", "c.txt"):
        (d / name).write_text(str(version) * 1000)


def complete_version(d: Path) -> int | None:
    """The version a directory holds if all three files are there, whole, and agree, else None."""
    try:
        texts = [(d / name).read_text() for name in ("a.txt", "b.txt", "c.txt")]
    except OSError:
        return None
    return int(texts[0][0]) if len(set(texts)) == 1 and len(texts[0]) == 1000 else None


def is_complete(d: Path) -> bool:
    """All three files there and whole. (Each may come from either side of a swap: a path is looked up per open.)"""
    try:
        texts = [(d / name).read_text() for name in ("a.txt", "b.txt", "c.txt")]
    except OSError:
        return False
    return all(len(t) == 1000 and len(set(t)) == 1 for t in texts)


# -- the directory swap ----------------------------------------------------------------------------
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_directory_swap_keeps_a_complete_dir_at_every_instant(exchange, tmp_path, monkeypatch):
    """A reader polling while the directory is replaced 200 times always finds a complete one: under the target
    name (renameat2 swap), or, with the portable fallback, under the target or its backup name."""
    if not exchange:
        monkeypatch.setattr(utils, "_exchange", lambda a, b: False)  # as on a system without renameat2
    target = tmp_path / "step-1"
    write_dir_atomically(target, lambda d: write_version(d, 0))
    misses, done = [], threading.Event()

    def reader() -> None:
        while not done.is_set():
            ok = is_complete(target)
            if not ok and not exchange:  # between the fallback's two renames: the backup is the complete one
                ok = is_complete(utils.backup_dir_name(target)) or is_complete(target)
            if not ok:
                misses.append(time.perf_counter())

    t = threading.Thread(target=reader)
    t.start()
    for i in range(200):
        write_dir_atomically(target, lambda d, i=i: write_version(d, i % 10))
    done.set()
    t.join()
    assert not misses, f"{len(misses)} reads found no complete directory"
    assert complete_version(target) == 199 % 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]  # no temp or backup left


def test_a_stop_between_the_fallback_renames_is_recovered(tmp_path):
    """A kill between the fallback's two renames leaves the old dir only under its backup name: the next write
    (and a resuming run's out_dir check) puts it back first."""
    target = tmp_path / "step-3"
    write_dir_atomically(target, lambda d: write_version(d, 3))
    os.rename(target, utils.backup_dir_name(target))  # the state that kill leaves
    utils.recover_dir(target)
    assert complete_version(target) == 3 and not utils.backup_dir_name(target).exists()


def test_a_write_error_keeps_the_previous_dir_and_removes_the_partial_one(tmp_path):
    target = tmp_path / "step-5"
    write_dir_atomically(target, lambda d: write_version(d, 5))

    def fill_disk(d: Path) -> None:
        (d / "a.txt").write_text("partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(SaveError, match=r"disk full while writing .*step-5 \(No space left on device\)"):
        write_dir_atomically(target, fill_disk)
    assert complete_version(target) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-5"]


# -- a full disk, end to end ------------------------------------------------------------------------
def dir_bytes(d: Path) -> int:
    """What a directory tree takes on tmpfs: whole pages per file."""
    return sum(-(-p.stat().st_size // 4096) * 4096 + 4096 for p in d.rglob("*") if p.is_file())


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a tmpfs of a given size (needs root and a kernel that lets this container mount; else skip)."""
    mounts = []

    def mount(size: int) -> Path:
        mnt = tmp_path / f"mnt{len(mounts)}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounts.append(mnt)
        return mnt

    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    yield mount
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(ckpt, task, tmp_path, small_tmpfs, capsys):
    probe = tmp_path / "probe"
    run(lora_args(ckpt, task, probe, 1))
    one_ckpt = dir_bytes(probe / "step-1")
    # room for the run's files and one checkpoint and a half: step-1 fits, the new step-2 beside it does not
    mnt = small_tmpfs(dir_bytes(probe) - dir_bytes(probe / "final") + one_ckpt // 2 + 8192)
    out = mnt / "out"
    code, _, stderr = litft_main(capsys, *lora_args(ckpt, task, out, 3))
    assert code == 1, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("litft:")]
    assert lines == [f"litft: error: disk full while writing {out / 'step-2'} (No space left on device); the previous "
                     f"checkpoint {out / 'step-1'} is intact; free space and rerun with --resume true"], stderr
    assert "Traceback" not in stderr
    read_resume_checkpoint(out / "step-1", "adapter.safetensors")  # complete and loadable
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "step-1"]  # the partial step-2 is gone


def test_disk_full_while_writing_final_is_one_error(ckpt, task, tmp_path, small_tmpfs):
    mnt = small_tmpfs(16384)  # config.yaml fits, final/ does not
    out = mnt / "out"
    with pytest.raises(LitftError, match=r"disk full while writing .*final .*no step checkpoint was written"):
        run(common_args(ckpt, task, out, steps=1))
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


# -- kill -9 at random moments --------------------------------------------------------------------------
def mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_kill_9_at_random_moments_always_resumes_to_the_same_weights(ckpt, task, tmp_path):
    """Save every step and kill -9 at random moments of the training (a tiny model spends about half of it saving);
    each rerun resumes from a complete checkpoint (--resume true) and the run ends with exactly the weights of an
    uninterrupted run."""
    steps, no_val = 40, ("--eval.final_validation", "false")  # the loop and its saves fill the window
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def start(out: Path, *more: str) -> tuple[subprocess.Popen, float]:
        """The process, once it has loaded the model and is about to train (it rewrote out_dir/config.yaml)."""
        before = mtime(out / "config.yaml")
        proc = subprocess.Popen([sys.executable, "-m", "litft.cli", *lora_args(ckpt, task, out, steps, *no_val),
                                 *more], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and mtime(out / "config.yaml") == before:
            time.sleep(0.005)
        return proc, time.perf_counter()

    straight, t_train = start(tmp_path / "straight")
    while straight.poll() is None and not (tmp_path / "straight" / "final").is_dir():
        time.sleep(0.002)
    window = time.perf_counter() - t_train  # the loop, its saves and the final save, uninterrupted
    assert straight.wait(timeout=600) == 0
    out, rng = tmp_path / "killed", random.Random(0)
    kills, resumed_from = 0, []
    for _ in range(10):
        done = int(step_dirs(out)[-1].name[5:]) if step_dirs(out) else 0
        resumed_from.append(done)
        proc, _ = start(out, *(["--resume", "true"] if done else ["--overwrite", "true"]))
        # a random later step k: once its save began, kill within a step and a half (load-proof: no fixed delay)
        k = rng.randint(done + 1, min(steps, done + 10)) if done < steps else None  # None: only final/ is left
        while k and proc.poll() is None and not ((out / f"step-{k}").exists() or (out / f".step-{k}.tmp").exists()):
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 1.5) * window / steps)
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait()
        for d in step_dirs(out):  # every step-N that exists is complete
            read_resume_checkpoint(d, "adapter.safetensors")
        if proc.returncode == 0:
            break
    print(f"{kills} kills; resumed from {resumed_from}")
    assert kills >= 4 and len(set(resumed_from) - {0}) >= 2, (kills, resumed_from)  # it really tested resume
    if proc.returncode != 0:
        last = litft_cmd(*lora_args(ckpt, task, out, steps, *no_val), "--resume", "true")
        assert last.returncode == 0, last.stderr[-2000:]
    a = load_state_dict_file(tmp_path / "straight" / "final" / "adapter.safetensors")
    b = load_state_dict_file(out / "final" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- Ctrl-C ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("save_on_interrupt", [False, True])
def test_ctrl_c_stops_with_one_line_and_exit_130(save_on_interrupt, ckpt, task, tmp_path):
    out = tmp_path / "out"
    args = [*common_args(ckpt, task, out, steps=100000), "--train.save_interval", "3",
            "--train.save_on_interrupt", str(save_on_interrupt).lower()]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "litft.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "step-3").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("litft:")]
    assert len(lines) == 1 and stderr.rstrip().endswith(lines[0]), stderr[-3000:]
    step = int(lines[0].split("interrupted at step ")[1].split(";")[0])
    last = step_dirs(out)[-1]
    assert lines[0] == (f"litft: interrupted at step {step}; last complete checkpoint: {last} "
                        "(resume with --resume true)")
    _, saved = read_resume_checkpoint(last, "adapter.safetensors")
    assert saved["loop"]["step"] == int(last.name[5:])
    if save_on_interrupt:
        assert last.name == f"step-{step}"
    else:
        assert int(last.name[5:]) % 3 == 0
    assert not list(out.glob(".*.tmp"))


# -- damaged or hostile step-N files ---------------------------------------------------------------------
class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/litft-test-faults-marker")


@pytest.fixture(scope="module")
def two_steps(ckpt, task, tmp_path_factory) -> Path:
    """A finished 2-step run with step-1/ and step-2/ (copied per test before damaging it)."""
    out = tmp_path_factory.mktemp("run") / "out"
    run(lora_args(ckpt, task, out, 2))
    return out


def damaged_copy(two_steps: Path, tmp_path: Path, damage: str) -> Path:
    out = tmp_path / "out"
    shutil.copytree(two_steps, out)
    state, adapter = out / "step-2" / "state.pt", out / "step-2" / "adapter.safetensors"
    if damage == "hostile":
        MARKER.unlink(missing_ok=True)
        torch.save({"optimizer": RunsCode()}, state)
    elif damage == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "adapter":
        adapter.write_bytes(adapter.read_bytes()[:100])
    elif damage == "not_a_state":
        torch.save({"step": 3}, state)
    return out


@pytest.mark.parametrize("damage", ["hostile", "truncated", "adapter", "not_a_state"])
def test_a_damaged_step_is_one_error_naming_the_file(damage, two_steps, ckpt, task, tmp_path, capsys):
    out = damaged_copy(two_steps, tmp_path, damage)
    bad = out / "step-2" / ("adapter.safetensors" if damage == "adapter" else "state.pt")
    code, _, stderr = litft_main(capsys, *lora_args(ckpt, task, tmp_path / "new", 2), "--resume", str(out / "step-2"))
    assert code == 1, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("litft:")]
    assert len(lines) == 1 and lines[0].startswith(f"litft: error: {bad}: "), stderr[-2000:]
    assert {"hostile": "cannot load the resume state", "truncated": "cannot load the resume state",
            "adapter": "cannot read safetensors file", "not_a_state": "not a litft resume state"}[damage] in lines[0]
    assert not MARKER.exists()


@pytest.mark.parametrize("damage", ["hostile", "truncated", "adapter"])
def test_resume_true_falls_back_to_the_previous_complete_step(damage, two_steps, ckpt, task, tmp_path, capsys):
    out = damaged_copy(two_steps, tmp_path, damage)
    run(lora_args(ckpt, task, out, 2, "--resume", "true"))
    printed = capsys.readouterr().out
    assert f"falling back to {out / 'step-1'}" in printed and f"Resumed from {out / 'step-1'} at step 1" in printed
    assert not MARKER.exists()
    a = load_state_dict_file(two_steps / "final" / "adapter.safetensors")  # the same run, finished the same
    b = load_state_dict_file(out / "final" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    read_resume_checkpoint(out / "step-2", "adapter.safetensors")  # rewritten whole


def test_resume_with_a_different_r_is_one_error(two_steps, ckpt, task, tmp_path):
    fits = r"adapter.safetensors: does not fit this model \(.*shape mismatch.*r, targets"
    with pytest.raises(LitftError, match=fits):
        run(lora_args(ckpt, task, tmp_path / "new", 2, "--r", "4", "--resume", str(two_steps / "step-2")))


# -- out_dir -------------------------------------------------------------------------------------------
def test_an_out_dir_holding_a_run_is_refused_unless_resume_or_overwrite(two_steps, ckpt, task, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(two_steps, out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(LitftError, match=r"already holds a run \(step-2/, final/, config.yaml\).*--resume true.*"
                                         r"--overwrite true"):
        run(common_args(ckpt, task, out, steps=1))
    assert sorted(p.name for p in out.iterdir()) == before
    run(common_args(ckpt, task, out, steps=1) + ["--overwrite", "true"])
    assert step_dirs(out) == []  # the earlier run's step-N are gone: a later --resume true cannot pick them
    assert (out / "final" / "adapter.safetensors").is_file()


@pytest.mark.parametrize("case", ["file", "read_only"])
def test_an_out_dir_that_cannot_be_written_is_refused_before_loading(case, ckpt, task, tmp_path, capsys):
    if case == "file":
        bad = tmp_path / "out"
        bad.write_text("not a dir")
        out, expect = bad / "sub", "is a file, not a directory"
    else:
        bad = tmp_path / "ro"
        bad.mkdir()
        if os.geteuid() == 0:  # root writes through mode bits: a read-only mount
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(bad)], capture_output=True)
            if r.returncode != 0:
                pytest.skip("root and cannot mount a read-only tmpfs here")
        else:
            bad.chmod(0o500)
        out, expect = bad / "out", "is not writable"
    try:
        code, stdout, stderr = litft_main(capsys, *common_args(ckpt, task, out, steps=1))
        assert code == 1
        assert f"litft: error: out_dir {out}: " in stderr and expect in stderr, stderr[-2000:]
        assert "Traceback" not in stderr and "trainable" not in stdout  # refused before the model
        assert not out.exists()
    finally:
        if case == "read_only" and os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(bad)], check=False)


# -- pruning, TensorBoard, the printed sample ----------------------------------------------------------------
def test_prune_keeps_the_newest_and_the_best(tmp_path):
    for n in (1, 2, 3, 10, 11):
        (tmp_path / f"step-{n}").mkdir()
    prune_step_dirs(tmp_path, keep_last=2, keep_step=2)
    assert [d.name for d in step_dirs(tmp_path)] == ["step-2", "step-10", "step-11"]
    prune_step_dirs(tmp_path, keep_last=1)
    assert [d.name for d in step_dirs(tmp_path)] == ["step-11"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-11"]


def test_keep_last_tensorboard_keys_and_the_printed_sample(ckpt, task, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    run([*common_args(ckpt, task, out, steps=6), "--train.save_interval", "1", "--train.keep_last", "2",
         "--train.keep_best", "true", "--eval.interval", "2", "--eval.initial_validation", "true",
         "--logger_name", "tensorboard"])
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {t for t in tags if t.startswith("train/")} == {
        "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/peak_memory_gb"}
    val = {e.step: e.value for e in acc.Scalars("val/loss")}
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 2, 4, 6]  # each validation once
    best = min((2, 4), key=lambda s: val[s])  # validated in-loop steps that have a checkpoint
    kept = {d.name for d in step_dirs(out)}
    assert kept == {"step-5", "step-6", f"step-{best}"}
    _, saved = read_resume_checkpoint(out / "step-6", "adapter.safetensors")
    assert saved["loop"]["best_step"] == best and saved["loop"]["best_val_loss"] == pytest.approx(val[best])
    printed = capsys.readouterr().out
    assert "sample: '<s>" in printed  # the prompt's BOS token is shown, not dropped
