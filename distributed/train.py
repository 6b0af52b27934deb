"""Ray Train (V2) over `c40.train.fit`: data-parallel training on N workers (DDP).

    python distributed/train.py --cpu --num-workers 2 --epochs 1 --subset 2000   # 2-core box
    python distributed/train.py --num-workers 4 --recipe best --storage s3://BUCKET/c40
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python distributed/train.py --num-workers 4 --config s3://BUCKET/c40/SEARCH/best_config.json

Every worker runs the same `fit` as `c40 train`; Ray starts the process group (fit reads rank and
world size from torch.distributed and wraps the model in DDP) and supplies the device and
the checkpoint to resume from. `--batch-size` is GLOBAL (each of N workers trains on
batch_size / N images per step), so results do not depend on N beyond BatchNorm statistics.
Ray keeps the run in STORAGE/NAME (a folder every node sees, or a URI such as s3://...);
running again with the same --storage/--name resumes from its last checkpoint. The final
checkpoint.pt and metrics.jsonl are copied to --out (default STORAGE/NAME), through the same
filesystem. GPU workers are packed on one node (STRICT_PACK) unless --placement says otherwise.

Fault injection (tests): C40_FAIL_AT_EPOCH=K makes rank 1 exit once, a few seconds after
reporting epoch K (a marker file in the run folder makes it happen only once).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _ray_common sits beside this file
import _ray_common as rc  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
import ray.train.torch  # noqa: E402
from ray.train.torch import TorchConfig, TorchTrainer  # noqa: E402

from c40.config import TrainConfig, config_from_args, positive_float, positive_int  # noqa: E402
from c40.errors import C40Error  # noqa: E402
from c40.remote import read_bytes  # noqa: E402

PLACEMENTS = ("auto", "PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")


def train_loop_per_worker(config: dict) -> dict:
    """One DDP worker: `fit` in Ray's process group, on Ray's device, from Ray's checkpoint."""
    import torch.distributed as dist

    from c40.train import fit

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    nodes = [None] * world_size  # where each rank runs: the summary says how the run spread
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    with tempfile.TemporaryDirectory(prefix=f"c40-rank{rank}-") as work:
        out = Path(work) / "out"
        resumed_epoch = rc.restore(ray.train.get_checkpoint(), out)
        cfg = TrainConfig(**{**config["cfg"], "out": str(out), "resume": resumed_epoch > 0})
        fault = config["fault"] if rank == min(1, world_size - 1) else None
        report = rc.create_reporter(ray.train.report, ray.train.Checkpoint, fault=fault,
                                    extra={"resumed_from_epoch": resumed_epoch})
        result = fit(cfg, device=ray.train.torch.get_device(), report=report,
                     progress=False)  # rank, DDP: from torch.distributed
    return {"test_acc": result.accuracy, "resumed_from_epoch": resumed_epoch, "node_ids": nodes}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, TrainConfig]:
    """Flags -> (Ray options, TrainConfig); bad values exit with argparse's one-line error."""
    parser = build_parser()
    args = rc.parse_args(parser, argv, refused=("resume", "device"),
                         hint="rerun with the same --name to resume, use --cpu for CPU workers")
    rc.check_ray_args(parser, args)
    if args.placement == "auto":
        args.placement = "PACK" if args.cpu else "STRICT_PACK"
    args.name = rc.run_name(args, "c40")
    args.run = f"{args.storage}/{args.name}"
    try:
        args.out = rc.location(args.out, "--out") if args.out else args.run
        cfg = rc.stage_teacher(args, config_from_args(args))
    except C40Error as e:
        parser.error(str(e))
    if cfg.time_budget and args.num_workers > 1:
        parser.error("--time-budget trains in one process (each worker's clock would plan its own "
                     "epochs); give --epochs, or --num-workers 1")
    return args, cfg


