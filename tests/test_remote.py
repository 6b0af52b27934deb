"""c40.remote and `--data URI`: a dataset in an S3 bucket (moto's server) is fetched once per
node into a local cache, CIFAR batch folders and image folders alike; missing or partial
datasets are one-line DataErrors. Also the Ray scripts' storage/data argument checks."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

pafs = pytest.importorskip("pyarrow.fs")
pytest.importorskip("moto.server")

from _s3 import BUCKET, s3_server  # noqa: E402
from conftest import load_script  # noqa: E402

from c40.data import load_dataset, resolve_data_root  # noqa: E402
from c40.errors import DataError  # noqa: E402


@pytest.fixture(scope="module")
def s3(tiny_cifar):
    with s3_server() as (env, fs):
        pafs.copy_files(str(tiny_cifar), f"{BUCKET}/cifar", destination_filesystem=fs)
        yield env, fs


@pytest.fixture
def aws(s3, monkeypatch, tmp_path):
    """This process talks to the moto server, with a fresh dataset cache."""
    env, fs = s3
    for k, v in {**env, "C40_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(k, v)
    return fs


def test_cifar_uri_is_fetched_once_and_reads_like_the_folder(aws, tiny_cifar, tmp_path):
    root = resolve_data_root(f"s3://{BUCKET}/cifar")
    assert root.is_relative_to(tmp_path / "cache")
    remote, local = load_dataset(root, "train"), load_dataset(tiny_cifar, "train")
    assert np.array_equal(remote.images, local.images) and np.array_equal(remote.labels, local.labels)
    assert resolve_data_root(f"s3://{BUCKET}/cifar/") == root  # cached: same folder


def test_four_processes_on_one_node_download_once(s3, tmp_path):
    """The file lock: four concurrent fetches copy each of the 7 files exactly once."""
    env, _ = s3
    calls = tmp_path / "copies.txt"
    code = ("import sys, pyarrow.fs as pafs\n"
            "from c40.remote import fetch_dataset\n"
            "copy = pafs.copy_files\n"
            "def counted(*a, **k):\n"
            "    open(sys.argv[2], 'a').write('x\\n')\n"
            "    return copy(*a, **k)\n"
            "pafs.copy_files = counted\n"
            "print(fetch_dataset(sys.argv[1]))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"s3://{BUCKET}/cifar", str(calls)],
                              env={**os.environ, **env, "C40_CACHE": str(tmp_path / "cache")},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert len({o.strip() for o, _ in outs}) == 1  # one cached folder for all four
    assert len(calls.read_text().splitlines()) == 7  # 5 train batches, test_batch, batches.meta


def test_image_folder_uri(aws, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            d = tmp_path / "imgs" / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    pafs.copy_files(str(tmp_path / "imgs"), f"{BUCKET}/imgs", destination_filesystem=aws)
    ds = load_dataset(resolve_data_root(f"s3://{BUCKET}/imgs"), "test")
    assert len(ds) == 6 and ds.classes == ("cat", "dog") and ds.images.shape == (6, 32, 32, 3)


def test_missing_and_partial_datasets_are_one_line_errors(aws, tiny_cifar):
    pafs.copy_files(str(tiny_cifar), f"{BUCKET}/partial", destination_filesystem=aws)
    aws.delete_file(f"{BUCKET}/partial/test_batch")
    aws.create_dir(f"{BUCKET}/other")
    with aws.open_output_stream(f"{BUCKET}/other/readme.txt") as f:
        f.write(b"not a dataset")
    cases = {f"s3://{BUCKET}/partial": "incomplete CIFAR-10 folder (missing: test_batch",
             f"s3://{BUCKET}/nothing-here": "no such dataset",
             f"s3://{BUCKET}/other": "neither a cifar-10-batches-py folder",
             "nope://x/y": "no filesystem for this URI"}
    for uri, message in cases.items():
        with pytest.raises(DataError, match="^" + re.escape(uri) + ": ") as e:
            resolve_data_root(uri)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("script", ["distributed/train.py", "tune/search.py"])
def test_scripts_check_storage_and_data_locations(script, aws, tiny_cifar, monkeypatch, capsys,
                                                  tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # see what the scripts leave there
    pytest.importorskip("ray")
    mod = load_script(script)
    base = ["--cpu", "--name", "n"]
    args, _ = mod.parse_args([*base, "--storage", f"s3://{BUCKET}/runs/", "--data",
                              f"s3://{BUCKET}/cifar"])
    assert args.storage == f"s3://{BUCKET}/runs" and args.run == f"s3://{BUCKET}/runs/n"
    assert args.data == f"s3://{BUCKET}/cifar"  # workers fetch it; the driver only listed it
    args, _ = mod.parse_args([*base, "--storage", "rel/store", "--data", str(tiny_cifar)])
    assert Path(args.storage).is_absolute() and args.storage.endswith("rel/store")
    for storage, message in (("s3://no-such-bucket/runs", "bucket 'no-such-bucket' does not exist"),
                             ("nope://x/y", "no filesystem")):
        with pytest.raises(SystemExit):
            mod.parse_args([*base, "--storage", storage, "--data", str(tiny_cifar)])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a partial/missing dataset fails on the driver, in one line
        mod.parse_args([*base, "--data", f"s3://{BUCKET}/nothing-here"])
    assert "no such dataset" in capsys.readouterr().err
    with aws.open_output_stream(f"{BUCKET}/best_config.json") as f:  # --config by URI too
        f.write(b'{"width": 0.75, "dropout": 0.05}')
    _, cfg = mod.parse_args([*base, "--config", f"s3://{BUCKET}/best_config.json", "--dropout",
                             "0.2", "--data", str(tiny_cifar)])
    assert (cfg.width, cfg.dropout) == (0.75, 0.2)  # flags override the file
    with pytest.raises(SystemExit):
        mod.parse_args([*base, "--config", f"s3://{BUCKET}/none.json", "--data", str(tiny_cifar)])
    assert f"--config s3://{BUCKET}/none.json: " in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # the config was read, not downloaded to a temp folder
    monkeypatch.setattr(mod.rc, "IN_RAY_JOB", True)  # the job's cwd is a temp copy: refuse
    with pytest.raises(SystemExit):
        mod.parse_args([*base, "--storage", "runs/x", "--data", str(tiny_cifar)])
    assert "temporary working dir" in capsys.readouterr().err
