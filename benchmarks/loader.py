"""Loader throughput (images/s) on real CIFAR-10 with the training augmentations (p=0.5):

  (a) baseline: torch DataLoader, per-sample albumentations Compose (with Normalize) in
      `Dataset.__getitem__` returning a CHW float tensor, default collate, N workers
  (b) c40.cpu_loader.AlbumentationsLoader, N workers (the same albumentations pipeline)
  (b') torch DataLoader over a dataset of whole batches (batch_size=None, pinned on CUDA), each
      made as (b)'s workers make it: the same per-image pipeline and batch normalisation, so
      (b) vs (b') measures only c40's own worker pool and shared-memory ring
  (c) c40.loaders.TensorLoader on CPU tensors (batch tensor augmentations)
  (d) TensorLoader on CUDA, when a GPU is present

Each is timed over K batches after one warm-up batch (worker start-up excluded), until the batch
is on the device (CUDA synchronised); R interleaved rounds, the median is reported. Usage:
  python benchmarks/loader.py --data DIR --workers 2 --batches 60 --json --out benchmarks/results/loader.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, run_and_emit  # noqa: E402
from c40.config import non_negative_int, positive_int  # noqa: E402

from c40.augment import create_albumentations  # noqa: E402
from c40.cpu_loader import AlbumentationsLoader, _fill_batch, _numpy_norm, _seed_batch  # noqa: E402
from c40.data import channel_stats, load_cifar10, resolve_data_root  # noqa: E402
from c40.errors import C40Error  # noqa: E402
from c40.loaders import LoaderSpec, TensorLoader, epoch_indices, num_batches  # noqa: E402


class _AlbuDataset(torch.utils.data.Dataset):
    """The usual per-sample dataset: albumentations (+ Normalize) then HWC -> CHW float tensor."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std, p: float):
        self.images, self.labels = images, labels
        self.compose = create_albumentations(mean, std, p, normalize=True)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.compose(image=self.images[i])["image"]            # (32, 32, 3) float32
        return torch.from_numpy(x.transpose(2, 0, 1)), int(self.labels[i])  # like ToTensorV2


