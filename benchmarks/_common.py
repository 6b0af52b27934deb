"""Shared by the benchmark scripts: what machine a result came from, and writing it safely.

benchmarks/ is a folder of scripts (no __init__.py); scripts import this with
`sys.path.insert(0, os.path.dirname(__file__))`.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _cpuinfo() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    pairs = (line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def _cpu_model(info: dict[str, str]) -> str:
    return info.get("model name") or platform.processor() or "unknown"


def _cpu_generation(info: dict[str, str]) -> str | None:
    """x86 "family F model M": "AMD EPYC" names hosts of different generations here (family 26
    runs the fast recipe ~1.9x faster than the earlier bf16 host)."""
    if "cpu family" not in info or "model" not in info:
        return None
    return f"family {info['cpu family']} model {info['model']}"


def _git_commit() -> str | None:
    """HEAD of the checkout this script lives in, with '-dirty' when tracked files changed."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def machine_info() -> dict:
    """Where and when a benchmark ran: hardware, versions, command line, git commit."""
    import torch

    from c40.precision import cpu_has_native_bf16

    cuda = torch.cuda.is_available()
    cpu = _cpuinfo()
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
        "git_commit": _git_commit(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(cpu),
        "cpu_bf16": cpu_has_native_bf16(),  # AVX512-BF16/AMX: CPU bf16 autocast is on (amp=auto)
        "cpu_generation": _cpu_generation(cpu),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if cuda else None,
        "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
    }
    for mod in ("numpy", "albumentations", "cv2"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


MACHINE_KEYS = ("cpu_model", "device_name", "cpu_count", "cpu_bf16", "cpu_generation")


def same_machine(a: dict, b: dict) -> bool:
    """Whether two results' `machine_info` describe one machine (the benchmarks never mix
    machines): same CPU model, generation, device, core count and bf16 support ("AMD EPYC" names
    AVX2-only and AVX512-BF16 hosts of two generations here, up to ~4x apart in speed). A result
    written before cpu_bf16 was recorded (2026-11-28) is matched on the other keys; one without
    cpu_generation (before 2026-12-05) is another machine: a 1.9x faster host of the same name
    and bf16 flag came then."""
    return all(a.get(k, b.get(k)) == b.get(k) if k == "cpu_bf16" else a.get(k) == b.get(k)
               for k in MACHINE_KEYS)


def machine_line(m: dict) -> str:
    return ", ".join(f"{k}={m.get(k)!r}" for k in MACHINE_KEYS)


def previous_result(path: str | os.PathLike, machine: dict, key: str) -> dict:
    """The result at `path` to add this machine's runs to: {} when there is none. One that holds
    another machine's results (under `key`) is not written over: a RuntimeError names both
    machines and --out-dir, before anything is measured (results never mix machines, and a
    committed result of one host must not vanish when the script runs on another)."""
    path = Path(path)
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise RuntimeError(f"{path} is not a JSON result ({e}); move it away or pass --out-dir") from None
    theirs = old.get("machine", {})
    if same_machine(theirs, machine):
        return old
    if old.get(key):
        raise RuntimeError(f"{path} holds another machine's results ({machine_line(theirs)}; this "
                           f"one: {machine_line(machine)}); pass --out-dir DIR to measure this "
                           "machine apart")
    return {}


def write_result(path: str | os.PathLike, result: dict) -> Path:
    """Write `result` as JSON to `path` atomically: readers see the old file or the whole new one."""
    from c40.files import write_text

    return write_text(path, json.dumps(result, indent=2, sort_keys=False) + "\n")


def arch_names(s: str) -> list[str]:
    """argparse type: comma-separated names of registered archs."""
    import argparse

    from c40.model import list_models

    names = [a.strip() for a in s.split(",") if a.strip()]
    bad = [a for a in names if a not in list_models()]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown arch {bad or s!r} (choose from "
                                         f"{', '.join(list_models())})")
    return names


FINAL_RE = re.compile(r"final test accuracy: ([0-9.]+)")


def portable(cmd: list[str]) -> list[str]:
    """A command as a user would type it (no absolute interpreter path)."""
    return ["python", *cmd[1:]]


def train_config(flags: list[str]) -> dict:
    """The config `c40 train FLAGS` trains with, its out folder aside. A recorded run is the same
    run only with the same config: the same command trains something else once a recipe or a
    default moved (best took Muon at batch 256 on 2026-12-06)."""
    from c40.cli import build_parser
    from c40.config import config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", *flags]))
    return {k: v for k, v in cfg.to_dict().items() if k != "out"}


def train_process(flags: list[str], out: Path, tag: str) -> dict:
    """One fresh `python -m c40 train FLAGS --out OUT --no-progress` process, timed from start to
    exit (imports, data loading and every evaluation included) -> its final accuracy, wall and
    startup seconds, epochs, per-epoch history (metrics.jsonl) and the command. A half-finished
    earlier run in OUT is removed first (time it afresh)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "c40", "train", *flags, "--out", str(out), "--no-progress"]
    print(f"[{tag}] {' '.join(portable(cmd))}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{tag} failed (exit {p.returncode}): {last}")
    found = FINAL_RE.search(p.stdout)
    if not found:
        raise RuntimeError(f"{tag}: no 'final test accuracy' line in the output")
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    from c40.checkpoint import load_checkpoint
    code = load_checkpoint(out / "checkpoint.pt")["provenance"].get("c40_commit")  # at its start
    return {"final_accuracy": float(found.group(1)), "wall_seconds": round(wall, 2),
            "c40_commit": code,
            # outside the epochs: imports, data loading and the run's setup inside fit(), exit
            "startup_seconds": round(wall - sum(m["seconds"] for m in hist), 2),
            "epochs": len(hist), "history": hist, "command": portable(cmd),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def run_and_emit(args, run, summarize) -> int:
    """Run a benchmark: a C40Error is one line and exit 2; --out writes the JSON result,
    --json prints it, otherwise `summarize(res, args)` prints a human summary."""
    from c40.errors import C40Error

    try:
        res = run(args)
    except C40Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        write_result(args.out, res)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        summarize(res, args)
    return 0
