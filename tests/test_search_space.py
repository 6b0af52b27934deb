"""tune/search.py's space, searchers, warm start and resource choice, without a Ray cluster."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("optuna")
sys.path[:0] = [str(Path(__file__).resolve().parents[1] / d) for d in ("distributed", "tune")]
import _search_resources as res  # noqa: E402
import _search_space as sp  # noqa: E402

from c40.errors import C40Error  # noqa: E402
from c40.model import PARAM_LIMIT, count_params, create_model, list_models  # noqa: E402


@pytest.mark.parametrize("arch", list_models())
def test_1000_configs_of_the_default_space_are_all_under_the_limit(arch):
    space = sp.create_param_space(arch, {}, {})
    samples = {k: v.sample(size=1000) for k, v in space.items()}  # Tune's own sampling
    configs = [{k: samples[k][i] for k in space} for i in range(1000)]
    params = {w: count_params(create_model(arch, width=w)) for w in {c["width"] for c in configs}}
    assert all(params[c["width"]] < PARAM_LIMIT for c in configs)
    # the limit binds: the widest legal width is sampled, and one step wider is over the limit
    widest = max(params)
    assert widest == max(sp.legal_widths(arch)) and len(params) >= 3
    assert count_params(create_model(arch, width=widest + sp.WIDTH_STEP)) >= PARAM_LIMIT
    for name, (lo, hi, _) in sp.RANGES.items():
        if name != "width":
            assert all(lo <= c[name] <= hi for c in configs), name


def test_optuna_sees_the_same_widths_and_ranges():
    from ray.tune.search.optuna import OptunaSearch

    space = sp.create_param_space("strided", {"lr": (0.1, 0.2, True)}, {"dropout": 0.1})
    dists = OptunaSearch.convert_search_space(space)
    assert "dropout" not in dists  # fixed by a flag: a constant, not searched
    assert list(dists["width"].choices) == sp.legal_widths("strided") == [0.5, 0.625, 0.75, 0.875, 1.0]
    assert (dists["lr"].low, dists["lr"].high, dists["lr"].log) == (0.1, 0.2, True)


def test_range_flags_parse_and_bad_ones_say_why():
    assert sp.parse_range("weight-decay=1e-4:1e-3") == ("weight_decay", 1e-4, 1e-3)
    for bad in ("lr=0:1", "lr=0.2:0.1", "depth=1:2", "lr=0.1"):
        with pytest.raises(ValueError, match="--range"):
            sp.parse_range(bad)
    with pytest.raises(C40Error, match="no width"):
        sp.create_param_space("strided", {"width": (1.1, 2.0, False)}, {})


def test_warm_start_tells_tpe_the_previous_trials(tmp_path):
    import optuna
    import pyarrow as pa
    import pyarrow.parquet as pq

    space = sp.create_param_space("strided", {}, {"label_smoothing": 0.1})
    rows = [dict(status="ok", dropout=0.1, lr=0.2, weight_decay=5e-4, width=1.0, val_acc=0.6),
            dict(status="stopped", dropout=0.2, lr=0.5, weight_decay=1e-3, width=0.5, val_acc=0.3),
            dict(status="rejected", dropout=0.1, lr=0.2, weight_decay=5e-4, width=1.25, val_acc=None),
            dict(status="ok", dropout=0.1, lr=3.0, weight_decay=5e-4, width=1.0, val_acc=0.1)]  # lr out of range
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "results.parquet")
    points, rewards = sp.read_warm_start(str(tmp_path), space)  # the folder works too
    assert rewards == [0.6, 0.3] and points[0] == {"dropout": 0.1, "lr": 0.2, "weight_decay": 5e-4,
                                                   "width": 1.0}
    searcher = sp.create_searcher("optuna", 0, 16, (points, rewards))
    searcher.set_search_properties("val_acc", "max", space)
    done = searcher._ot_study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert sorted(t.value for t in done) == [0.3, 0.6]
    assert searcher._ot_study.best_params["width"] == 1.0
    suggested = searcher.suggest("t1")
    assert suggested["width"] in sp.legal_widths("strided") and 0.05 <= suggested["lr"] <= 1.0
    with pytest.raises(C40Error, match="warm-start"):
        sp.read_warm_start(str(tmp_path / "missing.parquet"), space)


CPU_NODE, GPU_NODE = {"CPU": 2.0, "memory": 1e9}, {"CPU": 4.0, "GPU": 1.0}


def test_device_auto_uses_gpus_only_where_the_cluster_has_them():
    assert res.pick_device("auto", None, [CPU_NODE], [])[0] == "cpu"
    assert res.pick_device("auto", None, [CPU_NODE, GPU_NODE], [])[0] == "cuda"
    assert res.pick_device("auto", None, [{}], [GPU_NODE]) == ("cuda", "the autoscaler can start GPU nodes")
    assert res.pick_device("auto", 0.25, [CPU_NODE], [])[0] == "cuda"
    assert res.pick_device("cpu", None, [GPU_NODE], [])[0] == "cpu"


def test_a_request_nothing_can_hold_is_an_error_and_an_autoscaler_node_type_waits():
    gpu_trial = res.trial_resources("cuda", 1.0, None)
    assert gpu_trial == {"cpu": 1.0, "gpu": 0.5}
    assert res.check_fits(gpu_trial, [GPU_NODE], []) == ""
    assert res.check_fits(gpu_trial, [{"CPU": 0.0}], [GPU_NODE]) == "waiting"
    with pytest.raises(C40Error) as e:
        res.check_fits(gpu_trial, [CPU_NODE], [])
    assert "GPU 0.5" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(C40Error, match="cpus-per-trial"):
        res.check_fits(res.trial_resources("cpu", 3.0, None), [CPU_NODE], [{"CPU": 2.0}])


def test_on_a_ray_up_head_a_gpu_search_waits_for_the_autoscalers_gpu_nodes(tmp_path):
    """The README's cluster walk: the head (0 CPUs) runs the driver, GPU workers scale from 0.
    The launcher's config on the head is cluster.yaml as `ray up` copies it."""
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())
    types = res.launcher_node_types(str(bootstrap))
    assert types == [{"CPU": 4, "GPU": 1}, {"CPU": 48, "GPU": 4}]  # the head's type has 0 workers
    head = [{"CPU": 0.0, "memory": 1e9}]
    assert res.pick_device("auto", None, head, types) == ("cuda", "the autoscaler can start GPU nodes")
    assert res.check_fits(res.trial_resources("cuda", 1.0, 0.25), head, types) == "waiting"
    with pytest.raises(C40Error, match="or its autoscaler"):
        res.check_fits(res.trial_resources("cuda", 64.0, 1.0), head, types)  # 48 CPUs at most
    assert res.launcher_node_types(str(tmp_path / "absent.yaml")) == []
