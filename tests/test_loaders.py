"""Both loaders (c40.loaders.TensorLoader, c40.cpu_loader.AlbumentationsLoader): what they yield,
determinism, DistributedSampler-style shards, and that the albumentations loader's processes and
shared memory are gone after every way an epoch can end."""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from c40 import cpu_loader
from c40.augment import JPEG_QUALITY, NOISE_STD, create_albumentations, jpeg, normalize, plan_augment
from c40.cpu_loader import AlbumentationsLoader, WorkerError
from c40.data import channel_stats, load_cifar10
from c40.loaders import LoaderSpec, TensorLoader

N, B = 600, 64  # 600 = 9 full batches of 64 + 24


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Two cores shared with loader workers: intra-op threads would only oversubscribe them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def real(cifar_dir):
    ds = load_cifar10(cifar_dir, "test")
    return ds.images[:N], ds.labels[:N]


@pytest.fixture(scope="module")
def spec(real):
    mean, std = channel_stats(real[0])
    return LoaderSpec(batch_size=B, mean=mean, std=std, augment=True, shuffle=True, seed=3)


LOADERS = {"tensor": lambda im, lb, s: TensorLoader(im, lb, s, "cpu"),
           "albu0": lambda im, lb, s: AlbumentationsLoader(im, lb, s, "cpu", workers=0),
           "albu2": lambda im, lb, s: AlbumentationsLoader(im, lb, s, "cpu", workers=2)}


def _epoch(loader, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def _gone(pids: list[int], shm_names: list[str], wait: float = 5.0) -> None:
    """Assert the processes have exited and the shared-memory segments are unlinked."""
    import psutil

    deadline = time.monotonic() + wait
    while True:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        shm = [n for n in shm_names if os.path.exists(f"/dev/shm/{n}")]
        if not alive and not shm:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still alive: {alive}, still in /dev/shm: {shm}")
        time.sleep(0.1)


def _resources(loader: AlbumentationsLoader) -> tuple[list[int], list[str]]:
    return [p.pid for p in loader._procs], [s.name for s in loader._shms]


# --------------------------------------------------------------------------- what they yield
@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("drop_last, n_batches, last", [(False, 10, 24), (True, 9, B)])
def test_batches_shape_dtype_layout_and_count(real, spec, kind, drop_last, n_batches, last):
    s = replace(spec, drop_last=drop_last)
    with LOADERS[kind](*real, s) as loader:
        batches = _epoch(loader)
        assert len(loader) == n_batches == len(batches)
    for i, (x, y) in enumerate(batches):
        b = last if i == n_batches - 1 else B
        assert x.shape == (b, 3, 32, 32) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.shape == (b,) and y.dtype == torch.int64
    assert not _epoch_same(batches, [(x.flip(3), y) for x, y in batches])  # not trivially empty


def _epoch_same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2)
                                    for (x1, y1), (x2, y2) in zip(a, b))


@pytest.mark.parametrize("kind", LOADERS)
def test_unaugmented_batches_are_normalised(real, spec, kind):
    s = replace(spec, augment=False, shuffle=False, channels_last=False)
    with LOADERS[kind](*real, s) as loader:
        x = torch.cat([b[0] for b in _epoch(loader)])
        y = torch.cat([b[1] for b in _epoch(loader)])
    assert x.is_contiguous()
    assert torch.equal(y, torch.from_numpy(real[1]))
    assert x.mean((0, 2, 3)).abs().max() < 1e-4
    assert (x.std((0, 2, 3)) - 1).abs().max() < 1e-3


def test_both_loaders_normalise_identically(real, spec):
    s = replace(spec, augment=False)
    with TensorLoader(*real, s) as t, AlbumentationsLoader(*real, s, workers=2) as a:
        assert _epoch_same(_epoch(t), _epoch(a))


