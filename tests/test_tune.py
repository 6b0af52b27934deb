"""tune/search.py end to end: the guard for over-limit configs, failed trials, result files and
the report; the device chosen against the cluster; Optuna with a warm start."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

TINY = ["--epochs", "1", "--subset", "512", "--test-subset", "256", "--val-split", "128",
        "--batch-size", "64"]


@pytest.fixture(scope="module")
def search():
    return load_script("tune/search.py")


def test_searched_flags_given_on_the_command_line_are_fixed(search, tiny_cifar):
    tiny = [*TINY, "--data", str(tiny_cifar)]
    args, base = search.parse_args([*tiny, "--width", "0.5", "--lr", "0.1", "--cpu"])
    assert args.fixed == {"width": 0.5, "lr": 0.1}
    assert base.val_split == 128 and base.device == "cpu" and Path(base.data).is_absolute()
    args, base = search.parse_args(tiny)
    assert args.device == "auto" and args.search == "optuna" and args.gpus_per_trial is None
    # trials evaluate every epoch: 2 views (flip), not the recipes' 6, unless asked
    assert base.tta == "flip" and search.parse_args([*tiny, "--tta", "flip-shift"])[1].tta == "flip-shift"
    for bad in (["--num-samples", "0"], ["--width", "1.25"],  # 295,570 params: every trial over
                ["--cpu", "--gpus-per-trial", "0.5"], ["--device", "cuda:1"],
                ["--search", "random", "--warm-start", "x.parquet"], ["--range", "lr=1:0.1"]):
        with pytest.raises(SystemExit):
            search.parse_args([*tiny, *bad])


# The search runs in its own Python process: a second `ray.init` in one pytest process (after
# the Ray Train tests' instance was shut down) timed out starting its GCS on this 2-core machine,
# and one shared instance let the Tune trials hang behind what Ray Train left behind.
_DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from conftest import load_script
import ray
from ray import tune
search = load_script("tune/search.py")
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
args, base = search.parse_args(json.loads(sys.argv[2]))
space = {"width": tune.grid_search([0.5, 2.0, 0.375]), "dropout": 0.1,
         "lr": tune.sample_from(lambda spec: 1e12 if spec.config["width"] == 0.375 else 0.1)}
print("SUMMARY " + json.dumps(search.search(args, base, param_space=space)), flush=True)
"""


