"""benchmarks/loader.py runs end to end and prints the documented JSON (tiny settings)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = os.environ.get("C40_TEST_DATA", "/work/shared/cifar-10-batches-py")


@pytest.fixture(scope="module")
def data_dir() -> str:
    if not os.path.isdir(DATA):
        pytest.skip(f"CIFAR-10 not found at {DATA} (set C40_TEST_DATA)")
    return DATA


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loader.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_loader_benchmark_json(data_dir, tmp_path):
    out = tmp_path / "res" / "loader.json"
    p = _run("--json", "--batches", "3", "--workers", "1", "--batch-size", "128", "--repeats", "1",
             "--data", data_dir, "--out", str(out))
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert json.loads(out.read_text()) == res
    for k in ("baseline_img_s", "cpu_loader_img_s", "tensor_cpu_img_s"):
        assert isinstance(res[k], float) and res[k] > 0, k
    for k in ("cpu_loader_vs_baseline", "tensor_cpu_vs_baseline"):
        assert res[k] > 0, k
    cuda = res["tensor_cuda_img_s"]
    assert (cuda is None) == (res["tensor_cuda_vs_baseline"] is None)
    assert cuda is not None or res["tensor_cuda_note"].startswith("skipped")
    m = res["machine"]
    for k in ("cpu_count", "cpu_model", "torch", "device_name", "date", "command", "git_commit"):
        assert k in m, k
    assert m["cpu_count"] >= 1 and "loader.py" in m["command"]
    assert res["config"]["workers"] == 1 and res["config"]["batches"] == 3


def test_loader_benchmark_rejects_bad_input(tmp_path):
    p = _run("--data", str(tmp_path / "missing"), "--batches", "1")
    assert p.returncode == 2 and "does not exist" in p.stderr and len(p.stderr.splitlines()) == 1
