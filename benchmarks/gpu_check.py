"""Everything a GPU can prove about c40, in one command (at most ~8 minutes on one H100-class GPU):

  1. pytest -m cuda          the CUDA-marked tests
  2. fit_amp                 fit with fp16 (+ GradScaler) and with bf16
  3. resume_determinism      two deterministic runs -> identical weights; a run stopped after
                             epoch 1 and resumed on the GPU -> the same weights; a CPU checkpoint
                             resumed on the GPU
  4. loaders                 both loaders yield normalised channels_last batches on the GPU;
                             one epoch with the albumentations loader
  5. compile                 torch.compile(dynamic=False) across the 24 -> 32 px switch
  6. loader_benchmark        benchmarks/loader.py (its CUDA column)
  7. train_step_benchmark    benchmarks/train_step.py on the GPU, every arch, with its profile
  8. fast_recipe             the fast recipe on the full data: time to 85% and final accuracy
  9. ray_train_fault         Ray Train, 1 GPU worker killed once after epoch 1 and restored
 10. tune_search             a Tune search of 2 trials at 0.5 GPU each

One JSON under benchmarks/results/gpu/ (named after the GPU) holds every step's result, its
time and any error; a failed step does not stop the others; exit 1 if any failed.
`--dry-run` runs the same steps on the CPU at tiny sizes (CI runs it, so it cannot rot).

    python benchmarks/gpu_check.py --data ../shared/cifar-10-batches-py
    python benchmarks/gpu_check.py --dry-run --data ../shared/cifar-10-batches-py --out /tmp/dry.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# seconds one Ray script may run: on the GPU machine (16 cores) the limit guards the lent device
# time; the CPU rehearsal's fault test (Ray start, a killed worker, the restart) took 172 s on two
# cores beside a training run, and ran past 300 s beside a training run and a test suite
SCRIPT_TIMEOUT_S = {"gpu": 300, "dry_run": 900}
sys.path.insert(0, str(HERE))
from _common import machine_info, write_result  # noqa: E402

from c40.checkpoint import load_checkpoint  # noqa: E402
from c40.config import TrainConfig  # noqa: E402
from c40.data import resolve_data_root  # noqa: E402
from c40.errors import C40Error  # noqa: E402
from c40.train import fit  # noqa: E402


class Check:
    """What every step needs: device, sizes (tiny under --dry-run), data, a scratch folder."""

    def __init__(self, args, work: Path):
        self.dry, self.work = args.dry_run, work
        self.device = "cpu" if args.dry_run else "cuda"
        self.data = str(resolve_data_root(args.data).resolve())
        self.subset = 128 if self.dry else 5000   # training images of the small fits
        self.test_subset = 128 if self.dry else 2000
        self.epochs = 2 if self.dry else 3

    def cfg(self, name: str, **kw) -> TrainConfig:
        base = dict(data=self.data, out=str(self.work / name), device=self.device, epochs=self.epochs,
                    subset=self.subset, test_subset=self.test_subset, tta=False, eval_every=1, seed=0,
                    **(dict(width=0.25, batch_size=64) if self.dry else dict(batch_size=128)))
        return TrainConfig.from_recipe("fast", **{**base, **kw})


def _weights_equal(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)


# ------------------------------------------------------------------------------- steps
def step_pytest_cuda(c: Check) -> dict:
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                        str(ROOT / "tests")], capture_output=True, text=True, cwd=ROOT)
    tail = (p.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", tail)}
    _require(p.returncode in (0, 5) and not counts.get("failed") and not counts.get("error"),
             f"pytest -m cuda: {tail}")
    return {"summary": tail, **counts}


def step_fit_amp(c: Check) -> dict:
    out = {}
    for amp in ("fp16", "bf16"):
        res = fit(c.cfg(f"amp_{amp}", amp=amp), progress=False)
        state = load_checkpoint(res.out / "checkpoint.pt")
        _require(all(torch.isfinite(v).all() for v in state["model"].values()), f"{amp}: non-finite weights")
        _require(bool(state["scaler"]) == (amp == "fp16"), f"{amp}: GradScaler state {state['scaler']}")
        out[amp] = {"accuracy": res.accuracy, "seconds": round(res.seconds, 2),
                    "images_per_s": round(res.history[-1]["images_per_s"])}
    return out


def _stop_after_first(metrics, _ckpt):
    if metrics["epoch"] == 1:
        raise KeyboardInterrupt  # a kill after epoch 1's checkpoint


def step_resume_determinism(c: Check) -> dict:
    a1 = fit(c.cfg("det_a1", deterministic=True), progress=False)
    a2 = fit(c.cfg("det_a2", deterministic=True), progress=False)
    try:
        fit(c.cfg("det_cut", deterministic=True), report=_stop_after_first, progress=False)
    except KeyboardInterrupt:
        pass
    fit(c.cfg("det_cut", deterministic=True, resume=True), progress=False)
    try:  # a CPU checkpoint (fp32, empty scaler state) continued on this device
        fit(c.cfg("from_cpu", device="cpu", amp="off"), report=_stop_after_first, progress=False)
    except KeyboardInterrupt:
        pass
    from_cpu = fit(c.cfg("from_cpu", resume=True), progress=False)
    torch.use_deterministic_algorithms(False)
    res = {"deterministic_runs_identical": _weights_equal(a1.out / "checkpoint.pt", a2.out / "checkpoint.pt"),
           "resumed_identical_to_uninterrupted": _weights_equal(a1.out / "checkpoint.pt",
                                                                c.work / "det_cut" / "checkpoint.pt"),
           "accuracy": a1.accuracy, "cpu_checkpoint_resumed_epochs": from_cpu.epochs}
    _require(res["deterministic_runs_identical"], "two deterministic runs differ")
    _require(res["resumed_identical_to_uninterrupted"], "resumed run differs from the uninterrupted one")
    _require(from_cpu.epochs == c.epochs, "CPU checkpoint did not resume to the end")
    return res


def step_loaders(c: Check) -> dict:
    from c40.data import channel_stats, load_dataset
    from c40.loaders import LoaderSpec, create_loader

    ds = load_dataset(c.data, "train").subset(c.subset)
    mean, std = channel_stats(ds.images)
    b = 64 if c.dry else 128
    spec = LoaderSpec(b, mean, std, augment=True, shuffle=True, drop_last=True)
    out = {}
    for kind in ("tensor", "albumentations"):
        with create_loader(kind, ds.images, ds.labels, spec, c.device, workers=2) as loader:
            for i, (x, y) in enumerate(loader):
                _require(x.device.type == c.device and y.device.type == c.device, f"{kind}: not on {c.device}")
                _require(x.shape == (b, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last),
                         f"{kind}: batch {tuple(x.shape)}")
                if i == 2:
                    break
            out[kind] = {"batch_mean": round(float(x.mean()), 3), "batch_std": round(float(x.std()), 3)}
    res = fit(c.cfg("albu", loader="albumentations", epochs=1, workers=2), progress=False)
    out["albumentations_fit_accuracy"] = res.accuracy
    return out


def step_compile(c: Check) -> dict:
    """Under --dry-run with the eager backend: graph capture and the recompile at the 24 -> 32 px
    switch, without inductor's code generation (~3 min on 2 CPU cores)."""
    import c40.train

    real = torch.compile
    if c.dry:
        c40.train.torch.compile = lambda model, **kw: real(model, **{**kw, "backend": "eager"})
    try:
        res = fit(c.cfg("compiled", compile=True, epochs=2, low_res=24, low_res_frac=0.5), progress=False)
    finally:
        c40.train.torch.compile = real
    return {"accuracy": res.accuracy, "backend": "eager" if c.dry else "inductor",
            "epoch_seconds": [round(m["seconds"], 2) for m in res.history]}


