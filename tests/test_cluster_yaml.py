"""cluster.yaml passes Ray's cluster-launcher schema and keeps the dashboard private."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
util = pytest.importorskip("ray.autoscaler._private.util")

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _validate(cfg: dict) -> None:
    # validate_config alone needs the fields prepare_config fills in (cluster_synced_files, ...)
    util.validate_config(util.prepare_config(copy.deepcopy(cfg)))


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


def test_setup_installs_the_project_and_the_data(cluster):
    setup = " ".join(cluster["setup_commands"])
    assert "pip install" in setup and "~/c40" in setup and "c40 download" in setup
    assert "~/c40" in cluster["file_mounts"]


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
