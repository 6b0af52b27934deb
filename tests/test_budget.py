"""`--time-budget`: a run that follows the clock ends inside its budget with its schedule done.

The clock is faked (every training batch costs a fixed number of seconds, a test a fixed number
per view), so these runs are exact on any host."""
import time

import pytest
import torch

import c40.train
from c40.budget import TimeBudget
from c40.checkpoint import load_checkpoint
from c40.config import TrainConfig
from c40.errors import ConfigError
from c40.optim import one_cycle
from c40.train import fit

BATCH_SECONDS = 1.0   # one 32-px batch; a low-res batch costs its share of the pixels
VIEW_SECONDS = 0.25   # one view of the test set


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clk = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clk)
    real_batch, real_eval = c40.train.train_batch, c40.train.evaluate

    def batch(run, x, y, stats, res):
        clk.now += BATCH_SECONDS * (res / 32) ** 2
        return real_batch(run, x, y, stats, res)

    def evaluate(model, loader, classes, **kw):
        clk.now += VIEW_SECONDS * {"off": 1, "flip": 2, "flip-shift": 6}[kw["tta"]]
        return real_eval(model, loader, classes, **kw)
    monkeypatch.setattr(c40.train, "train_batch", batch)
    monkeypatch.setattr(c40.train, "evaluate", evaluate)
    return clk


def budget_cfg(data, out, **kw):
    # 256 images in batches of 64: a 32-px epoch costs 4 s, a 24-px one 2.25 s
    base = dict(data=str(data), out=str(out), width=0.5, epochs=1000, batch_size=64, subset=256,
                test_subset=200, seed=3, eval_every=5, time_budget=1.0, tta="flip-shift")
    return TrainConfig.from_recipe("best", arch="strided", **{**base, **kw})


def test_a_budgeted_run_ends_inside_its_budget_with_its_schedule_done(tiny_cifar, tmp_path, clock):
    res = fit(budget_cfg(tiny_cifar, tmp_path), progress=False)
    h = res.history
    last = h[-1]
    assert 10 < len(h) < 1000 and last["ended"] and not any(m["ended"] for m in h[:-1])
    assert last["eval_tta"] == "flip-shift" and "test_acc" in last
    assert last["elapsed"] <= 60.0  # the final test included
    assert last["elapsed"] + 4.0 + 2 * VIEW_SECONDS > 60.0  # another epoch would not have fit
    # the recipe as --epochs N would train it for the N that fit: the first 40% of the epochs
    # (the best recipe's low_res_frac) at 24 px, then 32 px
    assert h[-1]["planned"] == len(h) and h[-1]["done"] == 1.0
    res_px = [m["res"] for m in h]
    n_low = res_px.count(24)
    assert res_px == [24] * n_low + [32] * (len(h) - n_low) and n_low == int(0.4 * len(h))
    # the one-cycle shape over the planned epochs: warm-up to the peak, then down to its floor
    # as the last epoch ends (the plan showed it to be the last as it started)
    lrs = [m["lr"] for m in h]  # each epoch's first
    peak = max(lrs)
    assert lrs.index(peak) not in (0, len(lrs) - 1)
    final_lr = load_checkpoint(tmp_path / "checkpoint.pt")["optimizer"]["param_groups"][0]["lr"]
    assert final_lr < 0.001 * peak < lrs[-1]
    assert res.epochs == len(h) and res.accuracy == last["test_acc"]


def test_epochs_end_a_budgeted_run_first_when_they_are_fewer(tiny_cifar, tmp_path, clock):
    res = fit(budget_cfg(tiny_cifar, tmp_path, epochs=6, time_budget=30.0), progress=False)
    h = res.history
    assert len(h) == 6 and h[-1]["elapsed"] < 60 and h[-1]["ended"]
    assert [m["res"] for m in h] == [24, 24, 32, 32, 32, 32]  # int(0.4 x 6) at low res
    assert h[-1]["done"] == 1.0  # the schedule followed the steps


