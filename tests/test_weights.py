"""The released weights in weights/ are what weights/README.md says: each checkpoint's
per-epoch log beside it is the run's own, and each keeps the assignment's rules."""
from __future__ import annotations

import json

import pytest

from c40.checkpoint import load_checkpoint
from conftest import REPO

RELEASED = sorted((REPO / "weights").glob("*.pt"))


def test_every_released_checkpoint_is_listed():
    assert len(RELEASED) >= 8
    readme = (REPO / "weights" / "README.md").read_text()
    assert [p.name for p in RELEASED if p.name not in readme] == []


@pytest.mark.parametrize("path", RELEASED, ids=lambda p: p.name)
def test_metrics_jsonl_is_the_checkpoints_own_history(path):
    """A checkpoint replaced without its log (or the reverse) makes the README cite a run that
    is not the one released."""
    state = load_checkpoint(path)
    lines = path.with_suffix(".metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == state["history"]
    assert state["history"][-1]["epoch"] == len(state["history"]) and "test_acc" in state["history"][-1]


@pytest.mark.parametrize("path", RELEASED, ids=lambda p: p.name)
def test_released_model_keeps_the_rules(path):
    from c40.checkpoint import load_model
    from c40.receptive import summarize

    model, state = load_model(path)
    s = summarize(model, state["config"]["arch"])
    assert 0 < s["params"] < 200_000 and s["receptive_field"] > 44
    assert s["depthwise_separable"] >= 1 and s["dilated_convs"] >= 1
    assert s["gap"] and not s["max_pool"]
