"""Time to accuracy, measured the way a user meets it: `c40 train` as a subprocess, wall time
from process start to exit (imports, data loading, every epoch's test evaluation included).

Runs the fast recipe once per seed and the assignment's reference recipe (`--eval-every 1`), or
takes the reference from a committed JSON of the same machine (`--reference-from`), or skips it.
Per run: final accuracy (parsed from the printed line), seconds to 85% (the `elapsed` field of
the first epoch whose test_acc >= 0.85 in metrics.jsonl; null if never), wall seconds, epochs.
Results are written after every run and a run whose result exists (same command, same config: a
recipe that moved makes it stale) is skipped, so a long benchmark can be run in pieces; --force
reruns. Usage:
  python benchmarks/time_to_accuracy.py --data DIR --seeds 0,1,2
  python benchmarks/time_to_accuracy.py --data DIR --seeds 0,1,2 --force --skip-reference
    (reruns the fast seeds and keeps the reference run already recorded in the output JSON)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (machine_info, machine_line, previous_result, same_machine,  # noqa: E402
                     train_config, train_process, write_result)

from c40.config import TrainConfig  # noqa: E402

TARGET = 0.85  # the assignment's test-accuracy bar


def _command(recipe: str, seed: int, args) -> list[str]:
    """The `c40 train` flags of one run (--out and --no-progress are added by train_process)."""
    # the TTA mode is spelled out: the same command measures the same thing after a default moves
    cmd = ["--recipe", recipe, "--seed", str(seed),
           "--tta", TrainConfig.from_recipe(recipe, device="cpu").tta]
    if args.data:
        cmd += ["--data", args.data]
    epochs = args.epochs_reference if recipe == "reference" else args.epochs
    if epochs:
        cmd += ["--epochs", str(epochs)]
    if recipe == "reference":
        cmd += ["--eval-every", "1"]  # the reference evaluates every epoch: a curve to compare
    for flag, value in (("--subset", args.subset), ("--test-subset", args.test_subset)):
        if value:
            cmd += [flag, str(value)]
    return cmd


def _run_dir(recipe: str, seed: int, args) -> Path:
    return Path(args.runs_dir) / f"{recipe}-seed{seed}"


def _wanted(recipe: str, seed: int, args) -> list[str]:
    """The command a run of (recipe, seed) is recorded with."""
    return ["python", "-m", "c40", "train", *_command(recipe, seed, args), "--out",
            str(_run_dir(recipe, seed, args)), "--no-progress"]


def run_one(recipe: str, seed: int, args, config: dict) -> dict:
    """One fresh `c40 train` process; its outputs go to RUNS_DIR/<recipe>-seed<S>/."""
    r = train_process(_command(recipe, seed, args), _run_dir(recipe, seed, args),
                      f"time_to_accuracy {recipe} seed {seed}")
    curve = [{"epoch": m["epoch"], "elapsed": round(m["elapsed"], 2),
              "test_acc": m["test_acc"]} for m in r.pop("history") if "test_acc" in m]
    hit = next((m for m in curve if m["test_acc"] >= TARGET), None)
    return {"recipe": recipe, "seed": seed, "final_accuracy": r["final_accuracy"],
            "seconds_to_85": hit["elapsed"] if hit else None,
            "epochs_to_85": hit["epoch"] if hit else None,
            "wall_seconds": r["wall_seconds"], "startup_seconds": r["startup_seconds"],
            "epochs": r["epochs"], "curve": curve, "command": r["command"], "date": r["date"],
            "config": config}


def _summary(runs: list[dict]) -> dict | None:
    if not runs:
        return None
    acc = [r["final_accuracy"] for r in runs]
    wall = [r["wall_seconds"] for r in runs]
    to85 = [r["seconds_to_85"] for r in runs]
    return {"n": len(runs), "seeds": [r["seed"] for r in runs],
            "final_accuracy_mean": round(sum(acc) / len(acc), 4), "final_accuracy_min": min(acc),
            "wall_seconds_mean": round(sum(wall) / len(wall), 1), "wall_seconds_max": max(wall),
            "seconds_to_85_mean": (round(sum(to85) / len(to85), 1) if None not in to85 else None),
            "all_reached_85": None not in to85}


def _reference_from(path: str, machine: dict) -> dict:
    try:
        old = json.loads(Path(path).read_text())
        runs = [r for r in old["runs"].values() if r["recipe"] == "reference"]
        theirs = old["machine"]
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise RuntimeError(f"--reference-from {path}: not a time_to_accuracy result ({e})") from None
    if not same_machine(theirs, machine):
        raise RuntimeError(f"--reference-from {path}: measured on another machine "
                           f"({machine_line(theirs)} != {machine_line(machine)})")
    if not runs:
        raise RuntimeError(f"--reference-from {path}: holds no reference run")
    # a run that was itself taken from another file keeps that file as its source
    return {f"reference-seed{r['seed']}": {**r, "source": r.get("source", str(path))} for r in runs}


def plot(result: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"fast": "tab:blue", "reference": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = set()
    for r in result["runs"].values():
        xs = [m["elapsed"] for m in r["curve"]]
        ys = [100 * m["test_acc"] for m in r["curve"]]
        label = None if r["recipe"] in seen else f"{r['recipe']} recipe"
        seen.add(r["recipe"])
        ax.plot(xs, ys, marker="o", ms=3, color=colours.get(r["recipe"], "grey"), label=label)
    ax.axhline(100 * TARGET, color="grey", ls="--", lw=1, label=f"{100 * TARGET:.0f}% target")
    ax.set_xlabel("wall time since training started (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"time to accuracy on {result['machine']['device_name']} "
                 f"({result['machine']['cpu_count']} CPUs)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = _parse(argv)
    out_dir = Path(args.out_dir)
    json_path, png_path = out_dir / "time_to_accuracy.json", out_dir / "time_to_accuracy.png"
    machine = machine_info()
    try:
        runs: dict = previous_result(json_path, machine, "runs").get("runs", {})
        plan = [("fast", s) for s in args.seeds]
        if args.reference_from:
            runs.update(_reference_from(args.reference_from, machine))
        elif not args.skip_reference:
            plan.append(("reference", args.seeds[0]))
        for recipe, seed in plan:
            key = f"{recipe}-seed{seed}"
            wanted = _wanted(recipe, seed, args)
            done, config = runs.get(key, {}), train_config(_command(recipe, seed, args))
            if not args.force and done.get("command") == wanted and done.get("config") == config:
                print(f"[time_to_accuracy] {key}: already measured, skipped (--force reruns)",
                      file=sys.stderr)
                continue
            runs[key] = run_one(recipe, seed, args, config)
            result = _result(runs, args, machine)
            write_result(json_path, result)  # after every run: the benchmark can stop and go on
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = _result(runs, args, machine)
    write_result(json_path, result)
    plot(result, png_path)
    print(json.dumps({k: result[k] for k in ("fast", "reference")}, indent=2))
    print(f"wrote {json_path} and {png_path}", file=sys.stderr)
    return 0


def _result(runs: dict, args, machine: dict) -> dict:
    by = lambda recipe: [r for r in runs.values() if r["recipe"] == recipe]  # noqa: E731
    fast = [r for r in by("fast") if r["seed"] in args.seeds]
    return {"target": TARGET, "fast": _summary(fast), "reference": _summary(by("reference")),
            "runs": runs, "machine": machine,
            "commands": {k: " ".join(r["command"]) for k, r in runs.items()}}


def _parse(argv=None) -> argparse.Namespace:
    def seeds(s: str) -> list[int]:
        try:
            return [int(x) for x in s.split(",") if x.strip()] or [0]
        except ValueError:
            raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {s!r}")

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=seeds, default=[0, 1, 2], help="fast-recipe seeds, e.g. 0,1,2")
    ap.add_argument("--data", default=None, help="cifar-10-batches-py folder (else $C40_DATA)")
    ap.add_argument("--out-dir", default="benchmarks/results", help="where the JSON and PNG go")
    ap.add_argument("--runs-dir", default="runs/time_to_accuracy",
                    help="where each run's checkpoint and metrics go")
    ref = ap.add_mutually_exclusive_group()
    ref.add_argument("--reference-from", default=None,
                     help="take the reference run from this time_to_accuracy.json (same machine)")
    ref.add_argument("--skip-reference", action="store_true", help="do not run the reference")
    ap.add_argument("--epochs", type=int, default=None, help="override the fast recipe's epochs")
    ap.add_argument("--epochs-reference", type=int, default=None,
                    help="override the reference recipe's epochs (45)")
    ap.add_argument("--subset", type=int, default=None, help="train on N images (smoke tests)")
    ap.add_argument("--test-subset", type=int, default=None, help="test on N images (smoke tests)")
    ap.add_argument("--force", action="store_true", help="rerun runs that are already measured")
    return ap.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
