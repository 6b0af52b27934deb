"""cluster.yaml passes Ray's cluster-launcher schema, pins what CI tests, and every command it
runs (and every command of the cluster walk-through in the READMEs) exists and parses with its
program's own parser: Ray's click CLI, c40's argparse, the two Ray scripts' argparse."""
from __future__ import annotations

import copy
import re
import shlex
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import load_script

yaml = pytest.importorskip("yaml")
util = pytest.importorskip("ray.autoscaler._private.util")
ray_cli = pytest.importorskip("ray.scripts.scripts").cli

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
COMMAND_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands",
                 "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
SHELL_BUILTINS = {"ulimit", "export", "cd"}
NOT_CHECKED = {"aws"}  # the AWS CLI (one-time bucket/IAM set-up in the README) is not in CI
BUCKET_URI = "s3://c40-ray-runs/c40"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _validate(cfg: dict) -> None:
    # validate_config alone needs the fields prepare_config fills in (cluster_synced_files, ...)
    util.validate_config(util.prepare_config(copy.deepcopy(cfg)))


def _simple_commands(line: str) -> list[list[str]]:
    """A shell line -> its simple commands as argv lists (split on ; && || | &, quotes kept,
    `VAR=value` prefixes dropped)."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    out, argv = [], []
    for token in [*lex, ";"]:
        if token not in (";", "&&", "||", "|", "&"):
            argv.append(token)
            continue
        while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
            argv = argv[1:]
        if argv:
            out.append(argv)
        argv = []
    return out


def check_command(argv: list[str]) -> None:
    """Fail unless `argv` names a program we know and its flags parse with that program's parser."""
    prog, args = argv[0], argv[1:]
    if prog in SHELL_BUILTINS or prog in NOT_CHECKED:
        return
    if prog == "ray":
        group, args = ray_cli, list(args)
        while hasattr(group, "commands"):  # `ray job submit`: walk the click groups
            name = args.pop(0)
            assert name in group.commands, f"`ray ... {name}` is no Ray command: {argv}"
            group = group.commands[name]
        ctx = group.make_context(group.name, args)  # raises on an unknown flag
        if "entrypoint" in ctx.params:  # `ray job submit ... -- python script.py flags`
            check_command(list(ctx.params["entrypoint"]))
    elif prog == "c40":
        from c40.cli import build_parser

        build_parser().parse_args(args)
    elif prog == "pip" or prog == "python" and args[:2] == ["-m", "pip"]:
        args = args if prog == "pip" else args[2:]
        assert args[0] == "install", argv
        from packaging.requirements import Requirement

        for spec in args[1:]:
            if spec == "-e":
                continue
            if spec.startswith("~/c40"):  # the repository, synced by file_mounts
                continue
            Requirement(spec)
    elif prog == "python" and args and args[0] in ("distributed/train.py", "tune/search.py"):
        load_script(args[0]).build_parser().parse_args(args[1:])
    elif prog == "python" and args[:1] == ["-c"]:
        compile(args[1], "<command>", "exec")
    elif prog == "moto_server":  # the local S3 server of the walk-through
        assert (Path(sys.executable).parent / prog).is_file(), "moto[server] is not installed"
    else:
        raise AssertionError(f"unknown program in {argv}")


def test_cluster_yaml_is_valid(cluster):
    _validate(cluster)
    assert cluster["provider"]["type"] == "aws"


def test_every_node_type_declares_resources_and_workers_have_gpus(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert all(t.get("resources") for t in types.values())  # offline, nothing fills them in
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert all(t["min_workers"] == 0 for t in workers)  # autoscaling from zero
    assert any(t["resources"]["GPU"] >= 4 for t in workers)  # 4-GPU Ray Train packs on one node


def test_images_and_versions_are_the_ones_ci_tests(cluster):
    ray_version, torch_version = version("ray"), version("torch").split("+")[0]
    docker = cluster["docker"]
    assert docker["head_image"] == f"rayproject/ray:{ray_version}-py311-cpu"
    assert docker["worker_image"] == f"rayproject/ray:{ray_version}-py311-gpu"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"ray[default,train,tune]=={ray_version}"' in pyproject  # a node can't join otherwise
    setup = " ".join(cluster["setup_commands"])
    assert f"torch=={torch_version}" in setup and "pip install -e ~/c40" in setup
    assert "c40 download" in setup and "~/c40" in cluster["file_mounts"]
    for t in cluster["available_node_types"].values():  # never Ray's outdated default AMI
        assert t["node_config"]["ImageId"].startswith(("ami-", "resolve:ssm:"))


def test_storage_is_the_bucket_and_workers_can_reach_it(cluster):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert f"C40_STORAGE={BUCKET_URI}" in " ".join(cluster[key])
    workers = [t for n, t in cluster["available_node_types"].items() if n != cluster["head_node_type"]]
    assert all(t["node_config"].get("IamInstanceProfile") for t in workers)


def test_every_command_the_yaml_runs_exists_and_parses(cluster):
    commands = [argv for key in COMMAND_LISTS for line in cluster.get(key) or []
                for argv in _simple_commands(line)]
    assert any(argv[:2] == ["ray", "start"] for argv in commands)
    for argv in commands:
        check_command(argv)


def _walkthrough_commands() -> list[list[str]]:
    """The ray / c40 / script commands in the bash blocks of distributed/README.md and of the
    README's "Distributed training and search" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Distributed training and search"):]
    section = section[:section.index("\n## ", 3)]
    text = section + (ROOT / "distributed" / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            for argv in _simple_commands(line) if line and not line.startswith("#") else []:
                if argv[0] in ("ray", "c40", "pip", "aws", "moto_server", "python"):
                    out.append(argv)
    return out


def test_every_walkthrough_command_exists_and_parses():
    commands = _walkthrough_commands()
    for step in (["ray", "up"], ["ray", "job", "submit"], ["ray", "down"], ["c40", "report"]):
        assert any(argv[:len(step)] == step for argv in commands), step
    for argv in commands:
        check_command(argv)


def test_dashboard_is_bound_to_localhost(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


def test_validation_catches_mistakes(cluster):
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu_1x"]["resourcez"] = {}
    with pytest.raises(Exception, match="Additional properties"):
        _validate(bad)
    bad = copy.deepcopy(cluster)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError):
        _validate(bad)
    with pytest.raises(SystemExit):  # a misspelt script flag in a command fails the check
        check_command(["python", "tune/search.py", "--num-sampels", "4"])
    with pytest.raises(Exception, match="No such option"):
        check_command(["ray", "start", "--head", "--dashboard-hots=127.0.0.1"])
