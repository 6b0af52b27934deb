"""Corrupted copies of a test set, the CIFAR-10-C idea with albumentations: what users' own
photos do to the input (JPEG compression, blur, sensor noise, exposure). Image operations only:
`c40.inference.evaluate_corruptions` evaluates a checkpoint on them.

Each corruption has five severities given by its parameter (JPEG quality, blur sigma in pixels,
noise std as a fraction of 255, brightness shift as a fraction of 255). Noise is drawn from a
seeded generator: the same images and seed give the same corrupted set.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np


class Corruption(NamedTuple):
    param: str                        # what the levels are
    levels: tuple[float, ...]         # severity 1..5, mildest first
    transform: Callable               # level -> albumentations transform (p=1)


def _jpeg(q):
    from c40.augment import albumentations_jpeg
    return albumentations_jpeg((int(q), int(q)))  # RGB as RGB, unlike A.ImageCompression


def _blur(sigma):
    import albumentations as A
    return A.GaussianBlur(blur_limit=0, sigma_limit=(sigma, sigma), p=1.0)  # kernel from sigma


def _noise(std):
    import albumentations as A
    return A.GaussNoise(std_range=(std, std), p=1.0)


def _brightness(shift):
    import albumentations as A
    return A.RandomBrightnessContrast(brightness_limit=(shift, shift), contrast_limit=(0.0, 0.0),
                                      p=1.0)


CORRUPTIONS: dict[str, Corruption] = {
    "jpeg": Corruption("quality", (90, 75, 50, 30, 15), _jpeg),
    "blur": Corruption("sigma", (0.5, 0.75, 1.0, 1.25, 1.5), _blur),
    "noise": Corruption("std", (0.02, 0.04, 0.06, 0.08, 0.10), _noise),
    "brightness": Corruption("shift", (0.1, 0.2, 0.3, 0.4, 0.5), _brightness),
}


def corrupt(images: np.ndarray, name: str, level: float, seed: int = 0) -> np.ndarray:
    """(N, H, W, 3) uint8 -> the same images under corruption `name` at `level`, uint8."""
    import albumentations as A

    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption '{name}' (choose from {', '.join(CORRUPTIONS)})")
    pipeline = A.Compose([CORRUPTIONS[name].transform(level)], seed=seed)
    out = np.empty_like(images)
    for i, img in enumerate(images):
        out[i] = pipeline(image=img)["image"]
    return out
