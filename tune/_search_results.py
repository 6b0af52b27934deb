"""The results files of tune/search.py, written through the storage's pyarrow filesystem:
results.parquet + results.csv (one row per trial) and accuracy.png. Driver-side only."""
from __future__ import annotations

import io
from pathlib import Path

import _ray_common as rc

METRICS = ("rejected", "params", "epoch", "val_acc", "test_acc", "train_loss",
           "resumed_from_epoch", "node_id")


def results_table(grid, searched: tuple[str, ...], epochs: int):
    """One row per trial: its last result from `grid.get_dataframe()` (trials that never
    reported, e.g. failed at start-up, keep empty metrics), its `searched` values, its status
    (ok | stopped | rejected | failed) and its error."""
    import pandas as pd

    df = grid.get_dataframe()
    # the sampled values come from each trial's config ("lr" is also a metric: the schedule's)
    df = df.drop(columns=[c for c in df.columns if c.startswith("config/") or c in (*searched, "logdir")])
    trials = pd.DataFrame([{"trial_id": (r.metrics or {}).get("trial_id") or Path(r.path).name,
                            "path": r.path, "error": rc.last_line(r.error),
                            **{k: (r.config or {}).get(k) for k in searched}} for r in grid])
    t = trials.merge(df, on="trial_id", how="left") if "trial_id" in df else trials
    for column in METRICS:  # absent when no trial reported it
        if column not in t:
            t[column] = None
    rejected = t.rejected.fillna(False).astype(bool)
    done = (t.epoch == epochs) & t.test_acc.notna()
    t["status"] = "stopped"
    t.loc[done, "status"] = "ok"
    t.loc[rejected, "status"] = "rejected"
    t.loc[t.error.notna(), "status"] = "failed"
    return t.rename(columns={"epoch": "epochs"}).sort_values("trial_id", ignore_index=True)


def write_results(table, files: dict) -> None:
    """results.parquet + results.csv (pyarrow) and accuracy.png (matplotlib Agg)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    f64, i64, s = pa.float64(), pa.int64(), pa.string()
    schema = pa.schema([("trial_id", s), ("status", s), ("dropout", f64), ("lr", f64),
                        ("width", f64), ("label_smoothing", f64), ("params", i64), ("epochs", i64),
                        ("val_acc", f64), ("test_acc", f64), ("train_loss", f64),
                        ("resumed_from_epoch", i64), ("node_id", s), ("error", s)])
    arrow = pa.Table.from_pandas(table[schema.names], schema=schema, preserve_index=False)
    for key, write in (("results_parquet", pq.write_table), ("results_csv", pacsv.write_csv)):
        buf = io.BytesIO()
        write(arrow, buf)
        rc.write_bytes(files[key], buf.getvalue())
    _plot(table, files["plot"])


def _plot(table, dest: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for status, marker in (("ok", "o"), ("stopped", "x")):
        pts = table[(table.status == status) & table.val_acc.notna()]
        for ax, key in zip(axes, ("dropout", "lr")):
            ax.scatter(pts[key], pts.val_acc, marker=marker, label=f"{status} ({len(pts)})")
    axes[0].set(xlabel="dropout", ylabel="validation accuracy (last epoch)")
    plotted = table[table.status.isin(("ok", "stopped")) & table.val_acc.notna()]
    axes[1].set(xlabel="learning rate", xscale="log" if len(plotted) else "linear")  # log of nothing fails
    axes[0].legend(loc="best")
    fig.suptitle("c40 Ray Tune search (rejected and failed trials not shown)")
    fig.tight_layout()
    rc.save_figure(fig, dest)
    plt.close(fig)
