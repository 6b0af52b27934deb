"""The training augmentations, twice: an albumentations pipeline (per image, CPU) and the same
distributions as batch tensor functions (any device). SPEC item 8: HorizontalFlip,
ShiftScaleRotate (as its albumentations-2.x equivalent `Affine`), and CoarseDropout with one
16x16 hole filled with the dataset-mean colour.

Distributions shared by both paths (each transform fires with probability `p`):
  flip:    left-right mirror
  affine:  shift U(-SHIFT, SHIFT) x image size per axis, truncated to whole pixels, scale U(1-SCALE, 1+SCALE) (same on both
           axes), rotation U(-ROTATE, ROTATE) degrees about the centre, reflected borders
  cutout:  one HOLE x HOLE square, top-left corner uniform so the hole lies inside the image,
           filled with the dataset-mean colour (pixel values)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

SHIFT = 0.1     # fraction of the image size
SCALE = 0.1     # relative
ROTATE = 15.0   # degrees
HOLE = 16       # pixels


def mean_fill(mean: Sequence[float]) -> tuple[float, ...]:
    """The cutout colour: the dataset mean in whole pixel values (what a uint8 image can hold)."""
    return tuple(float(round(255.0 * m)) for m in mean)


def create_albumentations(mean: Sequence[float], std: Sequence[float], p: float = 0.5,
                          normalize: bool = True, flip_p: float | None = None):
    """The per-image pipeline; `mean`/`std` are per-channel in [0, 1] units (from the train set)."""
    import albumentations as A
    import cv2

    steps = [
        A.HorizontalFlip(p=p if flip_p is None else flip_p),
        A.Affine(translate_percent=(-SHIFT, SHIFT), scale=(1 - SCALE, 1 + SCALE),
                 rotate=(-ROTATE, ROTATE), keep_ratio=True, border_mode=cv2.BORDER_REFLECT,
                 interpolation=cv2.INTER_LINEAR, p=p),
        A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(HOLE, HOLE),
                        hole_width_range=(HOLE, HOLE), fill=mean_fill(mean), p=p),
    ]
    if normalize:
        steps.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0))
    return A.Compose(steps)


# ----------------------------------------------------------------------- batch tensor path
def _select(n: int, p: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) < p  # (B,) bool


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def batch_flip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image of (B, C, H, W) left-right with probability p."""
    sel = _select(x.shape[0], p, gen, x.device).view(-1, 1, 1, 1)
    return torch.where(sel, x.flip(3), x)


def affine_params(n: int, gen: torch.Generator, device) -> dict[str, torch.Tensor]:
    """Per-image shift (fraction of size), scale and rotation (degrees), as albumentations draws them."""
    return {"tx": _uniform(n, -SHIFT, SHIFT, gen, device), "ty": _uniform(n, -SHIFT, SHIFT, gen, device),
            "scale": _uniform(n, 1 - SCALE, 1 + SCALE, gen, device),
            "angle": _uniform(n, -ROTATE, ROTATE, gen, device)}


def batch_affine(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Shift-scale-rotate each float image of (B, C, H, W) with probability p (reflected borders)."""
    sel = _select(x.shape[0], p, gen, x.device)
    prm = affine_params(x.shape[0], gen, x.device)  # drawn for all so the stream is stable
    idx = sel.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    a = prm["angle"][idx] * (math.pi / 180)
    s = prm["scale"][idx]
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    # theta maps output -> input coords (normalised to [-1, 1]): the inverse of p' = sR p + t
    h, w = x.shape[2:]
    # albumentations truncates the shift to whole pixels; so do we (then to [-1, 1] units)
    t = torch.stack([torch.trunc(prm["tx"][idx] * w) * (2 / w),
                     torch.trunc(prm["ty"][idx] * h) * (2 / h)], 1)
    rot_inv = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # (n, 2, 2)
    theta = torch.cat([rot_inv, -(rot_inv @ t.unsqueeze(2))], 2).to(x.dtype)  # (n, 2, 3)
    sub = x.index_select(0, idx)
    grid = F.affine_grid(theta, list(sub.shape), align_corners=False)
    out = x.clone()
    out[idx] = F.grid_sample(sub, grid, mode="bilinear", padding_mode="reflection",
                             align_corners=False)
    return out


def batch_cutout(x: torch.Tensor, gen: torch.Generator, fill: torch.Tensor, p: float = 0.5,
                 size: int = HOLE) -> torch.Tensor:
    """One size x size hole per image (with probability p) filled with `fill` (C,) pixel values."""
    b, _, h, w = x.shape
    sel = _select(b, p, gen, x.device)
    y0 = torch.randint(0, h - size + 1, (b,), generator=gen, device=x.device)
    x0 = torch.randint(0, w - size + 1, (b,), generator=gen, device=x.device)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_r = (rows >= y0[:, None]) & (rows < y0[:, None] + size)   # (B, H)
    in_c = (cols >= x0[:, None]) & (cols < x0[:, None] + size)   # (B, W)
    hole = (in_r[:, :, None] & in_c[:, None, :] & sel[:, None, None]).unsqueeze(1)  # (B, 1, H, W)
    return torch.where(hole, fill.to(x.dtype).view(1, -1, 1, 1), x)


def batch_augment(x: torch.Tensor, gen: torch.Generator, fill: torch.Tensor,
                  p: float = 0.5, flip_p: float | None = None) -> torch.Tensor:
    """uint8 or float (B, C, H, W) in pixel values -> augmented float32 (B, C, H, W), pixel values.

    `p` is the probability of the affine and the cutout; the flip's is `flip_p` (default: p)."""
    x = x.float()
    x = batch_flip(x, gen, p if flip_p is None else flip_p)
    x = batch_affine(x, gen, p)
    return batch_cutout(x, gen, fill, p)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Pixel values (B, C, H, W) -> (x / 255 - mean) / std with (C,) mean/std in [0, 1] units."""
    return (x.float() * (1 / 255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
