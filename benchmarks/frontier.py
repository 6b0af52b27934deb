"""Accuracy vs time on this machine: for each arch and each time budget (default 5, 15, 30 and
60 minutes), the test accuracy of one `c40 train` run sized to fit the budget.

Each run's epochs come from a calibration run made right before it, of the same arch and recipe
(4 epochs on the whole training set, each tested: two at the recipe's low resolution, then two
at 32 px; the first three tests are progress tests, at most flip TTA, the last the final test in
the recipe's TTA): the most epochs n with startup (every second outside the epochs: imports,
data loading and setup inside fit(), exit) + n x (training seconds per epoch at the recipe's
low-res share, each size's two epochs averaged) + (progress tests of n epochs at the recipe's
eval_every) x (seconds of one) + (seconds of the final test) <= budget x (1 - headroom:
--headroom, default 2%, since a budget is a limit). Calibrating per run, not once per arch,
follows the host: its speed drifts 10-25% between hours (a calibration 50 minutes old once sized
a 60-min run that took 53), and one epoch of a size is a noisy sample of it (single-epoch
calibrations of the hour's resnet / resnet_whiten read 24 px at 15.5 / 23.8 s where their runs'
medians were 19.3 / 18.6 s): two per size halve that variance.
Each budget is then one fresh process timed from start to exit, as a user meets it; a run that
overshoots its budget is recorded with `within_budget: false`, not hidden. Results, each run with
the calibration that sized it, are written after every run, and a run already measured with the
same flags and config (its epochs aside) is skipped (--force reruns), so the benchmark can be run
in pieces; a run measured before its recipe or a default moved (or before runs recorded their
config) is run again.
--clock lets each run follow the clock instead (`c40 train --time-budget`, c40.budget): no
calibration, the recipe's epochs as a cap, the schedule stretched to the budget less its headroom
as the run goes; its runs are a line of their own ("ARCH clock").
--train-flags adds `c40 train` flags to every run of the call (its calibrations included); its
runs are a line of their own, named by the arch and those flags, beside the plain arch's. An
epoch is priced at the run's own low-res share and test interval, so flags such as
"--low-res 20 --low-res-frac 0.5" size the runs they make.
Usage:
  python benchmarks/frontier.py --data DIR --archs strided,resnet --budgets 5,15,30,60
  python benchmarks/frontier.py --data DIR --archs resnet --budgets 60 --train-flags "--muon-lr 0.05"
  python benchmarks/frontier.py --data DIR --archs resnet_whiten --budgets 60 --clock
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (arch_names, machine_info, portable, previous_result,  # noqa: E402
                     train_config, train_process, write_result)

from c40.config import RECIPES, TrainConfig, positive_int  # noqa: E402
from c40.errors import C40Error  # noqa: E402
from c40.report import figure  # noqa: E402


def _flags(arch: str, args, **extra) -> list[str]:
    # the TTA mode is spelled out: the same command measures the same thing after a default moves
    flags = ["--recipe", args.recipe, "--arch", arch, "--seed", str(args.seed),
             "--tta", TrainConfig.from_recipe(args.recipe, device="cpu").tta]
    if args.data:
        flags += ["--data", args.data]
    extra = {"subset": args.subset, "test_subset": args.test_subset, **extra}
    for flag, value in extra.items():
        if value is None:
            continue
        flags += ["--" + flag.replace("_", "-"), str(value)]
    return flags + args.train_flags


# the flags that make a frontier run what it is: --train-flags may not set them
OWNED = {"--recipe", "--arch", "--seed", "--tta", "--epochs", "--data", "--out", "--subset",
         "--test-subset", "--resume", "--config", "--no-progress", "--time-budget"}
# what a calibration run sets after the run's own flags: two low-res epochs, two 32-px, each tested
CALIBRATION = ["--epochs", "4", "--low-res-frac", "0.5", "--eval-every", "1"]


# the share of a budget its run is not sized into: the prediction is a few seconds off even when
# the calibration is right (the 2026-12-07 hour: predicted 3,582 s, ran 3,606 s; a budget is a
# limit), and the host drifts within minutes
HEADROOM = 0.02


def headroom(text: str) -> float:
    value = float(text)
    if not 0 <= value < 0.5:
        raise argparse.ArgumentTypeError(f"--headroom {text}: must be >= 0 and < 0.5")
    return value


def train_flags(text: str) -> list[str]:
    try:
        flags = shlex.split(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--train-flags {text!r}: {e}") from None
    owned = sorted({f.split("=")[0] for f in flags} & OWNED)
    if owned:
        raise argparse.ArgumentTypeError(f"--train-flags may not set {', '.join(owned)}: "
                                         "the frontier sets them for each run")
    return flags


def check_flags(arch: str, args) -> dict:
    """The config a run of this call trains with, its epochs aside (they are sized per run);
    flags that `c40 train` would refuse stop it here, before any run."""
    try:
        cfg = train_config(_flags(arch, args, epochs=1))  # a ConfigError names the bad value
    except SystemExit:  # argparse has printed why
        raise C40Error(f"--train-flags {' '.join(args.train_flags)!r}: not c40 train flags") from None
    return {k: v for k, v in cfg.items() if k not in ("epochs", "time_budget")}


def label(arch: str, args) -> str:
    """The line's name in the JSON and the plot: the arch, "clock" under --clock, then any
    --train-flags."""
    return " ".join([arch, *(["clock"] if args.clock else []), *args.train_flags])


def calibrate(arch: str, minutes: float, args, config: dict) -> dict:
    """Training seconds of an epoch at low resolution and at 32 px (the mean of two each; the
    samples are kept), seconds of a progress test (the mean of three) and of the final test
    (c40.config.progress_tta), and the process's startup; the epoch is priced at the run's own
    low-res share and test interval (config: the run's, from check_flags, so --train-flags
    "--low-res-frac 0.5" size the run they make)."""
    r = train_process(_flags(arch, args) + CALIBRATION,
                      Path(args.runs_dir) / f"calibrate-{_slug(arch, args)}-{minutes:g}min",
                      f"frontier calibrate {arch} for {minutes:g} min")
    hist = r["history"]
    half = len(hist) // 2  # CALIBRATION's low-res share is 0.5: the first half is at low res
    train = [m["train_seconds"] for m in hist]
    tests = [m["seconds"] - m["train_seconds"] for m in hist]  # progress tests, then the final
    low, full = sum(train[:half]) / half, sum(train[half:]) / (len(hist) - half)
    frac = config["low_res_frac"]
    return {"low_res_seconds": round(low, 2), "full_res_seconds": round(full, 2),
            "low_res_samples": [round(t, 2) for t in train[:half]],
            "full_res_samples": [round(t, 2) for t in train[half:]],
            "progress_eval_seconds": round(sum(tests[:-1]) / (len(tests) - 1), 2),
            "eval_seconds": round(tests[-1], 2), "startup_seconds": r["startup_seconds"],
            "seconds_per_epoch": round(frac * low + (1 - frac) * full, 2),
            "low_res_frac": frac, "eval_every": config["eval_every"], "command": r["command"]}


def run_seconds(n: int, cal: dict) -> float:
    """Predicted wall seconds of an n-epoch run: startup, training, its progress tests (every
    eval_every epochs before the last) and the final test."""
    progress = math.ceil(n / cal["eval_every"]) - 1 if cal["eval_every"] else 0
    return (cal["startup_seconds"] + n * cal["seconds_per_epoch"]
            + progress * cal["progress_eval_seconds"] + cal["eval_seconds"])


def epochs_for(budget_s: float, cal: dict, cap: int | None = None) -> int:
    """The most epochs whose predicted run fits the budget (at least 1, at most cap)."""
    n = max(1, math.floor((budget_s - cal["startup_seconds"]) / cal["seconds_per_epoch"]))
    while n > 1 and run_seconds(n, cal) > budget_s:
        n -= 1
    return min(n, cap) if cap else n


def run_budget(arch: str, minutes: float, args, config: dict) -> dict:
    """Calibrate, size the run to the budget less its headroom, run it (--clock: run it under
    that budget, the recipe's epochs as a cap); config: what check_flags planned."""
    if args.clock:
        cal, epochs = None, args.epochs_cap
        flags = _flags(arch, args, epochs=epochs, time_budget=round(minutes * (1 - args.headroom), 4))
    else:
        cal = calibrate(arch, minutes, args, config)
        epochs = epochs_for(60 * minutes * (1 - args.headroom), cal, args.epochs_cap)
        flags = _flags(arch, args, epochs=epochs)
    r = train_process(flags, _out(arch, minutes, args), f"frontier {label(arch, args)} {minutes:g} min")
    curve = [{"epoch": m["epoch"], "elapsed": round(m["elapsed"], 2), "test_acc": m["test_acc"]}
             for m in r.pop("history") if "test_acc" in m]
    return {**r, "arch": arch, "train_flags": args.train_flags, "budget_minutes": minutes, "curve": curve,
            "within_budget": r["wall_seconds"] <= 60 * minutes, "headroom": args.headroom,
            "predicted_seconds": round(run_seconds(epochs, cal), 1) if cal else None, "calibration": cal,
            "config": config}


def _sans_sizing(command: list[str]) -> list[str]:
    """A run's command less what sized it to its budget (--epochs, --time-budget)."""
    out = list(command)
    for flag in ("--epochs", "--time-budget"):
        if flag in out:
            i = out.index(flag)
            del out[i:i + 2]
    return out


def _slug(arch: str, args) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", label(arch, args).replace("--", "")).strip("_")


def _out(arch: str, minutes: float, args) -> Path:
    return Path(args.runs_dir) / f"{_slug(arch, args)}-{minutes:g}min"


def plot(result: dict, path: Path) -> Path:
    """Accuracy against the budget; runs that overshot their budget are hollow markers."""
    fig = figure(7, 4.5)
    ax = fig.add_subplot()
    budgets = set()
    for arch, entry in result["archs"].items():
        runs = sorted(entry["budgets"].values(), key=lambda r: r["budget_minutes"])
        xs = [r["budget_minutes"] for r in runs]
        ys = [100 * r["final_accuracy"] for r in runs]
        line, = ax.plot(xs, ys, marker="o", label=arch)
        over = [(x, y) for x, y, r in zip(xs, ys, runs) if not r["within_budget"]]
        if over:
            ax.plot(*zip(*over), ls="none", marker="o", ms=10, mfc="none", color=line.get_color())
        budgets.update(xs)
    ax.set_xscale("log")
    ax.set_xticks(sorted(budgets), [f"{b:g}" for b in sorted(budgets)])
    ax.minorticks_off()
    ax.set_xlabel("time budget (min); ring: the run took longer than its budget")
    ax.set_ylabel("test accuracy (%)")
    m = result["machine"]
    gen = f" {m['cpu_generation']}" if m.get("cpu_generation") else ""
    ax.set_title(f"{result['recipe']} recipe sized to each budget; {m['cpu_model']}{gen} "
                 f"({m['cpu_count']} CPUs, bf16={m['cpu_bf16']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.margins(x=0.1, y=0.2)  # a point at the range's edge is drawn whole, clear of the legend
    ax.legend(loc="best")
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def main(argv=None) -> int:
    args = _parse(argv)
    out_dir = Path(args.out_dir)
    json_path, png_path = out_dir / "frontier.json", out_dir / "frontier.png"
    machine = machine_info()
    try:
        old = previous_result(json_path, machine, "archs")
        result = {"recipe": args.recipe, "seed": args.seed, "archs": old.get("archs", {}),
                  "machine": machine}
        configs = {arch: check_flags(arch, args) for arch in args.archs}
        for arch in args.archs:
            entry = result["archs"].setdefault(label(arch, args), {"budgets": {}})
            for minutes in args.budgets:
                key = f"{minutes:g}"
                wanted = portable([sys.executable, "-m", "c40", "train", *_flags(arch, args),
                                   "--out", str(_out(arch, minutes, args)), "--no-progress"])
                done = entry["budgets"].get(key)
                if (not args.force and done and _sans_sizing(done["command"]) == wanted
                        and done.get("config") == configs[arch]):
                    print(f"[frontier] {arch} {key} min: already measured, skipped", file=sys.stderr)
                    continue
                entry["budgets"][key] = run_budget(arch, minutes, args, configs[arch])
                write_result(json_path, result)  # after every run: it can stop and go on
    except (RuntimeError, C40Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_result(json_path, result)
    plot(result, png_path)
    for arch, entry in result["archs"].items():
        for key, r in entry["budgets"].items():
            print(f"{arch:>10} {key:>4} min: {r['final_accuracy']:.4f} in {r['wall_seconds']:.0f} s "
                  f"({r['epochs']} epochs){'' if r['within_budget'] else ' OVER BUDGET'}")
    print(f"wrote {json_path} and {png_path}", file=sys.stderr)
    return 0


def _parse(argv=None) -> argparse.Namespace:
    def minutes(s: str) -> list[float]:
        try:
            vals = [float(x) for x in s.split(",") if x.strip()]
        except ValueError:
            vals = []
        if not vals or min(vals) <= 0:
            raise argparse.ArgumentTypeError(f"budgets must be positive minutes, e.g. 5,15,30,60; got {s!r}")
        return vals

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", type=arch_names, default=["strided"], help="comma-separated archs")
    ap.add_argument("--budgets", type=minutes, default=[5.0, 15.0, 30.0, 60.0],
                    help="time budgets in minutes")
    ap.add_argument("--recipe", choices=list(RECIPES), default="best",
                    help="the recipe whose epochs are sized to each budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="cifar-10-batches-py folder (else $C40_DATA)")
    ap.add_argument("--out-dir", default="benchmarks/results", help="where the JSON and PNG go")
    ap.add_argument("--runs-dir", default="runs/frontier", help="each run's checkpoint and metrics")
    ap.add_argument("--force", action="store_true", help="rerun runs already measured")
    ap.add_argument("--train-flags", type=train_flags, default=[],
                    help='more `c40 train` flags for every run, e.g. "--muon-lr 0.05 --bn-bias-lr 8" (one flag alone: --train-flags=--flag)')
    ap.add_argument("--clock", action="store_true",
                    help="each run follows the clock (c40 train --time-budget) instead of a calibration")
    ap.add_argument("--headroom", type=headroom, default=HEADROOM,
                    help="fraction of each budget left free when sizing its run (default %(default)s)")
    ap.add_argument("--epochs-cap", type=positive_int, default=None,
                    help="at most this many epochs per run (smoke tests)")
    ap.add_argument("--subset", type=positive_int, default=None, help="train on N images (smoke tests)")
    ap.add_argument("--test-subset", type=positive_int, default=None, help="test on N images (smoke tests)")
    return ap.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
