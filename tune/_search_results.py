"""The results files of tune/search.py, written through the storage's pyarrow filesystem:
results.parquet + results.csv (one row per trial), history.parquet (one row per trial and
epoch), then the report's pictures and REPORT.md (tune/_search_report.py). Driver-side only."""
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
    trials = pd.DataFrame([{"trial_id": _trial_id(r), "path": r.path, "error": rc.last_line(r.error),
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


def history_table(grid):
    """One row per trial and epoch (trial_id, epoch, val_acc, train_loss), from each trial's
    reported results in storage; a trial restarted after a crash keeps its last report of an
    epoch."""
    import pandas as pd

    frames = []
    for r in grid:
        df = r.metrics_dataframe
        if df is None or "epoch" not in df or "val_acc" not in df:
            continue
        df = df[["epoch", "val_acc", "train_loss"]].dropna(subset=["epoch"])
        frames.append(df.assign(trial_id=_trial_id(r)).drop_duplicates("epoch", keep="last"))
    cols = ["trial_id", "epoch", "val_acc", "train_loss"]
    if not frames:
        return pd.DataFrame(columns=cols)
    return pd.concat(frames)[cols].sort_values(["trial_id", "epoch"], ignore_index=True)


def write_results(table, history, files: dict, searched: tuple[str, ...], best: dict | None) -> None:
    """results.parquet + results.csv + history.parquet (pyarrow), then the report."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    f64, i64, s = pa.float64(), pa.int64(), pa.string()
    schema = pa.schema([("trial_id", s), ("status", s), *[(k, f64) for k in searched],
                        ("params", i64), ("epochs", i64), ("val_acc", f64), ("test_acc", f64),
                        ("train_loss", f64), ("resumed_from_epoch", i64), ("node_id", s),
                        ("error", s)])
    arrow = pa.Table.from_pandas(table[schema.names], schema=schema, preserve_index=False)
    hist = pa.Table.from_pandas(history, schema=pa.schema(
        [("trial_id", s), ("epoch", i64), ("val_acc", f64), ("train_loss", f64)]), preserve_index=False)
    for key, data, write in (("results_parquet", arrow, pq.write_table),
                             ("results_csv", arrow, pacsv.write_csv),
                             ("history_parquet", hist, pq.write_table)):
        buf = io.BytesIO()
        write(data, buf)
        rc.write_bytes(files[key], buf.getvalue())
    import _search_report  # matplotlib only now

    _search_report.write_report(table, history, files, searched, best)


def _trial_id(result) -> str:
    return (result.metrics or {}).get("trial_id") or Path(result.path).name
