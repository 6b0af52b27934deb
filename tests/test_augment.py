"""c40.augment: the albumentations pipeline and the batch tensor ops, on real CIFAR-10 images.

The distribution tests draw thousands of samples from both paths with fixed seeds (so they are
deterministic) and compare them with each other and with the ranges in SPEC item 8; a wrong range,
probability or hole size in either path fails them.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from c40.augment import affine_params, create_albumentations, mean_fill, normalize, normalize_
from c40.data import channel_stats, load_cifar10
from reference_augment import batch_affine, batch_augment, batch_cutout, batch_flip

stats = pytest.importorskip("scipy.stats")

# SPEC item 8 / the reference ShiftScaleRotate, written out so a changed constant in augment.py fails
SHIFT, SCALE, ROTATE, HOLE = 0.1, 0.1, 15.0, 16  # fraction of size, relative, degrees, pixels
N_DRAWS = 4000  # samples per distribution: rates are then known to +-0.008 (1 sigma)


@pytest.fixture(scope="module")
def real(cifar_dir):
    """64 real test images (uint8 NHWC) and the dataset-mean colour of the first 1000."""
    ds = load_cifar10(cifar_dir, "test")
    mean, std = channel_stats(ds.images[:1000])
    return ds.images[:64], mean, std


def _only(name: str, mean, std, p: float = 1.0):
    """The project's Compose with every transform but `name` switched off."""
    c = create_albumentations(mean, std, p=p, normalize=False)
    for t in c.transforms:
        t.p = p if type(t).__name__ == name else 0.0
    c.set_random_state(np.random.default_rng(0), random.Random(0))
    return c


def _holes(out: np.ndarray, img: np.ndarray, fill) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of HOLE x HOLE windows that are all `fill` with the rest untouched."""
    fill = np.asarray(fill, dtype=out.dtype)
    found = []
    for y in range(out.shape[0] - HOLE + 1):
        for x in range(out.shape[1] - HOLE + 1):
            inside = np.zeros(out.shape[:2], bool)
            inside[y:y + HOLE, x:x + HOLE] = True
            if (out[inside] == fill).all() and (out[~inside] == img[~inside]).all():
                found.append((y, x))
    return found


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float()  # (B, 3, 32, 32) pixel values


# ------------------------------------------------------------------------------ cutout
def test_albumentations_cutout_is_one_hole_of_the_mean_colour(real):
    images, mean, std = real
    c = _only("CoarseDropout", mean, std)
    for img in images[:16]:
        out = c(image=img)["image"]
        changed = (out != img).any(-1)
        colour = out[changed][0]
        assert np.abs(colour - 255 * np.asarray(mean)).max() < 1.0  # the mean colour, as uint8
        assert len(_holes(out, img, colour)) == 1


def test_albumentations_cutout_fill_is_the_rounded_mean(real):
    images, mean, std = real
    out = _only("CoarseDropout", mean, std)(image=images[0])["image"]
    (y, x), = _holes(out, images[0], out[(out != images[0]).any(-1)][0])
    assert out[y, x].tolist() == [round(255 * m) for m in mean]


def test_batch_cutout_is_one_hole_of_the_mean_colour(real):
    images, mean, _ = real
    fill = torch.tensor(mean_fill(mean))
    gen = torch.Generator().manual_seed(0)
    out = batch_cutout(_nchw(images[:16]), gen, fill, p=1.0)
    for o, img in zip(out.permute(0, 2, 3, 1).numpy(), images[:16].astype(np.float32)):
        assert len(_holes(o, img, fill.numpy())) == 1
        colour = o[(o != img).any(-1)][0]
        assert np.round(colour).tolist() == [round(255 * m) for m in mean]


# ------------------------------------------------------------------------- flip, affine
def test_flips_flip(real):
    images, mean, std = real
    c = _only("HorizontalFlip", mean, std)
    for img in images[:8]:
        np.testing.assert_array_equal(c(image=img)["image"], img[:, ::-1])
    x = _nchw(images)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(batch_flip(x, gen, p=1.0), x.flip(3))
    assert torch.equal(batch_flip(x, gen, p=0.0), x)


def test_affine_with_p0_is_identity(real):
    images, mean, std = real
    c = _only("Affine", mean, std, p=0.0)
    for img in images[:8]:
        np.testing.assert_array_equal(c(image=img)["image"], img)
    x = _nchw(images)
    assert torch.equal(batch_affine(x, torch.Generator().manual_seed(0), p=0.0), x)


def test_affine_with_p1_changes_every_image(real):
    images, mean, std = real
    out = batch_affine(_nchw(images), torch.Generator().manual_seed(0), p=1.0)
    assert ((out - _nchw(images)).abs().flatten(1).amax(1) > 0).all()


@pytest.mark.parametrize("p, flip_p", [(0.5, None), (1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.3, 0.7)])
def test_batch_augment_is_flip_then_affine_then_cutout(real, p, flip_p):
    """The fused pipeline (rows regrouped by transform, flip folded into the affine grid, in-place
    writes) draws the same numbers in the same order as the three public steps, so each of its
    rows must equal the steps' output for that image: the distribution tests below then hold for
    what the loader really runs."""
    images, mean, _ = real
    x = _nchw(images[np.arange(256) % len(images)])  # float pixel values
    fill = torch.tensor(mean_fill(mean))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    steps = batch_cutout(batch_affine(batch_flip(x, g1, p if flip_p is None else flip_p), g1, p),
                         g1, fill, p)
    before = x.clone()
    fused, order = batch_augment(x.to(torch.uint8).contiguous(memory_format=torch.channels_last),
                                 g2, fill, p, flip_p)
    assert sorted(order.tolist()) == list(range(256))  # a permutation of the batch
    assert fused.dtype == torch.float32
    assert torch.equal(x, before)  # the input is not written
    assert (fused - steps[order]).abs().max() < 1e-2  # pixel values: bilinear rounding only
    changed = (fused != x[order]).flatten(1).any(1).float().mean()
    assert changed > 0.5 if p > 0 else changed == 1.0  # p = 0: only the flips (flip_p = 1)


def test_affine_grid_matches_torch(real):
    """`_sample` builds affine_grid's grid itself (faster on CPU); it must be the same grid."""
    import torch.nn.functional as F
    from c40.augment import _sample

    x = _nchw(real[0][:16])
    theta = torch.tensor([[0.9, 0.2, 0.1], [-0.2, 0.9, -0.05]]).repeat(16, 1, 1)
    want = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False),
                         mode="bilinear", padding_mode="reflection", align_corners=False)
    assert (_sample(x, theta) - want).abs().max() < 1e-3


