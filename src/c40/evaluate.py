"""The one evaluation: a pass of a model over a dataset -> `Evaluation`, from which every metric
(accuracy, loss, per-class misses, confusion, misclassified samples) is derived. No training,
no plotting.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Evaluation:
    """Per-sample results of one pass; metrics are derived, never stored twice."""
    indices: np.ndarray        # (N,) int64 dataset indices
    labels: np.ndarray         # (N,) int64
    probs: np.ndarray          # (N, K) float32 softmax probabilities
    losses: np.ndarray         # (N,) float32 per-sample cross-entropy
    classes: tuple[str, ...]

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def accuracy(self) -> float:
        return float((self.preds == self.labels).mean()) if self.n else 0.0

    @property
    def loss(self) -> float:
        return float(self.losses.mean()) if self.n else 0.0


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


@torch.no_grad()
def evaluate(model: nn.Module, loader, classes, *, amp_dtype: torch.dtype | None = None,
             tta: bool = False, indices: np.ndarray | None = None) -> Evaluation:
    """Run `model` (switched to eval mode, restored afterwards) over an unshuffled loader.

    tta: average the softmax of the image and its horizontal mirror.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probs, losses, labels = [], [], []
    try:
        for x, y in loader:
            with _autocast(device, amp_dtype):
                logits = model(x).float()
                if tta:
                    logits = torch.stack([logits, model(x.flip(3)).float()])
            p = logits.softmax(-1)
            if tta:
                p = p.mean(0)
            probs.append(p)
            losses.append(F.nll_loss(p.clamp_min(1e-12).log(), y, reduction="none"))
            labels.append(y)
    finally:
        model.train(was_training)
    probs_np = torch.cat(probs).cpu().numpy() if probs else np.zeros((0, len(classes)), np.float32)
    labels_np = torch.cat(labels).cpu().numpy() if labels else np.zeros(0, np.int64)
    losses_np = torch.cat(losses).cpu().numpy() if losses else np.zeros(0, np.float32)
    idx = np.arange(len(labels_np)) if indices is None else np.asarray(indices)
    return Evaluation(idx, labels_np, probs_np.astype(np.float32), losses_np.astype(np.float32),
                      tuple(classes))
