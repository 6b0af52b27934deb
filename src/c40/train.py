"""The one training loop: `fit(cfg)` is what `c40 train`, Ray Train and Ray Tune all run.

Device, AMP and memory format are decided here (never in the model), through `c40.precision`.
One autocast context and one `GradScaler(enabled=...)` serve fp32, bf16 and CUDA fp16. A training
step never waits for the device: the augmentation plan is drawn on the host, the fp16 optimizer
step is fused (GradScaler then reads no overflow flag), the EMA counts on the host; the loop
reads the device once every `SYNC_EVERY` steps (NaN guard, progress).
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from c40.augment import normalize
from c40.budget import TimeBudget
from c40.checkpoint import load_checkpoint, provenance, restore_run, run_state, save_checkpoint
from c40.config import TrainConfig, progress_tta
from c40.data import channel_stats, load_dataset, resolve_data_root
from c40.distill import Teacher, load_teacher
from c40.ema import EMA
from c40.errors import CheckpointError, ConfigError, TrainingDiverged
from c40.evaluate import evaluate, n_views
from c40.files import prepare_out_dir, write_text
from c40.loaders import LoaderSpec, TensorLoader, create_loader
from c40.model import Whitening, check_input_size, check_param_limit, create_model, fit_whitening
from c40.optim import create_optimizer, create_scheduler
from c40.precision import autocast, configure_backends, keep_depthwise_fp32, resolve_amp, resolve_device

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
class RunState:
    """Everything one `fit` call trains with; built by `_setup`, saved by `checkpoint.run_state`."""
    cfg: TrainConfig
    device: torch.device
    rank: int
    world_size: int
    model: nn.Module                # the plain module (weights, checkpoints)
    net: nn.Module                  # what the step calls: model, under DDP and/or torch.compile
    ema: EMA | None
    teacher: Teacher | None         # knowledge distillation (cfg.teacher)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None         # the resolved autocast dtype (None: fp32)
    train_loader: object
    test_loader: TensorLoader | None  # rank 0 only
    val_loader: TensorLoader | None
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    params: int
    provenance: dict                # the code and versions this process started with
    image_px: int                   # the training images' side
    steps_per_epoch: int
    budget: TimeBudget | None       # cfg.time_budget's clock and plan
    start_epoch: int = 0
    step: int = 0                   # optimizer steps so far
    history: list[dict] = field(default_factory=list)

    def amp_ctx(self):
        return autocast(self.device, self.amp)

    def epochs(self) -> int:
        """The run's epochs: cfg.epochs, or under a time budget its current plan."""
        return self.cfg.epochs if self.budget is None else self.budget.epochs

    def done(self) -> float:
        """The fraction of the run's steps done."""
        return self.step / (self.epochs() * self.steps_per_epoch)

    def low_res_frac(self) -> float:
        """cfg.low_res_frac; 0 once an epoch trained at full size under a budget (its plan moves,
        the low-res phase does not come back)."""
        over = self.budget is not None and any(m.get("res") == self.image_px for m in self.history)
        return 0.0 if over else self.cfg.low_res_frac

    def epoch_px(self, epoch: int) -> int:
        """The side images of `epoch` train at: low_res for the first low_res_frac of the epochs
        (as cfg.low_res_epochs counts them)."""
        return self.cfg.low_res if epoch < int(self.low_res_frac() * self.epochs()) else self.image_px


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


def check_model(cfg: TrainConfig, model: nn.Module | None = None) -> int:
    """What a run's model must pass before it trains, as one-line ConfigErrors: < 200k
    parameters, and inputs of cfg.low_res px when some epochs train at that size. Returns the
    parameter count. `c40 train` and Ray Train's driver (before any worker starts) call it."""
    model = model if model is not None else create_model(cfg.arch, width=cfg.width)
    params = check_param_limit(cfg.arch, cfg.width, model=model)
    if cfg.low_res_epochs:
        check_input_size(cfg.arch, model, cfg.low_res)
    return params