def test_normalize_in_place_matches_the_definition():
    x = torch.arange(256.0).view(1, 1, 16, 16).repeat(2, 3, 1, 1)
    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])
    want = (x / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    y = normalize(x, mean, std)
    assert torch.allclose(y, want, atol=1e-5) and torch.equal(x[0, 0, 0], torch.arange(16.0))
    assert normalize_(x, mean, std) is x and torch.equal(x, y)


# ------------------------------------------------------- distribution equivalence
@pytest.fixture(scope="module")
def albu_draws(real):
    """What the real pipeline (p=0.5) did to N_DRAWS images, read from its applied params."""
    import albumentations as A

    images, mean, _ = real
    base = create_albumentations(mean, (0.25,) * 3, p=0.5, normalize=False)
    c = A.Compose(base.transforms, save_applied_params=True)
    c.set_random_state(np.random.default_rng(1), random.Random(1))
    d = {"flip": [], "affine": [], "cutout": [], "rotate": [], "scale": [], "shift": [],
         "holes": [], "fill": []}
    centre = np.array([31 / 2, 31 / 2])  # albumentations rotates about ((w-1)/2, (h-1)/2)
    for i in range(N_DRAWS):
        fired = dict(c(image=images[i % len(images)])["applied_transforms"])
        d["flip"].append("HorizontalFlip" in fired)
        d["affine"].append("Affine" in fired)
        d["cutout"].append("CoarseDropout" in fired)
        if "Affine" in fired:
            a = fired["Affine"]
            assert a["scale"]["x"] == a["scale"]["y"]  # keep_ratio: one scale for both axes
            m = a["matrix"]
            d["rotate"].append(a["rotate"])
            d["scale"].append(a["scale"]["x"])
            d["shift"].extend(m[:2, 2] - centre + m[:2, :2] @ centre)  # pixels, x then y
        if "CoarseDropout" in fired:
            d["holes"].extend(fired["CoarseDropout"]["holes"].tolist())  # (x0, y0, x1, y1)
            d["fill"].append(fired["CoarseDropout"]["fill"])
    return {k: np.asarray(v) for k, v in d.items()}


@pytest.fixture(scope="module")
def tensor_draws(real):
    """The same quantities from the batch tensor path (p=0.5)."""
    images, mean, _ = real
    gen = torch.Generator().manual_seed(1)
    x = _nchw(images[np.arange(N_DRAWS) % len(images)])
    flipped = batch_flip(x, gen, 0.5)
    affined = batch_affine(x, gen, 0.5)
    zeros = torch.zeros(N_DRAWS, 1, 32, 32)
    cut = batch_cutout(zeros, gen, torch.ones(1), 0.5)[:, 0] > 0  # (N, 32, 32) hole mask
    prm = affine_params(N_DRAWS, gen, "cpu")
    hit = cut.any(2).any(1)
    rows, cols = cut[hit].any(2).float(), cut[hit].any(1).float()  # (n, 32) each
    return {"flip": (flipped != x).flatten(1).any(1).numpy(),
            "affine": (affined != x).flatten(1).any(1).numpy(),
            "cutout": hit.numpy(),
            "rotate": prm["angle"].numpy(), "scale": prm["scale"].numpy(),
            "shift": torch.cat([prm["tx"], prm["ty"]]).numpy() * 32,  # pixels
            "hole_h": rows.sum(1).numpy(), "hole_w": cols.sum(1).numpy(),
            "y0": rows.argmax(1).numpy(), "x0": cols.argmax(1).numpy()}


@pytest.mark.parametrize("what", ["flip", "affine", "cutout"])
def test_each_augmentation_fires_half_the_time_on_both_paths(albu_draws, tensor_draws, what):
    tol = 4 * np.sqrt(0.25 / N_DRAWS)  # 4 sigma of a Bernoulli(0.5) rate
    assert abs(albu_draws[what].mean() - 0.5) < tol
    assert abs(tensor_draws[what].mean() - 0.5) < tol


def test_albumentations_augmentations_fire_independently(albu_draws):
    """Catches shared seeding bugs (e.g. every transform seeded alike fires together)."""
    for a, b in (("flip", "affine"), ("flip", "cutout"), ("affine", "cutout")):
        both = (albu_draws[a] & albu_draws[b]).mean()
        assert abs(both - 0.25) < 4 * np.sqrt(0.25 * 0.75 / N_DRAWS), (a, b)


def test_hole_size_fill_and_position_match(albu_draws, tensor_draws, real):
    _, mean, _ = real
    holes = albu_draws["holes"]
    assert (holes[:, 2] - holes[:, 0] == HOLE).all() and (holes[:, 3] - holes[:, 1] == HOLE).all()
    assert (tensor_draws["hole_h"] == HOLE).all() and (tensor_draws["hole_w"] == HOLE).all()
    np.testing.assert_allclose(albu_draws["fill"], np.tile(mean_fill(mean), (len(holes), 1)))
    assert mean_fill(mean) == tuple(float(round(255 * m)) for m in mean)  # whole pixel values
    last = 32 - HOLE  # top-left corner uniform on 0..16 so the hole lies inside the image
    for pos in (holes[:, 0], holes[:, 1], tensor_draws["x0"], tensor_draws["y0"]):
        counts = np.bincount(pos.astype(int), minlength=last + 1)
        assert pos.min() == 0 and pos.max() == last and len(counts) == last + 1
        assert stats.chisquare(counts).pvalue > 1e-3  # uniform over the 17 positions
    assert stats.ks_2samp(holes[:, 0], tensor_draws["x0"]).pvalue > 1e-3
    assert stats.ks_2samp(holes[:, 1], tensor_draws["y0"]).pvalue > 1e-3


@pytest.mark.parametrize("what, lo, hi", [("rotate", -ROTATE, ROTATE),
                                          ("scale", 1 - SCALE, 1 + SCALE)])
def test_rotation_and_scale_are_the_same_uniform(albu_draws, tensor_draws, what, lo, hi):
    width = hi - lo
    for x in (albu_draws[what], tensor_draws[what]):
        assert lo <= x.min() < lo + 0.01 * width and hi - 0.01 * width < x.max() <= hi
        assert abs(x.mean() - (lo + hi) / 2) < 0.05 * width
        assert abs(x.std() - width / np.sqrt(12)) < 0.05 * width / np.sqrt(12)
        assert stats.kstest(x, stats.uniform(lo, width).cdf).pvalue > 1e-3
    assert stats.ks_2samp(albu_draws[what], tensor_draws[what]).pvalue > 1e-3


def test_shift_ranges_match(albu_draws, tensor_draws):
    """Albumentations draws U(-0.1, 0.1) x size and truncates it to whole pixels
    (`int(t * width)`); `affine_params` draws the fraction and `batch_affine` truncates it the
    same way, so truncated tensor draws must give the albumentations pixel distribution."""
    px = SHIFT * 32
    albu, tens = albu_draws["shift"], tensor_draws["shift"]
    assert np.allclose(albu, np.round(albu), atol=1e-6)  # whole pixels
    assert np.abs(albu).max() <= px and np.abs(tens).max() <= px
    assert np.abs(tens).max() > 0.99 * px and abs(tens.mean()) < 0.05 * px
    assert abs(tens.std() - 2 * px / np.sqrt(12)) < 0.05 * px
    levels = np.arange(-int(px), int(px) + 1)
    a = np.array([(np.round(albu) == v).mean() for v in levels])
    t = np.array([(np.trunc(tens) == v).mean() for v in levels])
    np.testing.assert_allclose(a, t, atol=0.02)  # per-pixel-level frequencies
