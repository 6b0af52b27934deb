"""The batch augmentations written plainly, one transform at a time: the specification that
`c40.augment.plan_augment` + `apply_augment_` (the fused, regrouped path the loaders run) are
tested against, draw for draw, and that the albumentations pipeline is tested against in
distribution."""
from __future__ import annotations

import torch

from c40.augment import (HOLE, _hole_draws, _inverse_theta, _sample, _select, affine_params,
                         apply_augment_, plan_augment)


def batch_flip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image of (B, C, H, W) left-right with probability p."""
    sel = _select(x.shape[0], p, gen, x.device).view(-1, 1, 1, 1)
    return torch.where(sel, x.flip(3), x)


def batch_affine(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Shift-scale-rotate each float image of (B, C, H, W) with probability p (reflected borders)."""
    sel = _select(x.shape[0], p, gen, x.device)
    prm = affine_params(x.shape[0], gen, x.device)  # drawn for all so the stream is stable
    idx = sel.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    out = x.clone()
    out[idx] = _sample(x.index_select(0, idx), _inverse_theta(prm, idx, *x.shape[2:]))
    return out


def _hole_mask(sel: torch.Tensor, y0: torch.Tensor, x0: torch.Tensor, h: int, w: int,
               size: int) -> torch.Tensor:
    """(B, H, W) bool: the size x size hole of each selected image."""
    rows = torch.arange(h, device=sel.device)
    cols = torch.arange(w, device=sel.device)
    in_r = (rows >= y0[:, None]) & (rows < y0[:, None] + size) & sel[:, None]  # (B, H)
    in_c = (cols >= x0[:, None]) & (cols < x0[:, None] + size)                 # (B, W)
    return in_r[:, :, None] & in_c[:, None, :]


def batch_cutout(x: torch.Tensor, gen: torch.Generator, fill: torch.Tensor, p: float = 0.5,
                 size: int = HOLE) -> torch.Tensor:
    """One size x size hole per image (with probability p) filled with `fill` (C,) pixel values."""
    b, _, h, w = x.shape
    hole = _hole_mask(*_hole_draws(b, h, w, gen, x.device, p, size), h, w, size).unsqueeze(1)
    return torch.where(hole, fill.to(x.dtype).view(1, -1, 1, 1), x)


def batch_augment(x: torch.Tensor, gen: torch.Generator, fill: torch.Tensor,
                  p: float = 0.5, flip_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 or float (B, C, H, W) in pixel values -> (augmented float32 batch, order): row k of
    the result is input image order[k], augmented with the draws `batch_cutout(batch_affine(
    batch_flip(x)))` would have given it (a test holds the two equal). x is not written.

    `p` is the probability of the affine and the cutout; the flip's is `flip_p` (default: p)."""
    b, _, h, w = x.shape
    plan = plan_augment(b, h, w, gen, x.device, p, flip_p)
    return apply_augment_(x.index_select(0, plan.order).float(), plan, fill), plan.order
