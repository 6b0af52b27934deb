"""The one training loop: `fit(cfg)` is what `c40 train`, Ray Train and Ray Tune all run.

What it trains is built by `c40.run` (data, model, optimizer, device, AMP, time budget).
One autocast context and one `GradScaler(enabled=...)` serve fp32, bf16 and CUDA fp16. A training
step never waits for the device: the augmentation plan is drawn on the host, the fp16 optimizer
step is fused (GradScaler then reads no overflow flag), the EMA counts on the host; the loop
reads the device once every `SYNC_EVERY` steps (NaN guard, progress).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from c40.checkpoint import run_state, save_checkpoint
from c40.config import TrainConfig, progress_tta
from c40.distill import Teacher
from c40.errors import ConfigError, TrainingDiverged
from c40.evaluate import evaluate, n_views
from c40.files import prepare_out_dir, write_text
from c40.precision import resolve_device
from c40.run import RunState, setup_run, wrap_run

SYNC_EVERY = 10        # steps between the loop's host reads (NaN guard, progress bar)
ReportFn = Callable[[dict, "Path | None"], None]


@dataclass
class FitResult:
    accuracy: float                 # final test accuracy (0-1)
    epochs: int
    seconds: float                  # wall time of this call
    params: int
    out: Path
    history: list[dict] = field(default_factory=list)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, amp_ctx: Callable, label_smoothing: float,
               teacher: Teacher | None = None):
    """One optimisation step; returns (loss, correct) as device tensors (no host sync)."""
    with amp_ctx():
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        if teacher is not None:
            loss = teacher.loss(loss, logits, x)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach(), (logits.detach().argmax(1) == y).sum()


@dataclass
class EpochStats:
    """Running sums of an epoch, on the device; `first_bad` is the first step with a NaN/Inf loss."""
    loss_sum: torch.Tensor
    correct: torch.Tensor
    first_bad: torch.Tensor
    seen: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> "EpochStats":
        return cls(torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device),
                   torch.full((), -1, dtype=torch.long, device=device))


def train_batch(run: RunState, x: torch.Tensor, y: torch.Tensor, stats: EpochStats,
                res: int) -> None:
    """One batch of an epoch: resize, step, schedule, EMA, running sums. No host sync."""
    if res != x.shape[-1]:  # progressive resizing
        x = F.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
    loss, corr = train_step(run.net, x, y, run.opt, run.scaler, run.amp_ctx, run.cfg.label_smoothing,
                            run.teacher)
    bad = ~torch.isfinite(loss) & (stats.first_bad < 0)
    stats.first_bad = torch.where(bad, torch.full_like(stats.first_bad, run.step), stats.first_bad)
    run.sched.step()
    if run.ema is not None:
        run.ema.update(run.net)
    stats.loss_sum += loss.float() * len(y)
    stats.correct += corr
    stats.seen += len(y)
    run.step += 1


def train_one_epoch(run: RunState, epoch: int, progress: bool, res: int) -> dict:
    """One pass over this rank's shard at `res` px; a NaN/Inf loss raises `TrainingDiverged`."""
    cfg = run.cfg
    run.net.train()
    run.train_loader.set_epoch(epoch)
    stats, t0 = EpochStats.zeros(run.device), time.perf_counter()
    n = len(run.train_loader)
    bar = tqdm(run.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress or not sys.stderr.isatty(),
               leave=False, dynamic_ncols=True)
    for i, (x, y) in enumerate(bar):
        train_batch(run, x, y, stats, res)
        if (i + 1) % SYNC_EVERY == 0 or i + 1 == n:  # the loop's only host reads
            loss, correct, first_bad = torch.stack([stats.loss_sum, stats.correct.float(),
                                                    stats.first_bad.float()]).tolist()
            if first_bad >= 0:
                raise TrainingDiverged(f"loss became NaN/Inf at step {int(first_bad)} (epoch "
                                       f"{epoch + 1}); try a lower --lr. The last good checkpoint is kept.")
            bar.set_postfix(loss=f"{loss / stats.seen:.3f}", acc=f"{correct / stats.seen:.3f}",
                            img_s=f"{stats.seen / (time.perf_counter() - t0):.0f}")
    seconds = time.perf_counter() - t0
    return {"train_loss": loss / stats.seen, "train_acc": correct / stats.seen,
            "images_per_s": stats.seen * run.world_size / seconds, "train_seconds": seconds}


def evaluate_run(run: RunState, split: str = "test", tta: str | None = None):
    """Evaluation of the EMA weights when kept, else of the live model, on test or val, with
    `tta` (default: the run's mode)."""
    model = run.ema.module if run.ema is not None else run.model
    loader = run.val_loader if split == "val" else run.test_loader
    return evaluate(model, loader, run.classes, amp_dtype=run.amp,
                    tta=run.cfg.tta if tta is None else tta)


