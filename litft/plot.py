"""`litft plot RUN_DIR...`: one TensorBoard scalar of several runs (default the validation loss) as a PNG.

Reads the event files every run writes under `out_dir/logs/tensorboard/` with TensorBoard's own
reader, and draws with Pillow, which TensorBoard already depends on (no matplotlib needed).
"""
from __future__ import annotations

import math
from pathlib import Path

from litft.utils import LitftError, atomic_path

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def read_scalars(run_dir: Path, tag: str) -> tuple[list[int], list[float], list[str]]:
    """(steps, values, all scalar tags) of `tag` over every event file under run_dir; a later file
    (a resumed run's new version_N) wins on a step logged twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = run_dir / "logs" if (run_dir / "logs").is_dir() else run_dir
    files = sorted(root.rglob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, str(p)))
    if not files:
        raise LitftError(f"{run_dir}: no TensorBoard event files (was it run with --logger_name tensorboard?)")
    loggers = sorted({str(f.parent.parent) for f in files})  # .../tensorboard/version_N/events.*: one per run
    if len(loggers) > 1:
        raise LitftError(f"{run_dir} holds the logs of several runs ({', '.join(loggers[:3])}, ...): pass each "
                         "run directory, e.g. litft plot out/methods/*")
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


def nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """About n round numbers (1, 2 or 5 x 10^k apart) covering [lo, hi]."""
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def plot(run_dirs: list[Path], out: Path = Path("val_loss.png"), tag: str = "val/loss", width: int = 960,
         height: int = 560) -> Path:
    """Draw one scalar of several fine-tuning runs into a PNG (e.g. `litft plot out/methods/*`).

    Args:
        run_dirs: run directories (the out_dir of each `litft finetune` run, holding logs/tensorboard/).
        out: the PNG file to write.
        tag: the TensorBoard scalar to draw: val/loss, train/loss, train/lr, train/grad_norm, ...
        width: image width in pixels.
        height: image height in pixels.
    """
    from PIL import Image, ImageDraw, ImageFont

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

    x_lo = min(s[0] for _, s, _ in series)
    x_hi = max(s[-1] for _, s, _ in series)
    y_lo = min(min(v) for _, _, v in series)
    y_hi = max(max(v) for _, _, v in series)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    pad = (y_hi - y_lo) * 0.05 or abs(y_hi) * 0.05 or 1.0
    y_lo, y_hi = y_lo - pad, y_hi + pad

    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = ImageFont.load_default()
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 80, width - 220, 40, height - 50  # plot area; the legend sits on the right
    px = lambda x: left + (x - x_lo) / (x_hi - x_lo) * (right - left)  # noqa: E731
    py = lambda y: bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)  # noqa: E731

    for t in nice_ticks(x_lo, x_hi):
        draw.line([(px(t), top), (px(t), bottom)], fill=(230, 230, 230))
        draw.text((px(t), bottom + 6), f"{t:g}", fill="black", font=font, anchor="ma")
    for t in nice_ticks(y_lo, y_hi):
        draw.line([(left, py(t)), (right, py(t))], fill=(230, 230, 230))
        draw.text((left - 6, py(t)), f"{t:.4g}", fill="black", font=font, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2, 12), tag, fill="black", font=font, anchor="ma")
    draw.text(((left + right) / 2, height - 22), "step", fill="black", font=font, anchor="ma")

    for i, (name, steps, values) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        points = [(px(s), py(v)) for s, v in zip(steps, values)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2, joint="curve")
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        ly = top + 10 + 22 * i
        draw.line([(right + 15, ly), (right + 45, ly)], fill=color, width=3)
        draw.text((right + 52, ly), f"{name} ({values[-1]:.4g})", fill="black", font=font, anchor="lm")

    out = Path(out)
    with atomic_path(out) as tmp:
        img.save(tmp, format="PNG")
    print(f"Wrote {out}: {tag} of {', '.join(name for name, _, _ in series)}")
    return out
