"""Do more test-time views pay? The test accuracy of checkpoints with the softmax averaged over
view sets beyond c40's TTA modes (issue #19: "more TTA views").

Each image is seen once per view: itself and its left-right mirror, each moved by (dy, dx) px
with reflected borders, for the shifts of the 3x3 grid of +-1 px and the four +-2 px diagonals
(26 views). The sets compared, each averaging the softmax of its views:
  off (1), flip (2), flip-shift (6: c40's mode, flip x {0, (-1,-1), (+1,+1)}),
  flip-diag (10: flip x {0, the four +-1 diagonals}), flip-3x3 (18), flip-3x3-diag2 (26).
`off`, `flip` and `flip-shift` give what `c40 eval --tta MODE` prints for the checkpoint (one
loader, one dtype: the checkpoint's). Usage:
  python benchmarks/tta_views.py --data DIR --checkpoints weights/resnet_best200.pt,... \
      --json --out benchmarks/results/tta_views.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, run_and_emit  # noqa: E402

from c40.config import positive_int  # noqa: E402
from c40.data import load_dataset, resolve_data_root  # noqa: E402
from c40.inference import load_for_inference, run_amp  # noqa: E402
from c40.loaders import LoaderSpec, TensorLoader  # noqa: E402
from c40.precision import autocast  # noqa: E402

GRID = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
DIAG1 = [(-1, -1), (1, 1), (-1, 1), (1, -1)]
DIAG2 = [(-2, -2), (2, 2), (-2, 2), (2, -2)]
SHIFTS = GRID + DIAG2  # the views of one orientation; the mirror repeats them
SETS = {"off": [(0, 0)], "flip-shift": [(0, 0), (-1, -1), (1, 1)], "flip-diag": [(0, 0), *DIAG1],
        "flip-3x3": GRID, "flip-3x3-diag2": SHIFTS}  # off aside, each with its mirror


def view_probs(model, x: torch.Tensor, amp) -> torch.Tensor:
    """(B, 2 x len(SHIFTS), classes) softmax of every view of the batch x."""
    views, (h, w) = [], x.shape[2:]
    for v in (x, x.flip(3)):
        p = F.pad(v, (2, 2, 2, 2), mode="reflect")
        views += [p[:, :, 2 + dy:2 + dy + h, 2 + dx:2 + dx + w]
                  .contiguous(memory_format=torch.channels_last) for dy, dx in SHIFTS]
    with autocast(x.device, amp):
        return torch.stack([model(v).float().softmax(-1) for v in views], 1)


def set_accuracies(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    n = len(SHIFTS)
    idx = {name: [SHIFTS.index(s) for s in shifts] for name, shifts in SETS.items()}
    cols = {"off": idx["off"], "flip": [idx["off"][0], n + idx["off"][0]]}
    cols |= {name: ix + [n + i for i in ix] for name, ix in idx.items() if name != "off"}
    return {name: float((probs[:, c].mean(1).argmax(-1) == labels).mean())
            for name, c in sorted(cols.items(), key=lambda kv: len(kv[1]))}


def run(args) -> dict:
    ds = load_dataset(resolve_data_root(args.data), "test").subset(args.test_subset)
    res = {"machine": machine_info(), "test_images": len(ds), "checkpoints": {},
           "views": {"shifts": SHIFTS, "sets": SETS}}
    for path in args.checkpoints:
        t = time.perf_counter()
        model, state, dev = load_for_inference(path, args.device)  # in eval mode
        amp = run_amp(state, dev)
        spec = LoaderSpec(1024, state["mean"], state["std"])
        with torch.no_grad(), TensorLoader(ds.images, ds.labels, spec, dev) as loader:
            probs = torch.cat([view_probs(model, x, amp).cpu() for x, _ in loader]).numpy()
        res["checkpoints"][path] = {"accuracy": set_accuracies(probs, ds.labels),
                                    "seconds": round(time.perf_counter() - t, 1)}
    return res


def _print_summary(res: dict, args) -> None:
    for path, r in res["checkpoints"].items():
        print(path, "  ".join(f"{k}={v:.2%}" for k, v in r["accuracy"].items()))


def _parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="CIFAR-10 folder (default: $C40_DATA)")
    ap.add_argument("--checkpoints", required=True, type=lambda s: [p for p in s.split(",") if p],
                    help="comma-separated checkpoint files")
    ap.add_argument("--test-subset", type=positive_int, default=None, help="first N test images")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    return run_and_emit(_parse(argv), run, _print_summary)


if __name__ == "__main__":
    sys.exit(main())
