"""tune/search.py and distributed/train.py on a 3-node Ray cluster whose worker nodes do not see
the head's disk, with storage and data in an S3 bucket (moto's server on 127.0.0.1).

The head runs no work (`--num-cpus=0`). Each worker node is started inside its own mount
namespace with a tmpfs over HEAD_ONLY, the folder that holds the drivers' working dir: like a
second machine, it cannot see what the head writes there, so a run that keeps its storage on
the head's disk fails Ray's storage check ("Unable to set up cluster storage") or loses files.
Both scripts run as commands, as `ray job submit` would run them, with a fault injected: one
trial / one training worker exits after epoch 1 and must resume from its checkpoint in the bucket.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("moto.server")
pafs = pytest.importorskip("pyarrow.fs")
pytestmark = pytest.mark.ray

from _ray_cluster import free_port, stop_processes  # noqa: E402
from _s3 import BUCKET, s3_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATA_URI = f"s3://{BUCKET}/data/cifar-10-batches-py"
if os.geteuid() != 0 or shutil.which("unshare") is None:
    pytest.skip("needs root and unshare(1) to give worker nodes their own mounts",
                allow_module_level=True)


@pytest.fixture(scope="module")
def s3(tiny_cifar):
    """moto's S3 server with a bucket holding the tiny dataset; yields (AWS env, filesystem)."""
    with s3_server() as (env, fs):
        pafs.copy_files(str(tiny_cifar), DATA_URI.removeprefix("s3://"), destination_filesystem=fs)
        yield env, fs


@pytest.fixture(scope="module")
def cluster(s3):
    """Head (0 CPUs) + 2 worker nodes (1 CPU each, own mounts, own dataset cache)."""
    env_s3, _ = s3
    root = Path(tempfile.mkdtemp(prefix="c40m-", dir="/tmp"))  # short: Ray's socket paths
    head_only, home = root / "head_only", root / "home"
    (head_only / "cwd").mkdir(parents=True)
    home.mkdir()
    # nothing from another Ray of this test run (ray.init exports RAY_ADDRESS, RAY_AUTH_MODE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(env_s3, HOME=str(home), PATH=f"{BIN}{os.pathsep}{env['PATH']}",
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               C40_CACHE=str(head_only / "cache"))
    port = free_port()

    def start(*extra: str, cache: Path, unshare: bool) -> None:
        ports = [f"--{name}-port={free_port()}" for name in (
            "node-manager", "object-manager", "metrics-export", "dashboard-agent-listen",
            "dashboard-agent-grpc", "runtime-env-agent")]
        cmd = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *ports, *extra]
        if unshare:  # the node's processes live in a mount namespace where HEAD_ONLY is empty
            cmd = ["unshare", "-m", "--propagation", "private", "bash", "-c",
                   f"mount -t tmpfs tmpfs {head_only} && exec {' '.join(cmd)}"]
        log = root / f"node-{len(procs)}.log"
        with open(log, "w") as out:
            # one node at a time, with time to spare: on 2 busy cores, raylets started together
            # missed Ray's registration timeout
            procs.append(subprocess.Popen(cmd, env={**env, "C40_CACHE": str(cache),
                                                    "RAY_raylet_start_wait_time_s": "120"},
                                          stdout=out, stderr=subprocess.STDOUT))
        for _ in range(240):
            if "Ray runtime started" in log.read_text():
                return
            assert procs[-1].poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        raise AssertionError(f"node did not start in 120 s: {log.read_text()[-3000:]}")

    procs: list[subprocess.Popen] = []
    try:
        start("--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
              f"--temp-dir={root / 'ray'}", f"--ray-client-server-port={free_port()}",
              cache=head_only / "cache", unshare=False)
        for i in range(2):
            start(f"--address=127.0.0.1:{port}", "--num-cpus=1", cache=root / f"cache{i}",
                  unshare=True)
        nodes = _wait_for_nodes(f"127.0.0.1:{port}", 3, env, root)
        yield {"address": f"127.0.0.1:{port}", "env": env, "root": root, "head_only": head_only,
               "cwd": head_only / "cwd", "home": home, **nodes}
    finally:
        stop_processes([p.pid for p in procs])
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_nodes(address: str, n: int, env: dict, log_dir: Path) -> dict:
    code = ("import json, sys, time, ray\n"
            "ray.init(address=sys.argv[1], log_to_driver=False)\n"
            "for _ in range(120):\n"
            "    nodes = [x for x in ray.nodes() if x['Alive']]\n"
            "    if len(nodes) >= int(sys.argv[2]): break\n"
            "    time.sleep(0.5)\n"
            "head = [x['NodeID'] for x in nodes if 'node:__internal_head__' in x['Resources']]\n"
            "print('NODES ' + json.dumps({'head': head, 'workers': [x['NodeID'] for x in nodes\n"
            "                             if x['NodeID'] not in head]}), flush=True)\n")
    p = subprocess.run([sys.executable, "-c", code, address, str(n)], env=env, capture_output=True,
                       text=True, timeout=120)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("NODES ")]
    assert p.returncode == 0 and lines, (p.stdout + p.stderr)[-2000:]
    nodes = json.loads(lines[-1][len("NODES "):])
    logs = "".join(f.read_text()[-1500:] for f in sorted(log_dir.glob("node-*.log")))
    assert len(nodes["head"]) == 1 and len(nodes["workers"]) == n - 1, (nodes, logs)
    return {"head_id": nodes["head"][0], "worker_ids": set(nodes["workers"])}


