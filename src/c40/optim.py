"""The optimizer and its learning-rate schedule.

SGD with Nesterov momentum, weight decay only on conv/linear weights; `bn_bias_lr` scales the
learning rate of the BatchNorm biases (airbench's "bias scaler": they are the net's thresholds,
few and cheap to move fast). With `muon_lr` > 0 the full conv filters (not depthwise, not the
3-channel stem) are trained by Muon instead: the Nesterov
momentum of each filter bank, flattened to (out, in x k x k), is orthogonalized by five
Newton-Schulz iterations before the step (Jordan et al. 2024, as in airbench's Muon runs), so every
direction of the filter bank moves at the same rate. No weight decay there: BatchNorm follows
every such conv, so the filters' scale does not matter. Both follow the same one-cycle schedule,
each from its own peak. Under a time budget (`c40.budget`) the same one-cycle shape runs over the
steps of the run's current epoch plan, which may change between epochs. Muon's step is not fused: under fp16 (pre-Ampere GPUs) GradScaler reads
its inf flag back once per step, a host sync plain SGD avoids; the GPU recipes use plain SGD.
"""
from __future__ import annotations

import torch
from torch import nn

from typing import Callable

from c40.config import TrainConfig

MUON_MOMENTUM = 0.95
_NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Newton-Schulz quintic of Muon: fast, not exact
START_DIV, FINAL_DIV = 25.0, 1e3  # one cycle: from peak / 25 up to the peak, down to that / 1000


def muon_params(model: nn.Module) -> list[nn.Parameter]:
    """The filters Muon trains: full (groups = 1) convs with more than 3 input channels."""
    return [m.weight for m in model.modules()
            if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels > 3]


def create_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """SGD; weight decay only on conv/linear weights (not BatchNorm, not biases); BatchNorm
    biases at cfg.bn_bias_lr x the rate; Muon for the full conv filters when cfg.muon_lr > 0.
    `fused` for fp16: GradScaler then hands the overflow flag to the kernel instead of reading
    it back (SGD only)."""
    muon = {id(p) for p in muon_params(model)} if cfg.muon_lr > 0 else set()
    bn_bias = ({id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
               if cfg.bn_bias_lr != 1 else set())
    rest = [p for p in model.parameters()
            if p.requires_grad and id(p) not in muon and id(p) not in bn_bias]
    groups = [{"params": [p for p in rest if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.ndim <= 1], "weight_decay": 0.0}]
    if bn_bias:
        groups.append({"params": [p for p in model.parameters() if id(p) in bn_bias],
                       "lr": cfg.lr * cfg.bn_bias_lr, "weight_decay": 0.0})
    if not muon:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, fused=fused or None)
    groups.append({"params": [p for p in model.parameters() if id(p) in muon], "lr": cfg.muon_lr,
                   "weight_decay": 0.0, "momentum": MUON_MOMENTUM, "nesterov": True, "muon": True})
    return MuonSGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def one_cycle(done: float, warmup: float) -> float:
    """OneCycleLR's linear shape as a multiple of the peak, at `done` (0-1) of the run."""
    start, end, done = 1 / START_DIV, 1 / (START_DIV * FINAL_DIV), min(max(done, 0.0), 1.0)
    if done < warmup:
        return start + (1 - start) * done / warmup
    return 1 - (1 - end) * (done - warmup) / (1 - warmup)


def create_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int,
                     done: Callable[[int], float] | None = None):
    """The schedule over `total_steps`; with `done(step)` (a time budget: the fraction of the
    run done) the one-cycle shape follows that instead."""
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    if done is not None:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: one_cycle(done(step), cfg.warmup))
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=max(total_steps, 2),
        pct_start=cfg.warmup, anneal_strategy="linear", div_factor=START_DIV,
        final_div_factor=FINAL_DIV, cycle_momentum=False)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """~U V^T of g = U S V^T (singular values pushed to ~0.7-1.2) by Newton-Schulz iterations."""
    a, b, c = _NS_COEFFS
    x = g / (g.norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return x.T if tall else x


class MuonSGD(torch.optim.Optimizer):
    """Groups marked "muon": Muon (Nesterov momentum, orthogonalized, scaled by
    sqrt(max(1, out / fan_in))); every other group: SGD with (Nesterov) momentum and L2 weight
    decay, the same update as torch.optim.SGD."""

    def __init__(self, groups, lr: float, momentum: float, nesterov: bool = True):
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      weight_decay=0.0, muon=False))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad if not g["weight_decay"] else p.grad.add(p, alpha=g["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:  # as torch.optim.SGD: the first step copies
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(g["momentum"]).add_(d)
                buf = state["momentum_buffer"]
                u = d.add(buf, alpha=g["momentum"]) if g["nesterov"] else buf
                if g["muon"]:
                    flat = u.reshape(len(u), -1)
                    scale = max(1, flat.size(0) / flat.size(1)) ** 0.5
                    u = orthogonalize(flat).view_as(u) * scale
                p.add_(u, alpha=-g["lr"])
