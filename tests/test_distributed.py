"""distributed/train.py: Ray Train V2 over c40.train.fit on 2 CPU workers (gloo).

Tiny runs (512 real training images, the 200 test images of the `tiny_cifar` folder) on one
shared local Ray instance.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

TINY = ["--cpu", "--epochs", "1", "--subset", "512", "--test-subset", "256", "--batch-size", "64",
        "--lr", "0.05",  # stable on 8 steps (the fast recipe's 0.4 overshoots this tiny run)
        "--seed", "0"]


@pytest.fixture(scope="module")
def script():
    return load_script("distributed/train.py")


def _train(script, data: Path, tmp: Path, name: str, *extra: str) -> dict:
    args, cfg = script.parse_args([*TINY, "--data", str(data), "--storage", str(tmp / "storage"),
                                   "--name", name,
                                   "--out", str(tmp / name), *extra])
    return script.train(args, cfg)


def test_gpu_workers_are_packed_on_one_node_by_default(script, tiny_cifar, monkeypatch):
    """Multi-GPU DDP stays inside one node (NCCL over NVLink/PCIe, not the network)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a driver with a GPU
    for extra, placement in (([], "STRICT_PACK"), (["--cpu"], "PACK"),
                             (["--placement", "SPREAD"], "SPREAD")):
        args, _ = script.parse_args(["--num-workers", "4", "--data", str(tiny_cifar), *extra])
        assert args.placement == placement


def test_a_cpu_only_driver_configures_gpu_workers(script, tiny_cifar):
    """On a cluster the driver runs on the CPU head; the GPU recipe values are for the workers."""
    _, cfg = script.parse_args(["--num-workers", "4", "--data", str(tiny_cifar)])
    assert cfg.device == "cuda" and cfg.batch_size == 512


def test_a_time_budget_is_refused_on_several_workers(script, tiny_cifar, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--num-workers", "2", "--time-budget", "5", "--data", str(tiny_cifar)])
    assert "--time-budget trains in one process" in capsys.readouterr().err
    _, cfg = script.parse_args(["--num-workers", "1", "--time-budget", "5", "--data", str(tiny_cifar)])
    assert cfg.time_budget == 5.0


def test_the_driver_refuses_a_model_before_any_worker_starts(script, tiny_cifar, tmp_path):
    """One line from the driver, not a traceback from every worker after Ray has started: the
    no-stride dilated arch cannot take the fast recipe's 24-px epochs."""
    from c40.errors import ConfigError

    started = ray.is_initialized()
    with pytest.raises(ConfigError, match="needs inputs of at least 27 px"):
        _train(script, tiny_cifar, tmp_path, "small", "--arch", "dilated", "--epochs", "2",
               "--low-res-frac", "0.5")  # epoch 1 of 2 at 24 px
    assert ray.is_initialized() == started  # refused before ray.init


def test_a_local_teacher_is_staged_where_every_node_reads_it(script, tiny_cifar, tmp_path):
    """Workers on other nodes do not see the driver's disk: a local --teacher is copied into the
    run's storage and the workers' config names that copy; a missing one fails in the driver."""
    import torch

    from c40.checkpoint import load_checkpoint
    from c40.model import create_model

    teacher = tmp_path / "teacher.pt"  # any c40 checkpoint
    torch.save({"model": create_model("strided", width=0.5).state_dict(), "ema": None,
                "config": {"arch": "strided", "width": 0.5}, "classes": list(range(10)),
                "mean": [0.5] * 3, "std": [0.25] * 3}, teacher)
    args, cfg = script.parse_args([*TINY, "--data", str(tiny_cifar), "--storage", str(tmp_path / "s"),
                                   "--name", "kd", "--teacher", str(teacher)])
    staged = f"{tmp_path / 's'}/kd/teacher.pt"
    assert cfg.teacher == args.teacher == staged
    assert load_checkpoint(staged)["config"]["arch"] == "strided"
    with pytest.raises(SystemExit):
        script.parse_args([*TINY, "--data", str(tiny_cifar), "--storage", str(tmp_path / "s"),
                           "--name", "kd2", "--teacher", str(tmp_path / "missing.pt")])


@pytest.fixture(scope="module")
def two_workers(ray_local, script, tiny_cifar, tmp_path_factory):
    return _train(script, tiny_cifar, tmp_path_factory.mktemp("dist"), "w2", "--num-workers", "2")


def test_two_cpu_workers_leave_a_checkpoint_c40_eval_loads(two_workers, tiny_cifar):
    s = two_workers
    assert s["num_workers"] == 2 and s["per_worker_batch_size"] == 32 and s["epochs"] == 1
    assert s["placement"] == "PACK" and len(s["node_ids"]) == 2
    assert 0.0 <= s["test_acc"] <= 1.0 and s["params"] < 200_000
    assert s["resumed_from_epoch"] == 0
    ckpt = Path(s["checkpoint"])
    assert ckpt.is_file() and (ckpt.parent / "metrics.jsonl").is_file()
    proc = subprocess.run([sys.executable, "-m", "c40", "eval", "--checkpoint", str(ckpt),
                           "--data", str(tiny_cifar), "--json"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["n"] == 200 and 0.0 <= out["accuracy"] <= 1.0


def test_rank1_crash_resumes_from_last_checkpoint(ray_local, script, tiny_cifar, tmp_path,
                                                  monkeypatch):
    """Rank 1 exits once ~5 s after reporting epoch 1 (C40_FAIL_AT_EPOCH); the worker group
    restarts (max_failures=1), resumes from the epoch-1 checkpoint and finishes epochs 2-3."""
    monkeypatch.setenv(script.rc.FAIL_ENV, "1")
    s = _train(script, tiny_cifar, tmp_path, "crash", "--num-workers", "2", "--epochs", "3",
               "--max-failures", "1")
    assert (tmp_path / "storage" / "crash" / script.rc.FAIL_MARKER).is_file()  # it did crash
    assert s["resumed_from_epoch"] == 1
    assert [m["epoch"] for m in s["history"]] == [1, 2, 3]
    assert "test_acc" in s["history"][-1]
