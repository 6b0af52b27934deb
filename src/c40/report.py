"""Evaluation report: reads an `Evaluation` (and training history) and writes files a user can
open — PNG figures, predictions.parquet, summary.json and a REPORT.md linking them.

Nothing here computes a metric; every number comes from `Evaluation`. Every file is written to a
temporary name and renamed, and REPORT.md (written last) exists only when the report is complete.
matplotlib (Agg canvas, no pyplot) and pyarrow are imported lazily.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from c40.data import Dataset
from c40.errors import C40Error, DataError
from c40.files import atomic_path, write_text
from c40.evaluate import Evaluation

CELL_INCHES = 1.5  # size of one image cell in the picture grids


def figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no display): the one figure style of
    c40's reports and of the search report (tune/_search_report.py)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


# ---------------------------------------------------------------------------- figures
def plot_train_grid(ds: Dataset, path: Path, per_class: int = 8) -> Path:
    """One row per class: its first `per_class` training images, the class name on the left."""
    import torch
    from torchvision.utils import make_grid

    pad, size = 2, ds.images.shape[1]
    rows = [np.flatnonzero(ds.labels == c)[:per_class] for c in range(len(ds.classes))]
    tiles = np.zeros((len(rows) * per_class, *ds.images.shape[1:]), np.uint8)
    for r, idx in enumerate(rows):
        tiles[r * per_class:r * per_class + len(idx)] = ds.images[idx]
    grid = make_grid(torch.from_numpy(tiles).permute(0, 3, 1, 2), nrow=per_class, padding=pad,
                     pad_value=255)  # (3, H, W) uint8
    fig = figure(per_class * 0.8 + 1.5, len(rows) * 0.8 + 0.6)
    ax = fig.subplots()
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_yticks([pad + r * (size + pad) + size / 2 for r in range(len(rows))], ds.classes)
    ax.set_xticks([])
    ax.tick_params(length=0, labelsize=11)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title("CIFAR-10 training images")
    return _save(fig, path)


def plot_misclassified(ev: Evaluation, images: np.ndarray, path: Path, limit: int = 25,
                       ncols: int = 5) -> Path:
    """The most confident mistakes; `images` (N, 32, 32, 3) uint8 is indexed by dataset index."""
    m = ev.misclassified(limit)
    nrows = max(1, -(-len(m.indices) // ncols))
    fig = figure(ncols * CELL_INCHES, nrows * (CELL_INCHES + 0.45))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, i, t, p, c in zip(axes, m.indices, m.labels, m.preds, m.confidence):
        ax.imshow(images[i], interpolation="nearest")
        ax.set_title(f"true: {ev.classes[t]}\npred: {ev.classes[p]} ({c:.2f})", fontsize=9,
                     color="firebrick")
    if not len(m.indices):
        axes[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    total = len(ev.misclassified().indices)
    fig.suptitle(f"Most confident mistakes ({len(m.indices)} of {total})")
    return _save(fig, path)


def plot_per_class_missed(ev: Evaluation, path: Path) -> Path:
    """Bar chart of the fraction of each class's test images that were misclassified."""
    missed = np.nan_to_num(ev.missed_fraction())
    fig = figure(8, 4)
    ax = fig.subplots()
    bars = ax.bar(range(len(ev.classes)), missed, color="steelblue")
    ax.bar_label(bars, labels=[f"{v:.1%}" for v in missed], fontsize=8)
    ax.set_xticks(range(len(ev.classes)), ev.classes, rotation=30, ha="right")
    ax.set_ylabel("fraction missed")
    ax.set_ylim(0, max(0.05, float(missed.max()) * 1.15))
    ax.set_title(f"Fraction missed per class (accuracy {ev.accuracy:.2%}, n={ev.n})")
    return _save(fig, path)


