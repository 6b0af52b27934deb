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
  jpeg:    (off unless asked: probability `jpeg_p`, before the others) the image JPEG-compressed
           at a quality drawn uniformly from JPEG_QUALITY, as a photo tool saves it (`jpeg`)
  noise:   (off unless asked: probability `noise_p`, after jpeg, before the others) Gaussian noise
           per pixel and channel, its std drawn uniformly from NOISE_STD x 255, clipped to pixel
           values (albumentations' GaussNoise), as a camera sensor adds it
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

SHIFT = 0.1     # fraction of the image size
SCALE = 0.1     # relative
ROTATE = 15.0   # degrees
HOLE = 16       # pixels
JPEG_QUALITY = (30, 95)  # training JPEG quality range, inclusive
NOISE_STD = (0.0, 0.08)  # training Gaussian noise std range, fraction of 255


def mean_fill(mean: Sequence[float]) -> tuple[float, ...]:
    """The cutout colour: the dataset mean in whole pixel values (what a uint8 image can hold)."""
    return tuple(float(round(255.0 * m)) for m in mean)


def _swap_rb(img: np.ndarray, **_) -> np.ndarray:
    return np.ascontiguousarray(img[..., ::-1])


def albumentations_jpeg(quality: tuple[int, int], p: float = 1.0):
    """JPEG compression at a quality drawn from `quality` (inclusive), as an albumentations
    transform that treats the image as RGB. `A.ImageCompression` hands the RGB array to
    cv2.imencode, which reads it as BGR: luma and chroma come from swapped red and blue, which
    no photo tool does (mean |difference| 3.2 grey levels at quality 75 on CIFAR-10). Swapping
    around it gives bit for bit what PIL's save/open and `jpeg` give."""
    import albumentations as A

    return A.Sequential([A.Lambda(image=_swap_rb), A.ImageCompression(quality_range=quality, p=1.0),
                         A.Lambda(image=_swap_rb)], p=p)


def jpeg(images: np.ndarray, quality: Sequence[int]) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB images, each JPEG-compressed at its quality and decoded (libjpeg
    through OpenCV, RGB as RGB: bit for bit `albumentations_jpeg` and PIL's save/open)."""
    import cv2

    out = np.empty_like(images)
    for k, (img, q) in enumerate(zip(images, quality)):
        _, data = cv2.imencode(".jpg", img[..., ::-1], (cv2.IMWRITE_JPEG_QUALITY, int(q)))
        out[k] = cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]
    return out


def create_albumentations(mean: Sequence[float], std: Sequence[float], p: float = 0.5,
                          normalize: bool = True, flip_p: float | None = None, jpeg_p: float = 0.0,
                          noise_p: float = 0.0):
    """The per-image pipeline; `mean`/`std` are per-channel in [0, 1] units (from the train set)."""
    import albumentations as A
    import cv2

    steps = [albumentations_jpeg(JPEG_QUALITY, jpeg_p)] if jpeg_p > 0 else []
    steps += [A.GaussNoise(std_range=NOISE_STD, p=noise_p)] if noise_p > 0 else []
    steps += [
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
# (tests/reference_augment.py holds the same draws written as three plain batch functions,
# batch_flip -> batch_affine -> batch_cutout: the specification the fused path is tested against)
def _select(n: int, p: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) < p  # (B,) bool


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def affine_params(n: int, gen: torch.Generator, device) -> dict[str, torch.Tensor]:
    """Per-image shift (fraction of size), scale and rotation (degrees), as albumentations draws them."""
    return {"tx": _uniform(n, -SHIFT, SHIFT, gen, device), "ty": _uniform(n, -SHIFT, SHIFT, gen, device),
            "scale": _uniform(n, 1 - SCALE, 1 + SCALE, gen, device),
            "angle": _uniform(n, -ROTATE, ROTATE, gen, device)}


def _inverse_theta(prm: dict[str, torch.Tensor], idx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(n, 2, 3) affine_grid matrices of images `idx`: output -> input coordinates in [-1, 1] units,
    the inverse of p' = sR p + t."""
    a = prm["angle"][idx] * (math.pi / 180)
    s = prm["scale"][idx]
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    # albumentations truncates the shift to whole pixels; so do we (then to [-1, 1] units)
    t = torch.stack([torch.trunc(prm["tx"][idx] * w) * (2 / w),
                     torch.trunc(prm["ty"][idx] * h) * (2 / h)], 1)
    rot_inv = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # (n, 2, 2)
    return torch.cat([rot_inv, -(rot_inv @ t.unsqueeze(2))], 2)


def _sample(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Bilinear, reflected-border resampling of (n, C, H, W) at the (n, 2, 3) `theta` grid.

    The grid is `F.affine_grid(theta, align_corners=False)` written as broadcast multiply-adds:
    affine_grid's batched matmul of 3x2 matrices measured 2 ms of a 13 ms CPU batch."""
    n, _, h, w = x.shape
    theta = theta.to(x.dtype)
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) * 2 + 1) / w - 1   # pixel centres
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) * 2 + 1) / h - 1
    t = theta.reshape(n, 6, 1, 1)
    gx = t[:, 0] * xs + t[:, 1] * ys[:, None] + t[:, 2]                     # (n, H, W)
    gy = t[:, 3] * xs + t[:, 4] * ys[:, None] + t[:, 5]
    return F.grid_sample(x, torch.stack([gx, gy], 3), mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def _hole_draws(b: int, h: int, w: int, gen: torch.Generator, device, p: float,
                size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: whether it gets a hole (prob. p) and the hole's top-left corner (uniform)."""
    sel = _select(b, p, gen, device)
    y0 = torch.randint(0, h - size + 1, (b,), generator=gen, device=device)
    x0 = torch.randint(0, w - size + 1, (b,), generator=gen, device=device)
    return sel, y0, x0


@dataclass
class AugmentPlan:
    """One batch's draws, arranged so the work runs on contiguous rows: the output row k holds
    input image `order[k]`; rows [0, n_affine) are shifted/rotated (their flip folded into
    `theta`), rows [n_affine, n_affine + n_flip) are only flipped; `holes` = (rows, y0, x0) of the
    output rows that get a cutout and their holes' top-left corners. The counts are host ints,
    the tensors live on the training device."""
    order: torch.Tensor
    n_affine: int
    n_flip: int
    theta: torch.Tensor
    holes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    # host arrays: the output rows to JPEG-compress before everything else, the batch positions
    # of their input images, and their qualities (empty unless jpeg_p > 0)
    jpeg: tuple[np.ndarray, np.ndarray, np.ndarray] = (np.empty(0, np.int64),) * 3
    # the output rows that get Gaussian noise (after JPEG) and their (n, H, W, 3) noise in pixel
    # values, on the device (None unless noise_p > 0)
    noise: tuple[torch.Tensor, torch.Tensor] | None = None


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor to `device` without stalling it: pinned, then an asynchronous copy."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def plan_augment(b: int, h: int, w: int, gen: torch.Generator, device, p: float = 0.5,
                 flip_p: float | None = None, jpeg_p: float = 0.0,
                 noise_p: float = 0.0) -> AugmentPlan:
    """The draws of `batch_cutout(batch_affine(batch_flip(x)))` (same numbers, same order) for a
    batch of b images of h x w, drawn on the host from the CPU generator `gen`; then, if
    jpeg_p > 0, which images are JPEG-compressed first and at what quality, and if noise_p > 0,
    which get Gaussian noise and the noise (each drawn after the others, so jpeg_p = 0 and
    noise_p = 0 leave every other draw as it was).

    Everything whose size depends on the draws (how many rows each transform gets, which rows
    get a hole) is computed here, on the host, so the device never has to report a count back:
    no host sync per batch on CUDA. The plan's tensors then go to `device` asynchronously."""
    if gen.device.type != "cpu":
        raise ValueError("plan_augment draws on the host: pass a CPU torch.Generator")
    cpu, device = torch.device("cpu"), torch.device(device)
    flip = _select(b, p if flip_p is None else flip_p, gen, cpu)
    aff = _select(b, p, gen, cpu)
    prm = affine_params(b, gen, cpu)
    cut, y0, x0 = _hole_draws(b, h, w, gen, cpu, p, HOLE)
    f, a = flip.numpy(), aff.numpy()
    group = 2 - 2 * a.astype(np.int64) - (f & ~a)                  # 0 affine, 1 flip only, 2 rest
    order = np.argsort(group, kind="stable")
    n_affine, n_flip = int((group == 0).sum()), int((group == 1).sum())
    first = torch.from_numpy(order[:n_affine])
    theta = _inverse_theta(prm, first, h, w)
    theta[:, 0] *= 1 - 2 * flip[first].to(theta.dtype)[:, None]  # mirrored input: negate x_in
    rows = np.flatnonzero(cut.numpy()[order])                      # output rows with a hole
    src = torch.from_numpy(order[rows])
    holes = tuple(to_device(t, device) for t in (torch.from_numpy(rows), y0[src], x0[src]))
    plan = AugmentPlan(to_device(torch.from_numpy(order), device), n_affine, n_flip,
                       to_device(theta, device), holes)
    if jpeg_p > 0:
        sel = _select(b, jpeg_p, gen, cpu).numpy()
        quality = torch.randint(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1, (b,), generator=gen).numpy()
        jrows = np.flatnonzero(sel[order])
        plan.jpeg = (jrows, order[jrows], quality[order[jrows]])
    if noise_p > 0:
        sel = _select(b, noise_p, gen, cpu).numpy()
        std = _uniform(b, NOISE_STD[0] * 255, NOISE_STD[1] * 255, gen, cpu)
        nrows = np.flatnonzero(sel[order])
        field = torch.randn((len(nrows), h, w, 3), generator=gen)
        field *= std[torch.from_numpy(order[nrows])].view(-1, 1, 1, 1)
        plan.noise = (to_device(torch.from_numpy(nrows), device), to_device(field, device))
    return plan


def add_noise_(x: torch.Tensor, plan: AugmentPlan) -> torch.Tensor:
    """Add the plan's Gaussian noise to float (B, H, W, 3) pixel values gathered in `plan.order`,
    clipped to [0, 255] as albumentations' GaussNoise clips uint8 images; in place. Returns x."""
    if plan.noise is not None:
        rows, field = plan.noise
        x.index_add_(0, rows, field.to(x.dtype)).clamp_(0, 255)
    return x


def apply_augment_(x: torch.Tensor, plan: AugmentPlan, fill: torch.Tensor) -> torch.Tensor:
    """Augment float (B, C, H, W) rows already gathered in `plan.order`, in place; `fill` (C,) in
    x's units (pixel values, or normalised: every step commutes with a per-channel affine
    normalisation). Fastest on channels_last x. Returns x."""
    b, c, h, w = x.shape
    a, f = plan.n_affine, plan.n_affine + plan.n_flip
    if a:  # grid_sample measured ~25% faster on an NCHW-contiguous input than on channels_last
        x[:a] = _sample(x[:a].contiguous(), plan.theta)
    if f > a:
        x[a:f] = x[a:f].flip(3)
    rows, y0, x0 = plan.holes
    if len(rows):  # write the HOLE x HOLE pixels only (~1/8 of the batch), not a full mask pass
        k = torch.arange(HOLE, device=x.device)
        ys, xs = (y0[:, None] + k)[:, :, None], (x0[:, None] + k)[:, None, :]  # (n, HOLE, 1), (n, 1, HOLE)
        fill = fill.to(x.dtype)
        if x.is_contiguous(memory_format=torch.channels_last):  # one flat index per pixel
            pix = (rows[:, None, None] * h + ys) * w + xs                     # (n, HOLE, HOLE)
            flat = pix.flatten()
            x.permute(0, 2, 3, 1).view(-1, c).index_copy_(0, flat, fill.expand(len(flat), c))
        else:
            x.permute(0, 2, 3, 1)[rows[:, None, None], ys, xs] = fill
    return x


def normalize_constants(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), (C,) float32: normalised = pixel * scale - shift, i.e. (x / 255 - mean) / std.
    The one place these numbers are computed, so every loader normalises bit for bit alike."""
    mean = torch.as_tensor(mean, dtype=torch.float32)
    std = torch.as_tensor(std, dtype=torch.float32)
    return 1 / (255.0 * std), mean / std


def normalize_(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """In place: float pixel values (B, C, H, W) -> (x / 255 - mean) / std, as x * scale - shift
    (`normalize_constants`; two passes); (C,) mean/std in [0, 1] units. Returns x."""
    scale, shift = normalize_constants(mean.cpu(), std.cpu())
    return x.mul_(scale.to(x.device).view(1, -1, 1, 1)).sub_(shift.to(x.device).view(1, -1, 1, 1))


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """`normalize_` into a new float32 tensor (x untouched)."""
    return normalize_(x.to(torch.float32, copy=True), mean, std)