def fit(cfg: TrainConfig, *, device: torch.device | str | None = None,
        report: ReportFn | None = None, progress: bool = True) -> FitResult:
    """Train `cfg` and return the final test accuracy.

    Under `torch.distributed` (Ray Train starts the process group) each process trains its
    rank's shard of every batch and the model is wrapped in DDP here. `device`: where this
    process trains (default: `cfg.device`). `report(metrics, checkpoint_path)` is called every
    epoch (checkpoint_path on rank 0 only, else None). Only rank 0 evaluates and writes OUT:
    other ranks' metrics carry no test/val numbers, their accuracy is NaN. `cfg.resume` is the
    one way to continue a run: from OUT/checkpoint.pt (Ray puts the checkpoint it restores there).
    Under `cfg.time_budget` (one process) the epochs are planned as the run goes: `c40.budget`.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world_size = torch.distributed.get_world_size() if distributed else 1
    t_start = time.perf_counter()
    device = resolve_device(cfg.device) if device is None else torch.device(device)
    out = Path(cfg.out)
    created = rank == 0 and not out.exists()
    if rank == 0:
        prepare_out_dir(out, resume=cfg.resume)
    try:
        if cfg.time_budget and world_size > 1:
            raise ConfigError("--time-budget trains in one process (each rank's clock would steer "
                              "its own schedule); give --epochs instead")
        run = setup_run(cfg, device, rank, world_size)
        wrap_run(run)
    except BaseException:
        if created and not any(out.iterdir()):  # bad data, bad config: leave nothing behind
            out.rmdir()
        raise
    progress = progress and rank == 0
    # `elapsed` counts the whole run: a resumed run continues from its last recorded elapsed
    t_origin = t_start - (run.history[-1].get("elapsed", 0.0) if run.history else 0.0)
    budget = run.budget
    if budget is not None:
        budget.start(t_origin)
        budget.epochs = run.history[-1]["planned"] if run.history else cfg.epochs
    ended = bool(run.history) and run.history[-1].get("ended", False)  # a budget ended it
    try:
        for epoch in range(cfg.epochs if ended else run.start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            metrics = {"epoch": epoch + 1, "lr": run.opt.param_groups[0]["lr"]}
            every = cfg.eval_every if cfg.val_split == 0 else 0
            test_views = n_views(progress_tta(cfg.tta))
            if budget is not None:
                budget.plan(epoch, cfg.epochs, (cfg.low_res, run.low_res_frac()), run.image_px, every,
                            test_views)
            px = run.epoch_px(epoch)
            test = every > 0 and (epoch + 1) % every == 0
            last = epoch + 1 == run.epochs()
            metrics.update(train_one_epoch(run, epoch, progress, px))
            tta = cfg.tta if last else progress_tta(cfg.tta)  # progress tests: at most flip
            if run.val_loader is not None:  # every epoch: what early stopping (Tune) reads
                ev = evaluate_run(run, "val", tta)
                metrics.update(val_loss=ev.loss, val_acc=ev.accuracy, eval_tta=tta)
            if budget is not None:  # the epoch's cost (its val test included); room for another?
                budget.epoch_done(px, time.perf_counter() - t0)
                next_px = px if px == run.image_px else run.epoch_px(epoch + 1)
                last = last or not budget.room_for_epoch(next_px, test_views * test)
                tta = cfg.tta if last else tta
                metrics.update(res=px, planned=budget.epochs, done=round(run.done(), 4), ended=last)
            if rank == 0 and (last or test):
                t_test = time.perf_counter()
                ev = evaluate_run(run, "test", tta)
                metrics.update(test_loss=ev.loss, test_acc=ev.accuracy, eval_tta=tta)
                if budget is not None:
                    budget.test_done(n_views(tta), time.perf_counter() - t_test)
            metrics.update(seconds=time.perf_counter() - t0, elapsed=time.perf_counter() - t_origin)
            run.history.append(metrics)
            ckpt = None
            if rank == 0:
                ckpt = save_checkpoint(run_state(run, epoch + 1), out / "checkpoint.pt")
                write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in run.history))
                tqdm.write(_epoch_line(metrics)) if progress else print(_epoch_line(metrics), flush=True)
            if report is not None:
                report(metrics, ckpt)
            if last:
                break
    finally:
        run.train_loader.close()
    final = next((m["test_acc"] for m in reversed(run.history) if "test_acc" in m), None)
    if final is None:  # resumed a finished run: evaluate what was loaded (NaN: rank > 0)
        final = evaluate_run(run).accuracy if rank == 0 else math.nan
    return FitResult(final, len(run.history), time.perf_counter() - t_start, run.params, out,
                     run.history)


def _epoch_line(m: dict) -> str:
    test = f" test_loss={m['test_loss']:.4f} test_acc={m['test_acc']:.4f}" if "test_acc" in m else ""
    return (f"epoch {m['epoch']}: lr={m['lr']:.4f} train_loss={m['train_loss']:.4f} "
            f"train_acc={m['train_acc']:.4f}{test} img/s={m['images_per_s']:.0f} "
            f"time={m['seconds']:.1f}s elapsed={m['elapsed']:.1f}s")