@pytest.mark.parametrize("kind", ["tensor", "albu0"])
def test_augmented_rows_keep_their_labels(kind):
    """Image i is the constant grey level i and has label i: after every augmentation (p = 1,
    which keeps a constant image constant outside the cutout hole) each row's pixels outside the
    hole must still be its own label's level, whatever order the loader puts the rows in."""
    levels = np.arange(0, 250, 2)
    images = np.repeat(levels.astype(np.uint8), 32 * 32 * 3).reshape(-1, 32, 32, 3)
    s = LoaderSpec(batch_size=50, mean=(0.4,) * 3, std=(0.3,) * 3, augment=True, p=1.0,
                   shuffle=True, seed=1)
    fill = (round(255 * 0.4) / 255 - 0.4) / 0.3  # the mean colour, normalised
    seen = []
    with LOADERS[kind](images, levels, s) as loader:
        for x, y in loader:
            want = ((y.float() / 255 - 0.4) / 0.3).view(-1, 1, 1, 1).expand_as(x)
            off_hole = (x - fill).abs() > 1e-4
            assert torch.allclose(x[off_hole], want[off_hole], atol=1e-4)
            assert (off_hole.flatten(1).float().mean(1) < 0.8).all()  # every image got a hole
            seen.append(y)
    assert sorted(torch.cat(seen).tolist()) == levels.tolist()


