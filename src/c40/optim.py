"""The optimizer and its learning-rate schedule."""
from __future__ import annotations

import torch
from torch import nn

from c40.config import TrainConfig


def create_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """SGD; weight decay only on conv/linear weights (not BatchNorm, not biases). `fused` for
    fp16: GradScaler then hands the overflow flag to the kernel instead of reading it back."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0, fused=fused or None)


def create_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=max(total_steps, 2), pct_start=cfg.warmup,
        anneal_strategy="linear", div_factor=25.0, final_div_factor=1e3,
        cycle_momentum=False)
