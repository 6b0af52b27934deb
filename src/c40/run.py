"""A training run's state: what `c40.train.fit` trains with, built from a TrainConfig.

`setup_run` loads the data, builds and checks the model (fitting a whitening layer to the run's
own images), the loaders, optimizer, schedule, EMA, teacher and time budget, and restores a
resumed run from its checkpoint; `wrap_run` adds DDP and torch.compile. Device, AMP and memory
format are decided here (never in the model), through `c40.precision`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from c40.augment import normalize
from c40.budget import TimeBudget
from c40.checkpoint import load_checkpoint, provenance, restore_run
from c40.config import TrainConfig, low_res_count
from c40.data import channel_stats, load_dataset, resolve_data_root
from c40.distill import Teacher, load_teacher
from c40.ema import EMA
from c40.errors import CheckpointError
from c40.evaluate import n_views
from c40.loaders import LoaderSpec, TensorLoader, create_loader
from c40.model import Whitening, check_input_size, check_param_limit, create_model, fit_whitening
from c40.optim import create_optimizer, create_scheduler
from c40.precision import autocast, configure_backends, keep_depthwise_fp32, resolve_amp


@dataclass
class RunState:
    """Everything one `fit` call trains with; built by `setup_run`, saved by `checkpoint.run_state`."""
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
        low = epoch < low_res_count(self.low_res_frac(), self.epochs())
        return self.cfg.low_res if low else self.image_px


def check_model(cfg: TrainConfig, model: nn.Module | None = None) -> int:
    """What a run's model must pass before it trains, as one-line ConfigErrors: < 200k
    parameters, and inputs of cfg.low_res px when some epochs train at that size. Returns the
    parameter count. `c40 train` and Ray Train's driver (before any worker starts) call it."""
    model = model if model is not None else create_model(cfg.arch, width=cfg.width)
    params = check_param_limit(cfg.arch, cfg.width, model=model)
    if cfg.low_res_epochs:
        check_input_size(cfg.arch, model, cfg.low_res)
    return params


def setup_run(cfg: TrainConfig, device: torch.device, rank: int, world_size: int) -> RunState:
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


def wrap_run(run: RunState) -> None:
    """What the step calls: DDP across ranks (gradients averaged, buffers broadcast from rank 0),
    then torch.compile with static shapes (one graph per resolution: 24 px, then 32 px)."""
    if run.world_size > 1:
        run.net = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index or 0] if run.device.type == "cuda" else None)
    if run.cfg.compile:
        run.net = torch.compile(run.net, dynamic=False)
