"""The `c40` command line: JSON summaries, and one-line errors with exit code 2."""
import json
import os
import subprocess
import sys

import pytest


from conftest import run_c40 as c40  # in process; the pipe test below starts a real one


@pytest.mark.parametrize("arch", ["strided", "dilated"])
def test_summary_json_meets_every_rule(arch):
    r = c40("summary", "--arch", arch, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["arch"] == arch and s["params"] < 200_000 and s["receptive_field"] > 44
    assert s["max_pool"] is False and s["gap"] is True
    assert s["depthwise_separable"] >= 1 and s["dilated_convs"] >= 1
    assert s["strided_convs"] == (3 if arch == "strided" else 0)
    assert s["flops_per_image"] > 1e6


def test_summary_without_arch_is_the_model_c40_train_trains():
    """`c40 summary` (no --arch) shows the default recipe's net (it said strided after the
    default moved to strided_whiten)."""
    from c40.config import TrainConfig

    r = c40("summary", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["arch"] == TrainConfig().arch == "strided_whiten"


def test_summary_table():
    r = c40("summary", "--arch", "strided")
    assert r.returncode == 0 and "RF=" in r.stdout and "DepthwiseConv2d" in r.stdout


def _assert_clean_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_missing_data_folder(tmp_path):
    r = c40("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    _assert_clean_error(r, "does not exist", "c40 download")
    assert not (tmp_path / "o").exists()  # a failed run leaves no empty output folder


def test_default_data_folder_hint(tmp_path, monkeypatch):
    # a host that cannot be reached, whether or not this machine is online
    monkeypatch.setattr("c40.data.CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    env = {"C40_DATA": ""}
    r = c40("train", "--out", str(tmp_path / "o"), env=env, cwd=tmp_path)
    notice, error = r.stderr.strip().splitlines()
    assert "downloading CIFAR-10" in notice and r.returncode == 2 and "Traceback" not in r.stderr
    assert error.startswith("c40 train: error: could not download CIFAR-10")
    assert "data/cifar-10-batches-py" in error and "--data" in error


def test_corrupt_batch_file_through_cli(tiny_cifar, tmp_path):
    bad = tmp_path / "cifar"
    bad.mkdir()
    for f in tiny_cifar.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "data_batch_3").write_bytes(b"\x80\x04garbage")
    r = c40("train", "--data", str(bad), "--out", str(tmp_path / "o"), "--epochs", "1")
    _assert_clean_error(r, "data_batch_3")


@pytest.mark.parametrize("flags, words", [
    (["--epochs", "0"], ["epochs must be >= 1"]),
    (["--lr", "-1"], ["lr must be > 0"]),
    (["--dropout", "1.0"], ["dropout must be in [0, 1)"]),
    (["--jpeg-p", "1.5"], ["jpeg-p must be in [0, 1], got 1.5"]),
    (["--noise-p", "-0.1"], ["noise-p must be in [0, 1], got -0.1"]),
    (["--arch", "resnet50"], ["unknown arch 'resnet50'"]),
    (["--recipe", "slow"], ["unknown recipe 'slow'"]),
    (["--width", "3"], ["parameters", "200,000"]),
    # a no-stride arch's unpadded convs leave nothing of a 24-px image: said before training
    (["--arch", "dilated", "--low-res-frac", "0.5"],
     ["dilated needs inputs of at least 27 px", "--low-res 24", "--low-res-frac 0"]),
    (["--arch", "atrous", "--recipe", "best", "--epochs", "5"],  # 2 of 5 at 24 px
     ["atrous needs inputs of at least 25 px"]),
])
def test_bad_train_values(tiny_cifar, tmp_path, flags, words):
    r = c40("train", "--data", str(tiny_cifar), "--out", str(tmp_path / "o"), *flags)
    _assert_clean_error(r, *words)


def test_unknown_flag_is_a_usage_error():
    r = c40("summary", "--arch", "nope")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_eval_missing_and_corrupt_checkpoint(tmp_path):
    _assert_clean_error(c40("eval", "--checkpoint", str(tmp_path / "x.pt")), "not found")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    _assert_clean_error(c40("eval", "--checkpoint", str(bad)), "unreadable checkpoint")


def test_output_into_a_closed_pipe_is_not_a_traceback():
    """`c40 eval ... | head -1`: the reader has gone before c40 writes; c40 exits quietly.
    Here the pipe's read end is closed before the process starts, so every write fails."""

    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "c40", "summary", "--arch", "strided"],
                           stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
