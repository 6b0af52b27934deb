"""Ray Train (V2) over `c40.train.fit`: data-parallel training on N workers (DDP).

    python distributed/train.py --cpu --num-workers 2 --epochs 1 --subset 2000   # 2-core box
    python distributed/train.py --num-workers 4 --recipe best                    # 4 GPUs, NCCL
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python distributed/train.py --num-workers 2

Every worker runs the same `fit` as `c40 train`; Ray supplies rank, device, the DDP wrapper and
the checkpoint to resume from. `--batch-size` is GLOBAL (each of N workers trains on
batch_size / N images per step), so results do not depend on N beyond BatchNorm statistics.
Running again with the same `--storage`/`--name` resumes from the last reported checkpoint.
The final checkpoint is copied to `OUT/checkpoint.pt` (`c40 eval --checkpoint` loads it).

Fault injection (tests): `C40_FAIL_AT_EPOCH=K` makes rank 1 exit once, a few seconds after
reporting epoch K (a marker file in the run folder makes it happen only once).
Measured here (2 cores, --cpu --num-workers 2 --epochs 1 --subset 2000): see distributed/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from c40.config import TrainConfig, add_config_flags, config_from_args
from c40.data import resolve_data_root
from c40.errors import C40Error

FAIL_ENV = "C40_FAIL_AT_EPOCH"
FAIL_MARKER = ".c40-fault-injected"
REPORT_COLLECTION_S = 5.0  # Ray collects reports every ~2 s; die later so epoch K's checkpoint lands


def create_train_loop(fail_at_epoch: int | None = None, fail_marker: str | None = None):
    """The per-worker function; the fault-injection settings travel in its closure."""

    def train_loop_per_worker(config: dict) -> dict:
        import ray.train
        import ray.train.torch
        from ray.train import Checkpoint

        from c40.checkpoint import load_checkpoint
        from c40.train import fit

        ctx = ray.train.get_context()
        rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
        work = Path(tempfile.mkdtemp(prefix=f"c40-rank{rank}-"))
        cfg = TrainConfig(**{**config, "out": str(work / "out"), "resume": False})
        resume_from, resumed_epoch = None, None
        restored = ray.train.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as d:  # copy: the folder may vanish after the block
                resume_from = shutil.copy(Path(d) / "checkpoint.pt", work / "resume.pt")
            resumed_epoch = load_checkpoint(resume_from)["epoch"]

        def report(metrics: dict, path: Path | None) -> None:
            # every rank reports (Ray needs all of them); only rank 0 carries the checkpoint
            ckpt = Checkpoint.from_directory(str(Path(path).parent)) if path else None
            ray.train.report(metrics, checkpoint=ckpt)
            if rank == 0:
                acc = next((f" {k}={metrics[k]:.4f}" for k in ("test_acc", "val_acc") if k in metrics), "")
                print(f"[c40] epoch {metrics['epoch']}/{cfg.epochs} train_loss="
                      f"{metrics['train_loss']:.4f}{acc} img/s={metrics['images_per_s']:.0f}", flush=True)
            if (fail_at_epoch == metrics["epoch"] and rank == min(1, world_size - 1)
                    and fail_marker and not os.path.exists(fail_marker)):
                Path(fail_marker).write_text(f"rank {rank} exited after epoch {metrics['epoch']}\n")
                time.sleep(REPORT_COLLECTION_S)
                os._exit(1)

        try:
            result = fit(cfg, device=ray.train.torch.get_device(), rank=rank,
                         world_size=world_size, wrap_model=ray.train.torch.prepare_model,
                         report=report, resume_from=resume_from, progress=False)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {"test_acc": result.accuracy, "epochs": result.epochs, "params": result.params,
                "resumed_from_epoch": resumed_epoch}

    return train_loop_per_worker


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p)  # --epochs, --subset, --batch-size (global), --lr, --arch, --out, ...
    g = p.add_argument_group("Ray")
    g.add_argument("--num-workers", type=int, default=1, help="training workers (one per GPU)")
    g.add_argument("--cpu", action="store_true", help="CPU workers with gloo (default: GPUs, NCCL)")
    g.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs reserved per worker (default: 1, or less so all workers fit; "
                        "fractional values are allowed)")
    g.add_argument("--storage", default="runs/ray", help="Ray storage folder (or URI)")
    g.add_argument("--name", default=None,
                   help="run name (default: timestamped); an existing name resumes that run")
    g.add_argument("--max-failures", type=int, default=1, help="worker-group restarts allowed")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept in storage")
    g.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    g.add_argument("--json", action="store_true", help="print one JSON object at the end")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, TrainConfig]:
    """Flags -> (Ray options, TrainConfig); bad values exit with argparse's one-line error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume or args.device:
        parser.error("--resume/--device do not apply here: rerun with the same --name to resume, "
                     "use --cpu for CPU workers")
    if args.num_workers < 1 or args.max_failures < 0 or args.keep < 1:
        parser.error("--num-workers and --keep must be >= 1, --max-failures >= 0")
    if args.cpus_per_worker is not None and args.cpus_per_worker <= 0:
        parser.error("--cpus-per-worker must be > 0")
    if args.out is None:
        args.out = "runs/distributed"
    # workers may run elsewhere (job submit, cluster): send an absolute data path
    args.data = str(resolve_data_root(args.data).resolve())
    args.device = "cpu" if args.cpu else "cuda"
    return args, config_from_args(args)