def test_search_rejects_over_limit_configs_and_survives_a_failing_trial(search, tiny_cifar,
                                                                        tmp_path):
    """Three trials: a legal width (trains), width 2.0 (732k params: rejected before training)
    and a legal one at lr 1e12, whose loss turns NaN at once (fit raises: failed). The search
    finishes."""
    argv = [*TINY, "--data", str(tiny_cifar), "--num-samples", "1",  # x 3 grid points
            "--search", "random", "--storage", str(tmp_path), "--name", "t"]  # grids: random only
    home = tmp_path / "home"  # Ray writes ~/.ray/auth_token: never the user's
    home.mkdir()
    p = subprocess.run([sys.executable, "-c", _DRIVER, str(Path(__file__).parent), json.dumps(argv)],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HOME": str(home)})
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("SUMMARY ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    assert "device: cpu (no GPU in the cluster)" in p.stdout  # --device auto, no --cpu
    s = json.loads(lines[-1][len("SUMMARY "):])
    assert (s["trials"], s["ok"], s["rejected"], s["failed"]) == (3, 1, 1, 1), s
    assert s["best_config"]["width"] == 0.5 and s["dropout"] == 0.1 and s["lr"] == 0.1
    retrain = json.loads(Path(s["best_config_json"]).read_text())
    assert "nan_at_step" not in retrain and "tta" not in retrain  # evaluation views: the recipe's
    assert 0.0 <= s["val_acc"] <= 1.0 and 0.0 <= s["test_acc"] <= 1.0

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rows = pq.read_table(s["results_parquet"]).to_pylist()
    assert len(pacsv.read_csv(s["results_csv"]).to_pylist()) == 3
    by_width = {r["width"]: r for r in rows}
    assert by_width[2.0]["status"] == "rejected" and by_width[2.0]["params"] >= 200_000
    assert by_width[2.0]["val_acc"] is None
    assert by_width[0.375]["status"] == "failed" and "NaN" in by_width[0.375]["error"]
    trained = [r for r in rows if r["status"] in ("ok", "stopped")]
    assert trained and all(r["params"] < 200_000 for r in trained)
    history = pq.read_table(s["history_parquet"]).to_pylist()
    assert [h["epoch"] for h in history] == [1] and history[0]["trial_id"] == trained[0]["trial_id"]
    for key in ("plot", "parallel", "epochs"):
        assert Path(s[key]).read_bytes()[:4] == b"\x89PNG", key
    report = Path(s["report"]).read_text()
    assert "1 ok, 0 stopped, 1 rejected, 1 failed" in report and "| width | 0.5 |" in report

    from c40.checkpoint import load_model

    model, state = load_model(s["best_checkpoint"])
    assert state["config"]["width"] == 0.5 and state["params"] < 200_000


# One Ray start for three checks: `--device auto` picks the CPU here, and a GPU request no node
# can hold is one line, each within 10 s of Ray being up; then an Optuna search warm-started
# from a previous search's results.parquet.
_DRIVER_DEVICE = """
import contextlib, io, json, sys, time
sys.path.insert(0, sys.argv[1])
from conftest import load_script
import ray
search = load_script("tune/search.py")
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
argv = json.loads(sys.argv[2])
out = {}
t0 = time.perf_counter()
args, base = search.parse_args(argv)
base, resources = search.resolve_device(args, base)
out["auto"] = {"device": base.device, "resources": resources, "s": time.perf_counter() - t0}
err = io.StringIO()
t0 = time.perf_counter()
with contextlib.redirect_stderr(err):
    code = search.main([*argv, "--gpus-per-trial", "0.5", "--name", "gpu"])
out["gpu"] = {"code": code, "stderr": err.getvalue(), "s": time.perf_counter() - t0}
args, base = search.parse_args([*argv, "--num-samples", "2", "--name", "warm",
                                "--warm-start", sys.argv[3]])
out["optuna"] = search.search(args, base)
print("RESULT " + json.dumps(out, default=str), flush=True)
"""


@pytest.fixture(scope="module")
def device_and_optuna(search, tiny_cifar, tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = tmp_path_factory.mktemp("optuna")
    previous = tmp / "previous" / "results.parquet"  # a previous search: one good trial
    previous.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([dict(
        trial_id="a", status="ok", dropout=0.05, lr=0.1, weight_decay=5e-4, label_smoothing=0.1,
        width=0.5, val_acc=0.5)]), previous)
    argv = [*TINY, "--data", str(tiny_cifar), "--storage", str(tmp / "runs")]
    home = tmp / "home"
    home.mkdir()
    p = subprocess.run([sys.executable, "-c", _DRIVER_DEVICE, str(Path(__file__).parent),
                        json.dumps(argv), str(previous.parent)],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HOME": str(home)})
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, (p.stdout + p.stderr)[-3000:]
    return json.loads(lines[-1][len("RESULT "):]), p.stdout


def test_device_auto_picks_the_cpu_and_an_impossible_gpu_request_fails_in_one_line(
        device_and_optuna):
    out, stdout = device_and_optuna
    assert out["auto"]["device"] == "cpu" and out["auto"]["resources"] == {"cpu": 1.0}
    assert out["auto"]["s"] < 10, out["auto"]
    gpu = out["gpu"]
    assert gpu["code"] == 2 and gpu["s"] < 10, gpu  # the old search waited forever
    assert gpu["stderr"].count("\n") == 1 and gpu["stderr"].startswith(
        "tune/search.py: error: no node of the cluster can ever run a trial of CPU 1, GPU 0.5"), gpu


def test_optuna_search_warm_started_from_a_previous_search(device_and_optuna):
    out, stdout = device_and_optuna
    s = out["optuna"]
    assert (s["search"], s["trials"], s["ok"] + s["stopped"], s["rejected"], s["failed"]) == \
        ("optuna", 2, 2, 0, 0), s
    assert "warm start: 1 trials of " in stdout
    assert s["best_config"]["width"] in (0.5, 0.625, 0.75, 0.875, 1.0)
    assert Path(s["report"]).exists() and Path(s["best_config_json"]).exists()
