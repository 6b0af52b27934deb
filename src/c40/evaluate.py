"""The one evaluation: a pass of a model over a dataset -> `Evaluation`, from which every metric
(accuracy, loss, per-class misses, confusion, misclassified samples) is derived. No training,
no plotting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from c40.config import tta_mode
from c40.precision import autocast


class Mistakes(NamedTuple):
    """Misclassified samples, most confident first (arrays of equal length M)."""
    indices: np.ndarray        # (M,) dataset indices
    labels: np.ndarray         # (M,) true classes
    preds: np.ndarray          # (M,) predicted classes
    confidence: np.ndarray     # (M,) probability given to the (wrong) prediction


def _to_numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


@dataclass
class Evaluation:
    """Per-sample results of one pass; metrics are derived, never stored twice.

    Torch tensors (CPU or CUDA) are accepted and converted to numpy on construction.
    """
    indices: np.ndarray        # (N,) int64 dataset indices
    labels: np.ndarray         # (N,) int64
    probs: np.ndarray          # (N, K) float32 softmax probabilities
    losses: np.ndarray         # (N,) float32 per-sample cross-entropy
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        self.indices = _to_numpy(self.indices, np.int64)
        self.labels = _to_numpy(self.labels, np.int64)
        self.probs = _to_numpy(self.probs, np.float32)
        self.losses = _to_numpy(self.losses, np.float32)
        self.classes = tuple(self.classes)
        n, k = len(self.labels), len(self.classes)
        if self.probs.shape != (n, k) or self.indices.shape != (n,) or self.losses.shape != (n,):
            raise ValueError(f"inconsistent shapes: labels {self.labels.shape}, indices "
                             f"{self.indices.shape}, losses {self.losses.shape}, probs "
                             f"{self.probs.shape} for {k} classes")

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def confidence(self) -> np.ndarray:
        """(N,) probability of the predicted class."""
        return self.probs.max(1) if self.n else np.zeros(0, np.float32)

    @property
    def accuracy(self) -> float:
        return float((self.preds == self.labels).mean()) if self.n else 0.0

    @property
    def loss(self) -> float:
        return float(self.losses.mean()) if self.n else 0.0

    # ------------------------------------------------------------------ derived metrics
    def confusion(self, normalize: bool = False) -> np.ndarray:
        """(K, K) int64 counts; rows are true classes, columns predictions.

        normalize: each row divided by its class count (float; rows of absent classes are 0).
        """
        k = len(self.classes)
        counts = np.bincount(self.labels * k + self.preds, minlength=k * k).reshape(k, k)
        if not normalize:
            return counts
        return counts / np.maximum(counts.sum(1, keepdims=True), 1)

    def class_counts(self) -> np.ndarray:
        """(K,) number of samples of each true class."""
        return np.bincount(self.labels, minlength=len(self.classes))

    def per_class_accuracy(self) -> np.ndarray:
        """(K,) fraction of each class's samples predicted correctly; NaN for absent classes."""
        counts = self.class_counts()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.diag(self.confusion()) / counts.astype(np.float64)

    def missed_fraction(self) -> np.ndarray:
        """(K,) fraction of each class's samples misclassified; NaN for absent classes."""
        return 1.0 - self.per_class_accuracy()

    def topk_accuracy(self, k: int) -> float:
        """Fraction of samples whose label is among the k most probable classes (ties broken
        towards the lower class index, as argmax does, so top-1 equals `accuracy`)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not self.n:
            return 0.0
        top = np.argsort(-self.probs, axis=1, kind="stable")[:, :k]
        return float((top == self.labels[:, None]).any(1).mean())

    def misclassified(self, limit: int | None = None) -> Mistakes:
        """Wrong predictions, most confident first (ties: lower dataset index first)."""
        preds = self.preds
        wrong = np.flatnonzero(preds != self.labels)
        conf = self.confidence[wrong]
        order = wrong[np.lexsort((self.indices[wrong], -conf))][:limit]
        return Mistakes(self.indices[order], self.labels[order], preds[order],
                        self.confidence[order])

    def to_dict(self) -> dict:
        """JSON-ready summary (NaN for a class without samples becomes null)."""
        acc, missed = self.per_class_accuracy(), self.missed_fraction()
        num = lambda v: None if np.isnan(v) else float(v)  # noqa: E731
        return {
            "accuracy": self.accuracy, "loss": self.loss, "n": self.n,
            "top5": self.topk_accuracy(5),
            "per_class": {name: {"accuracy": num(acc[i]), "missed_fraction": num(missed[i]),
                                 "n": int(c)}
                          for i, (name, c) in enumerate(zip(self.classes, self.class_counts()))},
            "confusion": self.confusion().tolist(),
        }


def n_views(mode) -> int:
    """How many views per image a test in TTA `mode` evaluates."""
    return len(tta_views(torch.zeros(1, 1, 4, 4), tta_mode(mode)))


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of a batch (B, C, H, W) whose predictions `mode` averages (c40.config.TTA_MODES):
    off: the batch; flip: it and its left-right mirror; flip-shift: those two, each also moved
    1 px up-left and 1 px down-right with reflected borders (airbench's translate views)."""
    views = [x] if mode == "off" else [x, x.flip(3)]
    if mode == "flip-shift":
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        h, w = x.shape[2:]
        for v in views[:2]:
            padded = F.pad(v, (1, 1, 1, 1), mode="reflect")
            views += [padded[:, :, s:s + h, s:s + w].contiguous(memory_format=fmt) for s in (0, 2)]
    return views


@torch.no_grad()
def evaluate(model: nn.Module, loader, classes, *, amp_dtype: torch.dtype | None = None,
             tta: str | bool = "off") -> Evaluation:
    """Run `model` (switched to eval mode, restored afterwards) over an unshuffled loader.

    tta: a c40.config.TTA_MODES mode (True/False: flip/off); the softmax is averaged over the
    views `tta_views` makes.
    """
    mode = tta_mode(tta)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probs, losses, labels = [], [], []
    try:
        for x, y in loader:
            with autocast(device, amp_dtype):
                logits = torch.stack([model(v).float() for v in tta_views(x, mode)])
            p = logits.softmax(-1).mean(0)
            probs.append(p)
            losses.append(F.nll_loss(p.clamp_min(1e-12).log(), y, reduction="none"))
            labels.append(y)
    finally:
        model.train(was_training)
    probs_np = torch.cat(probs).cpu().numpy() if probs else np.zeros((0, len(classes)), np.float32)
    labels_np = torch.cat(labels).cpu().numpy() if labels else np.zeros(0, np.int64)
    losses_np = torch.cat(losses).cpu().numpy() if losses else np.zeros(0, np.float32)
    idx = np.arange(len(labels_np))  # an unshuffled loader: row i is dataset index i
    return Evaluation(idx, labels_np, probs_np.astype(np.float32), losses_np.astype(np.float32),
                      tuple(classes))