def _setup(cfg: TrainConfig, device: torch.device, rank: int, world_size: int) -> RunState:
    configure_backends(device, cfg.deterministic)  # before the first CUDA kernel
    if device.type == "cuda":
        torch.cuda.set_device(device)  # this process's GPU (NCCL, default-stream allocations)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    root = resolve_data_root(cfg.data)
    train = load_dataset(root, "train").subset(cfg.subset)
    test = load_dataset(root, "test").subset(cfg.test_subset)
    val = None
    if cfg.val_split:
        train, val = train.split(cfg.val_split, seed=cfg.seed)
    mean, std = channel_stats(train.images)
    model = create_model(cfg.arch, dropout=cfg.dropout, width=cfg.width,
                         num_classes=len(train.classes))
    params = check_model(cfg, model)
    if not cfg.resume and any(isinstance(m, Whitening) for m in model.modules()):
        # fixed filters, fit from data (a resumed run loads them from its checkpoint below)
        x = torch.from_numpy(train.images[:5000]).permute(0, 3, 1, 2)
        fit_whitening(model, normalize(x, torch.tensor(mean), torch.tensor(std)))
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    per_rank = max(1, cfg.batch_size // world_size)
    spec = LoaderSpec(per_rank, mean, std, augment=True, p=cfg.aug_p, flip_p=cfg.flip_p,
                      jpeg_p=cfg.jpeg_p, noise_p=cfg.noise_p, shuffle=True,
                      drop_last=len(train) >= per_rank * world_size, seed=cfg.seed, rank=rank,
                      world_size=world_size, channels_last=cfg.channels_last)
    train_loader = create_loader(cfg.loader, train.images, train.labels, spec, device, cfg.workers)
    # only rank 0 evaluates: every rank holds the same weights, and only rank 0's numbers are
    # reported (other ranks' BN buffers differ by their own last batch)
    test_spec = LoaderSpec(1024, mean, std, channels_last=cfg.channels_last)
    evaluates = rank == 0
    amp = resolve_amp(cfg.amp, device)
    budget = (TimeBudget(60 * cfg.time_budget, cfg.epochs, len(test) / len(train), n_views(cfg.tta))
              if cfg.time_budget else None)
    per_epoch = max(len(train_loader), 1)
    # under a budget the one-cycle shape follows the plan's steps (it grows or shrinks per epoch)
    done = budget and (lambda step: step / (budget.epochs * per_epoch))
    keep_depthwise_fp32(model, amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    opt = create_optimizer(model, cfg, fused=scaler.is_enabled())
    run = RunState(
        cfg=cfg, device=device, rank=rank, world_size=world_size, model=model, net=model,
        ema=EMA(model, cfg.ema_decay) if cfg.ema else None, opt=opt,
        teacher=load_teacher(cfg, device, amp, mean, std, train.classes),
        sched=create_scheduler(opt, cfg, cfg.epochs * per_epoch, done),
        scaler=scaler, amp=amp,
        train_loader=train_loader,
        test_loader=TensorLoader(test.images, test.labels, test_spec, device) if evaluates else None,
        val_loader=(TensorLoader(val.images, val.labels, test_spec, device)
                    if val is not None and evaluates else None),
        classes=tuple(train.classes), mean=tuple(map(float, mean)), std=tuple(map(float, std)),
        params=params, provenance=provenance(), image_px=train.images.shape[1],
        steps_per_epoch=per_epoch, budget=budget)
    if cfg.resume:
        ckpt_path = Path(cfg.out) / "checkpoint.pt"
        if not ckpt_path.is_file():
            raise CheckpointError(f"{ckpt_path}: nothing to resume (the run stopped before its first "
                                  "epoch ended); start it again without --resume")
        restore_run(run, load_checkpoint(ckpt_path), ckpt_path)  # to the CPU; state dicts move
    return run


def _wrap(run: RunState) -> None:
    """What the step calls: DDP across ranks (gradients averaged, buffers broadcast from rank 0),
    then torch.compile with static shapes (one graph per resolution: 24 px, then 32 px)."""
    if run.world_size > 1:
        run.net = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index or 0] if run.device.type == "cuda" else None)
    if run.cfg.compile:
        run.net = torch.compile(run.net, dynamic=False)


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
        run = _setup(cfg, device, rank, world_size)
        _wrap(run)
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
