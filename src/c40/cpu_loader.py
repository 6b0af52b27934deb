"""`AlbumentationsLoader`: the albumentations pipeline run per image by our own batched CPU
workers, yielding exactly what `TensorLoader` yields (normalised float32 NCHW, int64 labels, on the
device), so the train loop cannot tell them apart.

Why not torch DataLoader: it pickles every sample and collates in Python. Here the uint8 dataset
sits once in shared memory; forked workers read it without copies, augment a batch, normalise
it with two whole-batch numpy ops (the same float32 arithmetic as the tensor path's
`c40.augment.normalize_`) into a ring of shared-memory float32 slots, and only (batch number,
slot) travels over the queue; the main process just copies the batch out. Labels never travel:
the main process indexes them itself.

Determinism: batch b of epoch e draws from an RNG seeded by (seed, rank, e, b), and results are
reordered by batch number, so the output does not depend on worker count or timing.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import signal
import traceback
import weakref
from multiprocessing.shared_memory import SharedMemory
from typing import Iterator

import numpy as np
import torch

from c40.augment import create_albumentations, normalize_constants
from c40.loaders import LoaderSpec, epoch_indices, num_batches

_POLL_S = 0.5  # how often a waiting side checks that the other side is still alive


class WorkerError(RuntimeError):
    """An exception raised inside a worker, with the worker's traceback in the message."""


def _seed_batch(compose, spec: LoaderSpec, epoch: int, batch: int) -> None:
    """Seed one batch's augmentation stream from (seed, rank, epoch, batch)."""
    ss = np.random.SeedSequence([spec.seed, spec.rank, epoch, batch])
    # One generator pair shared by all transforms: `Compose.set_random_seed(s)` gives every
    # transform its own RNG with the *same* seed, which makes flip, affine and cutout fire
    # together (measured: 100% agreement on the first image), so it is not used here.
    compose.set_random_state(np.random.default_rng(ss), random.Random(int(ss.generate_state(1)[0])))


def _fill_batch(compose, images: np.ndarray, idx: np.ndarray, out: np.ndarray,
                scratch: np.ndarray, norm: tuple[np.ndarray, np.ndarray]) -> None:
    """Augment images[idx] (uint8) into scratch, then normalise the whole batch into out[:n]
    (float32 NHWC) with two numpy ops: pixel * scale - shift, the same float32 arithmetic as
    `c40.augment.normalize_`, so both loaders yield bit-identical unaugmented batches."""
    n = len(idx)
    if compose is None:
        np.take(images, idx, axis=0, out=scratch[:n])
    else:  # the Compose's transforms in order, without the container's per-call bookkeeping
        # (shape checks, bbox/keypoint processors: nothing to do for one image; ~6 of ~92 us)
        transforms = compose.transforms
        for j, i in enumerate(idx):
            data = {"image": images[i]}
            for t in transforms:
                data = t(**data)
            scratch[j] = data["image"]
    np.multiply(scratch[:n], norm[0], out=out[:n])
    np.subtract(out[:n], norm[1], out=out[:n])


def _compose(spec: LoaderSpec):
    """The per-image pipeline `spec` asks for (unnormalised: batches are normalised whole), or None."""
    if not spec.augment:
        return None
    return create_albumentations(spec.mean, spec.std, spec.p, normalize=False, flip_p=spec.flip_p,
                                 jpeg_p=spec.jpeg_p, noise_p=spec.noise_p)


def _numpy_norm(spec: LoaderSpec) -> tuple[np.ndarray, np.ndarray]:
    return tuple(t.numpy() for t in normalize_constants(spec.mean, spec.std))


def _worker(tasks, results, images, slots, spec: LoaderSpec, parent: int) -> None:
    """Worker loop: (token, epoch, batch, slot, idx) in, (token, batch, slot, error) out."""
    import cv2

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    cv2.setNumThreads(0)  # 32x32 images: threads only add contention with the other workers
    torch.set_num_threads(1)
    compose = _compose(spec)
    scratch, norm = np.empty(slots.shape[1:], np.uint8), _numpy_norm(spec)
    while True:
        try:
            task = tasks.get(timeout=_POLL_S)
        except queue.Empty:
            if os.getppid() != parent:  # the parent died without closing us
                return
            continue
        if task is None:
            return
        token, epoch, batch, slot, idx = task
        try:
            if compose is not None:
                _seed_batch(compose, spec, epoch, batch)
            _fill_batch(compose, images, idx, slots[slot], scratch, norm)
            results.put((token, batch, slot, None))
        except Exception:
            results.put((token, batch, slot, traceback.format_exc()))


def _shutdown(procs, queues, shms) -> None:
    """Stop workers and free shared memory; safe to call twice (also run by the finalizer)."""
    for _ in procs:
        try:
            queues[0].put_nowait(None)
        except Exception:
            pass
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():
            p.terminate()
            p.join(timeout=2.0)
    for q in queues:
        q.cancel_join_thread()  # never block exit on a pipe nobody reads any more
        q.close()
    for shm in shms:
        try:
            shm.close()
        except BufferError:
            pass  # arrays still view it (finalizer during GC); the mapping goes with them
        try:
            shm.unlink()
        except FileNotFoundError:
            pass
    procs.clear()
    shms.clear()