@pytest.mark.parametrize("kind", ["tensor", "albu0", pytest.param("tensor-cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_jpeg_augmentation_compresses_each_picked_image_at_a_quality_in_range(real, spec, kind):
    """jpeg_p = 1 and nothing else: every row is its own image JPEG-compressed (exactly, by the
    same libjpeg as `c40 eval --corruptions`) at some quality of JPEG_QUALITY, and the qualities
    vary; jpeg_p = 0.5 compresses about half."""
    images, labels = real[0][:192], np.arange(192)
    s = replace(spec, p=0.0, flip_p=0.0, jpeg_p=1.0, shuffle=False)
    norm = lambda im: normalize(torch.from_numpy(im).permute(0, 3, 1, 2).float(),  # noqa: E731
                                torch.tensor(s.mean), torch.tensor(s.std))
    qualities = range(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)
    make = (lambda im, lb, s: TensorLoader(im, lb, s, "cuda")) if kind == "tensor-cuda" else LOADERS[kind]
    with make(images, labels, s) as loader:
        x, y = (t.cpu() for t in next(iter(loader)))
    found = []
    for row, i in zip(x, y.tolist()):
        match = [q for q in qualities
                 if torch.allclose(row, norm(jpeg(images[i:i + 1], [q]))[0],
                                   atol=1e-5)]
        assert match, f"row of image {i} is no JPEG of it at quality {JPEG_QUALITY}"
        found.append(match[0])
    assert len(set(found)) > 20  # drawn, not fixed
    with make(images, labels, replace(s, jpeg_p=0.5)) as loader:
        x, y = (t.cpu() for t in next(iter(loader)))
    same = [torch.allclose(row, norm(images[i:i + 1])[0], atol=1e-5) for row, i in zip(x, y.tolist())]
    assert 0.3 < 1 - np.mean(same) < 0.7


@pytest.mark.parametrize("kind", ["tensor", "albu0", pytest.param("tensor-cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_noise_augmentation_adds_zero_mean_noise_of_a_drawn_std_in_range(real, spec, kind):
    """noise_p = 1 and nothing else: each row is its own image plus Gaussian noise whose std,
    drawn per image from NOISE_STD x 255, is what the two loaders agree on (their mean std
    ~half the top); the result stays in pixel range. noise_p = 0.5 leaves about half alone."""
    images, labels = real[0][:192], np.arange(192)
    s = replace(spec, p=0.0, flip_p=0.0, noise_p=1.0, shuffle=False)
    mean, std = torch.tensor(s.mean).view(1, 3, 1, 1), torch.tensor(s.std).view(1, 3, 1, 1)
    make = (lambda im, lb, s: TensorLoader(im, lb, s, "cuda")) if kind == "tensor-cuda" else LOADERS[kind]
    with make(images, labels, s) as loader:
        x, y = (t.cpu() for t in next(iter(loader)))
    pix = (x * std + mean) * 255                                   # back to pixel values
    clean = torch.from_numpy(images[y.numpy()]).permute(0, 3, 1, 2).float()
    assert pix.min() > -0.01 and pix.max() < 255.01               # clipped like uint8
    inside = (clean > 60) & (clean < 195)                          # far from clipping
    d = pix - clean
    sd = torch.stack([d[k][inside[k]].std() for k in range(len(d))])
    top = NOISE_STD[1] * 255
    assert sd.max() < top * 1.05 and sd.min() < 0.15 * top and sd.max() > 0.85 * top
    assert abs(sd.mean() - top / 2) < 0.1 * top                   # std ~ U(0, top)
    assert abs(d[inside].mean()) < 0.3
    with make(images, labels, replace(s, noise_p=0.5)) as loader:
        x, y = (t.cpu() for t in next(iter(loader)))
    untouched = [torch.allclose(row * std[0] + mean[0], torch.from_numpy(images[i]).permute(2, 0, 1)
                                / 255, atol=1e-5) for row, i in zip(x, y.tolist())]
    assert 0.3 < np.mean(untouched) < 0.7


def test_noise_is_drawn_after_every_other_augmentation():
    """noise_p > 0 changes none of the flip/affine/cutout/JPEG draws: a run that adds noise
    sees the same geometric augmentation, and noise_p = 0 is the run it was before."""
    plans = []
    for noise_p in (0.0, 0.5):
        gen = torch.Generator().manual_seed(11)
        plans.append(plan_augment(64, 32, 32, gen, "cpu", 0.5, 0.5, 0.5, noise_p))
    a, b = plans
    assert torch.equal(a.order, b.order) and torch.equal(a.theta, b.theta)
    assert all(torch.equal(u, v) for u, v in zip(a.holes, b.holes))
    assert all(np.array_equal(u, v) for u, v in zip(a.jpeg, b.jpeg))
    assert a.noise is None and 15 < len(b.noise[0]) < 50 and b.noise[1].shape[1:] == (32, 32, 3)


# ----------------------------------------------------------------------------- determinism
def test_albumentations_loader_is_deterministic_across_runs_and_worker_counts(real, spec):
    with AlbumentationsLoader(*real, spec, workers=0) as a0, \
            AlbumentationsLoader(*real, spec, workers=2) as a2:
        first = _epoch(a2, 1)
        assert _epoch_same(first, _epoch(a2, 1))   # same epoch twice
        assert _epoch_same(first, _epoch(a0, 1))   # 0 workers = 2 workers
        assert not _epoch_same(first, _epoch(a2, 2))


@pytest.mark.parametrize("kind", ["tensor", "albu0"])
def test_epochs_differ_even_without_shuffle(real, spec, kind):
    with LOADERS[kind](*real, replace(spec, shuffle=False)) as loader:
        e0, e1 = _epoch(loader, 0), _epoch(loader, 1)
        assert _epoch_same(e0, _epoch(loader, 0))
    # the same images in each batch (the tensor path groups an augmented batch's rows by
    # transform, so only their order within the batch may differ)
    assert all(torch.equal(a[1].sort().values, b[1].sort().values) for a, b in zip(e0, e1))
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(e0, e1))  # other augmentations


def test_batch_seeding_keeps_transforms_independent(spec):
    """`Compose.set_random_seed` would make flip, affine and cutout fire together."""
    import albumentations as A

    c = A.Compose(create_albumentations(spec.mean, spec.std, 0.5, normalize=False).transforms,
                  save_applied_params=True)
    img = np.zeros((32, 32, 3), np.uint8)
    fired = []
    for b in range(40):
        cpu_loader._seed_batch(c, spec, 0, b)
        for _ in range(50):
            names = {n for n, _ in c(image=img)["applied_transforms"]}
            fired.append([n in names for n in ("HorizontalFlip", "Affine", "CoarseDropout")])
    f = np.array(fired)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert abs((f[:, i] & f[:, j]).mean() - 0.25) < 0.04


# ------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("kind", ["tensor", "albu0"])
@pytest.mark.parametrize("n", [N, N - 1])
def test_two_ranks_are_disjoint_and_cover(real, spec, kind, n):
    ids = np.arange(n, dtype=np.int64)  # labels carry the sample index through the loader
    seen = []
    for rank in (0, 1):
        s = replace(spec, augment=False, rank=rank, world_size=2)
        with LOADERS[kind](real[0][:n], ids, s) as loader:
            seen.append(torch.cat([y for _, y in _epoch(loader, 5)]).numpy())
    assert len(seen[0]) == len(seen[1]) == -(-n // 2)  # padded to equal length per rank
    assert set(seen[0]) | set(seen[1]) == set(range(n))
    assert len(set(seen[0]) & set(seen[1])) == (0 if n % 2 == 0 else 1)  # one pad sample if odd


# ------------------------------------------------------------------------------- resources
def test_resources_freed_after_normal_end(real, spec):
    with AlbumentationsLoader(*real, spec, workers=2) as loader:
        pids, shms = _resources(loader)
        assert len(pids) == 2 and all(os.path.exists(f"/dev/shm/{n}") for n in shms)
        _epoch(loader)
    _gone(pids, shms)
    assert not [p for p in mp.active_children() if p.pid in pids]


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_resources_freed_after_consumer_raises_mid_epoch(real, spec, exc):
    with pytest.raises(exc):
        with AlbumentationsLoader(*real, spec, workers=2) as loader:
            pids, shms = _resources(loader)
            for i, _ in enumerate(loader):
                if i == 2:
                    raise exc("consumer failed")
    _gone(pids, shms)


def test_close_mid_epoch_frees_resources_and_stops_the_iterator(real, spec):
    loader = AlbumentationsLoader(*real, spec, workers=2)
    pids, shms = _resources(loader)
    it = iter(loader)
    next(it)
    loader.close()
    _gone(pids, shms)
    with pytest.raises(RuntimeError, match="closed"):
        next(it)
    loader.close()  # idempotent


class _Boom:
    """A pipeline whose one transform raises (the loader runs `compose.transforms` in order)."""

    def __init__(self):
        self.transforms = [self._boom]

    def set_random_state(self, *a):
        pass

    @staticmethod
    def _boom(image):
        raise ValueError("boom in the pipeline")


def test_worker_exception_surfaces_as_a_clear_error(real, spec, monkeypatch):
    monkeypatch.setattr(cpu_loader, "create_albumentations", lambda *a, **k: _Boom())
    t0 = time.monotonic()
    with AlbumentationsLoader(*real, spec, workers=2) as loader:
        pids, shms = _resources(loader)
        with pytest.raises(WorkerError, match="boom in the pipeline"):
            _epoch(loader)
    assert time.monotonic() - t0 < 10
    _gone(pids, shms)


def test_workers_exit_when_the_parent_dies_without_closing(real, spec):
    script = textwrap.dedent("""
        import os, numpy as np
        from c40.cpu_loader import AlbumentationsLoader
        from c40.loaders import LoaderSpec
        spec = LoaderSpec(batch_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, augment=True)
        loader = AlbumentationsLoader(np.zeros((64, 32, 32, 3), np.uint8), np.zeros(64), spec,
                                      workers=2)
        next(iter(loader))
        print(" ".join(str(p.pid) for p in loader._procs), flush=True)
        os._exit(0)  # no close(), no atexit: only the workers' parent check can end them
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    pids = [int(p) for p in out.split()]
    assert len(pids) == 2
    _gone(pids, [], wait=10.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_albumentations_loader_yields_on_cuda(real, spec):
    with AlbumentationsLoader(*real, spec, "cuda", workers=2) as loader:
        x, y = next(iter(loader))
    assert x.is_cuda and y.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
