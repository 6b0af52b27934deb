"""An exponential moving average of a model's weights, kept on the model's device.

Update n (n updates averaged so far) uses decay min(decay, (1 + n) / (10 + n)), the warm-up of
TensorFlow's ExponentialMovingAverage(num_updates=): the average never reaches back further than
~n/9 updates, so the first weights of a run do not linger in it. Without it a short run's EMA is
polluted by its start: at decay 0.999 the first update still weighs 0.999^n, 14% after 5 epochs
of batch 128 (`--recipe best --epochs 5` ended at 57% where the live weights were far better).
From update ~9,000 on (23 epochs at batch 128) the decay is the configured one.

The same numbers as `torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=..., use_buffers=True)`
with that decay (a test holds them equal), without its host syncs: AveragedModel keeps its step
count in a tensor, reads it back (`n_averaged == 0`) and copies it to the device on every update;
here the count is a host int.
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
            decay = self.decay_at(self.n_averaged)
            avg = [a for a, f in zip(self._avg, self._float) if f]
            torch._foreach_lerp_(avg, [t for t, f in zip(live, self._float) if f], 1 - decay)
            for a, t, f in zip(self._avg, live, self._float):
                if not f:  # integer buffers (BatchNorm's num_batches_tracked), as AveragedModel
                    a.copy_(a * decay + t * (1 - decay))
        self.n_averaged += 1

    def decay_at(self, n: int) -> float:
        """The decay of the update made after n updates."""
        return min(self.decay, (1 + n) / (10 + n))

    def state_dict(self) -> dict:
        return self.module.state_dict()
