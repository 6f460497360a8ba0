"""--logger_name tensorboard|csv|wandb (several at once) with Lightning's own loggers, and `litft plot` on CSV logs.

The wandb test needs the wandb package (`pip install "litft[wandb]"`); it runs offline (WANDB_MODE=offline) with
every proxy pointed at a closed port, so a network call would fail the run rather than pass silently.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from litft.cli import run
from litft.plot import read_csv_scalars, read_scalars
from litft.utils import LitftError
from tests.helpers import make_checkpoint, make_task
from tests.test_train import common_args

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
REPO = Path(__file__).resolve().parents[1]


def run_args(tmp_path: Path, loggers: str) -> list[str]:
    ckpt = make_checkpoint(tmp_path / "ckpt")
    task = make_task(tmp_path / "task.json", n=32)
    args = common_args(ckpt, task, tmp_path / "out", steps=4)
    args[args.index("--logger_name") + 1] = loggers
    return args + ["--eval.interval", "2"]


def tensorboard_tags(out: Path) -> set[str]:
    return set(read_scalars(out, "val/loss")[2])


def test_tensorboard_and_csv_log_the_same_points_and_plot_reads_csv(tmp_path):
    run(run_args(tmp_path, "tensorboard,csv"))
    out = tmp_path / "out"
    assert (out / "logs" / "tensorboard" / "version_0").is_dir()
    csv_files = list((out / "logs" / "csv").rglob("metrics.csv"))
    assert len(csv_files) == 1
    tb_tags = tensorboard_tags(out)
    csv_steps, csv_values, csv_tags = read_csv_scalars(out, out / "logs" / "csv", "val/loss")
    assert {"train/loss", "train/lr", "val/loss"} <= tb_tags and set(csv_tags) == tb_tags
    for tag in ("val/loss", "train/loss"):
        tb_steps, tb_values, _ = read_scalars(out, tag)
        steps, values, _ = read_csv_scalars(out, out / "logs" / "csv", tag)
        assert steps == tb_steps and values == pytest.approx(tb_values, rel=1e-6)
    # a run logged with csv only: `litft plot` draws it from the CSV file
    only_csv = tmp_path / "csv-run"
    shutil.copytree(out / "logs" / "csv", only_csv / "logs" / "csv")
    png = run(["plot", str(only_csv), "--out", str(tmp_path / "val.png")])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_scalars(only_csv, "val/loss")[:2] == (csv_steps, csv_values)


def test_logger_name_errors(tmp_path, monkeypatch):
    args = run_args(tmp_path, "tensorboard,cvs")
    with pytest.raises(LitftError, match=r"unknown logger_name 'tensorboard,cvs': use tensorboard, csv, wandb"):
        run(args)
    monkeypatch.setitem(sys.modules, "wandb", None)  # what importing it does when it is not installed
    args[args.index("--logger_name") + 1] = "csv,wandb"
    with pytest.raises(LitftError, match=r'pip install "litft\[wandb\]"'):
        run(args)
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason='needs wandb: pip install "litft[wandb]"')
def test_wandb_offline_writes_a_local_run_with_the_tensorboard_keys(tmp_path):
    args = run_args(tmp_path, "tensorboard,wandb")
    closed = "http://127.0.0.1:9"  # the discard port: any request fails at once
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
           "WANDB_SILENT": "true", "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "http_proxy": closed,
           "https_proxy": closed, "WANDB_BASE_URL": closed, "WANDB_API_KEY": ""}
    r = subprocess.run([sys.executable, "-m", "litft.cli", *args], capture_output=True, text=True, timeout=600,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((tmp_path / "out" / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "out" / "logs").rglob("*"))[:20]
    # the run's record file (protobuf records, for `wandb sync`) names every metric TensorBoard got
    records = next(runs[0].glob("run-*.wandb")).read_bytes()
    tb_tags = tensorboard_tags(tmp_path / "out")
    assert {"train/loss", "val/loss"} <= tb_tags
    assert [t for t in sorted(tb_tags) if t.encode() not in records] == []
    assert "Wandb logs:" in r.stdout and "wandb sync" in r.stdout
