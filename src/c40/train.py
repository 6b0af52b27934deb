"""The one training loop: `fit(cfg)` is what `c40 train`, Ray Train and Ray Tune all run.

Device, AMP and memory format are decided here (never in the model). One autocast context and
one `GradScaler(enabled=...)` serve fp32, CPU bf16 and CUDA fp16.
"""
from __future__ import annotations

import contextlib
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

from c40.checkpoint import load_checkpoint, load_weights, save_checkpoint
from c40.config import TrainConfig
from c40.data import channel_stats, load_dataset, resolve_data_root
from c40.errors import C40Error, CheckpointError, ConfigError, TrainingDiverged
from c40.evaluate import evaluate
from c40.loaders import LoaderSpec, TensorLoader, create_loader
from c40.model import count_params, create_model

PARAM_LIMIT = 200_000  # the assignment's limit on trainable parameters
ReportFn = Callable[[dict, "Path | None"], None]
# A resumed run continues the saved optimizer and schedule: their state would silently override
# a changed lr/momentum/weight decay, and a changed step count crashes OneCycleLR at the end.
RESUME_MUST_MATCH = ("arch", "width", "epochs", "batch_size", "subset", "val_split", "lr",
                     "schedule", "warmup", "momentum", "nesterov", "weight_decay")


@dataclass
class FitResult:
    accuracy: float                 # final test accuracy (0-1)
    epochs: int
    seconds: float                  # wall time of this call
    params: int
    out: Path
    history: list[dict] = field(default_factory=list)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available")
    return dev


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX), which makes CPU bf16 autocast pay."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """auto: fp16 on CUDA; bf16 on CPUs with native bf16 (AVX512-BF16/AMX), where it measured
    1.7x faster; off elsewhere (emulated bf16 measured ~10x slower on an AVX2 CPU)."""
    if mode == "off":
        return None
    if mode == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


class _Fp32Conv2d(nn.Conv2d):
    """A Conv2d that runs in fp32 under autocast. Swapped in as the class of existing modules
    (not a patched bound `forward`): deep copies such as the EMA model keep their own weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def keep_depthwise_fp32(model: nn.Module, amp: torch.dtype | None, device: torch.device) -> int:
    """Under CPU bf16 autocast, run depthwise convs (groups == channels) in fp32; returns how many.

    oneDNN's bf16 depthwise backward is pathological: a 96-channel 3x3 stride-2 depthwise conv at
    8x8, batch 128, took 30.7 ms fwd+bwd in bf16 vs 1.0 ms in fp32 (27% of the strided net's whole
    step); stride 1 is 5.9 vs 4.5 ms. Depthwise convs are a tiny share of the FLOPs, so fp32 costs
    nothing. CUDA (cuDNN) has no such cliff: left alone there."""
    if amp != torch.bfloat16 or device.type != "cpu":
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Conv2d and m.groups > 1 and m.groups == m.in_channels:
            m.__class__ = _Fp32Conv2d
            n += 1
    return n


def create_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD; weight decay only on conv/linear weights (not BatchNorm, not biases)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def create_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=max(total_steps, 2), pct_start=cfg.warmup,
        anneal_strategy="linear", div_factor=25.0, final_div_factor=1e3,
        cycle_momentum=False)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
             "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.asarray(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, autocast, label_smoothing: float):
    """One optimisation step; returns (loss, correct) as device tensors (no host sync)."""
    with autocast():
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach(), (logits.detach().argmax(1) == y).sum()