def step_loader_benchmark(c: Check) -> dict:
    import loader as bench

    argv = ["--data", c.data] + (["--batches", "3", "--repeats", "1", "--batch-size", "128",
                                  "--workers", "1"] if c.dry else ["--batches", "40", "--repeats", "3"])
    res = bench.run(bench._parse(argv))
    return {k: v for k, v in res.items() if k not in ("machine", "samples")}


def step_train_step_benchmark(c: Check) -> dict:
    import train_step as bench

    argv = ["--device", c.device, "--archs", "strided,dilated,resnet"] + (
        ["--steps", "2", "--repeats", "1", "--warmup", "1", "--profile", "1"] if c.dry
        else ["--steps", "100", "--repeats", "3", "--warmup", "10", "--profile", "20"])
    res = bench.run(bench._parse(argv))
    return {k: v for k, v in res.items() if k != "machine"}


def step_fast_recipe(c: Check) -> dict:
    kw = dict(subset=512, test_subset=256, epochs=2, width=0.25) if c.dry else {}
    cfg = TrainConfig.from_recipe("fast", data=c.data, out=str(c.work / "fast"), device=c.device,
                                  eval_every=1, **kw)
    res = fit(cfg, progress=False)
    hit = next((m for m in res.history if m.get("test_acc", 0) >= 0.85), None)
    return {"final_accuracy": res.accuracy, "seconds": round(res.seconds, 2),
            "seconds_to_85": round(hit["elapsed"], 2) if hit else None,
            "epoch_to_85": hit["epoch"] if hit else None, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "amp": load_checkpoint(res.out / "checkpoint.pt")["amp"],
            "test_acc_per_epoch": [m.get("test_acc") for m in res.history]}


