"""The training configuration: one validated dataclass, its recipes, and CLI flags derived from it.

`TrainConfig()` is the default (`fast`) recipe. `TrainConfig.from_recipe(name, **overrides)` is
the one place recipes are resolved: dataclass defaults < recipe < the recipe's GPU values (when
the run's device is CUDA) < a `--config` file < explicit flags/overrides. A resolved config is
what checkpoints save and what Ray sends to its workers (`TrainConfig(**d)` refuses unknown keys).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields

from c40.errors import ConfigError, first_line

# Test-time augmentation modes: the views whose softmax c40.evaluate averages (`tta_views`).
TTA_MODES = ("off", "flip", "flip-shift")


def tta_mode(value) -> str:
    """A TTA setting as one of TTA_MODES. True/False (what checkpoints saved before the modes)
    read as flip/off."""
    if isinstance(value, bool):
        return "flip" if value else "off"
    if value not in TTA_MODES:
        raise ConfigError(f"unknown tta '{value}' (choose from {', '.join(TTA_MODES)})")
    return value


def progress_tta(value) -> str:
    """The TTA of a run's tests before its last epoch: its own mode, at most flip (2 views).
    They show progress; flip-shift's 6 views cost ~0.6 of a 32-px resnet epoch each on the CPU.
    The last epoch's tests (the run's result) use the run's own mode."""
    mode = tta_mode(value)
    return mode if TTA_MODES.index(mode) <= TTA_MODES.index("flip") else "flip"


# What each recipe changes from the defaults (= `fast`). "cuda": values used instead when the
# run's device is a GPU. On a GPU the 32-MFLOP net at batch 128 is launch-bound (tiny kernels),
# so GPU recipes take 4x larger batches with the learning rate scaled by sqrt(4). Measured on
# the CPU (accuracy does not depend on the device; seed 0, fp32): fast at batch 512, lr 0.4 gave
# 85.13% in 11 epochs and 85.93% in 14 (batch 128: 85.69% in 11), hence 14 epochs on a GPU.
# dilated at batch 512 is not measured yet; best at batch 512 only in a 42-epoch CPU proxy.
# the optimizer of dilated, reference, GPU fast (and of every run before Muon came, 2026-12-05)
PLAIN_SGD = dict(muon_lr=0.0, bn_bias_lr=1.0)

RECIPES: dict[str, dict] = {
    # the default: >= 85% as fast as we can on a CPU. The strided net with a whitening first
    # layer, 5 epochs (the first 2 at 24 px), Muon for the full conv filters and the BatchNorm
    # biases at 8x the rate. On a 2-core AVX512-BF16 EPYC (family 25, bf16 autocast), seeds
    # 0/1/2, flip-shift TTA: 85.15 / 85.27 / 85.63% in 121 s mean wall vs 160 s for the 7-epoch
    # unwhitened recipe before it (85.52% mean; whitened at 7 epochs: 86.62%). On a GPU (batch
    # 512, lr 0.4): 14 epochs of plain SGD on the unwhitened strided net, as measured
    # (benchmarks/gpu_check.py; Muon and whitening on a GPU are not measured at batch 512).
    "fast": dict(cuda=dict(arch="strided", batch_size=512, lr=0.4, epochs=14, **PLAIN_SGD)),
    # the most accuracy: the resnet arch, a long schedule, stronger augmentation, EMA of the
    # weights; 40% of the epochs at 24 px; Muon for the full conv filters and the BatchNorm biases
    # at 8x the rate, batch 256 with both rates x sqrt 2 and the EMA decay for the same horizon in
    # epochs. 93.24% (weights/resnet_best200.pt) in ~109 min of the slower 2-core bf16 EPYC
    # (family 25); the plain SGD recipe at batch 128 before it: 93.13% in 75 min on a faster host
    # (92.3 vs 93.0% at epoch 180). The strided net gains slowly (120 epochs: 91.46% in 44 min;
    # 303: 92.28% in 58 min). On a GPU the same rule once more: batch 512, both rates x sqrt 2,
    # EMA 0.996; on the CPU at 42 epochs it keeps the accuracy per epoch of batch 256 (91.52 vs
    # 91.45%, benchmarks/results/resnet_b512_42/); its 200 epochs are not measured.
    "best": dict(arch="resnet", epochs=200, label_smoothing=0.1, aug_p=0.5, low_res_frac=0.4,
                 batch_size=256, lr=0.28, muon_lr=0.07, bn_bias_lr=8.0, ema=True,
                 ema_decay=0.998, eval_every=10,
                 cuda=dict(batch_size=512, lr=0.4, muon_lr=0.1, ema_decay=0.996)),
    # the dilated arch (no stride, no pooling; its unpadded convs need >= 27 px, so no low-res
    # epochs), aiming at >= 85% within 30 min on a 2-core CPU.
    "dilated": dict(arch="dilated", epochs=20, low_res=32, low_res_frac=0.0, **PLAIN_SGD,
                    cuda=dict(batch_size=512, lr=0.4)),
    # the assignment's reference: SGD 0.1 momentum 0.9, no schedule, 45 epochs, as it was written
    # (per-sample albumentations, fp32 NCHW, test every epoch); the same on every device.
    "reference": dict(arch="strided", epochs=45, lr=0.1, schedule="constant", nesterov=False,
                      weight_decay=0.0, **PLAIN_SGD,
                      label_smoothing=0.0, dropout=0.1, loader="albumentations", amp="off",
                      channels_last=False, tta=False, aug_p=0.5, low_res=32, low_res_frac=0.0,
                      eval_every=1),
}