class _Run:
    """State of one `fit` call that the epoch loop needs; built by `_setup`."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _setup(cfg: TrainConfig, device: torch.device, rank: int, world_size: int,
           wrap_model: Callable[[nn.Module], nn.Module] | None, resume_from) -> _Run:
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    _seed_everything(cfg.seed)
    root = resolve_data_root(cfg.data)
    train = load_dataset(root, "train").subset(cfg.subset)
    test = load_dataset(root, "test").subset(cfg.test_subset)
    val = None
    if cfg.val_split:
        train, val = train.split(cfg.val_split, seed=cfg.seed)
    mean, std = channel_stats(train.images)
    model = create_model(cfg.arch, dropout=cfg.dropout, width=cfg.width,
                         num_classes=len(train.classes))
    params = count_params(model)
    if params >= PARAM_LIMIT:
        raise ConfigError(f"{cfg.arch} at width {cfg.width} has {params:,} trainable parameters; "
                          f"the limit is < {PARAM_LIMIT:,}")
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    per_rank = max(1, cfg.batch_size // world_size)
    spec = LoaderSpec(per_rank, mean, std, augment=True, p=cfg.aug_p, flip_p=cfg.flip_p, shuffle=True,
                      drop_last=len(train) >= per_rank * world_size, seed=cfg.seed, rank=rank,
                      world_size=world_size, channels_last=cfg.channels_last)
    train_loader = create_loader(cfg.loader, train.images, train.labels, spec, device, cfg.workers)
    # only rank 0 evaluates: every rank holds the same weights, and only rank 0's numbers are
    # reported (other ranks' BN buffers differ by their own last batch)
    test_spec = LoaderSpec(1024, mean, std, channels_last=cfg.channels_last)
    test_loader = TensorLoader(test.images, test.labels, test_spec, device) if rank == 0 else None
    val_loader = (TensorLoader(val.images, val.labels, test_spec, device)
                  if val is not None and rank == 0 else None)
    opt = create_optimizer(model, cfg)
    sched = create_scheduler(opt, cfg, cfg.epochs * len(train_loader))
    amp = resolve_amp(cfg.amp, device)
    keep_depthwise_fp32(model, amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    ema = None
    if cfg.ema:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay),
            use_buffers=True)
    run = _Run(cfg=cfg, device=device, rank=rank, world_size=world_size, model=model, ema=ema,
               opt=opt, sched=sched, scaler=scaler, amp=amp, train=train, test=test,
               train_loader=train_loader, test_loader=test_loader, val_loader=val_loader,
               mean=mean, std=std,
               params=params, start_epoch=0, step=0, history=[])
    ckpt_path = Path(resume_from) if resume_from else (Path(cfg.out) / "checkpoint.pt" if cfg.resume else None)
    if ckpt_path is not None:
        if resume_from is None and not ckpt_path.is_file():
            raise CheckpointError(f"{ckpt_path}: nothing to resume (the run stopped before its first "
                                  "epoch ended); start it again without --resume")
        _restore(run, load_checkpoint(ckpt_path, map_location=device), ckpt_path)
    run.net = wrap_model(model) if wrap_model else model
    if cfg.compile:
        run.net = torch.compile(run.net)
    return run


def _restore(run: _Run, state: dict, path: Path) -> None:
    saved = state["config"]
    for key in RESUME_MUST_MATCH:
        if saved.get(key) != getattr(run.cfg, key):
            raise ConfigError(f"{path}: checkpoint has {key}={saved.get(key)!r} but this run asks "
                              f"for {getattr(run.cfg, key)!r} (a resumed run keeps its schedule: "
                              "use the same value, or a new --out)")
    load_weights(run.model, state["model"], str(path))
    if run.ema is not None and state.get("ema"):
        load_weights(run.ema.module, state["ema"], str(path))
        run.ema.n_averaged.fill_(state.get("ema_n", 1))
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    run.start_epoch, run.step = state["epoch"], state["step"]
    run.history = list(state.get("history", []))


def _checkpoint_state(run: _Run, epoch: int) -> dict:
    return {
        "model": _unwrap(run.model).state_dict(),
        "ema": run.ema.module.state_dict() if run.ema is not None else None,
        "ema_n": int(run.ema.n_averaged) if run.ema is not None else 0,
        "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
        "scaler": run.scaler.state_dict(), "rng": _rng_state(),
        "epoch": epoch, "step": run.step, "config": run.cfg.to_dict(),
        "params": run.params, "classes": list(run.train.classes),
        "mean": list(run.mean), "std": list(run.std), "history": run.history,
    }


def train_one_epoch(run: _Run, epoch: int, progress: bool) -> dict:
    """One pass over this rank's shard; a NaN/Inf loss raises `TrainingDiverged`."""
    cfg, net = run.cfg, run.net
    net.train()
    run.train_loader.set_epoch(epoch)
    autocast = (lambda: torch.autocast(run.device.type, dtype=run.amp)) if run.amp else contextlib.nullcontext
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), dtype=torch.long, device=run.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=run.device)  # first non-finite step
    seen, t0 = 0, time.perf_counter()
    res = cfg.low_res if epoch < int(cfg.low_res_frac * cfg.epochs) else None  # progressive resizing
    bar = tqdm(run.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress or not sys.stderr.isatty(),
               leave=False, dynamic_ncols=True)
    for i, (x, y) in enumerate(bar):
        if cfg.nan_at_step is not None and run.step == cfg.nan_at_step:
            x = x * float("nan")  # fault injection for tests
        if res is not None and res != x.shape[-1]:
            x = F.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
        loss, corr = train_step(net, x, y, run.opt, run.scaler, autocast, cfg.label_smoothing)
        bad = ~torch.isfinite(loss)
        first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, run.step), first_bad)
        run.sched.step()
        if run.ema is not None:
            run.ema.update_parameters(net)
        loss_sum += loss.float() * len(y)
        correct += corr
        seen += len(y)
        run.step += 1
        if i % 10 == 0 or i == len(run.train_loader) - 1:  # the only host syncs of the loop
            if int(first_bad) >= 0:
                break
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    if int(first_bad) >= 0:
        raise TrainingDiverged(f"loss became NaN/Inf at step {int(first_bad)} (epoch {epoch + 1}); "
                               "try a lower --lr. The last good checkpoint is kept.")
    seconds = time.perf_counter() - t0
    return {"train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
            "images_per_s": seen * run.world_size / seconds, "train_seconds": seconds}