def build_parser() -> argparse.ArgumentParser:
    # TrainConfig's flags: --epochs, --subset, --batch-size (global), --lr, --arch, --out, ...
    p, g = rc.script_parser(__doc__, default_storage="runs/ray")
    g.add_argument("--num-workers", type=positive_int, default=1, help="training workers (one per GPU)")
    g.add_argument("--cpus-per-worker", type=positive_float, default=None,
                   help="CPUs reserved per worker (default: 1, or less so all workers fit; "
                        "fractional values are allowed)")
    g.add_argument("--placement", choices=PLACEMENTS, default="auto",
                   help="placement of the workers (auto: STRICT_PACK on GPUs, so NCCL stays "
                        "inside one node; PACK on CPUs); PACK or SPREAD when no node has "
                        "--num-workers GPUs")
    g.add_argument("--keep", type=positive_int, default=2, help="checkpoints kept in storage")
    return p


def train(args: argparse.Namespace, cfg: TrainConfig) -> dict:
    """Train `cfg` with Ray Train, copy the final checkpoint to OUT; returns a summary dict."""
    from c40.run import check_model

    params = check_model(cfg)  # here in one line, not in every worker
    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=args.address)
    cpus = args.cpus_per_worker
    if cpus is None:  # e.g. 2 workers on a 2-core box: 1 each; 4 workers: 0.5 each
        cpus = 1.0 if not args.cpu else min(1.0, ray.cluster_resources().get("CPU", 1) / args.num_workers)
    if not args.cpu and ray.cluster_resources().get("GPU", 0) < args.num_workers:
        print(f"distributed/train.py: waiting for {args.num_workers} GPU(s) ({args.placement}), the "
              f"cluster has {ray.cluster_resources().get('GPU', 0):g} now (autoscaling?); use "
              "--cpu for CPU workers", file=sys.stderr, flush=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "fault": rc.fault_settings(args.run)},
        torch_config=TorchConfig(backend="gloo" if args.cpu else "nccl"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=args.num_workers, use_gpu=not args.cpu, placement_strategy=args.placement,
            resources_per_worker={"CPU": cpus, **({} if args.cpu else {"GPU": 1})}),
        run_config=ray.train.RunConfig(
            storage_path=args.storage, name=args.name,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=args.keep),
            failure_config=ray.train.FailureConfig(max_failures=args.max_failures)),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:  # after --max-failures restarts
        raise C40Error(f"Ray Train run {args.run} failed: {rc.last_line(e)}") from None
    if result.error is not None or result.checkpoint is None:
        raise C40Error(f"Ray Train run {args.run} failed: {result.error or 'no checkpoint reported'}")
    dest = rc.copy_from_checkpoint(result.checkpoint, "checkpoint.pt", f"{args.out}/checkpoint.pt")
    rc.copy_from_checkpoint(result.checkpoint, "metrics.jsonl", f"{args.out}/metrics.jsonl")
    history = [json.loads(line) for line in
               read_bytes(f"{args.out}/metrics.jsonl").decode().splitlines() if line]
    ret = result.return_value or {}  # rank 0's return value (of the last attempt)
    return {"test_acc": history[-1].get("test_acc", ret.get("test_acc")), "epochs": len(history),
            "params": params, "resumed_from_epoch": ret.get("resumed_from_epoch"),
            "node_ids": ret.get("node_ids"), "num_workers": args.num_workers,
            "global_batch_size": cfg.batch_size, "placement": args.placement,
            "per_worker_batch_size": max(1, cfg.batch_size // args.num_workers),
            "cpus_per_worker": cpus, "checkpoint": dest, "run": args.run,
            "seconds": time.perf_counter() - t0, "history": history}


def main(argv: list[str] | None = None) -> int:
    done = rc.run_script("distributed/train.py", parse_args, train, argv)
    if done is None:
        return 2
    args, summary = done
    if args.json:
        print(json.dumps(summary))
    else:
        acc = summary["test_acc"]
        print(f"final test accuracy: {acc:.4f} ({acc * 100:.2f}%) after {summary['epochs']} epochs "
              f"on {summary['num_workers']} workers ({len(set(summary['node_ids'] or []))} "
              f"node(s)), {summary['seconds']:.1f} s; checkpoint: {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
