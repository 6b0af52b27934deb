"""Ray glue shared by distributed/train.py and tune/search.py.

- Storage by path or URI: `--storage` is a local/NFS folder or any pyarrow filesystem URI
  (s3://bucket/prefix, gs://..., S3-compatible endpoints through AWS_ENDPOINT_URL & co.). Ray
  keeps its run folders there, and every file the scripts write or read afterwards (results,
  plot, checkpoints, best_config.json) goes through the same pyarrow filesystem, so nothing
  lives on a disk only one node has.
- Restoring a trial/worker from the checkpoint Ray hands back, reporting each epoch with the
  node it ran on, copying a checkpoint out of Ray's folders, and fault injection for tests.

Imported by both scripts from this folder (scripts folders have no __init__.py). Ray workers
cannot import it by name, so it is registered with cloudpickle to travel by value.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import ray
import ray.cloudpickle

from c40.errors import C40Error, first_line
from c40.remote import is_uri

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

FAIL_ENV = "C40_FAIL_AT_EPOCH"    # tests: kill one worker/trial once, after this epoch's report
FAIL_MARKER = ".c40-fault-injected"
REPORT_COLLECTION_S = 5.0  # Ray collects reports every ~2 s; die later so the checkpoint lands
STORAGE_ENV = "C40_STORAGE"
# `ray job submit` runs the driver in a temporary copy of the working dir, deleted afterwards
IN_RAY_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def script_parser(doc: str, default_storage: str) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    """A script's parser: one flag per TrainConfig field, `--config`, and the Ray flags both
    scripts share; returns the parser and the Ray group, where the script adds its own."""
    from c40.config import add_config_flags, non_negative_int

    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser)
    g = parser.add_argument_group("Ray")
    g.add_argument("--cpu", action="store_true",
                   help="train on CPUs (default: GPUs; tune/search.py: --device auto)")
    g.add_argument("--storage", default=os.environ.get(STORAGE_ENV) or default_storage,
                   help=f"where Ray keeps the run and the outputs go: a folder every node sees "
                        f"or a URI such as s3://bucket/prefix (default: ${STORAGE_ENV}, else "
                        f"{default_storage}; a relative folder is refused under ray job submit)")
    g.add_argument("--name", default=None,
                   help="run name (default: timestamped); an existing name resumes that run")
    g.add_argument("--max-failures", type=non_negative_int, default=1,
                   help="restarts from the last checkpoint after a worker/trial dies (spot nodes)")
    g.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    g.add_argument("--json", action="store_true", help="print one JSON object at the end")
    return parser, g


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None, *, refused: tuple[str, ...],
               hint: str) -> argparse.Namespace:
    """Parse `argv`; TrainConfig flags in `refused` (which Ray decides) exit with `hint`."""
    args = parser.parse_args(argv)
    given = ["--" + name.replace("_", "-") for name in refused if getattr(args, name)]
    if given:
        parser.error(f"{'/'.join(given)} does not apply here: {hint}")
    return args


def run_script(prog: str, parse_args, work, argv: list[str] | None):
    """`work(*parse_args(argv))` -> (args, summary); a C40Error prints one line `prog: error: ...`
    and gives None (exit status 2)."""
    try:
        args, cfg = parse_args(argv)
        return args, work(args, cfg)
    except C40Error as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return None


def check_ray_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Shared checks; makes --storage and --data locations every node can use (argparse errors)."""
    try:
        args.storage = location(args.storage, "--storage")
        args.data = data_location(args.data)
    except C40Error as e:
        parser.error(str(e))
    args.device = "cpu" if args.cpu else "cuda"


def location(value: str, what: str) -> str:
    """A URI as given (its bucket checked), or an absolute local path (relative ones resolve
    against the cwd)."""
    if is_uri(value):
        fs, path = filesystem(value)
        bucket = path.split("/")[0]  # empty for file:///...
        try:
            missing = bucket and fs.get_file_info(bucket).type == pafs.FileType.NotFound
        except OSError as e:  # credentials, endpoint, permissions
            raise C40Error(f"{what} {value}: not reachable ({first_line(e)})") from None
        if missing:
            raise C40Error(f"{what} {value}: bucket '{bucket}' does not exist")
        return value.rstrip("/")
    path = Path(value).expanduser()
    if not path.is_absolute() and IN_RAY_JOB:
        raise C40Error(f"{what} {value} is relative: under ray job submit it would land in the "
                       "job's temporary working dir; give a URI (s3://bucket/prefix) or an "
                       "absolute folder every node sees")
    return str(path.resolve())


