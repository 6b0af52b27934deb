"""Checkpoints: written atomically (temp file + fsync + rename), read with `weights_only=True`."""
from __future__ import annotations

import functools
import io
import os
import platform
import random
import subprocess
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from c40.config import PLAIN_SGD
from c40.errors import C40Error, CheckpointError, ConfigError, first_line
from c40.files import atomic_path
from c40.precision import amp_name
from c40.remote import is_uri, read_bytes

FORMAT_VERSION = 1
# what a released (weights-only) checkpoint keeps: enough to evaluate, report and predict
RELEASE_KEYS = ("model", "ema", "config", "params", "classes", "mean", "std", "history", "epoch")


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write `state` so that `path` is always either the old complete file or the new one
    (temp file + fsync + rename + fsync of the folder)."""
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as f:
        torch.save({**state, "format_version": FORMAT_VERSION}, f)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a c40 checkpoint (tensors and plain data only) from a path or a URI; a clear error
    for anything else.

    Training state is loaded to the CPU (the default): `load_state_dict` moves each tensor to its
    module's or parameter's device, and RNG states must stay CPU ByteTensors."""
    if is_uri(path):  # a bucket every node reads (e.g. a distillation teacher on a cluster)
        try:
            source = io.BytesIO(read_bytes(path))
        except (OSError, C40Error) as e:
            raise CheckpointError(f"{path}: checkpoint not readable ({first_line(e)})") from None
    else:
        path = source = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch warns on stderr about pickle protocols > 2
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as e:
        text, first = str(e).strip(), first_line(e)
        if text.startswith("Weights only load failed"):  # torch's advice is to load it unsafely
            first = "holds more than tensors and plain data, refused: " + _refusal(text)
        raise CheckpointError(f"{path}: unreadable checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a c40 checkpoint (no model/config entries)")
    return state


def _refusal(text: str) -> str:
    """The reason inside torch's multi-paragraph weights-only error (what it refused)."""
    for line in text.splitlines()[1:]:
        line = line.split("WeightsUnpickler error:", 1)[-1].strip()
        if line and not line.startswith(("Please file", "Check the documentation")):
            return line
    return "objects other than tensors"


def load_model(path: str | os.PathLike, *, use_ema: bool = True,
               map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint was trained with; returns (model in eval mode, state)."""
    from c40.model import create_model

    state = load_checkpoint(path, map_location)
    cfg = state["config"]
    try:
        model = create_model(cfg["arch"], dropout=cfg.get("dropout", 0.0),
                             width=cfg.get("width", 1.0), num_classes=len(state.get("classes", range(10))))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint config is unusable ({e})") from None
    weights = state["ema"] if use_ema and state.get("ema") else state["model"]
    load_weights(model, weights, source=str(path))
    return model.eval(), state


def load_weights(model: nn.Module, weights: dict, source: str = "checkpoint") -> None:
    """load_state_dict with a one-line error when the weights belong to another arch/width."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        detail = str(e).splitlines()[0]
        raise CheckpointError(f"{source}: weights do not fit this model "
                              f"(another arch or width?): {detail[:200]}") from None


# ------------------------------------------------------------------ RNG, scaler, provenance
def capture_rng(device: torch.device) -> dict:
    """The RNG streams a run draws from: CPU torch, numpy, Python, and this run's own GPU
    (not every visible GPU: a resume may see fewer)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": np_state[1].tolist(),
             "numpy_pos": int(np_state[2]), "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    """`capture_rng`'s state back; a GPU stream only when this run is on a GPU too (a CPU
    checkpoint resumed on CUDA keeps the seeded CUDA stream)."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(("MT19937", np.asarray(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    cuda = state.get("cuda")
    if device.type == "cuda" and isinstance(cuda, torch.Tensor):
        torch.cuda.set_rng_state(cuda.cpu(), device)


def restore_scaler(scaler: torch.amp.GradScaler, state: dict | None) -> None:
    """The saved loss scale when both runs use fp16; otherwise nothing to carry over (a run
    without fp16 saves an empty state, and a run without fp16 now has no scale to set)."""
    if state and scaler.is_enabled():
        scaler.load_state_dict(state)


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    """What produced a checkpoint: the c40 git commit (when run from a checkout) and versions."""
    import c40

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, cwd=Path(c40.__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"c40_commit": commit or None, "c40": c40.__version__, "torch": str(torch.__version__),
            "numpy": np.__version__, "python": platform.python_version()}


# ------------------------------------------------------------------ a training run's state
# A resumed run continues the saved optimizer and schedule: their state would silently override
# a changed lr/momentum/weight decay, and a changed step count crashes OneCycleLR at the end.
RESUME_MUST_MATCH = ("arch", "width", "epochs", "batch_size", "subset", "val_split", "lr",
                     "schedule", "warmup", "momentum", "nesterov", "weight_decay", "muon_lr",
                     "bn_bias_lr", "teacher", "distill", "distill_temp", "time_budget")
# fields newer than some checkpoints -> the value every run before them had (not today's default)
BEFORE_FIELD = {**PLAIN_SGD, "teacher": None, "distill": 0.5, "distill_temp": 4.0, "time_budget": 0.0}


def restore_run(run, state: dict, path: Path) -> None:
    """A `c40.train.RunState` continued from a checkpoint: weights, EMA, optimizer (keeping this
    run's kernels), schedule, loss scale, RNG, epoch and history; a changed schedule is an error."""
    saved = state["config"]
    for key in RESUME_MUST_MATCH:
        had = saved.get(key, BEFORE_FIELD.get(key))
        if had != getattr(run.cfg, key):
            raise ConfigError(f"{path}: checkpoint has {key}={had!r} but this run asks "
                              f"for {getattr(run.cfg, key)!r} (a resumed run keeps its schedule: "
                              "use the same value, or a new --out)")
    load_weights(run.model, state["model"], str(path))
    if run.ema is not None and state.get("ema"):
        load_weights(run.ema.module, state["ema"], str(path))
        run.ema.n_averaged = int(state.get("ema_n", 1))
    impl = [{k: g.get(k) for k in ("fused", "foreach")} for g in run.opt.param_groups]
    run.opt.load_state_dict(state["optimizer"])
    for group, keep in zip(run.opt.param_groups, impl):  # this run's kernels, not the saved run's
        group.update(keep)
    run.sched.load_state_dict(state["scheduler"])
    restore_scaler(run.scaler, state.get("scaler"))
    restore_rng(state["rng"], run.device)
    run.start_epoch, run.step = state["epoch"], state["step"]
    run.history = list(state.get("history", []))


def run_state(run, epoch: int) -> dict:
    """Everything a `c40.train.RunState` needs to continue after `epoch`, and what made it."""
    return {
        "model": run.model.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "ema_n": run.ema.n_averaged if run.ema is not None else 0,
        "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
        "scaler": run.scaler.state_dict(), "rng": capture_rng(run.device),
        "epoch": epoch, "step": run.step, "config": run.cfg.to_dict(),
        "amp": amp_name(run.amp), "device": run.device.type, "provenance": run.provenance,
        "params": run.params, "classes": list(run.classes),
        "mean": list(run.mean), "std": list(run.std), "history": run.history,
    }