class _BatchDataset(torch.utils.data.Dataset):
    """Item b = augmented, normalised batch b of an epoch, made like AlbumentationsLoader's workers."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, spec: LoaderSpec, epoch: int):
        self.images, self.labels, self.spec, self.epoch = images, labels, spec, epoch
        self.order = epoch_indices(len(labels), spec, epoch)
        self.compose = create_albumentations(spec.mean, spec.std, spec.p, normalize=False,
                                             flip_p=spec.flip_p)
        self.norm = _numpy_norm(spec)

    def __len__(self) -> int:
        return num_batches(len(self.order), self.spec)

    def __getitem__(self, b: int):
        idx = self.order[b * self.spec.batch_size:(b + 1) * self.spec.batch_size]
        scratch = np.empty((len(idx), *self.images.shape[1:]), np.uint8)
        out = np.empty(scratch.shape, np.float32)
        _seed_batch(self.compose, self.spec, self.epoch, b)
        _fill_batch(self.compose, self.images, idx, out, scratch, self.norm)
        return torch.from_numpy(out).permute(0, 3, 1, 2), torch.from_numpy(self.labels[idx])


def _worker_init(_: int) -> None:
    import cv2
    cv2.setNumThreads(0)  # the same thread setting our loader's workers use: a fair baseline


def _cpu_seconds() -> float | None:
    """CPU time (user + system) of this process and its live children, e.g. loader workers."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def _measure(loader, batches: int, batch_size: int, device: torch.device) -> tuple[float, float | None]:
    """(images/s, CPU ms per image) over `batches` batches after one warm-up batch, on `device`.

    Wall-clock throughput depends on whatever else the machine runs; CPU time per image does not
    (much), so it is reported too."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    it = iter(loader)
    x, y = next(it)  # warm-up: worker start-up and first-batch latency are not throughput
    sync()
    c0, t0 = _cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        x, y = next(it)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
    sync()
    wall, c1 = time.perf_counter() - t0, _cpu_seconds()
    n = batches * batch_size
    return n / wall, (None if c0 is None else 1e3 * (c1 - c0) / n)


def _ratio(a: float | None, b: float) -> float | None:
    return None if a is None else round(a / b, 2)


def run(args) -> dict:
    root = resolve_data_root(args.data)
    data = load_cifar10(root, "train")
    need = (args.batches + 1) * args.batch_size
    if need > len(data):
        raise C40Error(f"--batches {args.batches} x --batch-size {args.batch_size} needs {need} "
                       f"images, the training set has {len(data)}")
    mean, std = channel_stats(data.images[:10_000])  # 10k images estimate the stats to <1e-3
    spec = LoaderSpec(batch_size=args.batch_size, mean=mean, std=std, augment=True, p=args.p,
                      shuffle=True, drop_last=True, seed=0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    k, b = args.batches, args.batch_size
    ds = _AlbuDataset(data.images, data.labels, mean, std, args.p)
    samples: dict[str, list[float]] = {"baseline_img_s": [], "batch_dataloader_img_s": [],
                                       "cpu_loader_img_s": [], "tensor_cpu_img_s": [],
                                       "tensor_cuda_img_s": []}
    cpu_ms: dict[str, list[float]] = {key: [] for key in samples}

    def record(key: str, measured: tuple[float, float | None]) -> None:
        samples[key].append(measured[0])
        if measured[1] is not None:
            cpu_ms[key].append(measured[1])

    load_before = os.getloadavg()
    with AlbumentationsLoader(data.images, data.labels, spec, device, workers=args.workers) as al:
        tl = TensorLoader(data.images, data.labels, spec, "cpu")
        tg = TensorLoader(data.images, data.labels, spec, device) if cuda else None
        # Rounds interleave the loaders so a burst of load from other processes hits all of them;
        # the median of the rounds is reported.
        for r in range(args.repeats):
            dl = torch.utils.data.DataLoader(ds, batch_size=b, shuffle=True, drop_last=True,
                                             num_workers=args.workers, pin_memory=cuda,
                                             worker_init_fn=_worker_init if args.workers else None)
            record("baseline_img_s", _measure(dl, k, b, device))
            del dl  # stops its workers before the next measurement
            bl = torch.utils.data.DataLoader(_BatchDataset(data.images, data.labels, spec, r),
                                             batch_size=None, num_workers=args.workers,
                                             pin_memory=cuda,
                                             worker_init_fn=_worker_init if args.workers else None)
            record("batch_dataloader_img_s", _measure(bl, k, b, device))
            del bl
            for loader in (al, tl, tg):
                if loader is not None:
                    loader.set_epoch(r)
            record("cpu_loader_img_s", _measure(al, k, b, device))
            record("tensor_cpu_img_s", _measure(tl, k, b, torch.device("cpu")))
            if tg is not None:
                record("tensor_cuda_img_s", _measure(tg, k, b, device))
    res: dict = {key: round(float(np.median(v)), 1) if v else None for key, v in samples.items()}
    if not cuda:
        res["tensor_cuda_note"] = "skipped: torch.cuda.is_available() is False"
    base = res["baseline_img_s"]
    res["cpu_loader_vs_baseline"] = _ratio(res["cpu_loader_img_s"], base)
    res["batch_dataloader_vs_baseline"] = _ratio(res["batch_dataloader_img_s"], base)
    res["cpu_loader_vs_batch_dataloader"] = _ratio(res["cpu_loader_img_s"], res["batch_dataloader_img_s"])
    res["tensor_cpu_vs_baseline"] = _ratio(res["tensor_cpu_img_s"], base)
    res["tensor_cuda_vs_baseline"] = _ratio(res["tensor_cuda_img_s"], base)
    # CPU ms per image (main + workers): the cost the loader puts on the machine, load-independent
    res["cpu_ms_per_img"] = {key.replace("_img_s", ""): round(float(np.median(v)), 4) if v else None
                             for key, v in cpu_ms.items()}
    c = res["cpu_ms_per_img"]
    res["cpu_loader_vs_baseline_cpu_time"] = (round(c["baseline"] / c["cpu_loader"], 2)
                                              if c["baseline"] and c["cpu_loader"] else None)
    res["samples"] = {key: [round(x, 1) for x in v] for key, v in samples.items()}
    res["config"] = {"workers": args.workers, "batches": k, "batch_size": b, "p": args.p,
                     "repeats": args.repeats, "images": len(data), "data": str(root),
                     "device_for_a_b": str(device)}
    res["loadavg_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    res["machine"] = machine_info()
    return res


def _parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--workers", type=non_negative_int, default=2, help="worker processes for (a), (b)")
    ap.add_argument("--batches", type=positive_int, default=60, help="timed batches per loader")
    ap.add_argument("--batch-size", type=positive_int, default=512)
    ap.add_argument("--repeats", type=positive_int, default=5, help="interleaved rounds (median)")
    ap.add_argument("--p", type=float, default=0.5, help="probability of each augmentation")
    ap.add_argument("--data", default=None, help="cifar-10-batches-py folder (else $C40_DATA)")
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    return ap.parse_args(argv)


def _print_summary(res: dict, args) -> None:
    for k in ("baseline_img_s", "batch_dataloader_img_s", "cpu_loader_img_s", "tensor_cpu_img_s",
              "tensor_cuda_img_s"):
        print(f"{k:>20}: {res[k] if res[k] is not None else 'skipped'}")
    for k in ("cpu_loader_vs_baseline", "cpu_loader_vs_batch_dataloader", "tensor_cpu_vs_baseline",
              "tensor_cuda_vs_baseline"):
        print(f"{k:>24}: {res[k]}")


def main(argv=None) -> int:
    return run_and_emit(_parse(argv), run, _print_summary)


if __name__ == "__main__":
    sys.exit(main())
