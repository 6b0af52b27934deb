"""Shared fixtures: the real CIFAR-10 folder beside the repo, small slices of it, tiny copies."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import pickle
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("C40_TEST_DATA", REPO.parent / "shared" / "cifar-10-batches-py"))


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    if not (SHARED_DATA / "test_batch").exists():  # a failure, not a skip: CI must not go green without it
        pytest.fail(f"real CIFAR-10 not found at {SHARED_DATA} (put cifar-10-batches-py in "
                    "../shared or set C40_TEST_DATA)")
    return SHARED_DATA


def write_batch(path: Path, data: np.ndarray, labels, protocol: int = 4) -> Path:
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"test", b"labels": list(labels), b"data": data,
                     b"filenames": [b"x.png"] * len(data)}, f, protocol=protocol)
    return path


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory, cifar_dir) -> Path:
    """A cifar-10-batches-py folder of real images: 5 x 200 train, 200 test (fast to load)."""
    from c40.data import read_batch

    root = tmp_path_factory.mktemp("tiny") / "cifar-10-batches-py"
    root.mkdir()
    images, labels = read_batch(cifar_dir / "data_batch_1")
    test_images, test_labels = read_batch(cifar_dir / "test_batch")
    chw = lambda x: x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # noqa: E731  NHWC -> CHW rows
    for i in range(5):
        sl = slice(i * 200, (i + 1) * 200)
        write_batch(root / f"data_batch_{i + 1}", chw(images[sl]), labels[sl])
    write_batch(root / "test_batch", chw(test_images[:200]), test_labels[:200])
    (root / "batches.meta").write_bytes((cifar_dir / "batches.meta").read_bytes())
    return root


def load_script(rel: str):
    """Import a script by path. Not put in sys.modules, so Ray pickles its functions by value."""
    spec = importlib.util.spec_from_file_location(f"c40_script_{Path(rel).stem}", REPO / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def ray_local():
    """The one in-process local Ray (2 CPUs) of a test run; HOME is a temp dir so ~/.ray is
    untouched. Only the Ray Train tests use it: the Tune test starts its own in a subprocess
    (a second `ray.init` in one process timed out here), and pytest-timeout turns any hang into
    a failure."""
    ray = pytest.importorskip("ray")
    saved = dict(os.environ)  # ray.init also exports RAY_AUTH_MODE=token: restore it all
    with tempfile.TemporaryDirectory(prefix="c40-ray-home-") as home:
        os.environ["HOME"] = home
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()
            os.environ.clear()
            os.environ.update(saved)


def run_c40(*args, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """`c40 ARGS` in this process (`c40.cli.main` with stdout/stderr captured, `env` and `cwd`
    applied for the call): what a subprocess would report, without its ~4 s of imports. Tests of
    signals, exit codes of a real process or pipes start a real one instead."""
    from c40.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    try:
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse usage errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["c40", *map(str, args)], code, out.getvalue(), err.getvalue())