def data_location(data: str | None) -> str:
    """--data for workers on any node: a URI (checked here, fetched once per node) or an
    absolute folder (checked here)."""
    from c40.data import resolve_data_root
    from c40.remote import list_dataset

    data = data or os.environ.get("C40_DATA")
    if is_uri(data):
        list_dataset(data)  # a missing or partial dataset fails here, not in every worker
        return data
    return str(resolve_data_root(data).resolve())


def stage_teacher(args: argparse.Namespace, cfg):
    """cfg with its --teacher where every node reads it: a URI as given; a local file (checked
    here, in one line) copied into the run's storage as RUN/teacher.pt, since workers on other
    nodes do not see this machine's disk. `args.teacher` follows (scripts rebuild cfg from args)."""
    import dataclasses

    from c40.checkpoint import load_checkpoint

    if not cfg.teacher or is_uri(cfg.teacher):
        return cfg
    load_checkpoint(cfg.teacher)  # missing, unreadable, not a c40 checkpoint: fails here
    args.teacher = write_bytes(f"{args.run}/teacher.pt", Path(cfg.teacher).read_bytes())
    return dataclasses.replace(cfg, teacher=args.teacher)


def run_name(args: argparse.Namespace, prefix: str) -> str:
    return args.name or time.strftime(f"{prefix}-%Y%m%d-%H%M%S")


def fault_settings(run: str) -> dict | None:
    """Fault injection read on the driver (workers do not see its environment)."""
    value = os.environ.get(FAIL_ENV)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise C40Error(f"{FAIL_ENV} must be an epoch number >= 1, got {value!r}")
    return {"epoch": int(value), "marker": f"{run}/{FAIL_MARKER}"}


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a URI or an absolute local path."""
    try:
        return pafs.FileSystem.from_uri(location)
    except (ValueError, OSError) as e:  # ArrowInvalid (unknown scheme) is a ValueError
        raise C40Error(f"{location}: no filesystem for it ({first_line(e)})") from None


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes(location: str, data: bytes) -> str:
    """Write a whole file (temp file, then rename: never a half-written file under its name)."""
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)
    return location


def write_json(location: str, obj) -> str:
    return write_bytes(location, (json.dumps(obj, indent=2) + "\n").encode())


def copy_from_checkpoint(checkpoint, name: str, dest: str) -> str | None:
    """Copy one file of a Ray checkpoint (any filesystem) to `dest` (any filesystem), without
    a detour through the driver's disk; None when the checkpoint has no such file."""
    src = f"{checkpoint.path}/{name}"
    if checkpoint.filesystem.get_file_info(src).type == pafs.FileType.NotFound:
        return None
    with checkpoint.filesystem.open_input_stream(src) as f:
        return write_bytes(dest, f.read())


def restore(checkpoint, out: Path) -> int:
    """Put the checkpoint Ray hands a restarted worker/trial at OUT/checkpoint.pt, where
    `fit(cfg)` with `cfg.resume` continues it; returns its epoch (0 on a fresh start: nothing
    written). Only checkpoint.pt is downloaded."""
    if checkpoint is None:
        return 0
    from c40.checkpoint import load_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    local = out / "checkpoint.pt"
    local.write_bytes(read_bytes_fs(checkpoint.filesystem, f"{checkpoint.path}/checkpoint.pt"))
    return int(load_checkpoint(local)["epoch"])


def read_bytes_fs(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def create_reporter(report, checkpoint_cls, *, extra: dict, fault: dict | None = None):
    """The `report(metrics, checkpoint_path)` callback of c40.train.fit for Ray: adds `extra`
    and the node id to the metrics, wraps the checkpoint folder, and injects the fault."""
    node_id = ray.get_runtime_context().get_node_id()

    def on_epoch(metrics: dict, path: Path | None) -> None:
        ckpt = checkpoint_cls.from_directory(str(Path(path).parent)) if path else None
        report({**metrics, **extra, "node_id": node_id}, checkpoint=ckpt)
        if fault and metrics["epoch"] == fault["epoch"]:
            inject_fault(fault["marker"], f"{node_id} exited after epoch {metrics['epoch']}\n")

    return on_epoch


def inject_fault(marker: str, note: str) -> None:
    """Exit this worker process once per run (the marker in storage says it happened)."""
    if exists(marker):
        return
    write_bytes(marker, note.encode())
    time.sleep(REPORT_COLLECTION_S)
    os._exit(1)


def save_figure(fig, dest: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return write_bytes(dest, buf.getvalue())


def last_line(error: BaseException | None) -> str | None:
    """The last line of a (Ray-wrapped) exception, for one-line reports."""
    if error is None:
        return None
    return (str(error).strip().splitlines() or [type(error).__name__])[-1][:300]
