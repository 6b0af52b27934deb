"""Shared by the benchmark scripts: what machine a result came from, and writing it safely.

benchmarks/ is a folder of scripts (no __init__.py); scripts import this with
`sys.path.insert(0, os.path.dirname(__file__))`.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
        "git_commit": _git_commit(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "cpu_bf16": cpu_has_native_bf16(),  # AVX512-BF16/AMX: CPU bf16 autocast is on (amp=auto)
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


def write_result(path: str | os.PathLike, result: dict) -> Path:
    """Write `result` as JSON to `path` atomically: readers see the old file or the whole new one."""
    from c40.files import write_text

    return write_text(path, json.dumps(result, indent=2, sort_keys=False) + "\n")


def positive(s: str) -> int:
    """argparse type: an integer >= 1."""
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def non_negative(s: str) -> int:
    """argparse type: an integer >= 0."""
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


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
