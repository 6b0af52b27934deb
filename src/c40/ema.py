"""An exponential moving average of a model's weights, kept on the model's device.

The same numbers as `torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=
get_ema_multi_avg_fn(decay), use_buffers=True)` (a test holds them equal), without its host syncs:
AveragedModel keeps its step count in a tensor, reads it back (`n_averaged == 0`) and copies it to
the device on every update; here the count is a host int.
"""
from __future__ import annotations

import copy
import itertools

import torch
from torch import nn


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]


class EMA:
    """`module` holds the averaged weights (and BatchNorm buffers); `update(model)` after each step."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model)  # same device, dtype and classes as the live model
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.n_averaged = 0                 # updates so far (host int: no sync)
        self._avg = _tensors(self.module)
        self._float = [t.is_floating_point() for t in self._avg]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        live = _tensors(model)
        if self.n_averaged == 0:  # the first update copies, as AveragedModel does
            torch._foreach_copy_(self._avg, live)
        else:
            avg = [a for a, f in zip(self._avg, self._float) if f]
            torch._foreach_lerp_(avg, [t for t, f in zip(live, self._float) if f], 1 - self.decay)
            for a, t, f in zip(self._avg, live, self._float):
                if not f:  # integer buffers (BatchNorm's num_batches_tracked), as AveragedModel
                    a.copy_(a * self.decay + t * (1 - self.decay))
        self.n_averaged += 1

    def state_dict(self) -> dict:
        return self.module.state_dict()