def test_a_resumed_budget_run_continues_the_clock_and_an_ended_one_trains_no_more(tiny_cifar, tmp_path,
                                                                                  clock):
    class Stop(Exception):
        pass

    def stop_at_5(metrics, ckpt):
        if metrics["epoch"] == 5:
            clock.now += 1e6  # time between the processes does not count
            raise Stop

    with pytest.raises(Stop):
        fit(budget_cfg(tiny_cifar, tmp_path), report=stop_at_5, progress=False)
    res = fit(budget_cfg(tiny_cifar, tmp_path, resume=True), progress=False)
    assert res.history[-1]["ended"] and res.history[-1]["elapsed"] <= 60.0
    assert len(res.history) > 10
    again = fit(budget_cfg(tiny_cifar, tmp_path, resume=True), progress=False)
    assert again.history == res.history and again.accuracy == res.accuracy
    with pytest.raises(ConfigError, match="time_budget=1.0 but this run asks for 2.0"):
        fit(budget_cfg(tiny_cifar, tmp_path, resume=True, time_budget=2.0), progress=False)


def test_a_budget_is_refused_across_processes(tiny_cifar, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    with pytest.raises(ConfigError, match="--time-budget trains in one process"):
        fit(budget_cfg(tiny_cifar, tmp_path), progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_the_plan_fits_the_epochs_left_to_the_seconds_left(clock):
    b = TimeBudget(seconds=100.0, epochs=1000, test_share=0.2, final_views=6)
    b.start(clock.now)
    assert b.plan(0, 1000, (24, 0.4), 32, 5, 2) == 1000  # nothing timed yet: the plan stands
    clock.now += 10.0
    b.epoch_done(32, 4.0)
    # no test timed yet: a view of the test set is guessed at 0.2 x 0.5 of the last epoch
    assert b.test_seconds(6) == pytest.approx(6 * 4.0 * 0.2 * 0.5)
    b.test_done(2, 1.0)
    assert b.test_seconds(6) == 3.0  # 87 s left for epochs 2.. and their tests
    assert b.plan(1, 1000, (24, 0.0), 32, 0, 2) == 22      # 21 x 4 s = 84
    assert b.plan(1, 1000, (24, 0.0), 32, 5, 2) == 21      # 20 x 4 + 4 tests of 1 s = 84
    # a size not timed yet is priced by pixel count: 24 px costs 4 x (24/32)^2 = 2.25 s;
    # 28 epochs: 13 more at 24 px (int(0.5 x 28) - 1) and 14 at 32: 29.25 + 56 = 85.25
    assert b.plan(1, 1000, (24, 0.5), 32, 0, 2) == 28 == b.epochs
    assert b.plan(1, 25, (24, 0.5), 32, 0, 2) == 25        # the cap
    clock.now = b.origin + 98.0
    assert b.plan(1, 1000, (24, 0.0), 32, 0, 2) == 2       # at least the epoch that starts
    assert not b.room_for_epoch(32, test_views=0)          # 98 + 4 + 3 > 100
    clock.now = b.origin + 93.0
    assert b.room_for_epoch(32, test_views=0)              # 93 + 4 + 3 = 100
    assert not b.room_for_epoch(32, test_views=2)          # + a progress test of 1 s
    b.epoch_done(32, 12.0)  # a slow epoch: the median of the recent ones prices the next
    b.epoch_done(32, 4.0)
    assert b.epoch_cost(32) == 4.0 and b.epoch_cost(24) == 2.25
    for _ in range(5):
        b.epoch_done(32, 6.0)
    assert b.epoch_seconds[32] == [6.0] * 5  # the last five only


@pytest.mark.parametrize("warmup", [0.0, 0.2, 0.3])
def test_the_clock_schedule_has_onecycles_shape(warmup):
    """The budget's schedule, read at each step's fraction of the run, is OneCycleLR's linear
    one-cycle (within one step of it)."""
    steps = 200
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    ref = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1.0, total_steps=steps, pct_start=warmup, anneal_strategy="linear",
        div_factor=25.0, final_div_factor=1e3, cycle_momentum=False) if warmup else None
    got, want = [], []
    for step in range(steps):
        got.append(one_cycle(step / steps, warmup))
        if ref is not None:
            want.append(opt.param_groups[0]["lr"])
            opt.step()
            ref.step()
    if ref is not None:
        assert max(abs(a - b) for a, b in zip(got, want)) < 2.0 / (steps * min(warmup, 1 - warmup))
    assert got[0] == pytest.approx(1 / 25 if warmup else 1.0) and got[-1] < 0.01
    assert one_cycle(1.0, warmup) == pytest.approx(1 / 25000)
