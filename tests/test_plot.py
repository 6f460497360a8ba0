"""`litft plot`: reads the TensorBoard scalars of several runs and writes a PNG of them."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from litft.cli import run
from litft.plot import COLORS, read_scalars
from litft.utils import LitftError


def write_run(run_dir: Path, version: int, points: dict[int, float]) -> None:
    """Event files laid out as a `litft finetune` run writes them (TensorBoard's own writer)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "logs" / "tensorboard" / f"version_{version}"))
    for step, value in points.items():
        writer.add_scalar("val/loss", value, step)
        writer.add_scalar("train/loss", value + 0.1, step)
    writer.close()


def test_read_scalars_merges_resumed_versions(tmp_path):
    write_run(tmp_path / "a", 0, {0: 3.0, 10: 2.0, 20: 1.5})
    write_run(tmp_path / "a", 1, {20: 1.4, 30: 1.0})  # resumed at step 20: the later file wins
    steps, values, tags = read_scalars(tmp_path / "a", "val/loss")
    assert steps == [0, 10, 20, 30] and values == pytest.approx([3.0, 2.0, 1.4, 1.0])
    assert {"val/loss", "train/loss"} <= set(tags)


def test_plot_writes_a_png_of_every_run(tmp_path):
    for i, name in enumerate(["lora", "dora", "neft"]):
        write_run(tmp_path / "runs" / name, 0, {s: 3.0 - 0.1 * s * (i + 1) / 3 for s in range(0, 21, 5)})
    # the run directories as separate words, as a shell glob (litft plot out/methods/*) gives them
    (tmp_path / "runs" / "old.png").write_bytes(b"png")  # a glob catches earlier plots too: skipped
    run(["plot", *sorted(map(str, (tmp_path / "runs").iterdir())), "--out", str(tmp_path / "val.png")])
    img = Image.open(tmp_path / "val.png")
    assert img.format == "PNG" and img.size == (960, 560)
    colors = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert all(c in colors for c in COLORS[:3])  # one line per run


def test_plot_errors_are_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LitftError, match="no TensorBoard event files"):
        run(["plot", str(tmp_path / "empty")])
    with pytest.raises(LitftError, match="no such run directory"):
        run(["plot", str(tmp_path / "missing")])
    write_run(tmp_path / "runs" / "a", 0, {0: 1.0})
    write_run(tmp_path / "runs" / "b", 0, {0: 1.0})
    with pytest.raises(LitftError, match="scalars found: train/loss, val/loss"):
        run(["plot", str(tmp_path / "runs" / "a"), "--tag", "val/acc"])
    with pytest.raises(LitftError, match="several runs"):
        run(["plot", str(tmp_path / "runs")])


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    import sys

    from litft.plot import plot

    write_run(tmp_path / "a", 0, {0: 1.0})
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what importing it does when it is not installed
    with pytest.raises(LitftError, match=r'pip install "litft\[plot\]"'):
        plot([tmp_path / "a"], out=tmp_path / "v.png")
    assert not (tmp_path / "v.png").exists()
