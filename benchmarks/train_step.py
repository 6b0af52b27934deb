"""Training-step throughput (images/s) per arch, on one synthetic batch:

  (a) baseline: the plain loop: fp32, NCHW, eager; forward, cross-entropy, backward, SGD step
  (b) c40: `c40.train.train_step` as `fit` runs it: channels_last model and batch,
      `resolve_amp("auto", device)` autocast (+ GradScaler for fp16; depthwise convs kept fp32
      under CPU bf16, as `fit` does), our SGD optimizer
  (c) (b) under `torch.compile`, with --compile
With --profile N, also where (b)'s step spends its time: the ops with the most self time over N
steps under torch.profiler (CPU time on a CPU, device time on CUDA).

Every variant starts from the same initial weights (one seeded model, deep-copied) and trains on
the same batch. W warm-up steps per round are excluded (compilation, allocator, cuDNN autotune);
K timed steps per round, CUDA synchronised; R interleaved rounds, the median is reported. Usage:
  python benchmarks/train_step.py --json --out benchmarks/results/train_step.json
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import arch_names, machine_info, run_and_emit  # noqa: E402
from c40.config import non_negative_int, positive_int  # noqa: E402

from c40.config import TrainConfig  # noqa: E402
from c40.model import count_params, create_model  # noqa: E402
from c40.precision import autocast, keep_depthwise_fp32, resolve_amp, resolve_device  # noqa: E402
from c40.optim import create_optimizer  # noqa: E402
from c40.train import train_step  # noqa: E402


def _baseline_step(model, x, y):
    """The loop most tutorials write: no memory format, no autocast, no scaler."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _c40_step(model, x, y, arch: str, device: torch.device, compile: bool):
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    amp = resolve_amp("auto", device)
    keep_depthwise_fp32(model, amp, device)  # as fit() does: CPU bf16 depthwise backward is slow
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    opt = create_optimizer(model, TrainConfig.from_recipe("fast", arch=arch), fused=scaler.is_enabled())
    net = torch.compile(model, dynamic=False) if compile else model
    return lambda: train_step(net, x, y, opt, scaler, lambda: autocast(device, amp), label_smoothing=0.2)


def _images_per_s(step, warmup: int, steps: int, batch_size: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch_size / (time.perf_counter() - t0)


def profile_step(step, steps: int, device: torch.device, top: int = 12) -> list[dict]:
    """The `top` ops by self time over `steps` steps (after one untimed step), per step."""
    from torch.profiler import ProfilerActivity, profile

    step()
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events)
    return [{"op": e.key, "ms_per_step": round(getattr(e, key) / 1e3 / steps, 3),
             "share": round(getattr(e, key) / total, 3), "calls_per_step": e.count // steps}
            for e in sorted(events, key=lambda e: -getattr(e, key))[:top]]


def _ratio(a: float | None, b: float) -> float | None:
    return None if a is None else round(a / b, 2)


def bench_arch(arch: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    base = create_model(arch, width=args.width).to(device).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g).to(device)       # (B, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)      # (B,)
    variants = {"baseline": _baseline_step(copy.deepcopy(base), x, y),
                "c40": _c40_step(copy.deepcopy(base), x, y, arch, device, compile=False)}
    if args.compile:
        variants["compiled"] = _c40_step(copy.deepcopy(base), x, y, arch, device, compile=True)
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):  # interleaved: a burst of outside load hits every variant
        for name, step in variants.items():
            samples[name].append(_images_per_s(step, args.warmup, args.steps, args.batch_size, device))
    med = {k: round(float(np.median(v)), 1) for k, v in samples.items()}
    res = {"params": count_params(base), "baseline_img_s": med["baseline"], "c40_img_s": med["c40"],
           "compiled_img_s": med.get("compiled"),
           "c40_vs_baseline": _ratio(med["c40"], med["baseline"]),
           "compiled_vs_baseline": _ratio(med.get("compiled"), med["baseline"]),
           "samples": {k: [round(s, 1) for s in v] for k, v in samples.items()}}
    if args.profile:
        res["profile"] = profile_step(variants["c40"], args.profile, device)
    return res


def run(args) -> dict:
    device = resolve_device(args.device)
    amp = resolve_amp("auto", device)
    res = {"archs": {arch: bench_arch(arch, args, device) for arch in args.archs}}
    res["config"] = {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                     "batch_size": args.batch_size, "width": args.width, "device": str(device),
                     "c40_amp": str(amp).replace("torch.", "") if amp else "off",
                     "c40_channels_last": True, "compile": args.compile, "profile_steps": args.profile,
                     "batch": "synthetic randn, fixed"}
    res["machine"] = machine_info()
    return res


def _parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    ap.add_argument("--steps", type=positive_int, default=20, help="timed steps per round")
    ap.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps per round")
    ap.add_argument("--repeats", type=positive_int, default=3, help="interleaved rounds (median)")
    ap.add_argument("--batch-size", type=positive_int, default=128, help="the recipes' batch size")
    ap.add_argument("--archs", type=arch_names, default=["strided", "dilated"],
                    help="comma-separated arch names")
    ap.add_argument("--width", type=float, default=1.0, help="channel multiplier")
    ap.add_argument("--compile", action="store_true", help="also time (b) under torch.compile")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--profile", type=non_negative_int, default=0, metavar="N",
                    help="also profile N steps of (b): the ops with the most self time")
    return ap.parse_args(argv)


def _print_summary(res: dict, args) -> None:
    print(f"device={res['config']['device']} amp={res['config']['c40_amp']} "
          f"batch={args.batch_size}")
    for arch, r in res["archs"].items():
        comp = f"  compiled {r['compiled_img_s']} ({r['compiled_vs_baseline']}x)" \
            if r["compiled_img_s"] is not None else ""
        print(f"{arch:>8}: baseline {r['baseline_img_s']} img/s  c40 {r['c40_img_s']} "
              f"({r['c40_vs_baseline']}x){comp}")
        for row in r.get("profile", [])[:8]:
            print(f"          {row['share']:6.1%}  {row['ms_per_step']:8.2f} ms  {row['op']}")


def main(argv=None) -> int:
    return run_and_emit(_parse(argv), run, _print_summary)


if __name__ == "__main__":
    sys.exit(main())
