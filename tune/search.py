"""Ray Tune search over dropout, learning rate, width and label smoothing, under the
200,000-parameter limit.

    python tune/search.py --cpu --num-samples 4 --epochs 1 --subset 2000 --json
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python tune/search.py --num-samples 32 --epochs 15 --gpus-per-trial 0.25

Each trial is ONE process calling `c40.train.fit` directly (no DDP inside a trial). That suits
CPUs and fractional-GPU trials: several DDP workers packed on one fractional GPU fail in NCCL
("Duplicate GPU detected", ray-project/ray#48012), whereas single-process trials share a GPU
fine. Use distributed/train.py to train the winning config on several GPUs.

- The parameter limit is part of the search: a sampled config whose model has >= 200,000
  trainable parameters is rejected before it trains (reported as `rejected`, val_acc NaN).
- ASHA stops weak trials early on `val_acc`, measured on `--val-split` images held out of the
  training set; the test set stays clean (its accuracy is reported once, at the last epoch).
- A trial that raises is recorded as `failed`; the search goes on.
- Any searched field given as a flag (e.g. `--width 1.5`) is fixed instead of sampled.
- Outputs in STORAGE/NAME: results.parquet + results.csv (one row per trial, with status
  ok | stopped | rejected | failed), accuracy.png (val accuracy vs dropout and vs lr), and
  best_checkpoint.pt (the best completed trial; `c40 eval --checkpoint` loads it).
- Rerunning with the same --storage/--name resumes the search (errored trials included).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

from c40.config import TrainConfig, add_config_flags, config_from_args
from c40.data import resolve_data_root
from c40.errors import C40Error

SEARCHED = ("dropout", "lr", "width", "label_smoothing")
COLUMNS = ("trial_id", "status", "dropout", "lr", "width", "label_smoothing", "params", "epochs",
           "val_acc", "test_acc", "train_loss", "error")


def default_param_space() -> dict:
    from ray import tune

    return {"dropout": tune.uniform(0.0, 0.3), "lr": tune.loguniform(0.05, 1.0),
            "width": tune.choice([0.75, 1.0, 1.25]),  # 1.25 exceeds the limit: rejected
            "label_smoothing": tune.choice([0.0, 0.1, 0.2])}


def train_trial(config: dict, base: dict) -> None:
    """One Tune trial: the base TrainConfig with the sampled values, trained by `fit`."""
    from ray import tune

    from c40.model import count_params, create_model
    from c40.train import PARAM_LIMIT, fit

    with tempfile.TemporaryDirectory(prefix="c40-trial-") as work:
        cfg = TrainConfig(**{**base, **config, "out": str(Path(work) / "out"), "resume": False})
        params = count_params(create_model(cfg.arch, dropout=cfg.dropout, width=cfg.width))
        if params >= PARAM_LIMIT:
            tune.report({"rejected": True, "params": params, "val_acc": math.nan})
            return
        resume_from = None
        restored = tune.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as d:
                resume_from = shutil.copy(Path(d) / "checkpoint.pt", Path(work) / "resume.pt")

        def report(metrics: dict, path: Path | None) -> None:
            ckpt = tune.Checkpoint.from_directory(str(Path(path).parent)) if path else None
            tune.report({**metrics, "rejected": False, "params": params}, checkpoint=ckpt)

        fit(cfg, report=report, resume_from=resume_from, progress=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p)  # the fixed part of every trial: --epochs, --subset, --arch, ...
    g = p.add_argument_group("search")
    g.add_argument("--num-samples", type=int, default=8, help="sampled configs (trials)")
    g.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: as many as the resources allow)")
    g.add_argument("--cpu", action="store_true", help="train on CPUs (default: fractional GPUs)")
    g.add_argument("--cpus-per-trial", type=float, default=1.0)
    g.add_argument("--gpus-per-trial", type=float, default=0.5, help="GPU fraction per trial")
    g.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before stopping")
    g.add_argument("--storage", default="runs/tune", help="Ray storage folder")
    g.add_argument("--name", default=None,
                   help="search name (default: timestamped); an existing name resumes it")
    g.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    g.add_argument("--json", action="store_true", help="print one JSON object at the end")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, TrainConfig]:
    """Flags -> (search options, the base TrainConfig every trial starts from)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_samples < 1 or (args.max_concurrent is not None and args.max_concurrent < 1):
        parser.error("--num-samples and --max-concurrent must be >= 1")
    if args.cpus_per_trial <= 0 or not 0 < args.gpus_per_trial <= 1:
        parser.error("--cpus-per-trial must be > 0 and --gpus-per-trial in (0, 1]")
    if args.resume or args.out:
        parser.error("--resume/--out do not apply: rerun with the same --name to resume; "
                     "outputs go to STORAGE/NAME")
    if "://" in args.storage:
        parser.error("--storage must be a folder (shared, e.g. NFS, on a multi-node cluster): "
                     "the results files and best_checkpoint.pt are written there")
    args.data = str(resolve_data_root(args.data).resolve())  # trials run in other folders
    args.device = "cpu" if args.cpu else "cuda"
    if args.val_split is None:  # 10% of the training images (of --subset when given)
        args.val_split = max(1, (args.subset or 50_000) // 10)
    args.fixed = {k: getattr(args, k) for k in SEARCHED if getattr(args, k) is not None}
    return args, config_from_args(args)


def search(args: argparse.Namespace, base: TrainConfig, param_space: dict | None = None) -> dict:
    """Run (or resume) the search; writes the results files; returns the summary dict."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=args.address)
    space = {**default_param_space(), **args.fixed, **(param_space or {})}
    resources = {"cpu": args.cpus_per_trial, **({} if args.cpu else {"gpu": args.gpus_per_trial})}
    trainable = tune.with_resources(tune.with_parameters(train_trial, base=base.to_dict()), resources)
    name = args.name or time.strftime("c40-search-%Y%m%d-%H%M%S")
    storage = Path(args.storage).resolve()
    path = storage / name
    if tune.Tuner.can_restore(str(path)):
        print(f"resuming the search in {path}", flush=True)
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(
                metric="val_acc", mode="max", num_samples=args.num_samples,
                max_concurrent_trials=args.max_concurrent,
                search_alg=BasicVariantGenerator(random_state=base.seed),  # reproducible samples
                scheduler=ASHAScheduler(max_t=base.epochs, grace_period=args.grace_period,
                                        reduction_factor=2)),
            run_config=tune.RunConfig(name=name, storage_path=str(storage),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    grid = tuner.fit()
    rows, best = _collect(grid, base.epochs)
    files = _write_results(rows, path)
    if best is not None:
        files["best_checkpoint"] = _copy_checkpoint(best[1].checkpoint, path / "best_checkpoint.pt")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "stopped", "rejected", "failed")}
    summary = {"trials": len(rows), **counts, "path": str(path), **{k: str(v) for k, v in files.items()},
               "seconds": time.perf_counter() - t0, "best_config": None}
    if best is not None:
        row = best[0]
        summary.update(best_config={k: row[k] for k in SEARCHED}, dropout=row["dropout"],
                       lr=row["lr"], val_acc=row["val_acc"], test_acc=row["test_acc"],
                       params=row["params"])
    return summary


def _collect(grid, epochs: int) -> tuple[list[dict], tuple[dict, object] | None]:
    """One row per trial; the best completed trial by val_acc (ties: lower trial id)."""
    rows, best = [], None
    for result in grid:
        m, c = result.metrics or {}, result.config or {}
        if result.error is not None:
            status = "failed"
        elif m.get("rejected"):
            status = "rejected"
        else:
            status = "ok" if m.get("epoch") == epochs and "test_acc" in m else "stopped"
        error = str(result.error).strip().splitlines()[-1][:300] if result.error else None
        row = {"trial_id": m.get("trial_id") or Path(result.path).name, "status": status,
               **{k: c.get(k) for k in SEARCHED}, "params": m.get("params"),
               "epochs": m.get("epoch"), "val_acc": _finite(m.get("val_acc")), "test_acc": m.get("test_acc"),
               "train_loss": m.get("train_loss"), "error": error}
        rows.append(row)
        if status == "ok" and result.checkpoint is not None and (best is None or row["val_acc"] > best[0]["val_acc"]):
            best = (row, result)
    rows.sort(key=lambda r: str(r["trial_id"]))
    return rows, best


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


def _write_results(rows: list[dict], path: Path) -> dict:
    """results.parquet + results.csv (pyarrow) and accuracy.png (matplotlib Agg)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    schema = pa.schema([("trial_id", pa.string()), ("status", pa.string()),
                        ("dropout", pa.float64()), ("lr", pa.float64()), ("width", pa.float64()),
                        ("label_smoothing", pa.float64()), ("params", pa.int64()),
                        ("epochs", pa.int64()), ("val_acc", pa.float64()),
                        ("test_acc", pa.float64()), ("train_loss", pa.float64()),
                        ("error", pa.string())])
    table = pa.Table.from_pylist([{k: r[k] for k in COLUMNS} for r in rows], schema=schema)
    path.mkdir(parents=True, exist_ok=True)
    files = {"results_parquet": path / "results.parquet", "results_csv": path / "results.csv",
             "plot": path / "accuracy.png"}
    pq.write_table(table, files["results_parquet"])
    pacsv.write_csv(table, files["results_csv"])
    _plot(rows, files["plot"])
    return files


def _plot(rows: list[dict], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for status, marker in (("ok", "o"), ("stopped", "x")):
        pts = [r for r in rows if r["status"] == status and r["val_acc"] is not None]
        for ax, key in zip(axes, ("dropout", "lr")):
            ax.scatter([r[key] for r in pts], [r["val_acc"] for r in pts], marker=marker,
                       label=f"{status} ({len(pts)})")
    axes[0].set(xlabel="dropout", ylabel="validation accuracy (last epoch)")
    axes[1].set(xlabel="learning rate", xscale="log")
    axes[0].legend(loc="best")
    fig.suptitle("c40 Ray Tune search (rejected and failed trials not shown)")
    fig.tight_layout()
    fig.savefig(dest, dpi=100)
    plt.close(fig)


def _copy_checkpoint(checkpoint, dest: Path) -> Path:
    tmp = dest.with_name(f".{dest.name}.tmp")
    with checkpoint.as_directory() as d:
        shutil.copy(Path(d) / "checkpoint.pt", tmp)
    tmp.replace(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    try:
        args, base = parse_args(argv)
        summary = search(args, base)
    except C40Error as e:
        print(f"tune/search.py: error: {e}", file=sys.stderr)
        return 2
    if summary["best_config"] is None:
        print(f"tune/search.py: error: no trial completed ({summary['rejected']} rejected, "
              f"{summary['failed']} failed, {summary['stopped']} stopped); see "
              f"{summary['results_csv']}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"best config: {summary['best_config']} val_acc={summary['val_acc']:.4f} "
              f"test_acc={summary['test_acc']:.4f} params={summary['params']:,}")
        print(f"{summary['trials']} trials: {summary['ok']} ok, {summary['stopped']} stopped, "
              f"{summary['rejected']} rejected, {summary['failed']} failed; results: "
              f"{summary['results_parquet']}, plot: {summary['plot']}, best checkpoint: "
              f"{summary['best_checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