class AlbumentationsLoader:
    """Albumentations per image in `workers` forked processes; the `TensorLoader` interface.

    `workers=0` augments in the calling process. One iteration at a time: starting a new one
    abandons the previous. Use as a context manager (or call `close()`):
    that stops the workers and frees the shared memory even when the consuming loop raises.
    `timeout` (s) bounds the wait for one batch before a clear error instead of a hang.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, spec: LoaderSpec,
                 device: torch.device | str = "cpu", workers: int = 2, timeout: float = 120.0):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.spec, self.device, self.workers, self.timeout = spec, torch.device(device), workers, timeout
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.epoch, self._token, self._pending, self._closed = 0, 0, set(), False
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._n = len(images)
        b, shape = spec.batch_size, images.shape[1:]
        self._procs: list = []
        self._shms: list = []
        if workers == 0:
            self._images = images
            self._slots = np.empty((1, b, *shape), np.float32)
            self._scratch, self._norm = np.empty((b, *shape), np.uint8), _numpy_norm(spec)
            self._compose = _compose(spec)
            return
        ctx = mp.get_context("fork")  # workers inherit the shared-memory mappings: nothing is pickled
        n_slots = 2 * workers + 2     # enough for every worker to hold one and prefetch one more
        self._images = self._shared(images.shape, images)
        self._slots = self._shared((n_slots, b, *shape), dtype=np.float32)  # normalised batches
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        for _ in range(workers):
            p = ctx.Process(target=_worker, daemon=True, args=(
                self._tasks, self._results, self._images, self._slots, spec, os.getpid()))
            p.start()
            self._procs.append(p)
        # Runs on close(), garbage collection or interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, _shutdown, self._procs,
                                           (self._tasks, self._results), self._shms)

    def _shared(self, shape, data: np.ndarray | None = None, dtype=np.uint8) -> np.ndarray:
        shm = SharedMemory(create=True, size=max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize))
        self._shms.append(shm)
        arr = np.ndarray(shape, dtype, buffer=shm.buf)
        if data is not None:
            arr[...] = data
        return arr

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return num_batches(len(epoch_indices(self._n, self.spec, 0)), self.spec)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._closed:
            raise RuntimeError("AlbumentationsLoader is closed")
        spec, epoch = self.spec, self.epoch
        order = epoch_indices(self._n, spec, epoch)
        batches = [order[i * spec.batch_size:(i + 1) * spec.batch_size] for i in range(len(self))]
        if self.workers == 0:
            for b, idx in enumerate(batches):
                if self._compose is not None:
                    _seed_batch(self._compose, spec, epoch, b)
                _fill_batch(self._compose, self._images, idx, self._slots[0], self._scratch, self._norm)
                yield self._to_device(self._slots[0][: len(idx)]), self._to_device_labels(idx)
            return
        self._drain()  # an earlier, abandoned iteration may still be writing into slots
        self._token += 1
        token = self._token
        free, done, submitted = list(range(len(self._slots))), {}, 0
        try:
            for b, idx in enumerate(batches):
                if self._closed:
                    raise RuntimeError("AlbumentationsLoader was closed during the epoch")
                while submitted < len(batches) and free:  # keep every free slot busy
                    self._submit(epoch, submitted, free.pop(), batches[submitted])
                    submitted += 1
                while b not in done:
                    bb, slot = self._receive()
                    done[bb] = slot
                slot = done.pop(b)
                x = self._to_device(self._slots[slot][: len(idx)])  # copies out of the slot
                free.append(slot)
                yield x, self._to_device_labels(idx)
        finally:
            if self._token == token:  # a newer iteration has already drained this one's tasks
                self._drain()

    def _submit(self, epoch: int, batch: int, slot: int, idx: np.ndarray) -> None:
        self._pending.add(batch)
        self._tasks.put((self._token, epoch, batch, slot, idx))

    def _receive(self) -> tuple[int, int]:
        """The next finished (batch, slot) of this iteration; raises on worker error or death."""
        waited = 0.0
        while True:
            try:
                token, batch, slot, err = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [p for p in self._procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"AlbumentationsLoader worker pid {dead[0].pid} died "
                                       f"(exit code {dead[0].exitcode})") from None
                waited += _POLL_S
                if waited >= self.timeout:
                    raise TimeoutError(f"AlbumentationsLoader: no batch after {self.timeout:.0f} s")
                continue
            if token != self._token:
                continue  # a stale result from an abandoned iteration
            self._pending.discard(batch)
            if err is not None:
                raise WorkerError(f"AlbumentationsLoader worker failed on batch {batch}:\n{err}")
            return batch, slot

    def _drain(self) -> None:
        """Wait for in-flight tasks so no worker writes a slot the next iteration reuses."""
        while self._pending and not self._closed:
            try:
                self._receive()
            except WorkerError:
                pass  # this batch failed; the others may still be in flight
            except (RuntimeError, TimeoutError):
                self._pending.clear()  # the pool is broken: nothing more will arrive
                return

    def _to_device(self, x: np.ndarray) -> torch.Tensor:
        """A slot's normalised float32 (B, H, W, 3) -> a new (B, 3, H, W) tensor on the device.

        The copy out of the slot is numpy's (one thread): a whole-batch torch op would wake
        torch's thread pool, whose threads then fight the workers for the same cores."""
        fmt = torch.channels_last if self.spec.channels_last else torch.contiguous_format
        if self.device.type != "cpu":
            t = torch.from_numpy(x).permute(0, 3, 1, 2)  # a view of the slot, channels_last strides
            if self._pin:
                t = t.pin_memory()  # copies out of the slot; the copy below can then be async
            return t.to(self.device, non_blocking=self._pin).contiguous(memory_format=fmt)
        if fmt == torch.channels_last:
            return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    def _to_device_labels(self, idx: np.ndarray) -> torch.Tensor:
        return self.labels[torch.from_numpy(idx)].to(self.device, non_blocking=self._pin)

    def close(self) -> None:
        """Stop the workers and free the shared memory (idempotent)."""
        self._closed = True
        if self.workers:
            self._images = self._slots = None  # drop our views so the mappings can be closed
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
