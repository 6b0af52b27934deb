"""benchmarks/loader.py runs end to end and prints the documented JSON (tiny settings)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_dir(cifar_dir) -> str:
    return str(cifar_dir)


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
    for k in ("baseline_img_s", "batch_dataloader_img_s", "cpu_loader_img_s", "tensor_cpu_img_s"):
        assert isinstance(res[k], float) and res[k] > 0, k
    for k in ("cpu_loader_vs_baseline", "cpu_loader_vs_batch_dataloader", "tensor_cpu_vs_baseline"):
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


# ------------------------------------------------------------------------ train_step.py
def test_train_step_benchmark_json(tmp_path):
    out = tmp_path / "train_step.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--json",
                        "--steps", "2", "--warmup", "1", "--repeats", "1", "--batch-size", "16",
                        "--width", "0.5", "--archs", "strided,dilated", "--out", str(out),
                        "--profile", "2"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert json.loads(out.read_text()) == res
    assert set(res["archs"]) == {"strided", "dilated"}
    for r in res["archs"].values():
        assert r["baseline_img_s"] > 0 and r["c40_img_s"] > 0 and r["c40_vs_baseline"] > 0
        assert r["compiled_img_s"] is None and r["compiled_vs_baseline"] is None  # no --compile
        assert 0 < r["params"] < 200_000 and len(r["samples"]["c40"]) == 1
        ops = {row["op"] for row in r["profile"]}  # where the step's time goes
        assert any("convolution" in op for op in ops), ops
        assert 0 < sum(row["share"] for row in r["profile"]) <= 1.001
    c = res["config"]
    assert c["steps"] == 2 and c["batch_size"] == 16 and c["c40_channels_last"] is True
    assert c["c40_amp"] in ("off", "bfloat16", "float16")
    assert "train_step.py" in res["machine"]["command"]


def test_train_step_benchmark_rejects_unknown_arch():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"),
                        "--archs", "strided,resnet50"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown arch" in p.stderr


# ------------------------------------------------------------------ time_to_accuracy.py
def _tta(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "time_to_accuracy.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_time_to_accuracy_smoke_and_skip_on_rerun(tiny_cifar, tmp_path):
    args = ["--data", str(tiny_cifar), "--subset", "500", "--test-subset", "200", "--seeds", "0",
            "--skip-reference", "--epochs", "1", "--out-dir", str(tmp_path / "res"),
            "--runs-dir", str(tmp_path / "runs")]
    p = _tta(*args)
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "res" / "time_to_accuracy.json").read_text())
    assert (tmp_path / "res" / "time_to_accuracy.png").stat().st_size > 5000
    assert res["reference"] is None and set(res["runs"]) == {"fast-seed0"}
    run = res["runs"]["fast-seed0"]
    assert run["recipe"] == "fast" and run["seed"] == 0 and run["epochs"] == 1
    assert 0 <= run["final_accuracy"] <= 1 and run["final_accuracy"] == run["curve"][-1]["test_acc"]
    assert run["seconds_to_85"] is None and run["epochs_to_85"] is None  # 1 epoch on 500 images
    assert run["wall_seconds"] > run["curve"][-1]["elapsed"] > 0
    assert run["command"][:5] == ["python", "-m", "c40", "train", "--recipe"]
    assert "--epochs" in run["command"] and res["commands"]["fast-seed0"] == " ".join(run["command"])
    fast = res["fast"]
    assert fast["n"] == 1 and fast["final_accuracy_min"] == run["final_accuracy"]
    assert fast["seconds_to_85_mean"] is None and fast["all_reached_85"] is False
    assert "cpu_model" in res["machine"] and res["target"] == 0.85

    again = _tta(*args)  # the same command again: measured already, so nothing runs
    assert again.returncode == 0 and "skipped" in again.stderr, again.stderr
    assert json.loads((tmp_path / "res" / "time_to_accuracy.json").read_text())["runs"] == res["runs"]


# ------------------------------------------------------------------ frontier.py
def test_frontier_sizes_each_run_to_its_budget_and_skips_on_rerun(tiny_cifar, tmp_path):
    args = [sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--data", str(tiny_cifar),
            "--recipe", "fast", "--budgets", "0.3,30", "--epochs-cap", "3", "--subset", "500",
            "--test-subset", "200", "--out-dir", str(tmp_path / "res"), "--runs-dir",
            str(tmp_path / "runs")]
    run = lambda: subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT,  # noqa: E731
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    p = run()
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "res" / "frontier.json").read_text())
    assert (tmp_path / "res" / "frontier.png").stat().st_size > 5000
    runs = res["archs"]["strided"]["budgets"]
    assert set(runs) == {"0.3", "30"}
    for key, r in runs.items():  # each run is sized by its own calibration, made right before it
        cal = r["calibration"]
        assert cal["low_res_seconds"] > 0 and cal["full_res_seconds"] > 0 and cal["low_res_frac"] == 0.55
        # the calibration times training and evaluation apart: an epoch's own seconds, from the
        # calibration run's metrics, hold no test evaluation
        hist = [json.loads(line) for line in
                (tmp_path / "runs" / f"calibrate-strided-{key}min" / "metrics.jsonl").read_text().splitlines()]
        # two epochs of each size, averaged (one epoch of a size is a noisy sample of the host)
        assert len(hist) == 4
        assert cal["low_res_samples"] == [round(m["train_seconds"], 2) for m in hist[:2]]
        assert cal["full_res_samples"] == [round(m["train_seconds"], 2) for m in hist[2:]]
        assert cal["low_res_seconds"] == pytest.approx((hist[0]["train_seconds"] + hist[1]["train_seconds"]) / 2, abs=0.01)
        assert cal["full_res_seconds"] == pytest.approx((hist[2]["train_seconds"] + hist[3]["train_seconds"]) / 2, abs=0.01)
        assert cal["eval_seconds"] == pytest.approx(hist[3]["seconds"] - hist[3]["train_seconds"], abs=0.01)
        assert cal["eval_seconds"] > 0 and cal["eval_every"] == 0
        # its first three tests are progress tests (2 views), the last the final one (6 views)
        assert [m["eval_tta"] for m in hist] == ["flip", "flip", "flip", "flip-shift"]
        assert cal["progress_eval_seconds"] == pytest.approx(
            sum(m["seconds"] - m["train_seconds"] for m in hist[:3]) / 3, abs=0.01)
        per = 0.55 * cal["low_res_seconds"] + 0.45 * cal["full_res_seconds"]
        assert cal["seconds_per_epoch"] == pytest.approx(per, abs=0.01)
    # 18 s hold the most epochs n with startup + n * per + one evaluation <= 18 less the 2%
    # headroom (at least 1); 30 min hold more than the cap of 3
    cal = runs["0.3"]["calibration"]
    per = cal["seconds_per_epoch"]
    fit = max([n for n in range(1, 4) if cal["startup_seconds"] + n * per + cal["eval_seconds"] <= 0.98 * 18],
              default=1)
    assert runs["0.3"]["epochs"] == fit and runs["0.3"]["headroom"] == 0.02
    assert runs["0.3"]["predicted_seconds"] == pytest.approx(
        cal["startup_seconds"] + fit * per + cal["eval_seconds"], abs=0.1)
    assert runs["30"]["epochs"] == 3 and runs["30"]["within_budget"] is True
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip() or None
    for key, r in runs.items():
        assert r["c40_commit"] == head  # each run names the code it ran
        # startup is every second outside the epochs: imports, and the data loading and setup
        # inside fit() (the hour's run spent 3-7 s there, which sizing once left out)
        hist = [json.loads(line) for line in
                (tmp_path / "runs" / f"strided-{key}min" / "metrics.jsonl").read_text().splitlines()]
        assert r["startup_seconds"] == pytest.approx(r["wall_seconds"] - sum(m["seconds"] for m in hist),
                                                     abs=0.02)
        assert 0 <= r["final_accuracy"] <= 1 and r["final_accuracy"] == r["curve"][-1]["test_acc"]
        assert r["within_budget"] == (r["wall_seconds"] <= 60 * r["budget_minutes"])
        assert r["command"][:4] == ["python", "-m", "c40", "train"] and "--epochs" in r["command"]
    again = run()  # the same commands: nothing is trained again
    assert again.returncode == 0 and again.stderr.count("already measured") == 2, again.stderr
    assert json.loads((tmp_path / "res" / "frontier.json").read_text())["archs"] == res["archs"]


def test_frontier_train_flags_make_a_line_of_their_own(tiny_cifar, tmp_path, capsys):
    """--train-flags reach the calibration and the run, and their runs are measured and kept
    apart from the plain arch's (a Muon point must not be skipped as the plain one, nor replace
    it); flags the frontier sets, or that c40 train refuses, stop it before any run."""
    from conftest import load_script

    frontier = load_script("benchmarks/frontier.py")
    base = ["--data", str(tiny_cifar), "--recipe", "fast", "--budgets", "0.1", "--epochs-cap", "1",
            "--subset", "200", "--test-subset", "100", "--out-dir", str(tmp_path / "res"),
            "--runs-dir", str(tmp_path / "runs")]
    assert frontier.main(base) == 0
    assert frontier.main([*base, "--train-flags", "--bn-bias-lr 2 --muon-lr 0"]) == 0
    res = json.loads((tmp_path / "res" / "frontier.json").read_text())
    assert set(res["archs"]) == {"strided", "strided --bn-bias-lr 2 --muon-lr 0"}
    plain, flagged = res["archs"]["strided"]["budgets"]["0.1"], \
        res["archs"]["strided --bn-bias-lr 2 --muon-lr 0"]["budgets"]["0.1"]
    assert "--bn-bias-lr" not in plain["command"] and plain["train_flags"] == []
    assert flagged["command"][-7:-3] == ["--bn-bias-lr", "2", "--muon-lr", "0"]
    assert flagged["calibration"]["command"][-13:-9] == ["--bn-bias-lr", "2", "--muon-lr", "0"]
    from c40.checkpoint import load_checkpoint
    ckpt = load_checkpoint(tmp_path / "runs" / "strided_bn_bias_lr_2_muon_lr_0-0.1min" / "checkpoint.pt")
    assert ckpt["config"]["bn_bias_lr"] == 2.0 and ckpt["config"]["muon_lr"] == 0.0
    with pytest.raises(SystemExit):
        frontier.main([*base, "--train-flags", "--epochs 5"])
    assert "may not set --epochs" in capsys.readouterr().err
    assert frontier.main([*base, "--train-flags", "--bn-bias-lr -1"]) == 2
    assert "bn-bias-lr must be > 0" in capsys.readouterr().err
    assert frontier.main([*base, "--train-flags=--no-such-flag"]) == 2
    assert "not c40 train flags" in capsys.readouterr().err
    assert set(json.loads((tmp_path / "res" / "frontier.json").read_text())["archs"]) == set(res["archs"])


def test_frontier_prices_an_epoch_at_the_runs_own_low_res_share(tiny_cifar, tmp_path):
    """--train-flags may move the low-res share and the test interval (an hour's recipe trains
    half its epochs at 20 px); the calibration still times two epochs of each size, and prices the
    run's epochs at its own share, not the recipe's."""
    from conftest import load_script

    frontier = load_script("benchmarks/frontier.py")
    flags = "--low-res 20 --low-res-frac 0.3 --eval-every 2"
    assert frontier.main(["--data", str(tiny_cifar), "--recipe", "fast", "--budgets", "0.1",
                          "--epochs-cap", "1", "--subset", "200", "--test-subset", "100",
                          "--out-dir", str(tmp_path / "res"), "--runs-dir", str(tmp_path / "runs"),
                          "--train-flags", flags]) == 0
    run = json.loads((tmp_path / "res" / "frontier.json").read_text())["archs"][f"strided {flags}"]["budgets"]["0.1"]
    cal = run["calibration"]
    assert cal["low_res_frac"] == 0.3 and cal["eval_every"] == 2
    assert run["config"]["low_res_frac"] == 0.3 and run["config"]["low_res"] == 20
    assert cal["seconds_per_epoch"] == pytest.approx(
        0.3 * cal["low_res_seconds"] + 0.7 * cal["full_res_seconds"], abs=0.01)
    cal_dir = tmp_path / "runs" / "calibrate-strided_low_res_20_low_res_frac_0.3_eval_every_2-0.1min"
    hist = [json.loads(line) for line in (cal_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 4 and all("test_acc" in m for m in hist)  # two epochs of each size, each tested
    from c40.checkpoint import load_checkpoint
    ckpt = load_checkpoint(cal_dir / "checkpoint.pt")
    assert ckpt["config"]["low_res_frac"] == 0.5 and ckpt["config"]["low_res"] == 20


def test_frontier_reruns_a_point_whose_recipe_moved(tiny_cifar, tmp_path, monkeypatch, capsys):
    """The same command is not the same run once its recipe changed (best took Muon at batch 256
    on 2026-12-06): a point measured with the old recipe is run again, not skipped as measured."""
    from conftest import load_script

    from c40.config import RECIPES

    frontier = load_script("benchmarks/frontier.py")
    base = ["--data", str(tiny_cifar), "--recipe", "fast", "--budgets", "0.1", "--epochs-cap", "1",
            "--subset", "200", "--test-subset", "100", "--out-dir", str(tmp_path / "res"),
            "--runs-dir", str(tmp_path / "runs")]
    assert frontier.main(base) == 0
    first = json.loads((tmp_path / "res" / "frontier.json").read_text())["archs"]["strided"]["budgets"]["0.1"]
    assert first["config"]["label_smoothing"] == 0.2 and first["config"]["recipe"] == "fast"
    assert frontier.main(base) == 0
    assert "already measured" in capsys.readouterr().err  # same recipe: skipped
    monkeypatch.setitem(RECIPES, "fast", {**RECIPES["fast"], "label_smoothing": 0.05})
    assert frontier.main(base) == 0
    err = capsys.readouterr().err
    assert "already measured" not in err and "[frontier strided 0.1 min]" in err  # trained again
    again = json.loads((tmp_path / "res" / "frontier.json").read_text())["archs"]["strided"]["budgets"]["0.1"]
    assert again["config"]["label_smoothing"] == 0.05


def test_time_to_accuracy_reruns_a_seed_whose_recipe_moved(tiny_cifar, tmp_path, monkeypatch, capsys):
    """As the frontier: the same command after the fast recipe changed is a new measurement."""
    from conftest import load_script

    from c40.config import RECIPES

    tta = load_script("benchmarks/time_to_accuracy.py")
    args = ["--data", str(tiny_cifar), "--subset", "200", "--test-subset", "100", "--seeds", "0",
            "--skip-reference", "--epochs", "1", "--out-dir", str(tmp_path / "res"),
            "--runs-dir", str(tmp_path / "runs")]
    assert tta.main(args) == 0 and tta.main(args) == 0
    assert "already measured" in capsys.readouterr().err
    monkeypatch.setitem(RECIPES, "fast", {**RECIPES["fast"], "label_smoothing": 0.05})
    assert tta.main(args) == 0
    assert "already measured" not in capsys.readouterr().err
    run = json.loads((tmp_path / "res" / "time_to_accuracy.json").read_text())["runs"]["fast-seed0"]
    assert run["config"]["label_smoothing"] == 0.05 and run["config"]["epochs"] == 1


def test_frontier_budget_pays_for_the_test_evaluations():
    """A best-recipe run tests every 10 epochs (~5 s each with flip TTA on resnet) and at the
    end (~15 s with flip-shift): the epochs that fit a budget leave time for them, or the run
    overshoots."""
    from conftest import load_script

    frontier = load_script("benchmarks/frontier.py")
    cal = {"startup_seconds": 3.0, "seconds_per_epoch": 20.0, "progress_eval_seconds": 5.0,
           "eval_seconds": 15.0, "eval_every": 10}
    n = frontier.epochs_for(3600, cal)
    assert n == 174  # 3 + 174 * 20 + 17 progress tests * 5 + 15 = 3583 s; 175 epochs: 3603 s
    assert frontier.run_seconds(n, cal) <= 3600 < frontier.run_seconds(n + 1, cal)
    assert frontier.epochs_for(3600, {**cal, "eval_every": 0}) == 179  # one evaluation at the end
    assert frontier.epochs_for(3600, cal, cap=50) == 50 and frontier.epochs_for(1, cal) == 1
    # what run_budget sizes to with the default headroom: 98% of the hour, 3,528 s
    assert frontier.epochs_for(3600 * (1 - frontier.HEADROOM), cal) == 171  # 3,523 s; 172: 3,543
    with pytest.raises(SystemExit):
        frontier._parse(["--headroom", "0.5"])


def test_time_to_accuracy_never_mixes_machines():
    """Results of another machine are dropped, not merged: the CPU model string alone ("AMD
    EPYC") does not tell a 2x faster AVX512-BF16 host from an AVX2 one, nor two generations of
    bf16 hosts, so bf16 support and the CPU family/model count."""
    from conftest import load_script

    tta = load_script("benchmarks/time_to_accuracy.py")
    here = {"cpu_model": "AMD EPYC", "device_name": "cpu", "cpu_count": 2, "cpu_bf16": True,
            "cpu_generation": "family 26 model 2"}
    assert tta.same_machine(dict(here), here)
    assert not tta.same_machine({**here, "cpu_bf16": False}, here)
    assert not tta.same_machine({**here, "cpu_count": 16}, here)
    assert not tta.same_machine({**here, "device_name": "NVIDIA H100"}, here)
    # same name and bf16 flag, another generation: 1.9x apart in speed here (2026-12-05)
    assert not tta.same_machine({**here, "cpu_generation": "family 25 model 17"}, here)
    unknown = {k: v for k, v in here.items() if k != "cpu_generation"}  # before it was recorded
    assert not tta.same_machine(unknown, here)
    legacy = {k: v for k, v in here.items() if k != "cpu_bf16"}  # written before it was recorded
    assert tta.same_machine(legacy, here)


@pytest.mark.parametrize("script, name, key", [("frontier.py", "frontier.json", "archs"),
                                               ("time_to_accuracy.py", "time_to_accuracy.json", "runs")])
def test_benchmarks_keep_another_machines_results(script, name, key, tiny_cifar, tmp_path, capsys):
    """Run on another host, a benchmark stops before training, names --out-dir and leaves the
    committed result of the first host as it was (it used to start a new result and write it
    over the old file after its first run)."""
    from conftest import load_script

    mod = load_script(f"benchmarks/{script}")
    res_dir = tmp_path / "res"
    res_dir.mkdir()
    theirs = {"machine": {**mod.machine_info(), "cpu_generation": "family 1 model 1"},
              key: {"measured": {"final_accuracy": 0.93}}}
    (res_dir / name).write_text(json.dumps(theirs))
    small = ["--data", str(tiny_cifar), "--subset", "200", "--test-subset", "100",
             "--out-dir", str(res_dir), "--runs-dir", str(tmp_path / "runs")]
    extra = (["--recipe", "fast", "--budgets", "0.1", "--epochs-cap", "1"] if script == "frontier.py"
             else ["--seeds", "0", "--skip-reference", "--epochs", "1"])
    assert mod.main(small + extra) == 2
    err = capsys.readouterr().err
    assert "another machine's results" in err and "family 1 model 1" in err and "--out-dir" in err
    assert json.loads((res_dir / name).read_text()) == theirs
    assert not (tmp_path / "runs").exists()  # nothing was trained
    (res_dir / name).write_text("{not json")
    assert mod.main(small + extra) == 2 and "not a JSON result" in capsys.readouterr().err


def test_time_to_accuracy_reference_keeps_its_source(tmp_path):
    """A reference run copied from file to file keeps naming the file it was first taken from;
    one measured in the file it is read from gets that file as its source."""
    from conftest import load_script

    tta = load_script("benchmarks/time_to_accuracy.py")
    here = {"cpu_model": "AMD EPYC", "device_name": "cpu", "cpu_count": 2, "cpu_bf16": True}
    ref = {"recipe": "reference", "seed": 0, "seconds_to_85": 2087.6}
    fast = {"recipe": "fast", "seed": 0}
    f = tmp_path / "a.json"
    f.write_text(json.dumps({"machine": here, "runs": {"reference-seed0": ref, "fast-seed0": fast}}))
    got = tta._reference_from(str(f), here)
    assert set(got) == {"reference-seed0"} and got["reference-seed0"]["source"] == str(f)
    assert got["reference-seed0"]["seconds_to_85"] == 2087.6
    g = tmp_path / "b.json"
    g.write_text(json.dumps({"machine": here, "runs": got}))
    assert tta._reference_from(str(g), here)["reference-seed0"]["source"] == str(f)
    with pytest.raises(RuntimeError, match="another machine"):
        tta._reference_from(str(g), {**here, "cpu_count": 16})


# ------------------------------------------------------------------------ gpu_check.py
@pytest.mark.ray
@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_on_cpu(data_dir, tmp_path):
    """The one-command GPU check, rehearsed on the CPU at tiny sizes so it cannot rot."""
    out = tmp_path / "dry.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run",
                        "--data", data_dir, "--out", str(out)], capture_output=True, text=True,
                       timeout=900, cwd=ROOT, env={**os.environ, "HOME": str(tmp_path)})
    res = json.loads(out.read_text())
    failed = {k: s.get("error") for k, s in res["steps"].items() if not s["ok"]}
    assert p.returncode == 0 and not failed, (failed, p.stderr[-2000:])
    steps = res["steps"]
    assert set(steps) == {"pytest_cuda", "fit_amp", "resume_determinism", "loaders", "compile",
                          "loader_benchmark", "train_step_benchmark", "fast_recipe",
                          "ray_train_fault", "tune_search"}
    assert steps["resume_determinism"]["deterministic_runs_identical"]
    assert steps["resume_determinism"]["resumed_identical_to_uninterrupted"]
    assert steps["ray_train_fault"]["resumed_from_epoch"] == 1
    assert res["dry_run"] and res["machine"]["device_name"] == "cpu"


def test_gpu_check_reads_a_scripts_json_line_when_ray_logs_after_it():
    """Ray forwards worker logs to the driver's stdout asynchronously: a line can land after the
    script's JSON summary (it failed the tune_search step of a CI run)."""
    from conftest import load_script
    gpu_check = load_script("benchmarks/gpu_check.py")
    late = "import json; print('banner'); print(json.dumps({'a': 1})); print('(train_trial pid=7) bye')"
    check = types.SimpleNamespace(dry=True)
    assert gpu_check._script(check, ["-c", late]) == {"a": 1}
    with pytest.raises(AssertionError, match="no JSON line"):
        gpu_check._script(check, ["-c", "print('only logs')"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run")
def test_gpu_check_refuses_to_run_without_a_gpu(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out",
                        str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2 and "--dry-run" in p.stderr and not (tmp_path / "x.json").exists()


# ------------------------------------------------------------------------ tta_views.py
def test_tta_views_benchmark_matches_c40_eval_on_its_modes(data_dir, tmp_path):
    """The view sets that are c40 TTA modes give what `c40 eval --tta MODE` gives; the wider
    sets are measured beside them (the committed result says whether they pay)."""
    from c40.data import load_dataset
    from c40.inference import evaluate_model, load_for_inference

    from conftest import load_script
    tta_views = load_script("benchmarks/tta_views.py")
    ckpt = str(ROOT / "weights" / "strided_fast.pt")
    out = tmp_path / "tta.json"
    assert tta_views.main(["--data", data_dir, "--checkpoints", ckpt, "--test-subset", "300",
                           "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    acc = res["checkpoints"][ckpt]["accuracy"]
    assert res["test_images"] == 300
    assert list(acc) == ["off", "flip", "flip-shift", "flip-diag", "flip-3x3", "flip-3x3-diag2"]
    model, state, dev = load_for_inference(ckpt)
    ds = load_dataset(data_dir, "test").subset(300)
    for mode in ("off", "flip", "flip-shift"):
        assert acc[mode] == evaluate_model(model, state, ds, dev, tta=mode).accuracy
    assert all(0.7 < a <= 1 for a in acc.values()), acc


def test_tta_views_benchmark_refuses_a_missing_checkpoint_in_one_line(data_dir, tmp_path, capsys):
    from conftest import load_script
    tta_views = load_script("benchmarks/tta_views.py")
    assert tta_views.main(["--data", data_dir, "--checkpoints", str(tmp_path / "no.pt")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint not found" in err and len(err.splitlines()) == 1


def test_frontier_clock_runs_each_budget_under_the_clock_without_calibration(tiny_cifar, tmp_path,
                                                                            capsys):
    """--clock: each run is `c40 train --time-budget` (the budget less the headroom), no
    calibration; its points are a line of their own and are skipped when measured."""
    from conftest import load_script

    frontier = load_script("benchmarks/frontier.py")
    base = ["--data", str(tiny_cifar), "--recipe", "fast", "--budgets", "0.1", "--epochs-cap", "500",
            "--subset", "200", "--test-subset", "100", "--out-dir", str(tmp_path / "res"),
            "--runs-dir", str(tmp_path / "runs"), "--clock"]
    assert frontier.main(base) == 0
    r = json.loads((tmp_path / "res" / "frontier.json").read_text())["archs"]["strided clock"]["budgets"]["0.1"]
    assert r["calibration"] is None and r["predicted_seconds"] is None
    cmd = r["command"]
    assert cmd[cmd.index("--time-budget") + 1] == "0.098"  # 6 s less the 2% headroom
    assert not list((tmp_path / "runs").glob("calibrate-*"))
    hist = [json.loads(line) for line in
            (tmp_path / "runs" / "strided_clock-0.1min" / "metrics.jsonl").read_text().splitlines()]
    assert 1 < len(hist) < 500 and hist[-1]["ended"]  # the clock ended it, not the cap
    assert hist[-1]["elapsed"] < 0.098 * 60 + 1.0  # fit's clock: imports come before it
    assert r["final_accuracy"] == hist[-1]["test_acc"]
    capsys.readouterr()
    assert frontier.main(base) == 0
    assert "already measured" in capsys.readouterr().err
