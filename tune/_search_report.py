"""The search report of tune/search.py, in the storage folder beside results.parquet:
accuracy.png (validation accuracy against each searched hyperparameter), parallel.png (every
trial across all hyperparameters), epochs.png (validation accuracy per epoch of every trial,
marked where ASHA stopped it) and REPORT.md (the best config, links to the rest), written last.

Drawing only: every number comes from the results tables; matplotlib's Agg canvas, no pyplot.
"""
from __future__ import annotations

import math

import _ray_common as rc

from c40.report import figure

LOG_SCALE = ("lr", "weight_decay")
TRAINED = ("ok", "stopped")


def plot_vs_hyperparameters(table, searched: tuple[str, ...], dest: str) -> str:
    """Validation accuracy at each trial's last epoch against each searched value."""
    fig = figure(3 * len(searched), 3.2)
    axes = fig.subplots(1, len(searched), sharey=True)
    for ax, key in zip(axes, searched):
        for status, marker in (("ok", "o"), ("stopped", "x")):
            pts = table[(table.status == status) & table.val_acc.notna()]
            ax.scatter(pts[key], pts.val_acc, marker=marker, label=f"{status} ({len(pts)})")
        positive = table[key].dropna() > 0
        if key in LOG_SCALE and len(positive) and positive.all():
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # 2x10^-1 labels overlap in 3 inches
        ax.set_xlabel(key)
    axes[0].set_ylabel("validation accuracy (last epoch)")
    axes[0].legend(loc="best", fontsize="small")
    fig.suptitle("c40 search: validation accuracy against each hyperparameter "
                 "(rejected and failed trials not shown)")
    return rc.save_figure(fig, dest)


def plot_parallel(table, searched: tuple[str, ...], dest: str) -> str:
    """Parallel coordinates: one line per trained trial across the hyperparameters and its
    validation accuracy, each axis scaled to its own min..max (log for lr, weight decay)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    t = table[table.status.isin(TRAINED) & table.val_acc.notna()]
    axes_keys = [*searched, "val_acc"]
    fig = figure(1.6 * len(axes_keys) + 1.5, 4)
    ax = fig.subplots()
    norm = Normalize(t.val_acc.min(), t.val_acc.max()) if len(t) else Normalize(0, 1)
    cmap = colormaps["viridis"]
    columns = {k: _unit_axis(t[k], k in LOG_SCALE) for k in axes_keys}
    for i, (_, row) in enumerate(t.iterrows()):
        ys = [columns[k][0][i] for k in axes_keys]
        ax.plot(range(len(axes_keys)), ys, color=cmap(norm(row.val_acc)),
                linestyle="-" if row.status == "ok" else "--", alpha=0.8)
    for x, k in enumerate(axes_keys):
        lo, hi = columns[k][1]
        ax.axvline(x, color="grey", lw=0.8)
        ax.annotate(f"{hi:.3g}", (x, 1.02), ha="center", fontsize="small")
        ax.annotate(f"{lo:.3g}", (x, -0.06), ha="center", fontsize="small")
    ax.set(xticks=range(len(axes_keys)), xticklabels=axes_keys, yticks=[], ylim=(-0.1, 1.08))
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="validation accuracy")
    ax.set_title(f"c40 search: {len(t)} trained trials (dashed: stopped by ASHA)")
    return rc.save_figure(fig, dest)


def _unit_axis(values, log: bool) -> tuple[list[float], tuple[float, float]]:
    """Values drawn on a 0..1 axis, and the axis' (min, max) labels."""
    vals = [float(v) for v in values]
    if not vals:
        return [], (0.0, 0.0)
    lo, hi = min(vals), max(vals)
    f = math.log if log and lo > 0 else (lambda v: v)
    span = f(hi) - f(lo)
    return [0.5 if span == 0 else (f(v) - f(lo)) / span for v in vals], (lo, hi)


def plot_epochs(table, history, dest: str) -> str:
    """Validation accuracy per epoch of every trained trial; an x where ASHA stopped one."""
    fig = figure(7, 4.2)
    ax = fig.subplots()
    status = dict(zip(table.trial_id, table.status))
    for trial_id, h in history.groupby("trial_id", sort=True):
        if status.get(trial_id) not in TRAINED:
            continue
        line, = ax.plot(h.epoch, h.val_acc, lw=1, alpha=0.8)
        stopped = status[trial_id] == "stopped"
        ax.plot(h.epoch.iloc[-1:], h.val_acc.iloc[-1:], "x" if stopped else "o",
                color=line.get_color(), ms=8 if stopped else 4)
    ax.plot([], [], "kx", label="stopped by ASHA")
    ax.plot([], [], "ko", ms=4, label="finished")
    ax.set(xlabel="epoch", ylabel="validation accuracy",
           title="c40 search: every trial, epoch by epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="best", fontsize="small")
    return rc.save_figure(fig, dest)


def write_report(table, history, files: dict, searched: tuple[str, ...], best: dict | None) -> None:
    """The three pictures, then REPORT.md (last: present only once the report is complete)."""
    plot_vs_hyperparameters(table, searched, files["plot"])
    plot_parallel(table, searched, files["parallel"])
    plot_epochs(table, history, files["epochs"])
    counts = table.status.value_counts().to_dict()
    lines = ["# c40 search report", "",
             f"{len(table)} trials: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in
                                                  ("ok", "stopped", "rejected", "failed")), ""]
    if best:
        lines += ["## Best trial", "", f"`{best['trial_id']}`: validation accuracy "
                  f"{best['val_acc']:.4f}, test accuracy {best['test_acc']:.4f}, "
                  f"{int(best['params']):,} parameters", "", "| field | value |", "|---|---|",
                  *[f"| {k} | {best[k]:.4g} |" for k in searched], "",
                  "Retrain it with `--config best_config.json`.", ""]
    name = lambda key: files[key].rsplit("/", 1)[-1]  # noqa: E731  the report sits beside them
    lines += ["## Pictures", "", f"![accuracy]({name('plot')})", "", f"![parallel]({name('parallel')})",
              "", f"![epochs]({name('epochs')})", "", "## Tables", "",
              f"- [{name('results_parquet')}]({name('results_parquet')}) (and .csv): one row per trial",
              f"- [{name('history_parquet')}]({name('history_parquet')}): one row per trial and epoch", ""]
    rc.write_bytes(files["report"], "\n".join(lines).encode())
