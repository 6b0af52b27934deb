"""Writing files so that a crash never leaves a half-written one posing as complete."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from c40.errors import C40Error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False) -> Iterator[str]:
    """Yield a temporary path beside `path`; rename it over `path` only if the body succeeds, so
    readers see the old file or the whole new one. `durable`: fsync the file and the folder
    before and after the rename (checkpoints: survive a power loss too)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; give what open() would
        yield tmp
        if durable:
            _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent, os.O_RDONLY)  # make the rename itself durable
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync(path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` into `path`, atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def prepare_out_dir(out: Path, resume: bool) -> None:
    """A writable output folder that does not already hold a run (unless resuming it)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".c40-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise C40Error(f"output folder {out} is not writable ({e.strerror})") from None
    if not resume and (out / "checkpoint.pt").exists():
        raise C40Error(f"{out} already holds a run (checkpoint.pt): pass --resume to continue it "
                       "or choose another --out")
