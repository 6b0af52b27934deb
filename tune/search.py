"""Ray Tune search over dropout, learning rate, width and label smoothing, under the
200,000-parameter limit.

    python tune/search.py --cpu --num-samples 4 --epochs 1 --subset 2000 --json
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python tune/search.py --num-samples 32 --epochs 15 --gpus-per-trial 0.25 --storage s3://BUCKET/c40

Each trial is ONE process calling `c40.train.fit` (no DDP inside a trial): several DDP workers
on one fractional GPU fail in NCCL (ray-project/ray#48012), single-process trials share a GPU
fine. Retrain the winner with distributed/train.py --config best_config.json.

- A sampled config with >= 200,000 trainable parameters is rejected before it trains.
- ASHA stops weak trials early on `val_acc` (`--val-split` images held out of the training
  set); the test set is read once per finished trial.
- A trial that raises is `failed` and the search goes on; a trial whose process dies (a spot
  node lost) restarts from its last checkpoint, up to --max-failures times.
- Any searched field given as a flag (e.g. `--width 1.5`) is fixed instead of sampled.
- Outputs in STORAGE/NAME (a folder every node sees, or a URI such as s3://...):
  results.parquet + results.csv (one row per trial: status ok | stopped | rejected | failed,
  the node it ran on), accuracy.png, best_checkpoint.pt and best_config.json (the TrainConfig
  fields of the best trial, for --config).
- Rerunning with the same --storage/--name resumes the search (errored trials included).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))  # the shared glue
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ray_common as rc  # noqa: E402
import _search_results  # noqa: E402
import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402
from ray.tune.search.basic_variant import BasicVariantGenerator  # noqa: E402

from c40.config import TrainConfig, add_config_flags, config_from_args  # noqa: E402
from c40.errors import C40Error  # noqa: E402

SEARCHED = ("dropout", "lr", "width", "label_smoothing")
# left out of best_config.json: where a run happens and the slice of data the search used
NOT_RETRAINED = ("out", "resume", "device", "data", "subset", "test_subset", "val_split")


def default_param_space() -> dict:
    return {"dropout": tune.uniform(0.0, 0.3), "lr": tune.loguniform(0.05, 1.0),
            "width": tune.choice([0.75, 1.0, 1.25]),  # 1.25 exceeds the limit: rejected
            "label_smoothing": tune.choice([0.0, 0.1, 0.2])}


def train_trial(config: dict, base: dict, fault: dict | None) -> None:
    """One Tune trial: the base TrainConfig with the sampled values, trained by `fit`."""
    from c40.model import count_params, create_model
    from c40.train import PARAM_LIMIT, fit

    with tempfile.TemporaryDirectory(prefix="c40-trial-") as work:
        cfg = TrainConfig(**{**base, **config, "out": str(Path(work) / "out"), "resume": False})
        params = count_params(create_model(cfg.arch, dropout=cfg.dropout, width=cfg.width))
        if params >= PARAM_LIMIT:
            tune.report({"rejected": True, "params": params, "val_acc": math.nan})
            return
        resume_from, resumed_epoch = rc.restore(tune.get_checkpoint(), Path(work))
        first_trial = tune.get_context().get_trial_id().endswith("_00000")  # the fault's victim
        report = rc.create_reporter(tune.report, tune.Checkpoint, fault=fault if first_trial else None,
                                    extra={"rejected": False, "params": params,
                                           "resumed_from_epoch": resumed_epoch})
        fit(cfg, report=report, resume_from=resume_from, progress=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p)  # the fixed part of every trial: --epochs, --subset, --arch, ...
    g = rc.add_ray_flags(p, default_storage="runs/tune")
    g.add_argument("--num-samples", type=int, default=8, help="sampled configs (trials)")
    g.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: as many as the resources allow)")
    g.add_argument("--cpus-per-trial", type=float, default=1.0)
    g.add_argument("--gpus-per-trial", type=float, default=0.5, help="GPU fraction per trial")
    g.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before stopping")
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
    rc.check_ray_args(parser, args)
    args.name = rc.run_name(args, "c40-search")
    args.run = f"{args.storage}/{args.name}"
    if args.val_split is None:  # 10% of the training images (of --subset when given)
        args.val_split = max(1, (args.subset or 50_000) // 10)
    args.fixed = {k: getattr(args, k) for k in SEARCHED if getattr(args, k) is not None}
    return args, config_from_args(args)


def search(args: argparse.Namespace, base: TrainConfig, param_space: dict | None = None) -> dict:
    """Run (or resume) the search; writes the results files; returns the summary dict."""
    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=args.address)
    resources = {"cpu": args.cpus_per_trial, **({} if args.cpu else {"gpu": args.gpus_per_trial})}
    trainable = tune.with_resources(tune.with_parameters(
        train_trial, base=base.to_dict(), fault=rc.fault_settings(args.run)), resources)
    if tune.Tuner.can_restore(args.run):
        print(f"resuming the search in {args.run}", flush=True)
        tuner = tune.Tuner.restore(args.run, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space={**default_param_space(), **args.fixed, **(param_space or {})},
            tune_config=tune.TuneConfig(
                metric="val_acc", mode="max", num_samples=args.num_samples,
                max_concurrent_trials=args.max_concurrent,
                search_alg=BasicVariantGenerator(random_state=base.seed),  # reproducible samples
                scheduler=ASHAScheduler(max_t=base.epochs, grace_period=args.grace_period,
                                        reduction_factor=2)),
            run_config=tune.RunConfig(
                name=args.name, storage_path=args.storage,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=args.max_failures)))
    grid = tuner.fit()
    table = _search_results.results_table(grid, SEARCHED, base.epochs)
    files = {"results_parquet": f"{args.run}/results.parquet", "results_csv": f"{args.run}/results.csv",
             "plot": f"{args.run}/accuracy.png"}
    _search_results.write_results(table, files)
    ok = table[table.status == "ok"].sort_values(["val_acc", "trial_id"], ascending=[False, True])
    summary = {"trials": len(table), **{s: int((table.status == s).sum()) for s in
                                        ("ok", "stopped", "rejected", "failed")},
               "path": args.run, **files, "seconds": time.perf_counter() - t0, "best_config": None}
    if len(ok):
        best = {k: getattr(v, "item", lambda: v)() for k, v in ok.iloc[0].items()}  # numpy -> py
        result = next(r for r in grid if r.path == best["path"])
        summary.update(best_config={k: best[k] for k in SEARCHED}, dropout=best["dropout"],
                       lr=best["lr"], val_acc=best["val_acc"], test_acc=best["test_acc"],
                       params=int(best["params"]), node_id=best["node_id"],
                       best_checkpoint=rc.copy_from_checkpoint(
                           result.checkpoint, "checkpoint.pt", f"{args.run}/best_checkpoint.pt"),
                       best_config_json=rc.write_json(f"{args.run}/best_config.json", {
                           k: v for k, v in {**base.to_dict(), **result.config}.items()
                           if k not in NOT_RETRAINED}))
    return summary


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
        print(json.dumps(summary, default=str))
    else:
        print(f"best config: {summary['best_config']} val_acc={summary['val_acc']:.4f} "
              f"test_acc={summary['test_acc']:.4f} params={summary['params']:,}")
        print(f"{summary['trials']} trials: {summary['ok']} ok, {summary['stopped']} stopped, "
              f"{summary['rejected']} rejected, {summary['failed']} failed; results: "
              f"{summary['results_parquet']}, plot: {summary['plot']}, best checkpoint: "
              f"{summary['best_checkpoint']}, retrain with: --config {summary['best_config_json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
