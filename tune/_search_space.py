"""The search space of tune/search.py, its searchers and the warm start.

The parameter limit is part of the space: `width` is sampled only from the widths whose model,
built from the c40.model registry, has < 200,000 parameters (fixed ones count), so no sampled config can
be over the limit (the trial's rejection stays as a guard for spaces given in code).
"""
from __future__ import annotations

import io
import math

from ray import tune

import _ray_common as rc
from c40.errors import C40Error
from c40.remote import read_bytes

# name -> (low, high, log scale); width's bounds filter the legal widths
RANGES = {"dropout": (0.0, 0.3, False), "lr": (0.05, 1.0, True),
          "weight_decay": (5e-5, 5e-3, True), "label_smoothing": (0.0, 0.2, False),
          "width": (0.5, 4.0, False)}
SEARCHED = tuple(RANGES)
WIDTH_STEP = 0.125  # channels round to 8: finer steps mostly repeat the same model
SEARCHERS = ("random", "optuna")


def legal_widths(arch: str, low: float = 0.5, high: float = 4.0) -> list[float]:
    """Multiples of WIDTH_STEP in [low, high] whose `arch` model is under the parameter limit."""
    from c40.model import count_params, create_model
    from c40.model import PARAM_LIMIT

    first, last = math.ceil(low / WIDTH_STEP - 1e-9), math.floor(high / WIDTH_STEP + 1e-9)
    widths = [i * WIDTH_STEP for i in range(max(first, 1), last + 1)]
    return [w for w in widths if count_params(create_model(arch, width=w)) < PARAM_LIMIT]


def parse_range(text: str) -> tuple[str, float, float]:
    """'NAME=LO:HI' -> (name, lo, hi); ValueError with a one-line reason."""
    name, _, bounds = text.partition("=")
    name = name.replace("-", "_")
    if name not in RANGES or bounds.count(":") != 1:
        raise ValueError(f"--range {text}: expected NAME=LO:HI with NAME one of {', '.join(RANGES)}")
    lo, hi = (float(x) for x in bounds.split(":"))
    if not lo <= hi or (RANGES[name][2] and lo <= 0):
        raise ValueError(f"--range {text}: need LO <= HI (and LO > 0 for {name}: log scale)")
    return name, lo, hi


def create_param_space(arch: str, ranges: dict, fixed: dict) -> dict:
    """The Tune space: every searched field with its (possibly overridden) range, except the
    fixed ones (given as flags), which are constants."""
    space = {}
    for name, (lo, hi, log) in {**RANGES, **ranges}.items():
        if name in fixed:
            space[name] = fixed[name]
        elif name == "width":
            widths = legal_widths(arch, lo, hi)
            if not widths:
                raise C40Error(f"no width in [{lo}, {hi}] keeps arch '{arch}' under 200,000 params")
            space[name] = tune.choice(widths) if len(widths) > 1 else widths[0]
        elif lo == hi:
            space[name] = lo
        else:
            space[name] = tune.loguniform(lo, hi) if log else tune.uniform(lo, hi)
    return space


def create_searcher(kind: str, seed: int, num_samples: int, warm: tuple | None):
    """random (BasicVariantGenerator) or optuna (TPE), seeded; `warm` = (points, rewards)."""
    if kind == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed)  # reproducible samples
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    # TPE models the results after n_startup_trials random ones; Optuna's default of 10 would
    # leave a 16-trial search mostly random
    startup = max(2, min(10, num_samples // 3))
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    points, rewards = warm or (None, None)
    return OptunaSearch(sampler=sampler, points_to_evaluate=points, evaluated_rewards=rewards)


def read_warm_start(location: str, space: dict) -> tuple[list[dict], list[float]]:
    """A previous search's results.parquet (path or URI, or its folder) -> the configs that
    trained and their validation accuracy, restricted to the values the current space holds."""
    import pyarrow.parquet as pq

    if not location.endswith(".parquet"):
        location = f"{location.rstrip('/')}/results.parquet"
    try:
        rows = pq.read_table(io.BytesIO(read_bytes(location))).to_pylist()
    except (OSError, ValueError) as e:  # missing file, not parquet (ArrowInvalid)
        raise C40Error(f"--warm-start {location}: {rc.last_line(e)}") from None
    searched = {k: v for k, v in space.items() if hasattr(v, "sample")}
    points, rewards = [], []
    for r in rows:
        if r.get("status") not in ("ok", "stopped") or r.get("val_acc") is None:
            continue
        point = {k: r.get(k) for k in searched}
        if all(v is not None and _contains(searched[k], v) for k, v in point.items()):
            points.append(point)
            rewards.append(float(r["val_acc"]))
    if not points:
        raise C40Error(f"--warm-start {location}: no trained trial inside the current space")
    return points, rewards


def _contains(domain, value) -> bool:
    if hasattr(domain, "categories"):
        return value in domain.categories
    return domain.lower <= value <= domain.upper
