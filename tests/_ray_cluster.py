"""Helpers for tests that start Ray nodes with `ray start`: free ports, and stopping exactly the
processes a test started (never `ray stop`, which ends every Ray on the machine)."""
from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_processes(pids: list[int], timeout: float = 15.0) -> None:
    """SIGTERM each `ray start --block` process we started and everything below it (GCS,
    raylet, agents, workers), then SIGKILL what is left after `timeout` seconds."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs[pid] = p
            procs.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