def _fail_at_epoch() -> int | None:
    value = os.environ.get(FAIL_ENV)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise C40Error(f"{FAIL_ENV} must be an epoch number >= 1, got {value!r}")
    return int(value)


def _copy_final(checkpoint, out: Path) -> Path:
    """Copy the run's last checkpoint to OUT/checkpoint.pt (temp file + rename)."""
    out.mkdir(parents=True, exist_ok=True)
    dest = out / "checkpoint.pt"
    with checkpoint.as_directory() as d:
        tmp = out / ".checkpoint.pt.tmp"
        shutil.copy(Path(d) / "checkpoint.pt", tmp)
        if (Path(d) / "metrics.jsonl").exists():
            shutil.copy(Path(d) / "metrics.jsonl", out / "metrics.jsonl")
    os.replace(tmp, dest)
    return dest


def train(args: argparse.Namespace, cfg: TrainConfig) -> dict:
    """Train `cfg` with Ray Train, copy the final checkpoint to OUT; returns a summary dict."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from c40.model import count_params, create_model
    from c40.train import PARAM_LIMIT

    params = count_params(create_model(cfg.arch, dropout=cfg.dropout, width=cfg.width))
    if params >= PARAM_LIMIT:  # fail here in one line, not in every worker after start-up
        raise C40Error(f"{cfg.arch} at width {cfg.width} has {params:,} trainable parameters; "
                       f"the limit is < {PARAM_LIMIT:,}")
    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=args.address)
    if not args.cpu and ray.cluster_resources().get("GPU", 0) < args.num_workers:
        print(f"distributed/train.py: waiting for {args.num_workers} GPU(s), the cluster has "
              f"{ray.cluster_resources().get('GPU', 0):g} now (autoscaling?); use --cpu for CPU "
              "workers", file=sys.stderr, flush=True)
    cpus = args.cpus_per_worker
    if cpus is None:  # e.g. 2 workers on a 2-core box: 1 each; 4 workers: 0.5 each
        cpus = 1.0 if not args.cpu else min(1.0, ray.cluster_resources().get("CPU", 1) / args.num_workers)
    name = args.name or time.strftime("c40-%Y%m%d-%H%M%S")
    storage = args.storage if "://" in args.storage else str(Path(args.storage).resolve())
    marker = None
    if "://" not in storage:
        Path(storage, name).mkdir(parents=True, exist_ok=True)
        marker = str(Path(storage, name, FAIL_MARKER))
    trainer = TorchTrainer(
        create_train_loop(_fail_at_epoch(), marker),
        train_loop_config=cfg.to_dict(),
        torch_config=TorchConfig(backend="gloo" if args.cpu else "nccl"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=args.num_workers, use_gpu=not args.cpu,
            resources_per_worker={"CPU": cpus, **({} if args.cpu else {"GPU": 1})}),
        run_config=ray.train.RunConfig(
            storage_path=storage, name=name,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=args.keep),
            failure_config=ray.train.FailureConfig(max_failures=args.max_failures)),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:  # after --max-failures restarts
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise C40Error(f"Ray Train run {Path(storage, name)} failed: {last[:300]}") from None
    if result.error is not None or result.checkpoint is None:
        raise C40Error(f"Ray Train run {name} failed: {result.error or 'no checkpoint reported'}")
    dest = _copy_final(result.checkpoint, Path(args.out))
    from c40.checkpoint import load_checkpoint

    history = load_checkpoint(dest)["history"]
    ret = result.return_value or {}  # rank 0's return value (of the last attempt)
    return {"test_acc": history[-1].get("test_acc", ret.get("test_acc")),
            "epochs": len(history), "params": params,
            "resumed_from_epoch": ret.get("resumed_from_epoch"),
            "num_workers": args.num_workers, "global_batch_size": cfg.batch_size,
            "per_worker_batch_size": max(1, cfg.batch_size // args.num_workers),
            "cpus_per_worker": cpus, "checkpoint": str(dest), "run": str(Path(storage, name)),
            "seconds": time.perf_counter() - t0, "history": history}


def main(argv: list[str] | None = None) -> int:
    try:
        args, cfg = parse_args(argv)
        summary = train(args, cfg)
    except C40Error as e:
        print(f"distributed/train.py: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    else:
        acc = summary["test_acc"]
        print(f"final test accuracy: {acc:.4f} ({acc * 100:.2f}%) after {summary['epochs']} epochs "
              f"on {summary['num_workers']} workers, {summary['seconds']:.1f} s; checkpoint: "
              f"{summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
