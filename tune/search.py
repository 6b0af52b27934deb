"""Ray Tune search over dropout, learning rate, weight decay, label smoothing and width, under
the 200,000-parameter limit.

    python tune/search.py --num-samples 6 --epochs 1 --subset 500 --json      # smoke test
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python tune/search.py --num-samples 32 --epochs 15 --storage s3://BUCKET/c40

Each trial is ONE process calling `c40.train.fit` (no DDP inside a trial): several DDP workers
on one fractional GPU fail in NCCL (ray-project/ray#48012), single-process trials share a GPU
fine. Retrain the winner with distributed/train.py --config best_config.json.

- The space (tune/_search_space.py): dropout U(0, 0.3), lr logU(0.05, 1), weight_decay
  logU(5e-5, 5e-3), label_smoothing U(0, 0.2), width one of the multiples of 0.125 from 0.5
  whose model has < 200,000 parameters (strided: 0.5-1.0, dilated: 0.5-1.125), so no trial is
  over the limit. `--range NAME=LO:HI` changes a range; a searched field given as a flag (e.g.
  `--width 0.75`) is fixed instead of sampled.
- `--search optuna` (the default: Optuna's TPE, measured better than random here; see the
  README) or `random`; ASHA stops weak trials early on `val_acc` (`--val-split` images held out
  of the training set), evaluated with flip TTA (`--tta` to change); the test set is read once
  per finished trial. `--warm-start` tells TPE
  a previous search's results (its results.parquet) before the first trial.
- `--device auto` (default): GPUs when a node or an autoscaler node type has one, else CPUs.
  A trial request that nothing in the cluster can hold is a one-line error, not a wait.
- A trial that raises is `failed` and the search goes on; a trial whose process dies (a spot
  node lost) restarts from its last checkpoint, up to --max-failures times.
- Outputs in STORAGE/NAME (a folder every node sees, or a URI such as s3://...):
  results.parquet + results.csv (one row per trial: status ok | stopped | rejected | failed,
  the node it ran on), history.parquet (per epoch), the report (REPORT.md, accuracy.png,
  parallel.png, epochs.png), best_checkpoint.pt and best_config.json (for --config).
- Rerunning with the same --storage/--name resumes the search (errored trials included).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))  # the shared glue
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ray_common as rc  # noqa: E402
import _search_resources as res  # noqa: E402
import _search_results  # noqa: E402
import _search_space as space_  # noqa: E402
import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402

from c40.config import TrainConfig, config_from_args, positive_float, positive_int  # noqa: E402
from c40.errors import C40Error  # noqa: E402

SEARCHED = space_.SEARCHED
DEFAULT_SEARCH = "optuna"
# left out of best_config.json: where a run happens, the slice of data the search used and the
# views the trials were evaluated with (TTA never changes the weights)
NOT_RETRAINED = ("out", "resume", "device", "data", "subset", "test_subset", "val_split", "tta")
# Trials evaluate every epoch (ASHA's val_acc). fit() already tests with at most flip before a
# run's last epoch (c40.config.progress_tta); this keeps the last epoch at 2 views too, so a
# trial's val_acc is one measure from first epoch to last and its final test costs a third of
# flip-shift's 6 views; `--tta MODE` chooses otherwise.
SEARCH_TTA = "flip"


def train_trial(config: dict, base: dict, fault: dict | None) -> None:
    """One Tune trial: the base TrainConfig with the sampled values, trained by `fit`."""
    from c40.model import PARAM_LIMIT, count_params, create_model
    from c40.train import fit

    with tempfile.TemporaryDirectory(prefix="c40-trial-") as work:
        out = Path(work) / "out"
        cfg = TrainConfig(**{**base, **config, "out": str(out), "resume": False})
        params = count_params(create_model(cfg.arch, dropout=cfg.dropout, width=cfg.width))
        if params >= PARAM_LIMIT:  # a guard: the default space holds no such config
            tune.report({"rejected": True, "params": params, "val_acc": math.nan})
            return
        resumed_epoch = rc.restore(tune.get_checkpoint(), out)
        cfg = dataclasses.replace(cfg, resume=resumed_epoch > 0)  # continue what Ray restored
        report = rc.create_reporter(tune.report, tune.Checkpoint,
                                    fault=fault if fault and _trial_number() == fault["victim"] else None,
                                    extra={"rejected": False, "params": params,
                                           "resumed_from_epoch": resumed_epoch})
        fit(cfg, report=report, progress=False)


def _trial_number() -> str:
    """The trial's number in the search, from its folder name TRIALNAME_NUMBER_values_date:
    0, 1, ... under random search, 1, 2, ... under a searcher (whose trial ids are opaque)."""
    ctx = tune.get_context()
    return Path(ctx.get_trial_dir()).name.removeprefix(f"{ctx.get_trial_name()}_").split("_")[0]


def build_parser() -> argparse.ArgumentParser:
    # TrainConfig's flags are the fixed part of every trial: --epochs, --subset, --arch, ...
    p, g = rc.script_parser(__doc__, default_storage="runs/tune")
    g.add_argument("--search", choices=space_.SEARCHERS, default=DEFAULT_SEARCH,
                   help=f"searcher (default: {DEFAULT_SEARCH}: TPE; random: random sampling)")
    g.add_argument("--range", action="append", default=[], metavar="NAME=LO:HI",
                   help=f"search NAME in [LO, HI] (NAME: {', '.join(SEARCHED)}); repeatable")
    g.add_argument("--warm-start", default=None, metavar="PATH|URI",
                   help="a previous search's results.parquet (or its folder): TPE starts from it")
    g.add_argument("--num-samples", type=positive_int, default=8, help="sampled configs (trials)")
    g.add_argument("--max-concurrent", type=positive_int, default=None,
                   help="trials at once (default: as many as the resources allow)")
    g.add_argument("--cpus-per-trial", type=positive_float, default=1.0)
    g.add_argument("--gpus-per-trial", type=float, default=None,
                   help=f"GPU fraction per trial (implies GPUs; default {res.DEFAULT_GPUS_PER_TRIAL} "
                        "when --device auto finds GPUs)")
    g.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before stopping")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, TrainConfig]:
    """Flags -> (search options, the base TrainConfig every trial starts from)."""
    parser = build_parser()
    args = rc.parse_args(parser, argv, refused=("resume", "out"),
                         hint="rerun with the same --name to resume; outputs go to STORAGE/NAME")
    if args.gpus_per_trial is not None and not 0 < args.gpus_per_trial <= 1:
        parser.error("--gpus-per-trial must be in (0, 1]")
    device = "cpu" if args.cpu else (args.device or "auto")
    if device not in ("auto", "cpu", "cuda"):
        parser.error(f"--device {device}: auto, cpu or cuda here (Ray assigns each trial its GPU)")
    if device == "cpu" and args.gpus_per_trial is not None:
        parser.error("--gpus-per-trial and --cpu/--device cpu exclude each other")
    if args.warm_start and args.search != "optuna":
        parser.error("--warm-start needs --search optuna (random search cannot learn from it)")
    rc.check_ray_args(parser, args)
    args.device = device  # auto: resolved against the cluster in search()
    args.name = rc.run_name(args, "c40-search")
    args.run = f"{args.storage}/{args.name}"
    if args.val_split is None:  # 10% of the training images (of --subset when given)
        args.val_split = max(1, (args.subset or 50_000) // 10)
    if args.tta is None:
        args.tta = SEARCH_TTA
    try:
        args.ranges = {n: (lo, hi, space_.RANGES[n][2]) for n, lo, hi in map(space_.parse_range, args.range)}
        base = rc.stage_teacher(args, config_from_args(args))
    except (ValueError, C40Error) as e:
        parser.error(str(e))
    args.fixed = {k: getattr(args, k) for k in SEARCHED if getattr(args, k) is not None}
    if "width" in args.fixed and args.fixed["width"] not in space_.legal_widths(
            base.arch, args.fixed["width"], args.fixed["width"]):
        parser.error(f"--width {args.fixed['width']}: arch '{base.arch}' has >= 200,000 params "
                     f"there (legal: {', '.join(map(str, space_.legal_widths(base.arch)))})")
    return args, base


def resolve_device(args: argparse.Namespace, base: TrainConfig) -> tuple[TrainConfig, dict]:
    """Pick the trials' device against the running cluster (prints which) and check that a
    trial fits a node or an autoscaler node type; -> (base config for it, trial resources)."""
    nodes, types = res.cluster_shapes()
    device, why = res.pick_device(args.device, args.gpus_per_trial, nodes, types)
    if device != base.device:  # rebuilt: the recipe's GPU values apply on GPUs
        args.device = device
        base = config_from_args(args)
    resources = res.trial_resources(device, args.cpus_per_trial, args.gpus_per_trial)
    waiting = res.check_fits(resources, nodes, types)
    print(f"device: {device} ({why}); each trial: {resources}"
          + ("; waiting for the autoscaler to start a node for it" if waiting else ""), flush=True)
    return base, resources


def _fault(args: argparse.Namespace) -> dict | None:
    """Tests: the fault injection, aimed at the search's first trial."""
    fault = rc.fault_settings(args.run)
    return fault and {**fault, "victim": "0" if args.search == "random" else "1"}


