"""Using a trained checkpoint: evaluate it on a dataset, write its report, predict single
images, export it (torch.export / ONNX / TorchScript). The CLI commands eval, report, predict and export are
thin wrappers over these functions.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from c40.augment import normalize
from c40.checkpoint import load_model, provenance
from c40.config import tta_mode
from c40.data import Dataset, load_dataset, resolve_data_root
from c40.errors import C40Error, DataError
from c40.evaluate import Evaluation, evaluate
from c40.imagefolder import SIZE, to_input
from c40.loaders import LoaderSpec, TensorLoader
from c40.precision import keep_depthwise_fp32, resolve_amp, resolve_device

EXPORT_FORMATS = ("pt2", "onnx", "torchscript", "weights")  # pt2 (torch.export): the default


# ---------------------------------------------------------------------------- evaluation
def evaluate_model(model: nn.Module, state: dict, ds: Dataset, device: torch.device, *,
                   tta: str | bool = "off") -> Evaluation:
    """`model` on `ds`, normalised with the checkpoint's training statistics."""
    trained_on = tuple(state.get("classes") or ds.classes)
    if trained_on != tuple(ds.classes):
        raise DataError(f"the data's classes {list(ds.classes)} are not the ones the checkpoint "
                        f"was trained on {list(trained_on)}")
    spec = LoaderSpec(1024, state["mean"], state["std"])
    with TensorLoader(ds.images, ds.labels, spec, device) as loader:
        return evaluate(model, loader, ds.classes, amp_dtype=run_amp(state, device), tta=tta)


def run_amp(state: dict, device: torch.device) -> torch.dtype | None:
    """The autocast dtype the training run evaluated with, so the same file gives the same
    accuracy on every host: the resolved `amp` a checkpoint records (older checkpoints: their
    config's mode, resolved on this device)."""
    return resolve_amp(state.get("amp") or state["config"].get("amp", "auto"), device)


def load_for_inference(path, device: str = "auto") -> tuple[nn.Module, dict, torch.device]:
    """(model, checkpoint state, device): the checkpoint's model on the device, in eval numerics
    as `fit` ran them (channels_last; depthwise convs in fp32 under CPU bf16)."""
    dev = resolve_device(device)
    model, state = load_model(path, map_location="cpu")
    keep_depthwise_fp32(model, run_amp(state, dev), dev)  # the numerics fit() evaluated with
    return model.to(dev, memory_format=torch.channels_last), state, dev


def run_tta(state: dict, tta: str | bool | None) -> str:
    """`tta` if given, else what the training run evaluated with (its config's `tta`), so
    `c40 eval` reproduces the accuracy `c40 train` printed; a c40.config.TTA_MODES mode."""
    return tta_mode(state["config"].get("tta", False) if tta is None else tta)


def evaluate_checkpoint(path, *, data=None, tta: str | bool | None = None, device: str = "auto",
                        split: str = "test") -> tuple[Evaluation, dict]:
    """The checkpoint's model on a split of the data, normalised with its training statistics.
    Evaluated with the TTA mode `run_tta(state, tta)`."""
    model, state, dev = load_for_inference(path, device)
    ds = load_dataset(resolve_data_root(data), split)
    return evaluate_model(model, state, ds, dev, tta=run_tta(state, tta)), state


def evaluate_corruptions(path, *, data=None, tta: str | bool | None = None, device: str = "auto",
                         names: Sequence[str] | None = None, seed: int = 0) -> dict:
    """Test accuracy of the checkpoint on the clean test set and on each corrupted copy of it
    (`c40.corruptions`, every severity): {"clean": acc, "tta": mode, "corruptions": {name:
    {"param", "levels", "accuracy", "drop"}}, "code": what made the corrupted sets}; tta is
    the c40.config.TTA_MODES mode used;
    drop = clean - corrupted, in accuracy units."""
    import albumentations
    import cv2

    from c40.corruptions import CORRUPTIONS, corrupt

    model, state, dev = load_for_inference(path, device)
    tta = run_tta(state, tta)
    ds = load_dataset(resolve_data_root(data), "test")
    clean = evaluate_model(model, state, ds, dev, tta=tta).accuracy
    code = provenance() | {"albumentations": albumentations.__version__, "opencv": cv2.__version__}
    out = {"clean": clean, "tta": tta, "seed": seed, "code": code, "corruptions": {}}
    for name in names or CORRUPTIONS:
        c = CORRUPTIONS[name]
        accs = [evaluate_model(model, state, Dataset(corrupt(ds.images, name, level, seed),
                                                     ds.labels, ds.classes), dev, tta=tta).accuracy
                for level in c.levels]
        out["corruptions"][name] = {"param": c.param, "levels": list(c.levels), "accuracy": accs,
                                    "drop": [clean - a for a in accs]}
    return out


def describe(ev: Evaluation, state: dict, checkpoint, *, tta: str) -> dict:
    """`ev.to_dict()` plus what produced it: the dict `c40 eval --json` prints and
    summary.json holds."""
    cfg = state["config"]
    return ev.to_dict() | {"params": state.get("params"), "arch": cfg.get("arch"),
                           "width": cfg.get("width"), "tta": tta,
                           "checkpoint": str(checkpoint), "classes": list(ev.classes)}


