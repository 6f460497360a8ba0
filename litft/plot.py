"""`litft plot RUN_DIR...`: one logged scalar of several runs (default the validation loss) as a PNG.

Reads what a run's loggers wrote under `out_dir/logs/`: TensorBoard event files (with TensorBoard's own reader)
or, for a run logged with `--logger_name csv` only, Lightning's CSV files (`csv/version_N/metrics.csv`), and
draws with matplotlib (`pip install "litft[plot]"`).
"""
from __future__ import annotations

import csv
from pathlib import Path

from litft.utils import LitftError, atomic_path

# matplotlib's default cycle (tab10) as RGB: the tests look for each run's line by its color.
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def read_scalars(run_dir: Path, tag: str) -> tuple[list[int], list[float], list[str]]:
    """(steps, values, all scalar tags) of `tag` over every TensorBoard event file under run_dir (else every
    CSV logger file); a later file (a resumed run's new version_N) wins on a step logged twice."""
    root = run_dir / "logs" if (run_dir / "logs").is_dir() else run_dir
    files = sorted(root.rglob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, str(p)))
    if not files:
        return read_csv_scalars(run_dir, root, tag)
    check_one_run(run_dir, files)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    tags: set[str] = set()
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        tags.update(acc.Tags()["scalars"])
        if tag in acc.Tags()["scalars"]:
            points.update({e.step: e.value for e in acc.Scalars(tag)})
    steps = sorted(points)
    return steps, [points[s] for s in steps], sorted(tags)


def check_one_run(run_dir: Path, files: list[Path]) -> None:
    """Log files of one run only: .../<logger>/version_N/<file>, one logger directory per run (its versions are
    one run resumed)."""
    loggers = sorted({str(f.parent.parent) for f in files})
    if len(loggers) > 1:
        raise LitftError(f"{run_dir} holds the logs of several runs ({', '.join(loggers[:3])}, ...): pass each "
                         "run directory, e.g. litft plot out/methods/*")


def read_csv_scalars(run_dir: Path, root: Path, tag: str) -> tuple[list[int], list[float], list[str]]:
    """The same from Lightning's CSVLogger files (a header of metric names, one row per log call, empty cells
    for the metrics that call did not log)."""
    files = sorted(root.rglob("metrics.csv"), key=lambda p: (p.stat().st_mtime, str(p)))
    if not files:
        raise LitftError(f"{run_dir}: no TensorBoard event files or CSV logs (was it run with --logger_name "
                         "tensorboard or csv?)")
    check_one_run(run_dir, files)
    points: dict[int, float] = {}
    tags: set[str] = set()
    for f in files:
        with open(f, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            tags.update(n for n in reader.fieldnames or [] if n != "step")
            for row in reader:
                try:
                    if row.get(tag) not in (None, ""):
                        points[int(float(row["step"]))] = float(row[tag])
                except (KeyError, ValueError):
                    raise LitftError(f"{f}: not a CSV log of steps and numbers (row {row})") from None
    steps = sorted(points)
    return steps, [points[s] for s in steps], sorted(tags)


def plot(run_dirs: list[Path], out: Path = Path("val_loss.png"), tag: str = "val/loss", width: int = 960,
         height: int = 560) -> Path:
    """Draw one scalar of several fine-tuning runs into a PNG (e.g. `litft plot out/methods/*`).

    Args:
        run_dirs: run directories (the out_dir of each `litft finetune` run, holding logs/tensorboard/ or
            logs/csv/).
        out: the PNG file to write.
        tag: the logged scalar to draw: val/loss, train/loss, train/lr, train/grad_norm, ...
        width: image width in pixels.
        height: image height in pixels.
    """
    try:  # the Figure API (not pyplot): no global backend or figure state, no display needed
        from matplotlib.figure import Figure
    except ImportError:
        raise LitftError('litft plot draws with matplotlib, which is not installed: pip install "litft[plot]"') \
            from None

    if not run_dirs:
        raise LitftError("no run directories given: e.g. litft plot out/methods/*")
    series, all_tags = [], set()
    for d in run_dirs:
        if not Path(d).exists():
            raise LitftError(f"{d}: no such run directory")
        if not Path(d).is_dir():  # a shell glob (out/methods/*) also catches the PNGs written there
            print(f"skipping {d}: not a run directory")
            continue
        steps, values, tags = read_scalars(Path(d), tag)
        all_tags.update(tags)
        if steps:
            series.append((Path(d).name, steps, values))
        else:
            print(f"{d}: no {tag!r} points; skipped")
    if not series:
        raise LitftError(f"no run has the scalar {tag!r}; scalars found: {', '.join(sorted(all_tags)) or 'none'}")

    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.subplots()
    for i, (name, steps, values) in enumerate(series):
        color = "#%02x%02x%02x" % COLORS[i % len(COLORS)]
        ax.plot(steps, values, color=color, linewidth=2, marker="o", markersize=4, label=f"{name} ({values[-1]:.4g})")
    ax.set_title(tag)
    ax.set_xlabel("step")
    ax.grid(True, color="#e6e6e6")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.subplots_adjust(left=0.08, right=0.76, top=0.92, bottom=0.1)  # the legend sits on the right
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    print(f"Wrote {out}: {tag} of {', '.join(name for name, _, _ in series)}")
    return out
