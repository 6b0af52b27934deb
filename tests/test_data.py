import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from c40.data import (CIFAR10_CLASSES, channel_stats, download_cifar10, load_cifar10,
                      load_dataset, read_batch, resolve_data_root, safe_unpickle)
from c40.errors import DataError
from c40.imagefolder import load_image_folder
from conftest import write_batch


def test_reads_real_cifar10_test_batch(cifar_dir):
    ds = load_cifar10(cifar_dir, "test")
    assert ds.images.shape == (10000, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and set(np.unique(ds.labels)) == set(range(10))
    assert np.bincount(ds.labels).tolist() == [1000] * 10  # the official test set is balanced
    assert ds.classes == CIFAR10_CLASSES
    # real photographs, not noise: neighbouring pixels are strongly correlated
    x = ds.images[:500].astype(np.float32)
    corr = np.corrcoef(x[:, :, :-1].ravel(), x[:, :, 1:].ravel())[0, 1]
    assert corr > 0.8


def test_channel_stats_match_known_cifar_values(cifar_dir):
    images, _ = read_batch(cifar_dir / "data_batch_1")
    mean, std = channel_stats(images)
    np.testing.assert_allclose(mean, (0.491, 0.482, 0.447), atol=0.01)
    np.testing.assert_allclose(std, (0.247, 0.243, 0.262), atol=0.01)


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "data_batch_1"
    bad.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataError, match="unsafe|refused"):
        read_batch(bad)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        safe_unpickle(bad.read_bytes())


@pytest.mark.parametrize("case, match", [
    ("truncated", "unreadable"),
    ("wrong_keys", "no 'data'"),
    ("wrong_shape", "N x 3072"),
    ("wrong_dtype", "uint8"),
    ("labels_range", "out of range"),
    ("labels_count", "labels"),
    ("not_a_dict", "not a CIFAR-10 batch"),
])
def test_bad_batch_files_raise_data_error_naming_the_file(tmp_path, cifar_dir, case, match):
    path = tmp_path / "data_batch_1"
    data = np.zeros((4, 3072), np.uint8)
    if case == "truncated":
        path.write_bytes((cifar_dir / "data_batch_1").read_bytes()[:5000])
    elif case == "wrong_keys":
        path.write_bytes(pickle.dumps({b"pixels": data, b"labels": [0] * 4}))
    elif case == "wrong_shape":
        write_batch(path, np.zeros((4, 1024), np.uint8), [0] * 4)
    elif case == "wrong_dtype":
        write_batch(path, data.astype(np.float32), [0] * 4)
    elif case == "labels_range":
        write_batch(path, data, [0, 1, 2, 10])
    elif case == "labels_count":
        write_batch(path, data, [0, 1])
    else:
        path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match=match) as e:
        read_batch(path)
    assert str(path) in str(e.value)