def low_res_count(frac: float, epochs: int) -> int:
    """How many of a run's `epochs`, the first ones, train at low_res: the one rule for it."""
    return int(frac * epochs)


def _f(default, help: str):
    """A field with its flag's help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved inside every checkpoint."""

    recipe: str = _f("fast", "fast | best | dilated | reference: fills the fields not given")
    arch: str = _f("strided_whiten", "model name in the c40.model registry")
    width: float = _f(1.0, "channel multiplier (params must stay < 200k)")
    dropout: float = _f(0.0, "dropout probability after each block and before the head")
    epochs: int = _f(5, "passes over the training set")
    time_budget: float = _f(0.0, "minutes for the whole run, final test included (0: off): epochs "
                            "re-planned before each from their measured cost; --epochs caps them")
    batch_size: int = _f(128, "images per optimizer step (global across workers)")
    lr: float = _f(0.2, "peak learning rate of the schedule")
    schedule: str = _f("onecycle", "onecycle | constant")
    warmup: float = _f(0.2, "fraction of steps spent warming up (onecycle)")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum")
    weight_decay: float = _f(5e-4, "L2 on conv/linear weights (not BN, not biases)")
    bn_bias_lr: float = _f(8.0, "learning-rate multiplier of the BatchNorm biases")
    muon_lr: float = _f(0.05, "peak learning rate of Muon (orthogonalized momentum) for the full "
                              "conv filters; 0: SGD for every weight (see c40.optim)")
    label_smoothing: float = _f(0.2, "cross-entropy label smoothing")
    teacher: str | None = _f(None, "knowledge distillation: a c40 checkpoint, path or URI, whose "
                                   "model (its EMA weights if kept) gives soft targets for every "
                                   "training batch; its forward pass is part of each step")
    distill: float = _f(0.5, "with --teacher: weight of the distillation loss (KL divergence to "
                             "the teacher at distill_temp); the label loss gets 1 - distill")
    distill_temp: float = _f(4.0, "with --teacher: softmax temperature of the distillation loss")
    ema: bool = _f(False, "evaluate an exponential moving average of the weights")
    ema_decay: float = _f(0.99, "per-step EMA decay")
    loader: str = _f("tensor", "tensor (batch tensor ops on the device: measured faster on CPU "
                               "and CUDA) | albumentations (per-image pipeline in worker processes)")
    workers: int = _f(2, "worker processes of the albumentations loader")
    aug_p: float = _f(0.3, "probability of the shift-scale-rotate and of the cutout")
    flip_p: float = _f(0.5, "probability of the horizontal flip")
    jpeg_p: float = _f(0.0, "probability that a training image is first JPEG-compressed at a "
                            "quality uniform in c40.augment.JPEG_QUALITY (robustness to photos)")
    noise_p: float = _f(0.0, "probability that a training image gets Gaussian noise (after any "
                             "JPEG) of a std uniform in c40.augment.NOISE_STD x 255 (robustness "
                             "to noisy photos)")
    low_res: int = _f(24, "progressive resizing: training resolution (pixels) of the first "
                          "low_res_frac x epochs (rounded down), then 32")
    low_res_frac: float = _f(0.55, "fraction of the epochs trained at low_res")
    amp: str = _f("auto", "auto | bf16 | fp16 | off (auto: bf16 on GPUs and CPUs with native "
                          "bf16, fp16 + GradScaler on older GPUs, else off)")
    channels_last: bool = _f(True, "NHWC memory format for the model and batches")
    compile: bool = _f(False, "torch.compile the model (static shapes: one graph per resolution)")
    tta: str = _f("flip-shift", "test-time augmentation at evaluation: off | flip (the image and "
                                "its mirror) | flip-shift (both, each also shifted 1 px up-left "
                                "and down-right: 6 views); tests before the last epoch use at "
                                "most flip")
    subset: int | None = _f(None, "use only the first N training images")
    test_subset: int | None = _f(None, "use only the first N test images")
    val_split: int = _f(0, "hold out N training images, evaluated every epoch (0: none)")
    eval_every: int = _f(0, "test every N epochs and at the end (0: only at the end)")
    seed: int = _f(0, "seeds model init, augmentation and shuffling")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    data: str | None = _f(None, "cifar-10-batches-py folder or image folder, a path or URI "
                                "(default: $C40_DATA or ./data/cifar-10-batches-py)")
    out: str = _f("runs/c40", "output folder: checkpoint.pt, metrics.jsonl")
    resume: bool = _f(False, "continue from OUT/checkpoint.pt")
    deterministic: bool = _f(False, "deterministic algorithms (bit-identical resume; on CUDA "
                                    "sets CUBLAS_WORKSPACE_CONFIG and turns cuDNN autotuning off)")

    def __post_init__(self) -> None:
        from c40.model import list_models

        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe '{self.recipe}' (choose from {', '.join(RECIPES)})")
        if self.arch not in list_models():
            raise ConfigError(f"unknown arch '{self.arch}' (choose from {', '.join(list_models())})")
        self.tta = tta_mode(self.tta)
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.time_budget >= 0, f"time-budget must be >= 0 minutes, got {self.time_budget}"),
            (self.batch_size >= 1, f"batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (0 < self.width <= 4, f"width must be in (0, 4], got {self.width}"),
            (0 <= self.label_smoothing < 1, f"label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.aug_p <= 1, f"aug-p must be in [0, 1], got {self.aug_p}"),
            (0 <= self.flip_p <= 1, f"flip-p must be in [0, 1], got {self.flip_p}"),
            (0 <= self.jpeg_p <= 1, f"jpeg-p must be in [0, 1], got {self.jpeg_p}"),
            (0 <= self.noise_p <= 1, f"noise-p must be in [0, 1], got {self.noise_p}"),
            (8 <= self.low_res <= 32, f"low-res must be in [8, 32], got {self.low_res}"),
            (0 <= self.low_res_frac < 1, f"low-res-frac must be in [0, 1), got {self.low_res_frac}"),
            (0 <= self.warmup < 1, f"warmup must be in [0, 1), got {self.warmup}"),
            (self.weight_decay >= 0, f"weight-decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.distill <= 1, f"distill must be in [0, 1], got {self.distill}"),
            (self.distill_temp > 0, f"distill-temp must be > 0, got {self.distill_temp}"),
            (self.muon_lr >= 0, f"muon-lr must be >= 0, got {self.muon_lr}"),
            (self.bn_bias_lr > 0, f"bn-bias-lr must be > 0, got {self.bn_bias_lr}"),
            (0 < self.ema_decay < 1, f"ema-decay must be in (0, 1), got {self.ema_decay}"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (self.val_split >= 0, f"val-split must be >= 0, got {self.val_split}"),
            (self.eval_every >= 0, f"eval-every must be >= 0, got {self.eval_every}"),
            (self.subset is None or self.subset >= 1, f"subset must be >= 1, got {self.subset}"),
            (self.test_subset is None or self.test_subset >= 1,
             f"test-subset must be >= 1, got {self.test_subset}"),
            (self.schedule in ("onecycle", "constant"), f"unknown schedule '{self.schedule}'"),
            (self.loader in ("albumentations", "tensor"), f"unknown loader '{self.loader}'"),
            (self.amp in ("auto", "bf16", "fp16", "off"), f"unknown amp mode '{self.amp}'"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def low_res_epochs(self) -> int:
        """How many epochs, the first ones, train at low_res."""
        return low_res_count(self.low_res_frac, self.epochs)

    @classmethod
    def from_recipe(cls, recipe: str = "fast", **overrides) -> "TrainConfig":
        """Dataclass defaults < recipe < its "cuda" values on a GPU < explicit overrides."""
        import torch

        if recipe not in RECIPES:
            raise ConfigError(f"unknown recipe '{recipe}' (choose from {', '.join(RECIPES)})")
        values = dict(RECIPES[recipe])
        gpu = values.pop("cuda", {})
        device = str(overrides.get("device", values.get("device", "auto")))
        # an explicit cuda is believed, not checked: a CPU-only Ray head configures GPU workers
        # (fit checks the device where it runs); auto means this machine's choice
        if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
            values.update(gpu)
        return cls(**{**values, **overrides, "recipe": recipe})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_config_file(path: str) -> dict:
    """The fields of a `--config` JSON file, a path or a URI (e.g. a search's best_config.json)."""
    from c40.remote import read_bytes

    try:
        d = json.loads(read_bytes(path))
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or first_line(e)}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of TrainConfig fields")
    unknown = sorted(set(d) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"--config {path}: unknown field(s) {', '.join(unknown)}")
    return d


def positive_int(s: str) -> int:
    """argparse type: an integer >= 1 (scripts' counts: steps, workers, trials...)."""
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def non_negative_int(s: str) -> int:
    """argparse type: an integer >= 0."""
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def positive_float(s: str) -> float:
    """argparse type: a number > 0 (e.g. CPUs per Ray worker; fractions allowed)."""
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def add_config_flags(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """`--config FILE` and one `--flag` per dataclass field; unset flags stay None so the file
    and the recipe can fill them."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="JSON of TrainConfig fields (e.g. a search's best_config.json); "
                             "flags override it")
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help")
        if f.name == "tta":
            add_tta_flags(parser, help_)
            continue
        if type(f.default) is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        if type(f.default) in (int, float):
            kind = type(f.default)
        parser.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=help_)


def add_tta_flags(parser: argparse.ArgumentParser, help: str) -> None:
    """`--tta [MODE]` (bare: flip) and `--no-tta` (= --tta off); unset: None."""
    parser.add_argument("--tta", nargs="?", const="flip", choices=TTA_MODES, default=None,
                        metavar="MODE", help=help)
    parser.add_argument("--no-tta", dest="tta", action="store_const", const="off",
                        help="same as --tta off")


def config_from_args(args: argparse.Namespace, cls=TrainConfig) -> TrainConfig:
    """The explicitly given flags over the `--config` file over the chosen recipe."""
    from_file = read_config_file(args.config) if getattr(args, "config", None) else {}
    given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    merged = {**from_file, **given}
    recipe = merged.pop("recipe", "fast")
    return cls.from_recipe(recipe, **merged)
