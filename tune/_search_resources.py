"""Resources of tune/search.py's trials that fit the cluster.

`--device auto` picks GPUs when a node of the cluster, or a node type its autoscaler can start,
has one, else CPUs. A trial request that no node and no node type can ever hold is an error
before the search starts: Ray would otherwise wait for it forever, printing a warning a minute.
"""
from __future__ import annotations

from pathlib import Path

from c40.errors import C40Error

DEFAULT_GPUS_PER_TRIAL = 0.5  # two single-process trials share a GPU


def cluster_shapes() -> tuple[list[dict], list[dict | None]]:
    """(resources of each live node, resources of each node type the autoscaler may start;
    None for a type whose resources are unknown)."""
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n["Alive"]]
    try:  # autoscaler v2 reports its node types to the GCS (Ray Train V2 reads them so too)
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # a private API: without it, the launcher's file below is what we know
        config = None
    types = [dict(g.resources) for g in (config.node_group_configs if config else [])
             if g.max_count != 0]
    return nodes, types or launcher_node_types()


def launcher_node_types(path: str = "~/ray_bootstrap_config.yaml") -> list[dict | None]:
    """The worker node types of a `ray up` cluster, from the config the cluster launcher puts
    on the head (where `ray job submit` runs the driver; Tune checks the same file); [] when
    this is not such a head."""
    import yaml

    file = Path(path).expanduser()
    if not file.exists():
        return []
    types = (yaml.safe_load(file.read_text()) or {}).get("available_node_types") or {}
    return [t.get("resources") for t in types.values() if t.get("max_workers", 0) > 0]


def pick_device(requested: str, gpus_per_trial: float | None, nodes: list[dict],
                types: list[dict]) -> tuple[str, str]:
    """('cpu' | 'cuda', why) for --device auto|cpu|cuda; an explicit --gpus-per-trial means cuda."""
    if requested != "auto":
        return requested, f"--device {requested}"
    if gpus_per_trial is not None:
        return "cuda", "--gpus-per-trial given"
    if any(r.get("GPU", 0) > 0 for r in nodes):
        return "cuda", "the cluster has GPUs"
    if any(r and r.get("GPU", 0) > 0 for r in types):
        return "cuda", "the autoscaler can start GPU nodes"
    return "cpu", "no GPU in the cluster" + (" nor in its autoscaler's node types" if types else "")


def trial_resources(device: str, cpus: float, gpus: float | None) -> dict:
    """Tune's per-trial request."""
    if device == "cpu":
        return {"cpu": cpus}
    return {"cpu": cpus, "gpu": DEFAULT_GPUS_PER_TRIAL if gpus is None else gpus}


def check_fits(request: dict, nodes: list[dict], types: list[dict]) -> str:
    """'' when a node holds one trial now, 'waiting' when only an autoscaler node type can;
    raises C40Error (one line) when none ever can."""
    need = {k.upper(): v for k, v in request.items()}

    def holds(r: dict | None) -> bool:  # a node type of unknown resources might
        return r is None or all(r.get(k, 0) >= v for k, v in need.items())

    if any(holds(r) for r in nodes):
        return ""
    if any(holds(r) for r in types):
        return "waiting"
    biggest = max([*nodes, *filter(None, types)], key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    have = ", ".join(f"{k} {biggest.get(k, 0):g}" for k in need)
    hint = "lower --cpus-per-trial" if need.get("GPU") is None else \
        "use --device cpu, or lower --gpus-per-trial/--cpus-per-trial"
    raise C40Error(f"no node of the cluster{' or its autoscaler' if types else ''} can ever run "
                   f"a trial of {', '.join(f'{k} {v:g}' for k, v in need.items())} (the largest "
                   f"has {have or 'nothing'}); {hint}")