def test_missing_folder_and_files(tmp_path, monkeypatch):
    monkeypatch.delenv("C40_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="c40 download"):
        resolve_data_root(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a cifar-10-batches-py"):
        load_dataset(tmp_path / "empty", "train")
    monkeypatch.setenv("C40_DATA", str(tmp_path / "empty"))
    assert resolve_data_root(None) == tmp_path / "empty"
    assert resolve_data_root(tmp_path) == tmp_path  # --data beats the environment


def test_missing_batch_file_is_named(tiny_cifar, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "data_batch_1").write_bytes((tiny_cifar / "data_batch_1").read_bytes())
    with pytest.raises(DataError, match="data_batch_2: missing"):
        load_cifar10(partial, "train")


def test_subset_and_split(tiny_cifar):
    ds = load_cifar10(tiny_cifar, "train")
    assert len(ds) == 1000 and len(ds.subset(100)) == 100
    train, val = ds.split(100, seed=1)
    assert len(train) == 900 and len(val) == 100
    with pytest.raises(DataError):
        ds.split(0)


def _make_tarball(src: Path, dest: Path) -> Path:
    tar = dest / "cifar-10-python.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(src, arcname="cifar-10-batches-py")
    return tar


@pytest.fixture
def local_server(tmp_path):
    """A loopback HTTP server over tmp_path/www (the real download code path, offline)."""
    import functools
    import http.server
    import threading

    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_extracts_a_checked_tarball(tiny_cifar, tmp_path, monkeypatch, local_server):
    import hashlib

    import c40.data as data

    www, url = local_server
    tar = _make_tarball(tiny_cifar, www)
    monkeypatch.setattr(data, "CIFAR10_URL", f"{url}/{tar.name}")
    monkeypatch.setattr(data, "CIFAR10_MD5", hashlib.md5(tar.read_bytes()).hexdigest())
    out = download_cifar10(tmp_path / "dl")
    assert len(load_cifar10(out, "test")) == 200
    monkeypatch.setattr(data, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(DataError, match="check"):
        download_cifar10(tmp_path / "dl2")


def test_download_offline_is_a_clear_error(tmp_path, monkeypatch):
    import c40.data as data

    monkeypatch.setattr(data, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="could not download"):
        download_cifar10(tmp_path)


def _png(path: Path, size=(32, 32), mode="RGB"):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=120 if mode == "L" else (200, 10, 10)).save(path)


def test_image_folder_reader(tmp_path):
    _png(tmp_path / "train" / "cat" / "a.png")
    _png(tmp_path / "train" / "dog" / "b.png")
    _png(tmp_path / "train" / "dog" / "c.png")
    ds = load_dataset(tmp_path, "train")
    assert ds.classes == ("cat", "dog") and ds.labels.tolist() == [0, 1, 1]
    assert ds.images.shape == (3, 32, 32, 3) and tuple(ds.images[0, 0, 0]) == (200, 10, 10)


@pytest.mark.parametrize("size, mode, name, match", [
    ((64, 64), "RGB", "big.png", "resized from 64x64"),
    ((32, 32), "L", "gray.png", "converted from L to RGB"),
    (None, None, "notes.txt", "not an image file"),
])
def test_image_folder_rejects_bad_images(tmp_path, size, mode, name, match):
    f = tmp_path / "train" / "cat" / name
    if size:
        _png(f, size, mode)
    else:
        f.parent.mkdir(parents=True)
        f.write_text("hello")
    with pytest.raises(DataError, match=match) as e:
        load_image_folder(tmp_path / "train")
    assert name in str(e.value) and "\n" not in str(e.value)


@pytest.fixture
def cifar_tarball_url(tiny_cifar, tmp_path):
    """A CIFAR-10 tarball of the tiny folder, served over HTTP on 127.0.0.1: (url, md5)."""
    import functools
    import hashlib
    import http.server
    import tarfile
    import threading

    site = tmp_path / "site"
    site.mkdir()
    tarball = site / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tiny_cifar, arcname="cifar-10-batches-py")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield (f"http://127.0.0.1:{server.server_port}/{tarball.name}",
               hashlib.md5(tarball.read_bytes()).hexdigest())
    finally:
        server.shutdown()


def test_default_data_is_downloaded_when_absent(cifar_tarball_url, tmp_path, monkeypatch, capsys):
    """No --data, no $C40_DATA, no ./data/cifar-10-batches-py: the tarball is fetched (here from
    a local server standing in for the official URL), md5-checked and extracted there."""
    from c40 import data

    monkeypatch.setattr(data, "CIFAR10_URL", cifar_tarball_url[0])
    monkeypatch.setattr(data, "CIFAR10_MD5", cifar_tarball_url[1])
    monkeypatch.delenv("C40_DATA", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    root = data.resolve_data_root(None)
    assert root == data.DEFAULT_ROOT and len(data.load_dataset(root, "test")) == 200
    assert "downloading CIFAR-10" in capsys.readouterr().err
    monkeypatch.setattr(data, "CIFAR10_MD5", "0" * 32)  # present now: no second download
    assert data.resolve_data_root(None) == data.DEFAULT_ROOT


def test_default_download_with_a_bad_checksum_is_one_line(cifar_tarball_url, tmp_path, monkeypatch):
    from c40 import data

    monkeypatch.setattr(data, "CIFAR10_URL", cifar_tarball_url[0])
    monkeypatch.setattr(data, "CIFAR10_MD5", "0" * 32)
    monkeypatch.delenv("C40_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="failed its check") as e:
        data.resolve_data_root(None)
    assert "\n" not in str(e.value) and not (tmp_path / data.DEFAULT_ROOT).exists()
