"""Batch loaders. Both paths yield the same thing, so the train loop cannot tell them apart:
`(images, labels)` with images normalised float32 (B, 3, 32, 32) (channels_last if asked) and
int64 labels (B,), already on the training device.

- `TensorLoader`: the dataset lives on the device, normalised once, as one float32 NHWC tensor;
  augmentation is batch tensor ops (`c40.augment.plan_augment` / `apply_augment_`, the same
  draws as `batch_flip` -> `batch_affine` -> `batch_cutout`) on rows regrouped by transform, so
  an augmented batch's rows come in a shuffled order within the batch. Fastest on CUDA, and on
  CPU too (see benchmarks/).
- `AlbumentationsLoader` (`c40.cpu_loader`): worker processes run the albumentations pipeline
  per image into shared-memory batches.

Sharding for distributed runs follows DistributedSampler: one permutation per epoch from
(seed, epoch), padded to a multiple of `world_size`, and rank r takes every world_size-th index.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from c40.augment import (add_noise_, apply_augment_, jpeg, mean_fill, normalize_constants,
                         plan_augment, to_device)


@dataclass
class LoaderSpec:
    """What every loader needs besides the data."""
    batch_size: int                  # per-rank batch size
    mean: Sequence[float]            # per-channel, [0, 1] units (from the training set)
    std: Sequence[float]
    augment: bool = False            # apply the training augmentations
    p: float = 0.5                   # probability of the affine and of the cutout
    flip_p: float | None = None      # probability of the flip (None: same as p)
    jpeg_p: float = 0.0              # probability of JPEG compression (c40.augment.jpeg)
    noise_p: float = 0.0             # probability of Gaussian noise (c40.augment.NOISE_STD)
    shuffle: bool = False
    drop_last: bool = False
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for p in (self.p, self.jpeg_p, self.noise_p):
            if not 0 <= p <= 1:
                raise ValueError(f"augmentation probability must be in [0, 1], got {p}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world_size}")


def epoch_indices(n: int, spec: LoaderSpec, epoch: int) -> np.ndarray:
    """This rank's sample order for `epoch` (deterministic in seed and epoch)."""
    if spec.shuffle:
        order = np.random.default_rng((spec.seed, epoch)).permutation(n)
    else:
        order = np.arange(n)
    if spec.world_size > 1:
        total = -(-n // spec.world_size) * spec.world_size
        order = np.concatenate([order, order[: total - n]])  # pad like DistributedSampler
        order = order[spec.rank::spec.world_size]
    return order


def num_batches(n_indices: int, spec: LoaderSpec) -> int:
    if spec.drop_last:
        return n_indices // spec.batch_size
    return -(-n_indices // spec.batch_size)


class TensorLoader:
    """The GPU-tensor path (also runs on CPU tensors): augmentation as batch tensor ops.

    The dataset stays uint8 (N, H, W, 3) on the device (150 MB for the 50k training images,
    a quarter of float32: four fractional-GPU trials fit beside each other); a gathered batch is
    normalised as it is converted to float (`normalize_constants`, bit for bit what normalising
    the whole set once gives) and is then already channels_last. The augmentation plan is drawn
    on the host (`plan_augment`), so a batch needs no host sync on CUDA. JPEG compression runs
    on the host (libjpeg) on the few images the plan picks, read from the host copy; their
    results go to the device and replace those rows before anything else."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, spec: LoaderSpec,
                 device: torch.device | str = "cpu"):
        self.spec, self.device = spec, torch.device(device)
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))  # (N, H, W, 3)
        self.host_images, self.images = x.numpy(), to_device(x, self.device)
        self.labels = to_device(torch.from_numpy(np.asarray(labels, dtype=np.int64)), self.device)
        scale, shift = normalize_constants(spec.mean, spec.std)         # (3,) each
        self.scale, self.shift = scale.to(self.device), shift.to(self.device)
        fill = torch.tensor(mean_fill(spec.mean), dtype=torch.float32)  # pixel values
        self.fill = (fill * scale - shift).to(self.device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return num_batches(len(epoch_indices(len(self.labels), self.spec, 0)), self.spec)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        spec = self.spec
        host_order = epoch_indices(len(self.labels), spec, self.epoch)
        order = torch.from_numpy(host_order).to(self.device)
        gen = torch.Generator()  # on the host: the plan's sizes never come back from the device
        gen.manual_seed(spec.seed * 1_000_003 + self.epoch * 7919 + spec.rank)
        _, h, w, _ = self.images.shape
        for i in range(len(self)):
            idx = order[i * spec.batch_size:(i + 1) * spec.batch_size]
            plan = None
            if spec.augment:  # rows regrouped so each transform runs on a contiguous block
                plan = plan_augment(len(idx), h, w, gen, self.device, spec.p, spec.flip_p, spec.jpeg_p,
                                    spec.noise_p)
                idx = idx.index_select(0, plan.order)
            x = self.images.index_select(0, idx)                        # (B, H, W, 3) uint8
            if plan is not None and len(plan.jpeg[0]):
                rows, src, quality = plan.jpeg
                start = i * spec.batch_size
                compressed = jpeg(self.host_images[host_order[start + src]], quality)
                x[to_device(torch.from_numpy(rows), self.device)] = to_device(
                    torch.from_numpy(compressed), self.device)
            x = x.float()
            if plan is not None:
                add_noise_(x, plan)
            x = x.mul_(self.scale).sub_(self.shift).permute(0, 3, 1, 2)  # channels_last
            if plan is not None:
                apply_augment_(x, plan, self.fill)
            if not spec.channels_last:
                x = x.contiguous()
            yield x, self.labels.index_select(0, idx)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def create_loader(kind: str, images: np.ndarray, labels: np.ndarray, spec: LoaderSpec,
                  device: torch.device | str, workers: int = 2):
    """`kind`: tensor (measured faster on CPU and CUDA) | albumentations."""
    if kind == "tensor" or not spec.augment:
        return TensorLoader(images, labels, spec, device)
    if kind == "albumentations":
        from c40.cpu_loader import AlbumentationsLoader
        return AlbumentationsLoader(images, labels, spec, device, workers=workers)
    raise ValueError(f"unknown loader '{kind}'")
