"""Datasets by URI (s3://, gs://, any pyarrow filesystem): one copy per node, in a local cache.

On a cluster every node reads the dataset from a bucket rather than from a disk the nodes share.
`fetch_dataset(uri)` copies it once into `$C40_CACHE` (default `~/.cache/c40`) and returns the
local folder; a file lock makes the trials and workers of one node wait for a single download
instead of fetching it once each. S3-compatible endpoints come through pyarrow's usual variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...). Nothing here imports Ray.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from c40.errors import DataError, first_line

CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
COMPLETE = ".c40-complete"  # written last: a folder without it is an interrupted copy


def is_uri(location: str | os.PathLike | None) -> bool:
    """True for `scheme://...` locations (s3://, gs://, file://, hdfs://); False for paths."""
    return location is not None and "://" in str(location)


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a URI; a one-line DataError if it has no filesystem."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:  # ArrowInvalid (unknown scheme) is a ValueError
        raise DataError(f"{uri}: no filesystem for this URI ({first_line(e)})") from None


def read_bytes(location: str | os.PathLike) -> bytes:
    """A whole file from a local path or a URI (any pyarrow filesystem)."""
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = filesystem(str(location))
    with fs.open_input_stream(path) as f:
        return f.read()


def list_dataset(uri: str) -> list[tuple[str, int]]:
    """(relative path, size) of every file of the remote dataset at `uri`, checked to be complete:
    a CIFAR-10 batch folder (data_batch_1..5 and test_batch) or an image folder
    (`train/` and/or `test/` of class folders of images)."""
    import pyarrow.fs as pafs

    fs, base = filesystem(uri)
    base = base.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except FileNotFoundError:
        raise DataError(f"{uri}: no such dataset (nothing at that location)") from None
    except OSError as e:
        raise DataError(f"{uri}: cannot list the dataset ({first_line(e)})") from None
    files = sorted((i.path[len(base) + 1:], i.size) for i in infos if i.type == pafs.FileType.File)
    if not files:
        raise DataError(f"{uri}: no such dataset (no files at that location)")
    names = {name for name, _ in files}
    if any(name in names for name in CIFAR_FILES):  # a batch folder: all six or nothing
        missing = [f for f in CIFAR_FILES if f not in names]
        empty = [name for name, size in files if name in CIFAR_FILES and size == 0]
        if missing or empty:
            raise DataError(f"{uri}: incomplete CIFAR-10 folder (missing: "
                            f"{', '.join(missing) or '-'}; empty: {', '.join(empty) or '-'})")
        return files
    images = [name for name, _ in files if name.lower().endswith(IMAGE_SUFFIXES)]
    if not any(name.split("/")[0] in ("train", "test") and name.count("/") == 2 for name in images):
        raise DataError(f"{uri}: neither a cifar-10-batches-py folder (data_batch_1..5, test_batch) "
                        "nor an image folder (train/<class>/*.png, test/<class>/*.png)")
    return files


def cache_root() -> Path:
    """Where fetched datasets live on this node: `$C40_CACHE`, else `~/.cache/c40`."""
    return Path(os.environ.get("C40_CACHE") or Path.home() / ".cache" / "c40").expanduser()


def fetch_dataset(uri: str, cache: str | os.PathLike | None = None) -> Path:
    """The local copy of the dataset at `uri`, downloaded on the first call on this node.

    The cache key hashes the URI and every file's name and size, so a dataset replaced in the
    bucket is fetched again; concurrent callers on one node share one download (file lock)."""
    import pyarrow.fs as pafs

    files = list_dataset(uri)
    root = Path(cache) if cache is not None else cache_root()
    key = hashlib.sha256(repr((uri.rstrip("/"), files)).encode()).hexdigest()[:16]
    dest = root / "datasets" / f"{Path(uri.rstrip('/')).name or 'dataset'}-{key}"
    if (dest / COMPLETE).is_file():  # fast path: no lock once the copy exists
        return dest
    fs, base = filesystem(uri)
    base = base.rstrip("/")
    with _locked(dest.with_name(dest.name + ".lock")):
        if (dest / COMPLETE).is_file():  # another process finished it while we waited
            return dest
        tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for name, size in files:
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(f"{base}/{name}", str(target), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
                if target.stat().st_size != size:
                    raise DataError(f"{uri}/{name}: copied {target.stat().st_size} of {size} bytes")
            (tmp / COMPLETE).write_text(f"{uri}\n")
            shutil.rmtree(dest, ignore_errors=True)  # an interrupted copy from an older run
            tmp.rename(dest)
        except OSError as e:
            raise DataError(f"{uri}: download failed ({first_line(e)})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