def report_checkpoint(path, out, *, data=None, tta: str | bool | None = None, device: str = "auto",
                      metrics=None) -> dict[str, Path]:
    """Evaluate a checkpoint on the test set and write the full report into `out`.

    The training curves come from `metrics` (a metrics.jsonl) when given, else from the
    history stored in the checkpoint.
    """
    from c40.report import read_metrics, write_report

    history = read_metrics(metrics) if metrics is not None else None
    model, state, dev = load_for_inference(path, device)
    tta = run_tta(state, tta)
    root = resolve_data_root(data)
    test = load_dataset(root, "test")
    ev = evaluate_model(model, state, test, dev, tta=tta)
    try:
        train = load_dataset(root, "train")
    except DataError:
        train = None  # e.g. an image folder with only test/: no training grid
    return write_report(ev, out, images=test.images, train=train,
                        history=history if history is not None else state.get("history"),
                        meta=describe(ev, state, path, tta=tta))


# ---------------------------------------------------------------------------- prediction
@dataclass
class Prediction:
    label: str                  # most probable class name
    confidence: float           # its probability
    probs: np.ndarray           # (K,) float32 class probabilities


@torch.no_grad()
def predict_images(model: nn.Module, state: dict, images: Sequence) -> list[Prediction]:
    """Class probabilities for PIL images of any size (resized to 32x32)."""
    if not images:
        return []
    device = next(model.parameters()).device
    x = np.stack([to_input(im)[0] for im in images])                      # (B, 32, 32, 3) uint8
    x = torch.from_numpy(x).permute(0, 3, 1, 2).to(device)               # (B, 3, 32, 32)
    mean = torch.tensor(state["mean"], dtype=torch.float32, device=device)
    std = torch.tensor(state["std"], dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    try:
        probs = model(normalize(x, mean, std)).float().softmax(-1).cpu().numpy()
    finally:
        model.train(was_training)
    classes = state.get("classes") or [str(i) for i in range(probs.shape[1])]
    return [Prediction(classes[int(p.argmax())], float(p.max()), p) for p in probs]


def predict_checkpoint(path, images: Sequence, *, device: str = "auto") -> list[Prediction]:
    model, state, _ = load_for_inference(path, device)
    return predict_images(model, state, images)


# ---------------------------------------------------------------------------- export
def _write_atomic(out: Path, write) -> Path:
    from c40.files import atomic_path

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            write(tmp)
    except OSError as e:
        raise C40Error(f"cannot write {out} ({e.strerror or e})") from None
    return out


def export_checkpoint(path, fmt: str, out) -> Path:
    """Export the checkpoint's model (input: normalised float (B, 3, 32, 32), any B; output: logits).

    `pt2`: a `torch.export` program (load with `torch.export.load(f).module()`), carrying
    `c40.json` (classes, mean, std, arch) as an extra file; `onnx` needs the optional extra
    (`pip install c40[onnx]`); `torchscript` is deprecated by torch and kept for old consumers.
    `weights` is a c40 checkpoint without the training state (optimizer, schedule, RNG): a third
    of the size, loadable by eval/report/predict.
    """
    if fmt == "weights":
        from c40.checkpoint import RELEASE_KEYS, load_checkpoint, save_checkpoint

        state = load_checkpoint(path)
        return save_checkpoint({k: state[k] for k in RELEASE_KEYS if k in state}, out)
    if fmt not in EXPORT_FORMATS:
        raise C40Error(f"unknown export format '{fmt}' (choose from {', '.join(EXPORT_FORMATS)})")
    if fmt == "onnx" and importlib.util.find_spec("onnxscript") is None:
        raise C40Error("ONNX export needs the onnx extra, which is not installed "
                       "(pip install 'c40[onnx]'), or use --format pt2")
    model, state = load_model(path, map_location="cpu")
    example = torch.zeros(2, 3, SIZE, SIZE)  # batch 2: a batch of 1 would be specialised
    batch = {"x": {0: torch.export.Dim.DYNAMIC}}
    info = json.dumps({"classes": state.get("classes"), "mean": state["mean"], "std": state["std"],
                       "arch": state["config"].get("arch"), "params": state.get("params"),
                       "input": "normalised float (B, 3, 32, 32): (pixels / 255 - mean) / std"})
    if fmt == "pt2":
        program = torch.export.export(model, (example,), dynamic_shapes=batch)
        write = lambda tmp: torch.export.save(program, tmp, extra_files={"c40.json": info})  # noqa: E731
    elif fmt == "torchscript":
        with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated; asked for
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.trace(model, example)

        def write(tmp):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.save(scripted, tmp, _extra_files={"c40.json": info})
    else:
        def write(tmp):
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter narrates its passes
                torch.onnx.export(model, (example,), tmp, input_names=["images"],
                                  output_names=["logits"], dynamic_shapes=batch, dynamo=True,
                                  external_data=False)
    return _write_atomic(Path(out), write)
