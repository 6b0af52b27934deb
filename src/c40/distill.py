"""Knowledge distillation: a trained c40 checkpoint (the teacher) gives soft targets for the very
batch the student trains on (augmented, resized), so the student learns the teacher's view of
each image on top of its label. The loss (Hinton et al., 2015):

    (1 - w) * cross_entropy(student, labels) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The teacher runs frozen, in eval mode, under the run's autocast; its checkpoint may name another
arch and other normalisation statistics (the batch is re-normalised for it). A distilled run's
`train_loss` is this mixed loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from c40.checkpoint import load_model
from c40.errors import CheckpointError
from c40.model import check_input_size
from c40.precision import keep_depthwise_fp32


class Teacher:
    def __init__(self, model: nn.Module, weight: float, temp: float,
                 scale: torch.Tensor, shift: torch.Tensor):
        self.model, self.weight, self.temp = model, weight, temp
        self.scale, self.shift = scale, shift  # student-normalised x -> teacher-normalised

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)

    def loss(self, label_loss: torch.Tensor, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The student's loss on batch `x` given its label loss and logits (inside autocast)."""
        t = self.temp
        soft = F.kl_div(F.log_softmax(logits.float() / t, 1),
                        F.log_softmax(self.logits(x).float() / t, 1),
                        reduction="batchmean", log_target=True)
        return (1 - self.weight) * label_loss + self.weight * t * t * soft


def load_teacher(cfg, device: torch.device, amp: torch.dtype | None, mean, std,
                 classes) -> Teacher | None:
    """The run's teacher (None without `cfg.teacher`): one-line CheckpointErrors when it cannot
    teach this run (other classes, or an arch that cannot take the run's low-res inputs)."""
    if not cfg.teacher:
        return None
    model, state = load_model(cfg.teacher, map_location="cpu")
    if list(state.get("classes", [])) != list(classes):
        raise CheckpointError(f"--teacher {cfg.teacher}: it predicts {state.get('classes')}, "
                              f"this run's data has {list(classes)}")
    if cfg.low_res_epochs:
        check_input_size(f"{state['config']['arch']} (the --teacher's)", model, cfg.low_res)
    for p in model.parameters():
        p.requires_grad_(False)
    keep_depthwise_fp32(model, amp, device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    as_t = lambda v: torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)  # noqa: E731
    t_mean, t_std = as_t(state["mean"]), as_t(state["std"])
    scale = as_t(std) / t_std                           # x_t = (x * std + mean - t_mean) / t_std
    shift = (as_t(mean) - t_mean) / t_std
    return Teacher(model, cfg.distill, cfg.distill_temp, scale, shift)