def _script(c: Check, argv: list[str], env: dict | None = None) -> dict:
    p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, **(env or {})},
                       timeout=SCRIPT_TIMEOUT_S["dry_run" if c.dry else "gpu"])
    _require(p.returncode == 0, f"{argv[0]} exited {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1][:300]}")
    # the script's summary is its last JSON line, not its last line: Ray forwards worker logs to
    # the driver's stdout asynchronously, so one can land after it
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise AssertionError(f"{argv[0]}: no JSON line in its output")


def step_ray_train_fault(c: Check) -> dict:
    argv = ["distributed/train.py", "--num-workers", "1", "--epochs", "2", "--subset", str(c.subset),
            "--test-subset", str(c.test_subset), "--data", c.data, "--storage", str(c.work / "ray"),
            "--name", "fault", "--out", str(c.work / "ray_out"), "--json"] + (["--cpu"] if c.dry else [])
    res = _script(c, argv, {"C40_FAIL_AT_EPOCH": "1"})
    _require(res.get("resumed_from_epoch") == 1, f"not restored from epoch 1: {res.get('resumed_from_epoch')}")
    return {k: res.get(k) for k in ("test_acc", "epochs", "resumed_from_epoch", "seconds")}


def step_tune_search(c: Check) -> dict:
    argv = ["tune/search.py", "--num-samples", "2", "--epochs", "1", "--subset", str(c.subset),
            "--data", c.data, "--storage", str(c.work / "tune"), "--name", "search", "--json"]
    argv += ["--cpu"] if c.dry else ["--gpus-per-trial", "0.5"]
    res = _script(c, argv)
    return {k: v for k, v in res.items() if k not in ("results", "trials")}


STEPS = {"pytest_cuda": step_pytest_cuda, "fit_amp": step_fit_amp,
         "resume_determinism": step_resume_determinism, "loaders": step_loaders,
         "compile": step_compile, "loader_benchmark": step_loader_benchmark,
         "train_step_benchmark": step_train_step_benchmark, "fast_recipe": step_fast_recipe,
         "ray_train_fault": step_ray_train_fault, "tune_search": step_tune_search}


def run(args) -> dict:
    if not args.dry_run and not torch.cuda.is_available():
        raise C40Error("no CUDA GPU here: run on a GPU machine, or pass --dry-run for the CPU rehearsal")
    result = {"dry_run": args.dry_run, "steps": {}, "machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="c40-gpu-check-") as work:
        c = Check(args, Path(work))
        for name in args.steps:
            t0 = time.perf_counter()
            print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
            try:
                step = {"ok": True, **STEPS[name](c)}
            except Exception as e:  # recorded; the other steps still run
                step = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}",
                        "traceback": traceback.format_exc()[-2000:]}
            step["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"[gpu_check] {name}: {'ok' if step['ok'] else 'FAILED ' + step['error']} "
                  f"({step['seconds']} s)", file=sys.stderr, flush=True)
            result["steps"][name] = step
    result["ok"] = all(s["ok"] for s in result["steps"].values())
    return result


def default_out(dry_run: bool) -> Path:
    name = "dry-run" if dry_run else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return HERE / "results" / "gpu" / f"{name}.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    ap.add_argument("--data", default=None, help="cifar-10-batches-py folder (else $C40_DATA)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu/<gpu>.json)")
    ap.add_argument("--steps", default=",".join(STEPS), type=lambda s: s.split(","),
                    help="comma-separated subset of: " + ", ".join(STEPS))
    args = ap.parse_args(argv)
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        ap.error(f"unknown step(s) {', '.join(unknown)} (choose from {', '.join(STEPS)})")
    try:
        res = run(args)
    except C40Error as e:
        print(f"gpu_check.py: error: {e}", file=sys.stderr)
        return 2
    out = write_result(args.out or default_out(args.dry_run), res)
    print(f"[gpu_check] {'all ok' if res['ok'] else 'FAILED: ' + ', '.join(k for k, s in res['steps'].items() if not s['ok'])}"
          f" -> {out}", file=sys.stderr)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
