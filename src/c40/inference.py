"""Loading a trained checkpoint and running it on a dataset (used by eval, report, predict)."""
from __future__ import annotations

import torch

from c40.checkpoint import load_model
from c40.data import load_dataset, resolve_data_root
from c40.evaluate import Evaluation, evaluate
from c40.loaders import LoaderSpec, TensorLoader
from c40.train import resolve_amp, resolve_device


def evaluate_checkpoint(path, *, data=None, tta: bool = False, device: str = "auto",
                        split: str = "test") -> tuple[Evaluation, dict]:
    """The checkpoint's model on a split of the data, normalised with its training statistics."""
    dev = resolve_device(device)
    model, state = load_model(path, map_location="cpu")
    model = model.to(dev, memory_format=torch.channels_last)
    ds = load_dataset(resolve_data_root(data), split)
    spec = LoaderSpec(1024, state["mean"], state["std"])
    with TensorLoader(ds.images, ds.labels, spec, dev) as loader:
        ev = evaluate(model, loader, ds.classes, amp_dtype=resolve_amp("auto", dev), tta=tta)
    return ev, state