def evaluate_run(run: _Run, split: str = "test"):
    """Evaluation of the EMA weights when kept, else of the live model, on test or val."""
    model = run.ema.module if run.ema is not None else _unwrap(run.model)
    loader = run.val_loader if split == "val" else run.test_loader
    return evaluate(model, loader, run.test.classes, amp_dtype=run.amp, tta=run.cfg.tta)


def fit(cfg: TrainConfig, *, device: torch.device | str | None = None, rank: int = 0,
        world_size: int = 1, wrap_model: Callable[[nn.Module], nn.Module] | None = None,
        report: ReportFn | None = None, resume_from: str | Path | None = None,
        progress: bool = True) -> FitResult:
    """Train `cfg` and return the final test accuracy.

    rank/world_size/wrap_model let Ray Train run the same loop under DDP; `report(metrics,
    checkpoint_path)` is called every epoch (checkpoint_path on rank 0 only, else None). Only
    rank 0 evaluates: other ranks' metrics carry no test/val numbers, their accuracy is NaN.
    """
    t_start = time.perf_counter()
    device = resolve_device(cfg.device) if device is None else torch.device(device)
    out = Path(cfg.out)
    if rank == 0:
        _prepare_out(out, resume=cfg.resume or resume_from is not None)
    run = _setup(cfg, device, rank, world_size, wrap_model, resume_from)
    progress = progress and rank == 0
    # `elapsed` counts the whole run: a resumed run continues from its last recorded elapsed
    t_origin = t_start - (run.history[-1].get("elapsed", 0.0) if run.history else 0.0)
    try:
        for epoch in range(run.start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            metrics = {"epoch": epoch + 1, "lr": run.opt.param_groups[0]["lr"]}
            metrics.update(train_one_epoch(run, epoch, progress))
            last = epoch + 1 == cfg.epochs
            due = cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0
            if run.val_loader is not None:  # every epoch: what early stopping (Tune) reads
                ev = evaluate_run(run, "val")
                metrics.update(val_loss=ev.loss, val_acc=ev.accuracy)
            if rank == 0 and (last or (cfg.val_split == 0 and due)):
                ev = evaluate_run(run, "test")
                metrics.update(test_loss=ev.loss, test_acc=ev.accuracy)
            metrics.update(seconds=time.perf_counter() - t0, elapsed=time.perf_counter() - t_origin)
            run.history.append(metrics)
            ckpt = None
            if rank == 0:
                ckpt = save_checkpoint(_checkpoint_state(run, epoch + 1), out / "checkpoint.pt")
                _write_metrics(out / "metrics.jsonl", run.history)
                tqdm.write(_epoch_line(metrics)) if progress else print(_epoch_line(metrics), flush=True)
            if report is not None:
                report(metrics, ckpt)
    finally:
        run.train_loader.close()
    final = next((m["test_acc"] for m in reversed(run.history) if "test_acc" in m), None)
    if final is None:  # resumed a finished run: evaluate what was loaded (NaN: rank > 0)
        final = evaluate_run(run).accuracy if rank == 0 else math.nan
    return FitResult(final, len(run.history), time.perf_counter() - t_start, run.params, out,
                     run.history)


def _prepare_out(out: Path, resume: bool) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".c40-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise C40Error(f"output folder {out} is not writable ({e.strerror})") from None
    if not resume and (out / "checkpoint.pt").exists():
        raise C40Error(f"{out} already holds a run (checkpoint.pt): pass --resume to continue it "
                       "or choose another --out")


def _write_metrics(path: Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl from the history (a resumed run never duplicates epochs)."""
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(m) + "\n" for m in history))
    tmp.replace(path)


def _epoch_line(m: dict) -> str:
    test = f" test_loss={m['test_loss']:.4f} test_acc={m['test_acc']:.4f}" if "test_acc" in m else ""
    return (f"epoch {m['epoch']}: lr={m['lr']:.4f} train_loss={m['train_loss']:.4f} "
            f"train_acc={m['train_acc']:.4f}{test} img/s={m['images_per_s']:.0f} "
            f"time={m['seconds']:.1f}s elapsed={m['elapsed']:.1f}s")
