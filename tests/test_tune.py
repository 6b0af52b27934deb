"""tune/search.py: the parameter limit inside the search, failed trials, result files."""
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

TINY = ["--cpu", "--epochs", "1", "--subset", "512", "--test-subset", "256", "--val-split", "128",
        "--batch-size", "64"]


@pytest.fixture(scope="module")
def search():
    return load_script("tune/search.py")


def test_searched_flags_given_on_the_command_line_are_fixed(search, tiny_cifar):
    tiny = [*TINY, "--data", str(tiny_cifar)]
    args, base = search.parse_args([*tiny, "--width", "2.0", "--lr", "0.1"])
    assert args.fixed == {"width": 2.0, "lr": 0.1}
    assert base.val_split == 128 and base.device == "cpu" and Path(base.data).is_absolute()
    with pytest.raises(SystemExit):
        search.parse_args([*tiny, "--num-samples", "0"])


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
            "--storage", str(tmp_path), "--name", "t"]
    home = tmp_path / "home"  # Ray writes ~/.ray/auth_token: never the user's
    home.mkdir()
    p = subprocess.run([sys.executable, "-c", _DRIVER, str(Path(__file__).parent), json.dumps(argv)],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HOME": str(home)})
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("SUMMARY ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    s = json.loads(lines[-1][len("SUMMARY "):])
    assert (s["trials"], s["ok"], s["rejected"], s["failed"]) == (3, 1, 1, 1), s
    assert s["best_config"]["width"] == 0.5 and s["dropout"] == 0.1 and s["lr"] == 0.1
    assert "nan_at_step" not in json.loads(Path(s["best_config_json"]).read_text())
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
    assert Path(s["plot"]).stat().st_size > 0

    from c40.checkpoint import load_model

    model, state = load_model(s["best_checkpoint"])
    assert state["config"]["width"] == 0.5 and state["params"] < 200_000