def search(args: argparse.Namespace, base: TrainConfig, param_space: dict | None = None) -> dict:
    """Run (or resume) the search; writes the results files and the report; returns the summary."""
    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=args.address)
    base, resources = resolve_device(args, base)
    trainable = tune.with_resources(tune.with_parameters(
        train_trial, base=base.to_dict(), fault=_fault(args)), resources)
    if tune.Tuner.can_restore(args.run):
        print(f"resuming the search in {args.run}", flush=True)
        tuner = tune.Tuner.restore(args.run, trainable=trainable, resume_errored=True)
    else:
        space = {**space_.create_param_space(base.arch, args.ranges, args.fixed), **(param_space or {})}
        warm = space_.read_warm_start(args.warm_start, space) if args.warm_start else None
        if warm:
            print(f"warm start: {len(warm[0])} trials of {args.warm_start}", flush=True)
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(
                metric="val_acc", mode="max", num_samples=args.num_samples,
                max_concurrent_trials=args.max_concurrent,
                search_alg=space_.create_searcher(args.search, base.seed, args.num_samples, warm),
                scheduler=ASHAScheduler(max_t=base.epochs, grace_period=args.grace_period,
                                        reduction_factor=2)),
            run_config=tune.RunConfig(
                name=args.name, storage_path=args.storage,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=args.max_failures)))
    grid = tuner.fit()
    table = _search_results.results_table(grid, SEARCHED, base.epochs)
    files = {k: f"{args.run}/{name}" for k, name in (
        ("results_parquet", "results.parquet"), ("results_csv", "results.csv"),
        ("history_parquet", "history.parquet"), ("plot", "accuracy.png"),
        ("parallel", "parallel.png"), ("epochs", "epochs.png"), ("report", "REPORT.md"))}
    ok = table[table.status == "ok"].sort_values(["val_acc", "trial_id"], ascending=[False, True])
    best = {k: getattr(v, "item", lambda: v)() for k, v in ok.iloc[0].items()} if len(ok) else None
    _search_results.write_results(table, _search_results.history_table(grid), files, SEARCHED, best)
    summary = {"trials": len(table), **{s: int((table.status == s).sum()) for s in
                                        ("ok", "stopped", "rejected", "failed")},
               "search": args.search, "device": base.device, "trial_resources": resources,
               "path": args.run, **files, "seconds": time.perf_counter() - t0, "best_config": None}
    if best:
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
    done = rc.run_script("tune/search.py", parse_args, search, argv)
    if done is None:
        return 2
    args, summary = done
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
              f"{summary['rejected']} rejected, {summary['failed']} failed; report: "
              f"{summary['report']}, results: {summary['results_parquet']}, best checkpoint: "
              f"{summary['best_checkpoint']}, retrain with: --config {summary['best_config_json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