def _run(cluster, script: str, *args: str) -> dict:
    """Run a script as a driver on the head, with one fault injected after epoch 1."""
    env = {**cluster["env"], "C40_FAIL_AT_EPOCH": "1"}
    p = subprocess.run([sys.executable, str(ROOT / script), "--address", cluster["address"],
                        "--cpu", "--data", DATA_URI, "--storage", f"s3://{BUCKET}/runs", "--json",
                        "--subset", "256", "--test-subset", "128", "--batch-size", "64",
                        "--epochs", "2", *args],
                       cwd=cluster["cwd"], env=env, capture_output=True, text=True, timeout=400)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert p.returncode == 0 and lines, (p.stdout + p.stderr)[-4000:]
    return json.loads(lines[-1])


def _nothing_local(cluster) -> None:
    assert not any(cluster["cwd"].iterdir())  # no runs/ folder beside the driver
    assert not (cluster["home"] / "ray_results").exists()
    # each worker node fetched the dataset once into its own cache; the head never needed it
    assert not (cluster["head_only"] / "cache").exists()
    for cache in cluster["root"].glob("cache*"):
        assert len([d for d in (cache / "datasets").iterdir() if d.is_dir()]) == 1


def test_search_runs_on_worker_nodes_resumes_a_killed_trial_from_s3(cluster, s3, tiny_cifar,
                                                                    tmp_path):
    _, fs = s3
    t0 = time.perf_counter()
    s = _run(cluster, "tune/search.py", "--name", "search", "--num-samples", "2",
             "--width", "0.5", "--val-split", "64", "--cpus-per-trial", "0.5",
             "--grace-period", "2")  # ASHA stops nobody: both trials finish 2 epochs
    print(f"search on the cluster: {time.perf_counter() - t0:.1f} s")
    run = f"{BUCKET}/runs/search"
    assert (s["trials"], s["ok"], s["failed"]) == (2, 2, 0), s
    assert s["best_checkpoint"] == f"s3://{run}/best_checkpoint.pt"
    import pyarrow.parquet as pq

    rows = pq.read_table(f"{run}/results.parquet", filesystem=fs).to_pylist()
    assert {r["node_id"] for r in rows} <= cluster["worker_ids"]  # never the head
    killed = [r for r in rows if r["resumed_from_epoch"]]  # trial ids are opaque under Optuna
    assert len(killed) == 1 and killed[0]["resumed_from_epoch"] == 1 and killed[0]["epochs"] == 2, rows
    assert fs.get_file_info(f"{run}/.c40-fault-injected").is_file
    for name in ("results.csv", "history.parquet", "accuracy.png", "parallel.png", "epochs.png",
                 "REPORT.md", "best_config.json"):  # the report in the bucket too
        assert fs.get_file_info(f"{run}/{name}").size > 0, name
    trials = [i.path for i in fs.get_file_info(pafs.FileSelector(run)) if i.type == pafs.FileType.Directory]
    assert len(trials) == 2  # each trial folder has Tune's TensorBoard events, for --logdir
    for trial in trials:
        assert any(i.base_name.startswith("events.out.tfevents")
                   for i in fs.get_file_info(pafs.FileSelector(trial))), trial
    best = json.loads(fs.open_input_stream(f"{run}/best_config.json").read())
    assert best["width"] == 0.5 and "data" not in best and "out" not in best

    local = tmp_path / "best_checkpoint.pt"  # c40 eval reads a local file: fetch it first
    pafs.copy_files(f"{run}/best_checkpoint.pt", str(local), source_filesystem=fs)
    p = subprocess.run([sys.executable, "-m", "c40", "eval", "--checkpoint", str(local),
                        "--data", str(tiny_cifar), "--json"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["n"] == 200
    _nothing_local(cluster)


def test_train_spreads_two_workers_and_restores_a_killed_one_from_s3(cluster, s3, tiny_cifar):
    """... with a distillation teacher that only the head's disk holds: the driver stages it in
    the bucket, where the workers on the other nodes read it."""
    import torch

    from c40.data import load_dataset
    from c40.model import create_model

    _, fs = s3
    teacher = cluster["head_only"] / "teacher.pt"
    torch.save({"model": create_model("strided", width=0.5).state_dict(), "ema": None,
                "config": {"arch": "strided", "width": 0.5}, "mean": [0.5] * 3, "std": [0.25] * 3,
                "classes": list(load_dataset(tiny_cifar, "train").classes)}, teacher)
    t0 = time.perf_counter()
    s = _run(cluster, "distributed/train.py", "--name", "train", "--num-workers", "2",
             "--cpus-per-worker", "0.5", "--placement", "SPREAD", "--lr", "0.05",
             "--teacher", str(teacher))
    print(f"Ray Train on the cluster: {time.perf_counter() - t0:.1f} s")
    assert set(s["node_ids"]) == cluster["worker_ids"]  # one worker on each worker node
    assert s["resumed_from_epoch"] == 1  # rank 1 died after epoch 1: restored from the bucket
    assert [m["epoch"] for m in s["history"]] == [1, 2] and "test_acc" in s["history"][-1]
    run = f"{BUCKET}/runs/train"
    assert s["checkpoint"] == f"s3://{run}/checkpoint.pt"
    assert fs.get_file_info(f"{run}/checkpoint.pt").size > 0
    assert fs.get_file_info(f"{run}/.c40-fault-injected").is_file
    assert fs.get_file_info(f"{run}/teacher.pt").size == teacher.stat().st_size
    with fs.open_input_stream(f"{run}/checkpoint.pt") as f:  # the workers' config names the copy
        state = torch.load(io.BytesIO(f.read()), weights_only=True)
    assert state["config"]["teacher"] == f"s3://{run}/teacher.pt"
    teacher.unlink()
    _nothing_local(cluster)