def plot_confusion(ev: Evaluation, path: Path) -> Path:
    """Row-normalised confusion matrix (rows: true class), each cell annotated in percent."""
    cm = ev.confusion(normalize=True)
    k = len(ev.classes)
    fig = figure(7.5, 6.5)
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for (r, c), v in np.ndenumerate(cm):
        ax.text(c, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=8,
                color="white" if v > 0.5 else "black")
    ax.set_xticks(range(k), ev.classes, rotation=45, ha="right")
    ax.set_yticks(range(k), ev.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (% of each true class)")
    return _save(fig, path)


def plot_curves(history: Sequence[dict], path: Path) -> Path:
    """Loss, accuracy and learning rate (at the epoch's start) per epoch from metrics rows."""
    from matplotlib.ticker import MaxNLocator

    panels = [("loss", ("train_loss", "val_loss", "test_loss")),
              ("accuracy", ("train_acc", "val_acc", "test_acc")),
              ("learning rate (epoch start)", ("lr",))]
    fig = figure(13, 3.6)
    for ax, (title, keys) in zip(fig.subplots(1, 3), panels):
        for key in keys:
            pts = [(m["epoch"], m[key]) for m in history if key in m and "epoch" in m]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines and len(keys) > 1:
            ax.legend()
    return _save(fig, path)


# ---------------------------------------------------------------------------- tables
def write_predictions(ev: Evaluation, path: Path) -> Path:
    """One row per sample: index, label, pred, confidence, prob_<class> for every class."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"index": pa.array(ev.indices), "label": pa.array(ev.labels),
            "pred": pa.array(ev.preds.astype(np.int64)), "confidence": pa.array(ev.confidence)}
    cols |= {f"prob_{name}": pa.array(ev.probs[:, i]) for i, name in enumerate(ev.classes)}
    table = pa.table(cols).replace_schema_metadata({"classes": json.dumps(list(ev.classes))})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def write_json(obj: dict, path: Path) -> Path:
    write_text(path, json.dumps(obj, indent=2) + "\n")
    return path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """metrics.jsonl (one JSON object per epoch) -> list of dicts; a clear error if malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: metrics file not found")
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable metrics file ({e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not a JSON line ({e.msg})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: every line must be a JSON object")
    return rows


# ---------------------------------------------------------------------------- the report
def _markdown(summary: dict, files: dict[str, Path]) -> str:
    params = summary.get("params")
    lines = ["# c40 evaluation report", "",
             f"- checkpoint: `{summary.get('checkpoint', '?')}`",
             f"- arch: {summary.get('arch', '?')}, params: "
             f"{f'{params:,}' if isinstance(params, int) else '?'}, TTA: {summary.get('tta', '?')}",
             f"- test accuracy: {summary['accuracy']:.2%} (top-5 {summary['top5']:.2%}), "
             f"loss {summary['loss']:.4f}, n = {summary['n']}", ""]
    titles = {"train_grid": "Training images", "curves": "Training curves",
              "misclassified": "Most confident mistakes",
              "per_class_missed": "Fraction missed per class", "confusion": "Confusion matrix"}
    for key, title in titles.items():
        if key in files:
            lines += [f"## {title}", "", f"![{title}]({files[key].name})", ""]
    lines += ["## Files", "", "- `predictions.parquet`: per-sample label, prediction, "
              "confidence and class probabilities", "- `summary.json`: the numbers above, "
              "per-class accuracy and the confusion matrix", ""]
    return "\n".join(lines)


def write_report(ev: Evaluation, out: str | os.PathLike, *, images: np.ndarray,
                 train: Dataset | None = None, history: Sequence[dict] | None = None,
                 meta: dict | None = None) -> dict[str, Path]:
    """Write every report file into `out`; returns {name: path}.

    images: (N, 32, 32, 3) uint8 evaluated images, indexed by `ev.indices`.
    meta: what describes the run (arch, params, checkpoint...), merged into summary.json.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "REPORT.md").unlink(missing_ok=True)  # present again only once all is written
    except OSError as e:
        raise C40Error(f"report folder {out} is not writable ({e.strerror})") from None
    try:
        return _write_files(ev, out, images, train, history, meta or {})
    except OSError as e:  # disk full, permissions: one line, and REPORT.md stays absent
        raise C40Error(f"could not write the report into {out} ({e.strerror or e})") from None


def _write_files(ev: Evaluation, out: Path, images: np.ndarray, train: Dataset | None,
                 history: Sequence[dict] | None, meta: dict) -> dict[str, Path]:
    files: dict[str, Path] = {}
    if train is not None:
        files["train_grid"] = plot_train_grid(train, out / "train_grid.png")
    if history:
        files["curves"] = plot_curves(history, out / "curves.png")
    files["misclassified"] = plot_misclassified(ev, images, out / "misclassified.png")
    files["per_class_missed"] = plot_per_class_missed(ev, out / "per_class_missed.png")
    files["confusion"] = plot_confusion(ev, out / "confusion.png")
    files["predictions"] = write_predictions(ev, out / "predictions.parquet")
    summary = ev.to_dict() | meta
    files["summary"] = write_json(summary, out / "summary.json")
    write_text(out / "REPORT.md", _markdown(summary, files))
    files["report"] = out / "REPORT.md"
    return files
