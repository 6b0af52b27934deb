"""Random search vs Optuna's TPE in tune/search.py, for the same budget: N trials x E epochs on a
subset, ASHA on, once per search seed (the seed seeds the searcher and every trial's training).

Per search: the best validation accuracy of a finished trial (what the search picks by), that
trial's test accuracy, the mean validation accuracy of the finished trials, wall seconds. The
JSON is rewritten after every search and searches already recorded (same settings) are skipped,
so it can run in pieces. The report pictures of the last TPE search are copied beside it
(--pictures PREFIX), for the README. Usage:
  python benchmarks/search_compare.py --data DIR --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, write_result  # noqa: E402
from c40.config import positive_int  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "search_random_vs_tpe.json"


def load_search():
    """tune/search.py by path, outside sys.modules: Ray pickles its trial function by value."""
    spec = importlib.util.spec_from_file_location("c40_search_script", ROOT / "tune" / "search.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="cifar-10-batches-py folder")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--num-samples", type=positive_int, default=16)
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--subset", type=positive_int, default=4000)
    p.add_argument("--val-split", type=positive_int, default=1000)
    p.add_argument("--test-subset", type=positive_int, default=1000)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--pictures", default=str(OUT.parent / "search"),
                   help="PREFIX: the last TPE search's pictures go to PREFIX_<name>.png")
    args = p.parse_args(argv)
    settings = {k: getattr(args, k) for k in ("num_samples", "epochs", "subset", "val_split",
                                              "test_subset")}
    old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    runs = old.get("runs", []) if old.get("settings") == settings else []
    search = load_search()
    storage = tempfile.mkdtemp(prefix="c40-search-compare-")
    for seed in [int(s) for s in args.seeds.split(",")]:
        for kind in ("random", "optuna"):
            if any(r["search"] == kind and r["seed"] == seed for r in runs):
                continue
            argv_ = ["--search", kind, "--seed", str(seed), "--storage", storage,
                     "--name", f"{kind}-{seed}", "--batch-size", "128",
                     *[f"--{k.replace('_', '-')}={v}" for k, v in settings.items()],
                     *(["--data", args.data] if args.data else [])]
            s = search.search(*search.parse_args(argv_))
            runs.append({"search": kind, "seed": seed, "best_val_acc": s.get("val_acc"),
                         "best_test_acc": s.get("test_acc"), "best_config": s["best_config"],
                         "mean_val_acc_finished": _mean_finished(s["results_parquet"]),
                         "ok": s["ok"], "stopped": s["stopped"], "rejected": s["rejected"],
                         "failed": s["failed"], "seconds": round(s["seconds"], 1)})
            print(json.dumps(runs[-1]), flush=True)
            write_result(args.out, _summary(runs, settings))
            if kind == "optuna":
                for name in ("accuracy", "parallel", "epochs"):
                    shutil.copyfile(f"{s['path']}/{name}.png", f"{args.pictures}_{name}.png")
    shutil.rmtree(storage, ignore_errors=True)
    print(json.dumps(_summary(runs, settings)["mean"], indent=2))
    return 0


def _mean_finished(parquet: str) -> float | None:
    import pyarrow.parquet as pq

    vals = [r["val_acc"] for r in pq.read_table(parquet).to_pylist() if r["status"] == "ok"]
    return statistics.fmean(vals) if vals else None


def _summary(runs: list[dict], settings: dict) -> dict:
    mean = {}
    for kind in ("random", "optuna"):
        mine = [r for r in runs if r["search"] == kind and r["best_val_acc"] is not None]
        if mine:
            mean[kind] = {k: statistics.fmean(r[k] for r in mine) for k in
                          ("best_val_acc", "best_test_acc", "seconds")} | {"seeds": len(mine)}
    winner = max(mean, key=lambda k: mean[k]["best_val_acc"]) if len(mean) == 2 else None
    return {"settings": settings, "mean": mean, "winner_by_best_val_acc": winner, "runs": runs,
            "machine": machine_info()}


if __name__ == "__main__":
    sys.exit(main())
