"""`ray job submit -- python tune/search.py` against a local head started with `ray start`.

The head gets its own HOME (so the user's ~/.ray/auth_token is neither read nor written), its
own --temp-dir and free ports (so it never meets another Ray on this machine), and the venv's
bin first on PATH (the job's `python` is the one `ray start` ran with).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
if shutil.which("ray", path=str(BIN)) is None:
    pytest.skip("the `ray` CLI is not next to this Python", allow_module_level=True)
# working_dir uploads are capped at 100 MB: the venv, data and runs never travel
EXCLUDES = [".venv", "data", "runs", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_head(temp_dir: str, gcs_port: int) -> None:
    """End the processes of THIS head only (`ray stop` would end every Ray on the machine):
    those whose command line names our --temp-dir or GCS port, and all their children."""
    import psutil

    ours: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            args = p.info["cmdline"] or []
            if p.pid != os.getpid() and any(temp_dir in a or a.endswith(f":{gcs_port}")
                                            for a in args):
                ours[p.pid] = p
                ours.update((c.pid, c) for c in p.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in ours.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(ours.values()), timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def head(tmp_path):
    # short paths: Ray's unix sockets live under --temp-dir (107-byte limit)
    root = tempfile.mkdtemp(prefix="c40j-", dir="/tmp")
    home, temp_dir = Path(root, "home"), Path(root, "ray")
    home.mkdir()
    # ray.init() in this process (other Ray tests) exports RAY_AUTH_MODE=token: start clean, then
    # turn token auth on deliberately with a token of our own (HOME/.ray/auth_token), as the
    # NOTES say a real head ends up: the client then needs RAY_AUTH_MODE=token and the token.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    dash, gcs = _free_port(), _free_port()
    start = [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=2",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--ray-client-server-port={_free_port()}",
             # the agent's HTTP port (job submission) defaults to 52365: taken if another Ray runs
             f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env,
                       capture_output=True, text=True, timeout=60, check=True)
        assert (home / ".ray" / "auth_token").is_file()
        proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop_head(str(temp_dir), gcs)
        shutil.rmtree(root, ignore_errors=True)


def test_job_submit_runs_the_tune_search(head, tiny_cifar, tmp_path):
    address, env = head
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--",
           "python", "tune/search.py", "--cpu", "--num-samples", "2", "--epochs", "1",
           "--subset", "256", "--test-subset", "128", "--val-split", "64", "--batch-size", "64",
           "--width", "0.5",  # fixed below the limit: both trials train
           "--data", str(tiny_cifar), "--storage", str(tmp_path / "storage"), "--name", "job", "--json"]
    t0 = time.perf_counter()
    for _ in range(10):  # a fresh head accepts jobs once its agent has registered (seconds)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
        out = proc.stdout + proc.stderr
        if proc.returncode == 0 or "No available agent to submit job" not in out:
            break
        time.sleep(3)
    assert proc.returncode == 0, out[-3000:]
    assert "succeeded" in out, out[-3000:]
    summary = json.loads(next(line for line in reversed(out.splitlines())
                              if line.startswith("{") and '"best_config"' in line))
    assert summary["trials"] == 2 and summary["failed"] == 0 and summary["rejected"] == 0
    assert {"dropout", "lr"} <= set(summary["best_config"])
    assert Path(summary["best_checkpoint"]).is_file()
    assert Path(tmp_path / "storage" / "job" / "results.parquet").is_file()
    print(f"job submit: {time.perf_counter() - t0:.1f} s")
